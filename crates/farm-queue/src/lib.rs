//! The Redis Streams protocol that the coordinator and the workers speak.
//!
//! Keys (all under one prefix, `farm` by default, so tests and farms can share a server; the
//! prefix is written in braces, a Redis Cluster hash tag, so all of a farm's keys share a slot):
//! - `{prefix}:tasks:{worker}`: one dispatch stream per worker. The coordinator places each
//!   task on a worker (model affinity, capabilities, a bounded prefetch) and `XADD`s one
//!   [`TaskSpec`] per attempt to that worker's stream; the worker reads it in the consumer
//!   group `workers` and `XACK`s + `XDEL`s when done. Work not yet placed waits in Postgres.
//! - `{prefix}:events`: the event stream. Workers `XADD` [`Event`]s; coordinators read it in the
//!   consumer group `coordinators` and `XACK` after the event is applied in Postgres.
//! - `{prefix}:dead`: messages no one could decode, kept for a human.
//! - `{prefix}:cancel:{job}`: present while a job is cancelled; workers check it between steps.
//!
//! Every message is one field `m` holding JSON. Redis is a conveyor, not a store: losing
//! everything here loses no work, because Postgres leases bring every task back.

use std::time::Duration;

use farm_core::{Attempt, Capabilities, JobId, TaskRef, TaskSpec, WorkerId};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use serde::{Deserialize, Serialize};

pub const WORKERS_GROUP: &str = "workers";
pub const COORDINATORS_GROUP: &str = "coordinators";
const FIELD: &str = "m";
/// How long a cancel mark lives: longer than any task should run.
const CANCEL_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A message that could not be decoded; it goes to the dead-letter stream.
#[derive(Debug, Clone, thiserror::Error)]
#[error("undecodable message {id}: {reason}")]
pub struct DecodeError {
    pub id: String,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// How long each phase of a task took, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub load_ms: u64,
    pub render_ms: u64,
    pub upload_ms: u64,
}

/// What a worker says about itself every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker: WorkerId,
    pub hostname: String,
    pub device: String,
    pub concurrency: u32,
    /// Models loaded now.
    pub models: Vec<String>,
    /// Model folders it could load (its models root).
    #[serde(default)]
    pub available: Vec<String>,
    /// The tasks it is rendering now; their leases are extended.
    pub running: Vec<(TaskRef, Attempt)>,
    pub tasks_done: u64,
    pub tasks_failed: u64,
    /// Tasks it renders together in one batch, at most (`--max-batch`).
    #[serde(default = "one")]
    pub max_batch: u32,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub cache: CacheState,
    /// It got SIGTERM: it takes nothing new, and gives back its unstarted tasks.
    #[serde(default)]
    pub draining: bool,
    /// Render calls made since it started; with `tasks_done` it shows how well batches fill.
    #[serde(default)]
    pub batches: u64,
}

fn one() -> u32 {
    1
}

/// A worker's model cache: what it holds, its room, and how often it loaded a model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheState {
    /// `--model-cache-bytes`; `None`: no limit.
    pub capacity: Option<u64>,
    /// Bytes of the models loaded now.
    pub used: u64,
    /// Each loaded model (its key, see `farm_core::model_key`) and its size in bytes.
    pub models: Vec<(String, u64)>,
    /// Models loaded since the worker started (a reload after an eviction counts again).
    pub loads: u64,
    /// Models evicted to make room.
    pub evictions: u64,
}

/// Worker → coordinator. Every task event names its attempt (fencing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Started {
        task: TaskRef,
        attempt: Attempt,
        worker: WorkerId,
    },
    Progress {
        task: TaskRef,
        attempt: Attempt,
        worker: WorkerId,
        step: u32,
        total_steps: u32,
        /// finetune: the step's training loss.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f32>,
    },
    Succeeded {
        task: TaskRef,
        attempt: Attempt,
        worker: WorkerId,
        object_key: String,
        sha256: String,
        size_bytes: u64,
        timings: Timings,
    },
    Failed {
        task: TaskRef,
        attempt: Attempt,
        worker: WorkerId,
        error: String,
        /// False when trying again cannot help (e.g. the model does not exist).
        retryable: bool,
    },
    Heartbeat(WorkerInfo),
    /// A draining worker gives back a task it was handed but never started: the task goes
    /// back to `pending` at once, and this attempt number is used again (no attempt spent).
    Released {
        task: TaskRef,
        attempt: Attempt,
        worker: WorkerId,
    },
}

