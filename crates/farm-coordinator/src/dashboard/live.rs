//! What each worker is rendering right now, step by step, as this coordinator's ingester hears
//! it (progress events are not stored in Postgres).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use farm_core::{JobId, TaskRef};

/// Progress older than this is not shown (the task ended or its worker went quiet).
const STALE: Duration = Duration::from_secs(30);

/// One task in a worker's hands.
#[derive(Debug, Clone)]
pub(crate) struct TaskLive {
    pub task: TaskRef,
    pub step: u32,
    pub total_steps: u32,
    pub at: Instant,
    /// Smoothed seconds per denoising step, once two progress reports were seen.
    pub secs_per_step: Option<f64>,
}

#[derive(Default)]
pub(crate) struct Live {
    workers: Mutex<HashMap<String, Vec<TaskLive>>>,
    /// Jobs cancelled here lately: reports still in flight from their workers are dropped.
    ended: Mutex<HashMap<JobId, Instant>>,
}

impl Live {
    /// Records a progress report. Returns the seconds per step measured since the previous
    /// report of the same task, if there was one with a lower step.
    pub fn progress(
        &self,
        task: TaskRef,
        step: u32,
        total_steps: u32,
        worker: &str,
    ) -> Option<f64> {
        let now = Instant::now();
        if let Ok(ended) = self.ended.lock() {
            if ended
                .get(&task.job)
                .is_some_and(|at| now.duration_since(*at) < STALE)
            {
                return None;
            }
        }
        let Ok(mut workers) = self.workers.lock() else {
            return None;
        };
        if workers.len() > 10_000 {
            workers.clear();
        }
        // A task lives with one worker; drop it from any other (it was retried elsewhere).
        for (name, tasks) in workers.iter_mut() {
            if name != worker {
                tasks.retain(|t| t.task != task);
            }
        }
        let tasks = workers.entry(worker.to_string()).or_default();
        tasks.retain(|t| now.duration_since(t.at) < STALE);
        match tasks.iter_mut().find(|t| t.task == task) {
            Some(t) => {
                let measured = (step > t.step)
                    .then(|| now.duration_since(t.at).as_secs_f64() / f64::from(step - t.step));
                if let Some(m) = measured {
                    t.secs_per_step = Some(match t.secs_per_step {
                        Some(prev) => 0.7 * prev + 0.3 * m,
                        None => m,
                    });
                }
                t.step = step;
                t.total_steps = total_steps;
                t.at = now;
                measured
            }
            None => {
                tasks.push(TaskLive {
                    task,
                    step,
                    total_steps,
                    at: now,
                    secs_per_step: None,
                });
                None
            }
        }
    }

    /// A task changed state: whatever it was doing is over (a new attempt reports afresh).
    pub fn changed(&self, task: TaskRef) {
        if let Ok(mut workers) = self.workers.lock() {
            for tasks in workers.values_mut() {
                tasks.retain(|t| t.task != task);
            }
            workers.retain(|_, tasks| !tasks.is_empty());
        }
    }

    /// The job was cancelled: forget its tasks, and ignore their last reports.
    pub fn job_ended(&self, job: JobId) {
        let now = Instant::now();
        if let Ok(mut ended) = self.ended.lock() {
            ended.retain(|_, at| now.duration_since(*at) < STALE);
            ended.insert(job, now);
        }
        if let Ok(mut workers) = self.workers.lock() {
            for tasks in workers.values_mut() {
                tasks.retain(|t| t.task.job != job);
            }
        }
    }

    /// The recent progress of `worker`'s tasks.
    pub fn of(&self, worker: &str) -> Vec<TaskLive> {
        let now = Instant::now();
        self.workers
            .lock()
            .ok()
            .and_then(|w| w.get(worker).cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| now.duration_since(t.at) < t.fresh_for())
            .collect()
    }
}

impl TaskLive {
    /// A running task reports every step (or every 250 ms); silence longer than this means
    /// it ended (e.g. cancelled after its last report).
    fn fresh_for(&self) -> Duration {
        Duration::from_secs_f64((3.0 * self.secs_per_step.unwrap_or(0.0)).clamp(5.0, 600.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_seconds_per_step_and_forgets_changed_tasks() {
        let live = Live::default();
        let task = TaskRef {
            job: JobId::new(),
            index: 3,
        };
        assert_eq!(live.progress(task, 1, 10, "w1"), None);
        std::thread::sleep(Duration::from_millis(20));
        let per_step = live.progress(task, 3, 10, "w1").expect("a measurement");
        assert!(per_step > 0.005 && per_step < 1.0, "{per_step}");
        let now = live.of("w1");
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].step, 3);
        assert!(now[0].secs_per_step.is_some());
        // Retried on another worker: it moves.
        live.progress(task, 1, 10, "w2");
        assert!(live.of("w1").is_empty());
        live.changed(task);
        assert!(live.of("w2").is_empty());
        live.job_ended(task.job);
        live.progress(task, 4, 10, "w2");
        assert!(live.of("w2").is_empty());
    }
}
