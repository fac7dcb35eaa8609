//! Prometheus metrics. Gauges (tasks by state, queue depth, workers) are read from Postgres and
//! Redis at each scrape, so every coordinator reports the same farm-wide values; counters and
//! histograms (durations, bytes, retries, dead letters, webhooks) count what this
//! coordinator's loops saw, so sum them over coordinators.

use farm_queue::Event;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::store::{Claimed, Reaped};
use crate::Shared;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("postgres: {0}")]
    Store(#[from] crate::store::StoreError),
}

pub(crate) struct Metrics {
    registry: Registry,
    tasks: IntGaugeVec,
    queue_depth: IntGaugeVec,
    stream_length: IntGaugeVec,
    workers_online: IntGauge,
    worker_slots: IntGauge,
    model_loads: IntGaugeVec,
    oldest_pending: Gauge,
    task_seconds: Histogram,
    render_seconds: Histogram,
    step_seconds: Histogram,
    model_load_seconds: Histogram,
    upload_seconds: Histogram,
    upload_bytes: IntCounter,
    task_failures: IntCounterVec,
    retries: IntCounter,
    leases_expired: IntCounterVec,
    dead_letters: IntCounterVec,
    events_applied: IntCounter,
    webhooks: IntCounterVec,
}

fn buckets(b: &[f64]) -> Vec<f64> {
    b.to_vec()
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let gauge_vec =
            |name: &str, help: &str, label: &str| IntGaugeVec::new(Opts::new(name, help), &[label]);
        let histogram = |name: &str, help: &str, b: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets(b)))
        };
        let durations = [
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ];
        let m = Metrics {
            tasks: gauge_vec("farm_tasks", "Tasks by state.", "state")?,
            queue_depth: gauge_vec(
                "farm_queue_depth",
                "Tasks waiting (pending or queued) per model.",
                "model",
            )?,
            stream_length: gauge_vec("farm_stream_length", "Entries in a Redis stream.", "stream")?,
            workers_online: IntGauge::new(
                "farm_workers_online",
                "Workers with a recent heartbeat.",
            )?,
            worker_slots: IntGauge::new(
                "farm_worker_slots",
                "Concurrent task slots of the online workers.",
            )?,
            model_loads: gauge_vec(
                "farm_worker_model_loads",
                "Models each online worker loaded since it started (reloads after an eviction count again).",
                "worker",
            )?,
            oldest_pending: Gauge::new(
                "farm_oldest_pending_seconds",
                "Age of the oldest pending task (0 when none waits).",
            )?,
            task_seconds: histogram(
                "farm_task_duration_seconds",
                "Worker time of a succeeded task: model load, render and upload.",
                &durations,
            )?,
            render_seconds: histogram(
                "farm_task_render_seconds",
                "Render time of a succeeded task.",
                &durations,
            )?,
            step_seconds: histogram(
                "farm_step_duration_seconds",
                "Seconds per denoising step, from workers' progress reports.",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )?,
            model_load_seconds: histogram(
                "farm_model_load_seconds",
                "Time a worker spent loading a model for a task (cache misses only).",
                &durations,
            )?,
            upload_seconds: histogram(
                "farm_upload_duration_seconds",
                "Time to upload a finished image.",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )?,
            upload_bytes: IntCounter::new(
                "farm_upload_bytes_total",
                "Bytes of images uploaded by workers.",
            )?,
            task_failures: IntCounterVec::new(
                Opts::new(
                    "farm_task_failures_total",
                    "Failed task attempts reported by workers.",
                ),
                &["retryable"],
            )?,
            retries: IntCounter::new(
                "farm_task_retries_total",
                "Dispatches of a task beyond its first attempt.",
            )?,
            leases_expired: IntCounterVec::new(
                Opts::new(
                    "farm_leases_expired_total",
                    "Tasks whose lease expired, by what became of them.",
                ),
                &["outcome"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "farm_dead_letters_total",
                    "Dead letters: undecodable events, and tasks failed for good by the reaper.",
                ),
                &["kind"],
            )?,
            events_applied: IntCounter::new(
                "farm_events_applied_total",
                "Worker events applied to Postgres.",
            )?,
            webhooks: IntCounterVec::new(
                Opts::new(
                    "farm_webhook_deliveries_total",
                    "Webhook delivery attempts by outcome.",
                ),
                &["outcome"],
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.tasks.clone()))?;
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.stream_length.clone()))?;
        r.register(Box::new(m.workers_online.clone()))?;
        r.register(Box::new(m.worker_slots.clone()))?;
        r.register(Box::new(m.model_loads.clone()))?;
        r.register(Box::new(m.oldest_pending.clone()))?;
        r.register(Box::new(m.task_seconds.clone()))?;
        r.register(Box::new(m.render_seconds.clone()))?;
        r.register(Box::new(m.step_seconds.clone()))?;
        r.register(Box::new(m.model_load_seconds.clone()))?;
        r.register(Box::new(m.upload_seconds.clone()))?;
        r.register(Box::new(m.upload_bytes.clone()))?;
        r.register(Box::new(m.task_failures.clone()))?;
        r.register(Box::new(m.retries.clone()))?;
        r.register(Box::new(m.leases_expired.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        r.register(Box::new(m.events_applied.clone()))?;
        r.register(Box::new(m.webhooks.clone()))?;
        // Labelled counters show at zero before anything happened.
        for v in ["true", "false"] {
            m.task_failures.with_label_values(&[v]);
        }
        for v in ["requeued", "failed"] {
            m.leases_expired.with_label_values(&[v]);
        }
        for v in ["event", "task"] {
            m.dead_letters.with_label_values(&[v]);
        }
        for v in ["delivered", "retry", "failed"] {
            m.webhooks.with_label_values(&[v]);
        }
        Ok(m)
    }

    /// Worker events the ingester applied.
    pub fn observe_events(&self, events: &[Event]) {
        for event in events {
            match event {
                Event::Succeeded {
                    size_bytes,
                    timings,
                    ..
                } => {
                    let s = |ms: u64| ms as f64 / 1000.0;
                    self.task_seconds
                        .observe(s(timings.load_ms + timings.render_ms + timings.upload_ms));
                    self.render_seconds.observe(s(timings.render_ms));
                    if timings.load_ms > 0 {
                        self.model_load_seconds.observe(s(timings.load_ms));
                    }
                    self.upload_seconds.observe(s(timings.upload_ms));
                    self.upload_bytes.inc_by(*size_bytes);
                }
                Event::Failed { retryable, .. } => self
                    .task_failures
                    .with_label_values(&[if *retryable { "true" } else { "false" }])
                    .inc(),
                _ => {}
            }
        }
        self.events_applied.inc_by(events.len() as u64);
    }

    /// Tasks the dispatcher handed out.
    pub fn dispatched(&self, claimed: &[Claimed]) {
        let retries = claimed.iter().filter(|c| c.attempt.0 > 1).count();
        self.retries.inc_by(retries as u64);
    }

    /// Tasks the reaper took back.
    pub fn reaped(&self, reaped: &[Reaped]) {
        for r in reaped {
            if r.status == farm_core::TaskStatus::Failed {
                self.leases_expired.with_label_values(&["failed"]).inc();
                self.dead_letters.with_label_values(&["task"]).inc();
            } else {
                self.leases_expired.with_label_values(&["requeued"]).inc();
            }
        }
    }

    /// An undecodable event went to the dead-letter stream.
    pub fn dead_letter_event(&self) {
        self.dead_letters.with_label_values(&["event"]).inc();
    }

    pub fn observe_step(&self, secs: f64) {
        self.step_seconds.observe(secs);
    }

    /// `outcome`: delivered, retry or failed.
    pub fn webhook(&self, outcome: &str) {
        self.webhooks.with_label_values(&[outcome]).inc();
    }

    /// Refreshes the gauges from Postgres and Redis and renders everything in the text format.
    pub async fn render(&self, shared: &Shared) -> Result<String, MetricsError> {
        let store = &shared.store;
        let counts = store.task_counts().await?;
        for (state, n) in [
            ("pending", counts.pending),
            ("queued", counts.queued),
            ("running", counts.running),
            ("succeeded", counts.succeeded),
            ("failed", counts.failed),
            ("cancelled", counts.cancelled),
        ] {
            self.tasks.with_label_values(&[state]).set(n as i64);
        }
        self.oldest_pending.set(
            counts
                .oldest_pending
                .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
        let models = store.queue_by_model(None).await?;
        let workers = store.workers().await?;
        let online: Vec<_> = workers.iter().filter(|w| w.online).collect();
        self.queue_depth.reset();
        // Models an online worker can load show as 0 rather than vanish when idle.
        for w in &online {
            for model in &w.info.available {
                self.queue_depth.with_label_values(&[model.as_str()]).set(0);
            }
        }
        for m in &models {
            self.queue_depth
                .with_label_values(&[m.model.as_str()])
                .set((m.pending + m.queued) as i64);
        }
        self.workers_online.set(online.len() as i64);
        self.worker_slots
            .set(online.iter().map(|w| i64::from(w.info.concurrency)).sum());
        let ids: Vec<farm_core::WorkerId> = online.iter().map(|w| w.info.worker.clone()).collect();
        self.model_loads.reset();
        for w in &online {
            self.model_loads
                .with_label_values(&[w.info.worker.0.as_str()])
                .set(w.info.cache.loads as i64);
        }
        match shared.queue.dispatch_backlog(&ids).await {
            Ok(n) => self
                .stream_length
                .with_label_values(&["dispatch"])
                .set(n as i64),
            Err(e) => tracing::debug!(error = %e, "tasks stream length unknown"),
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_core::{Attempt, JobId, TaskRef, WorkerId};
    use farm_queue::Timings;

    #[test]
    fn events_feed_the_histograms_and_counters() {
        let m = Metrics::new().expect("metrics");
        let task = TaskRef {
            job: JobId::new(),
            index: 0,
        };
        m.observe_events(&[
            Event::Succeeded {
                task,
                attempt: Attempt(1),
                worker: WorkerId("w".into()),
                object_key: "k".into(),
                sha256: "s".into(),
                size_bytes: 1234,
                timings: Timings {
                    load_ms: 1500,
                    render_ms: 2000,
                    upload_ms: 30,
                },
            },
            Event::Failed {
                task,
                attempt: Attempt(2),
                worker: WorkerId("w".into()),
                error: "boom".into(),
                retryable: true,
            },
        ]);
        m.observe_step(0.02);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .expect("encode");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("farm_upload_bytes_total 1234"), "{text}");
        assert!(text.contains("farm_model_load_seconds_count 1"), "{text}");
        assert!(
            text.contains("farm_step_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("farm_task_failures_total{retryable=\"true\"} 1"),
            "{text}"
        );
        assert!(text.contains("farm_events_applied_total 2"), "{text}");
        assert!(
            text.contains("farm_dead_letters_total{kind=\"event\"} 0"),
            "{text}"
        );
    }
}