/// One stream entry as delivered to a consumer.
#[derive(Debug)]
pub struct Delivery<T> {
    pub id: String,
    pub message: Result<T, DecodeError>,
}

/// The stream keys of one farm.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// `{prefix}`, braces included: a Redis Cluster hash tag, so every key of one farm lives
    /// in the same slot (streams and their companion keys can be used together).
    fn tag(&self) -> String {
        format!("{{{}}}", self.prefix)
    }
    /// The dispatch stream of one worker.
    pub fn worker_tasks(&self, worker: &WorkerId) -> String {
        format!("{}:tasks:{}", self.tag(), worker.0)
    }
    pub fn events(&self) -> String {
        format!("{}:events", self.tag())
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.tag())
    }
    pub fn cancel(&self, job: JobId) -> String {
        format!("{}:cancel:{job}", self.tag())
    }
}

/// A connection to the farm's Redis, with a second connection for blocking reads (a blocking
/// `XREADGROUP` would otherwise hold up every other command on a multiplexed connection).
#[derive(Clone)]
pub struct Queue {
    url: String,
    keys: Keys,
    conn: ConnectionManager,
    blocking: ConnectionManager,
}

impl Queue {
    /// Connects (failing fast when Redis is down) and creates the consumer groups.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, QueueError> {
        Self::connect_with_ca(url, prefix, None).await
    }

    /// [`Queue::connect`]; for a `rediss://` URL, `ca_pem` (a PEM CA certificate) replaces the
    /// system's trust store.
    pub async fn connect_with_ca(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, QueueError> {
        let err = |source| QueueError::Redis {
            url: farm_core::redact_url(url),
            source,
        };
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            None => redis::Client::open(url),
        }
        .map_err(err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2)
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(err)?;
        let blocking = ConnectionManager::new_with_config(
            client,
            config.set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(err)?;
        let queue = Queue {
            url: farm_core::redact_url(url),
            keys: Keys::new(prefix),
            conn,
            blocking,
        };
        queue.ensure_groups().await?;
        Ok(queue)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, source: redis::RedisError) -> QueueError {
        QueueError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// Creates both streams and their consumer groups if missing (after a Redis restart too).
    pub async fn ensure_groups(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let created: Result<(), _> = conn
            .xgroup_create_mkstream(self.keys.events(), COORDINATORS_GROUP, "0")
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Creates a worker's dispatch stream and its group if missing. The group starts at the
    /// beginning, so messages dispatched before the worker got here are read too.
    pub async fn ensure_worker_stream(&self, worker: &WorkerId) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let created: Result<(), _> = conn
            .xgroup_create_mkstream(self.keys.worker_tasks(worker), WORKERS_GROUP, "0")
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Hands each task to its worker: one `XADD` to that worker's stream each, pipelined.
    /// Returns the stream ids, in order.
    pub async fn dispatch(
        &self,
        tasks: &[(&WorkerId, &TaskSpec)],
    ) -> Result<Vec<String>, QueueError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (worker, task) in tasks {
            let payload = serde_json::to_vec(task)?;
            pipe.xadd(self.keys.worker_tasks(worker), "*", &[(FIELD, payload)]);
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(|e| self.err(e))
    }

    /// Up to `count` tasks of `worker`'s stream that were handed to it before and never
    /// acknowledged: what a worker restarted under the same id (a pod's name) held.
    pub async fn pending_tasks(
        &self,
        worker: &WorkerId,
        count: usize,
    ) -> Result<Vec<Delivery<TaskSpec>>, QueueError> {
        self.read_group(
            &self.keys.worker_tasks(worker),
            WORKERS_GROUP,
            &worker.0,
            "0",
            count,
            Duration::ZERO,
        )
        .await
    }

    /// Reads up to `count` new tasks from `worker`'s own stream, waiting up to `block` for
    /// the first.
    pub async fn read_tasks(
        &self,
        worker: &WorkerId,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery<TaskSpec>>, QueueError> {
        self.read_group(
            &self.keys.worker_tasks(worker),
            WORKERS_GROUP,
            &worker.0,
            ">",
            count,
            block,
        )
        .await
    }

    /// Reads up to `count` events for coordinator `consumer`. `pending` re-reads the entries
    /// this consumer was handed before but never acknowledged (after a restart).
    pub async fn read_events(
        &self,
        consumer: &str,
        count: usize,
        block: Duration,
        pending: bool,
    ) -> Result<Vec<Delivery<Event>>, QueueError> {
        let from = if pending { "0" } else { ">" };
        self.read_group(
            &self.keys.events(),
            COORDINATORS_GROUP,
            consumer,
            from,
            count,
            block,
        )
        .await
    }

    async fn read_group<T: for<'de> Deserialize<'de>>(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        from: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery<T>>, QueueError> {
        let mut opts = StreamReadOptions::default()
            .group(group, consumer)
            .count(count);
        if from == ">" && !block.is_zero() {
            opts = opts.block(block.as_millis() as usize);
        }
        let mut conn = self.blocking.clone();
        let reply: Result<Option<StreamReadReply>, _> =
            conn.xread_options(&[stream], &[from], &opts).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // First read, or Redis lost its data (restart without persistence): create
                // the group and carry on.
                if group == WORKERS_GROUP {
                    self.ensure_worker_stream(&WorkerId(consumer.to_string()))
                        .await?;
                } else {
                    tracing::warn!(stream, "consumer group missing; recreating it");
                    self.ensure_groups().await?;
                }
                return Ok(Vec::new());
            }
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let message = decode(&entry.id, entry.map.get(FIELD));
                out.push(Delivery {
                    id: entry.id,
                    message,
                });
            }
        }
        Ok(out)
    }

    /// Acknowledges and deletes handled messages of `worker`'s stream.
    pub async fn ack_tasks(&self, worker: &WorkerId, ids: &[String]) -> Result<(), QueueError> {
        self.ack(&self.keys.worker_tasks(worker), WORKERS_GROUP, ids)
            .await
    }

    pub async fn ack_events(&self, ids: &[String]) -> Result<(), QueueError> {
        self.ack(&self.keys.events(), COORDINATORS_GROUP, ids).await
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.xack(stream, group, ids)
            .ignore()
            .xdel(stream, ids)
            .ignore();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }

    /// Removes dispatch messages of attempts that were superseded (their lease expired, or
    /// their worker went away), so no worker starts them late. A worker that already has one
    /// is fenced by its attempt.
    pub async fn retract_tasks(&self, messages: &[(WorkerId, String)]) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for (worker, id) in messages {
            let stream = self.keys.worker_tasks(worker);
            pipe.xack(&stream, WORKERS_GROUP, &[id])
                .ignore()
                .xdel(&stream, &[id])
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }

    /// Deletes a departed worker's stream (after its tasks were requeued).
    pub async fn drop_worker_stream(&self, worker: &WorkerId) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.keys.worker_tasks(worker))
            .await
            .map_err(|e| self.err(e))
    }

    /// Moves an undecodable message to the dead-letter stream and acknowledges it.
    /// `worker`: the message came from that worker's dispatch stream; `None`: from the event
    /// stream.
    pub async fn dead_letter(
        &self,
        worker: Option<&WorkerId>,
        bad: &DecodeError,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let source = match worker {
            Some(w) => self.keys.worker_tasks(w),
            None => self.keys.events(),
        };
        let _: String = conn
            .xadd(
                self.keys.dead(),
                "*",
                &[
                    ("source", source.as_bytes().to_vec()),
                    ("id", bad.id.as_bytes().to_vec()),
                    ("reason", bad.reason.as_bytes().to_vec()),
                    ("raw", bad.raw.clone()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let ids = [bad.id.clone()];
        match worker {
            Some(w) => self.ack_tasks(w, &ids).await,
            None => self.ack_events(&ids).await,
        }
    }

    /// Publishes several events in one round trip (pipelined `XADD`s, in order).
    pub async fn publish_all(&self, events: &[Event]) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.xadd(
                self.keys.events(),
                "*",
                &[(FIELD, serde_json::to_vec(event)?)],
            )
            .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }

    pub async fn publish(&self, event: &Event) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(event)?;
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(self.keys.events(), "*", &[(FIELD, payload)])
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn mark_cancelled(&self, job: JobId) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.set_ex::<_, _, ()>(self.keys.cancel(job), 1, CANCEL_TTL_SECS)
            .await
            .map_err(|e| self.err(e))
    }

    pub async fn is_cancelled(&self, job: JobId) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        conn.exists(self.keys.cancel(job))
            .await
            .map_err(|e| self.err(e))
    }

    /// Entries in these workers' dispatch streams (handed out or not yet read).
    pub async fn dispatch_backlog(&self, workers: &[WorkerId]) -> Result<u64, QueueError> {
        if workers.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for w in workers {
            pipe.xlen(self.keys.worker_tasks(w));
        }
        let lens: Vec<u64> = pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        Ok(lens.iter().sum())
    }

    /// The Redis server's `run_id` (new at every restart) and its uptime in seconds.
    pub async fn server_identity(&self) -> Result<(String, u64), QueueError> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .map(String::from)
        };
        let run_id = field("run_id").unwrap_or_default();
        let uptime = field("uptime_in_seconds")
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        Ok((run_id, uptime))
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

