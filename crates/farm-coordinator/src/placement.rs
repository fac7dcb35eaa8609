//! Which worker gets which task: model affinity, capability filters and a bounded prefetch.
//!
//! Pure: the dispatcher feeds it the online workers (from heartbeats and Postgres) and the
//! pending tasks in fair-share order, and claims what it places. The rules, in order:
//!
//! 1. A task goes only to a worker that admits it ([`Capabilities::admits`]), has its model
//!    folder (any worker may download a published model) and has room: fewer than
//!    `2 × concurrency × max_batch` unfinished tasks placed on it (prefetch).
//! 2. A worker that holds the task's model (loaded, or with tasks of that model already
//!    placed on it) is preferred; among those, the one already given tasks of the same batch
//!    key this round (so batches fill), then the one with the most room.
//! 3. Otherwise a worker that can load the model without evicting another (room in its
//!    `--model-cache-bytes`), fewest models first.
//! 4. Otherwise the task waits for the worker that holds its model, or, when no worker holds
//!    it, for a cache to free up; once it has waited `spread_after` it goes to the worker
//!    whose models have the least demand, which then evicts. So in steady state no worker
//!    reloads a model between tasks, and no model waits forever.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use farm_core::{BatchKey, Capabilities, Mode, TaskRef, WorkerId};

/// One online, non-draining worker as the dispatcher sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: WorkerId,
    pub concurrency: u32,
    pub max_batch: u32,
    pub capabilities: Capabilities,
    /// `None`: no cache limit.
    pub cache_capacity: Option<u64>,
    /// Loaded model keys and their sizes in bytes.
    pub loaded: Vec<(String, u64)>,
    /// Unfinished tasks placed on it, by model key.
    pub placed: HashMap<String, u32>,
    /// Model folders it has on disk. A model some worker has goes only to workers that have
    /// it, unless every worker can download it ([`Task::downloadable`]).
    pub available: Vec<String>,
}

impl WorkerView {
    /// The most unfinished tasks placed on it at once.
    pub fn prefetch(&self) -> u32 {
        2 * self.concurrency.max(1) * self.max_batch.max(1)
    }
}

/// A pending task with what placement needs to know of its job.
#[derive(Debug, Clone)]
pub struct Task {
    pub task: TaskRef,
    pub mode: Mode,
    pub width: u32,
    pub height: u32,
    /// `None` for fine-tuning: no model to keep warm, no batching.
    pub batch: Option<BatchKey>,
    pub waited: Duration,
    /// Its model is published in storage (by a finetune job): any worker can fetch it.
    pub downloadable: bool,
}

/// Per-worker bookkeeping for one round.
struct Slot<'a> {
    view: &'a WorkerView,
    room: u32,
    /// Model keys it holds or will hold after this round.
    warm: HashSet<String>,
    /// Bytes its cache will hold (known sizes only).
    cache_used: u64,
    /// Batch keys placed on it this round, with counts.
    batches: HashMap<BatchKey, u32>,
}

impl Slot<'_> {
    /// Whether loading `model` (of `size`, when known) needs no eviction.
    fn fits(&self, size: Option<u64>) -> bool {
        match (self.view.cache_capacity, size) {
            (None, _) => true,
            (Some(cap), Some(size)) => self.cache_used.saturating_add(size) <= cap,
            // No size known at all: only an empty cache surely has room.
            (Some(_), None) => self.warm.is_empty(),
        }
    }
}