fn decode<T: for<'de> Deserialize<'de>>(id: &str, value: Option<&Value>) -> Result<T, DecodeError> {
    let bad = |reason: String, raw: Vec<u8>| DecodeError {
        id: id.to_string(),
        reason,
        raw,
    };
    let raw = match value {
        Some(Value::BulkString(bytes)) => bytes.clone(),
        Some(Value::SimpleString(s)) => s.clone().into_bytes(),
        Some(other) => return Err(bad(format!("field {FIELD} is {other:?}"), Vec::new())),
        None => return Err(bad(format!("no field {FIELD}"), Vec::new())),
    };
    serde_json::from_slice(&raw).map_err(|e| bad(e.to_string(), raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_core::{Mode, SchedulerName};
    use proptest::prelude::*;

    proptest! {
        /// Whatever lands in a stream, decoding answers with a message or an error, never a
        /// panic.
        #[test]
        fn decoding_arbitrary_payloads_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512), text in ".{0,200}") {
            let _ = decode::<TaskSpec>("1-0", Some(&Value::BulkString(raw.clone())));
            let _ = decode::<Event>("1-0", Some(&Value::BulkString(raw)));
            let _ = decode::<Event>("1-0", Some(&Value::SimpleString(text.clone())));
            let _ = decode::<TaskSpec>("1-0", Some(&Value::Int(3)));
            let _ = decode::<TaskSpec>("1-0", None);
            // Valid JSON of the wrong shape is refused too.
            let json = serde_json::json!({"type": "started", "task": text});
            prop_assert!(decode::<Event>("1-0", Some(&Value::BulkString(json.to_string().into_bytes()))).is_err());
        }
    }

    fn redis_url() -> String {
        std::env::var("FARM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn spec(index: u32) -> TaskSpec {
        let job = JobId::new();
        TaskSpec {
            task: TaskRef { job, index },
            attempt: Attempt(1),
            mode: Mode::Txt2Img,
            model: "tiny".into(),
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 7,
            width: 64,
            height: 64,
            steps: 2,
            guidance_scale: 7.5,
            scheduler: SchedulerName::Pndm,
            object_key: farm_core::object_key("t", job, index, 7),
            strength: 0.8,
            vae: None,
            init_image: None,
            mask: None,
            train: None,
        }
    }

    #[test]
    fn every_key_of_a_farm_carries_the_same_hash_tag() {
        let keys = Keys::new("farm");
        let job = JobId::new();
        let worker = WorkerId("gpu-1".into());
        for key in [
            keys.worker_tasks(&worker),
            keys.events(),
            keys.dead(),
            keys.cancel(job),
        ] {
            assert!(key.starts_with("{farm}:"), "{key}");
        }
    }

    #[tokio::test]
    async fn tasks_and_events_round_trip_and_garbage_is_dead_lettered() {
        let prefix = format!("test-queue-{}", uuid::Uuid::new_v4());
        let queue = Queue::connect(&redis_url(), &prefix).await.expect("redis");
        let worker = WorkerId("w1".into());
        let other = WorkerId("w2".into());
        let sent = vec![spec(0), spec(1)];
        let elsewhere = spec(2);
        // The first read creates the group; messages sent before it are still read.
        queue
            .dispatch(&[
                (&worker, &sent[0]),
                (&other, &elsewhere),
                (&worker, &sent[1]),
            ])
            .await
            .expect("dispatch");
        assert_eq!(
            queue
                .dispatch_backlog(&[worker.clone(), other.clone()])
                .await
                .expect("xlen"),
            3
        );

        // Garbage in the dispatch stream must not stop the reader.
        let mut conn = queue.conn.clone();
        let _: String = conn
            .xadd(
                queue.keys.worker_tasks(&worker),
                "*",
                &[(FIELD, b"{not json".to_vec())],
            )
            .await
            .expect("xadd");

        let mut got = Vec::new();
        for _ in 0..2 {
            got.extend(
                queue
                    .read_tasks(&worker, 10, Duration::from_millis(100))
                    .await
                    .expect("read"),
            );
        }
        // Only this worker's messages.
        assert_eq!(got.len(), 3);
        let decoded: Vec<_> = got
            .iter()
            .filter_map(|d| d.message.as_ref().ok())
            .cloned()
            .collect();
        assert_eq!(decoded, sent);
        let bad = got[2].message.as_ref().expect_err("garbage");
        queue
            .dead_letter(Some(&worker), bad)
            .await
            .expect("dead letter");
        let dead: u64 = conn.xlen(queue.keys.dead()).await.expect("xlen");
        assert_eq!(dead, 1);
        // Handled and retracted messages leave the streams.
        queue
            .ack_tasks(&worker, &[got[0].id.clone()])
            .await
            .expect("ack");
        queue
            .retract_tasks(&[(worker.clone(), got[1].id.clone())])
            .await
            .expect("retract");
        assert_eq!(
            queue
                .dispatch_backlog(std::slice::from_ref(&worker))
                .await
                .expect("xlen"),
            0
        );
        queue.drop_worker_stream(&other).await.expect("drop");
        assert_eq!(
            queue
                .dispatch_backlog(std::slice::from_ref(&other))
                .await
                .expect("xlen"),
            0
        );

        let event = Event::Started {
            task: sent[0].task,
            attempt: Attempt(1),
            worker: worker.clone(),
        };
        queue.publish(&event).await.expect("publish");
        let events = queue
            .read_events("c1", 10, Duration::from_millis(100), false)
            .await
            .expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message.as_ref().ok(), Some(&event));
        // Unacknowledged events come back to the same consumer after a restart.
        let again = queue
            .read_events("c1", 10, Duration::ZERO, true)
            .await
            .expect("pending");
        assert_eq!(again.len(), 1);
        queue.ack_events(&[again[0].id.clone()]).await.expect("ack");
        let none = queue
            .read_events("c1", 10, Duration::ZERO, true)
            .await
            .expect("pending");
        assert!(none.is_empty());

        assert!(!queue.is_cancelled(sent[0].task.job).await.expect("exists"));
        queue
            .mark_cancelled(sent[0].task.job)
            .await
            .expect("cancel");
        assert!(queue.is_cancelled(sent[0].task.job).await.expect("exists"));

        let _: () = conn
            .del(&[
                queue.keys.worker_tasks(&worker),
                queue.keys.events(),
                queue.keys.dead(),
                queue.keys.cancel(sent[0].task.job),
            ])
            .await
            .expect("cleanup");
    }
}