/// Places `tasks` (in dispatch order) on `workers`; returns `(task, worker)` for each task
/// placed now. Tasks not returned stay pending for a later round.
pub fn place(
    workers: &[WorkerView],
    tasks: &[Task],
    spread_after: Duration,
) -> Vec<(TaskRef, WorkerId)> {
    // Model sizes reported by any worker; a model never loaded has no known size.
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for w in workers {
        for (key, bytes) in &w.loaded {
            sizes.insert(key.as_str(), *bytes);
        }
    }
    let largest = sizes.values().copied().max();
    let mut slots: Vec<Slot> = workers
        .iter()
        .map(|w| {
            let outstanding: u32 = w.placed.values().sum();
            let mut warm: HashSet<String> = w.loaded.iter().map(|(k, _)| k.clone()).collect();
            warm.extend(w.placed.keys().cloned());
            Slot {
                view: w,
                room: w.prefetch().saturating_sub(outstanding),
                cache_used: w.loaded.iter().map(|(_, b)| b).sum(),
                warm,
                batches: HashMap::new(),
            }
        })
        .collect();
    // Demand per model key: placed anywhere plus waiting in this round.
    let mut demand: HashMap<String, u32> = HashMap::new();
    for w in workers {
        for (key, n) in &w.placed {
            *demand.entry(key.clone()).or_default() += n;
        }
    }
    for t in tasks {
        if let Some(b) = &t.batch {
            *demand.entry(b.model_key()).or_default() += 1;
        }
    }

    let mut out = Vec::new();
    for t in tasks {
        if slots.iter().all(|s| s.room == 0) {
            break;
        }
        let key = t.batch.as_ref().map(BatchKey::model_key);
        let size = key.as_deref().and_then(|k| sizes.get(k).copied());
        // A model never loaded anywhere is guessed to be as large as the largest known one.
        let estimate = size.or(largest);
        let model = t.batch.as_ref().map(BatchKey::model);
        let only_where_on_disk = !t.downloadable
            && model.is_some_and(|m| workers.iter().any(|w| w.available.iter().any(|a| a == m)));
        let capable: Vec<usize> = (0..slots.len())
            .filter(|&i| {
                let view = slots[i].view;
                let has_model = !only_where_on_disk
                    || model.is_some_and(|m| view.available.iter().any(|a| a == m));
                has_model
                    && view
                        .capabilities
                        .admits(t.mode, t.width, t.height, size)
                        .is_ok()
            })
            .collect();
        let open: Vec<usize> = capable
            .iter()
            .copied()
            .filter(|&i| slots[i].room > 0)
            .collect();
        if open.is_empty() {
            continue;
        }
        let chosen = match (&key, &t.batch) {
            // Fine-tuning: any worker with room, the emptiest first.
            (None, _) | (_, None) => open.iter().copied().max_by_key(|&i| slots[i].room),
            (Some(key), Some(batch)) => {
                let hot: Vec<usize> = open
                    .iter()
                    .copied()
                    .filter(|&i| slots[i].warm.contains(key))
                    .collect();
                if !hot.is_empty() {
                    // Ties go to the first worker, so a round is deterministic.
                    hot.into_iter().max_by_key(|&i| {
                        let same = slots[i].batches.get(batch).copied().unwrap_or(0);
                        (same > 0, slots[i].room, std::cmp::Reverse(i))
                    })
                } else if let Some(i) = open
                    .iter()
                    .copied()
                    .filter(|&i| slots[i].fits(estimate))
                    .min_by_key(|&i| (slots[i].warm.len(), u32::MAX - slots[i].room))
                {
                    Some(i)
                } else if t.waited >= spread_after {
                    // Evict: on the worker whose models are least wanted.
                    open.iter().copied().min_by_key(|&i| {
                        let wanted: u32 = slots[i]
                            .warm
                            .iter()
                            .map(|k| demand.get(k).copied().unwrap_or(0))
                            .sum();
                        (wanted, u32::MAX - slots[i].room)
                    })
                } else {
                    // Wait for the worker that holds the model, or for cache room.
                    None
                }
            }
        };
        let Some(i) = chosen else {
            continue;
        };
        let slot = &mut slots[i];
        slot.room -= 1;
        if let (Some(key), Some(batch)) = (key, &t.batch) {
            if slot.warm.insert(key) {
                slot.cache_used = slot.cache_used.saturating_add(estimate.unwrap_or(0));
            }
            *slot.batches.entry(batch.clone()).or_default() += 1;
        }
        out.push((t.task, slot.view.id.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_core::{JobId, JobRequest};

    const MODEL: u64 = 1000;

    fn worker(name: &str, loaded: &[&str], capacity: Option<u64>) -> WorkerView {
        WorkerView {
            id: WorkerId(name.into()),
            concurrency: 1,
            max_batch: 1,
            capabilities: Capabilities::default(),
            cache_capacity: capacity,
            loaded: loaded.iter().map(|m| (m.to_string(), MODEL)).collect(),
            placed: HashMap::new(),
            available: vec!["A".into(), "B".into(), "C".into()],
        }
    }

    fn key(model: &str, width: u32) -> BatchKey {
        let spec = farm_core::validate(&JobRequest {
            model: model.into(),
            prompts: vec!["p".into()],
            seeds: vec![1],
            width,
            height: 64,
            steps: 2,
            ..Default::default()
        })
        .expect("valid");
        spec.batch_key().expect("batchable")
    }

    fn tasks(models: &[&str], waited: Duration) -> Vec<Task> {
        let job = JobId::new();
        models
            .iter()
            .enumerate()
            .map(|(i, m)| Task {
                task: TaskRef {
                    job,
                    index: i as u32,
                },
                mode: Mode::Txt2Img,
                width: 64,
                height: 64,
                batch: Some(key(m, 64)),
                waited,
                downloadable: false,
            })
            .collect()
    }

    fn on(placed: &[(TaskRef, WorkerId)], worker: &str) -> Vec<u32> {
        placed
            .iter()
            .filter(|(_, w)| w.0 == worker)
            .map(|(t, _)| t.index)
            .collect()
    }

    const SPREAD: Duration = Duration::from_secs(30);

    #[test]
    fn tasks_go_to_the_worker_holding_their_model_and_wait_for_it() {
        let workers = [
            worker("a", &["A"], Some(MODEL)),
            worker("b", &["B"], Some(MODEL)),
        ];
        let placed = place(
            &workers,
            &tasks(&["A", "A", "A", "B", "A", "B"], Duration::ZERO),
            SPREAD,
        );
        // Each worker takes two (its prefetch) of its own model; the third A waits.
        assert_eq!(on(&placed, "a"), vec![0, 1]);
        assert_eq!(on(&placed, "b"), vec![3, 5]);
    }

    #[test]
    fn steady_state_with_two_models_and_two_workers_never_reloads() {
        // Simulate rounds: each round the workers finish what they had, report it, and the
        // dispatcher places the next tasks. A worker "reloads" if it gets a model it lacks.
        let mut workers = [
            worker("a", &["A"], Some(MODEL)),
            worker("b", &["B"], Some(MODEL)),
        ];
        let backlog: Vec<&str> = (0..40)
            .map(|i| if i % 3 == 0 { "B" } else { "A" })
            .collect();
        let mut pending = tasks(&backlog, Duration::ZERO);
        let mut reloads = 0;
        for _round in 0..100 {
            if pending.is_empty() {
                break;
            }
            let placed = place(&workers, &pending, SPREAD);
            for (task, w) in &placed {
                let model = pending
                    .iter()
                    .find(|t| t.task == *task)
                    .and_then(|t| t.batch.as_ref())
                    .map(BatchKey::model_key)
                    .expect("placed task");
                let view = workers.iter_mut().find(|v| v.id == *w).expect("worker");
                if !view.loaded.iter().any(|(k, _)| *k == model) {
                    reloads += 1;
                    view.loaded = vec![(model, MODEL)];
                }
            }
            pending.retain(|t| !placed.iter().any(|(p, _)| *p == t.task));
        }
        assert!(pending.is_empty(), "everything is placed eventually");
        assert_eq!(reloads, 0);
    }

    #[test]
    fn a_model_loaded_nowhere_goes_to_a_worker_with_cache_room() {
        let workers = [
            worker("full", &["A"], Some(MODEL)),
            worker("roomy", &["B"], Some(2 * MODEL)),
        ];
        let placed = place(&workers, &tasks(&["C"], Duration::ZERO), SPREAD);
        assert_eq!(on(&placed, "roomy"), vec![0]);
        // With no cache room anywhere it waits, then evicts the least wanted model.
        let workers = [
            worker("a", &["A"], Some(MODEL)),
            worker("b", &["B"], Some(MODEL)),
        ];
        assert!(place(&workers, &tasks(&["C"], Duration::ZERO), SPREAD).is_empty());
        let mut waiting = tasks(&["C", "A"], SPREAD);
        waiting[1].waited = Duration::ZERO;
        let placed = place(&workers, &waiting, SPREAD);
        // A is wanted (a task waits for it), B is not: b evicts B for C.
        assert_eq!(on(&placed, "b"), vec![0]);
        assert_eq!(on(&placed, "a"), vec![1]);
    }

    #[test]
    fn an_unlimited_cache_spreads_a_busy_model() {
        let workers = [worker("a", &["A"], None), worker("b", &[], None)];
        let placed = place(&workers, &tasks(&["A"; 4], Duration::ZERO), SPREAD);
        assert_eq!(on(&placed, "a").len(), 2);
        assert_eq!(on(&placed, "b").len(), 2);
    }

    #[test]
    fn capabilities_filter_and_prefetch_bounds_hold() {
        let mut small = worker("small", &["A"], None);
        small.capabilities = Capabilities {
            max_pixels: Some(64 * 64),
            device_memory: None,
            modes: vec![Mode::Txt2Img],
        };
        let mut big = worker("big", &[], None);
        big.max_batch = 4; // prefetch 8
        big.placed.insert("A".into(), 6);
        let mut wide = tasks(&["A", "A", "A", "A"], Duration::ZERO);
        for t in &mut wide[..2] {
            t.width = 128;
            t.batch = Some(key("A", 128));
        }
        wide[3].mode = Mode::Img2Img;
        let placed = place(&[small, big], &wide, SPREAD);
        // 128-wide and img2img only fit "big", which has room for two more.
        assert_eq!(on(&placed, "big"), vec![0, 1]);
        assert_eq!(on(&placed, "small"), vec![2]);
        // Device memory: a model larger than the device is never routed there.
        let mut tiny_gpu = worker("tiny-gpu", &[], None);
        tiny_gpu.capabilities.device_memory = Some(MODEL - 1);
        let holder = WorkerView {
            placed: HashMap::from([("A".to_string(), 2)]),
            ..worker("holder", &["A"], None)
        };
        let placed = place(&[tiny_gpu, holder], &tasks(&["A"], SPREAD), SPREAD);
        assert!(placed.is_empty(), "{placed:?}");
    }

    #[test]
    fn a_model_goes_only_to_workers_that_have_its_folder() {
        let mut lacking = worker("lacking", &[], None);
        lacking.available = vec!["A".into()];
        let having = worker("having", &[], None);
        let placed = place(
            &[lacking, having],
            &tasks(&["B", "B"], Duration::ZERO),
            SPREAD,
        );
        assert_eq!(on(&placed, "having"), vec![0, 1]);
        // A published model goes anywhere: every worker can download it.
        let mut lacking = worker("lacking", &[], None);
        lacking.available = vec!["A".into()];
        let mut published = tasks(&["B"], Duration::ZERO);
        published[0].downloadable = true;
        let placed = place(&[lacking], &published, SPREAD);
        assert_eq!(on(&placed, "lacking"), vec![0]);
    }

    #[test]
    fn a_batch_key_fills_one_worker_before_the_next() {
        let mut a = worker("a", &["A"], None);
        a.max_batch = 4;
        let mut b = worker("b", &["A"], None);
        b.max_batch = 4;
        let placed = place(&[a, b], &tasks(&["A"; 6], Duration::ZERO), SPREAD);
        assert_eq!(on(&placed, "a"), vec![0, 1, 2, 3, 4, 5]);
    }
}
