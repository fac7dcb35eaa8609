//! The job spec and its validation: every bound a request field has is written here once.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, JobId, TaskRef};

/// The documented bounds of a job request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_side: u32,
    pub max_side: u32,
    pub max_steps: u32,
    pub max_guidance: f64,
    pub max_prompts: usize,
    pub max_prompt_bytes: usize,
    pub max_tasks: u64,
    pub max_model_name_bytes: usize,
    pub max_idempotency_key_bytes: usize,
    pub max_priority: i32,
    pub max_attempts: u32,
}

pub const LIMITS: Limits = Limits {
    min_side: 64,
    max_side: 2048,
    max_steps: 1000,
    max_guidance: 50.0,
    max_prompts: 10_000,
    max_prompt_bytes: 4096,
    max_tasks: 100_000,
    max_model_name_bytes: 128,
    max_idempotency_key_bytes: 128,
    max_priority: 100,
    max_attempts: 10,
};

pub const DEFAULT_SIDE: u32 = 512;
pub const DEFAULT_STEPS: u32 = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A request field that failed validation, and why. The gRPC layer turns it into
/// `INVALID_ARGUMENT` with the message `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        reason: reason.into(),
    }
}

/// What kind of image a task makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    #[serde(rename = "txt2img")]
    Txt2Img,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "txt2img" => Ok(Mode::Txt2Img),
            other => Err(format!("unknown mode {other:?}; expected txt2img")),
        }
    }
}

/// The sampler a task denoises with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchedulerName {
    #[serde(rename = "pndm")]
    Pndm,
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "dpm++")]
    DpmPlusPlus,
    #[serde(rename = "euler-a")]
    EulerAncestral,
}

impl SchedulerName {
    pub const ALL: &'static [SchedulerName] = &[
        SchedulerName::Pndm,
        SchedulerName::Ddim,
        SchedulerName::DpmPlusPlus,
        SchedulerName::EulerAncestral,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerName::Pndm => "pndm",
            SchedulerName::Ddim => "ddim",
            SchedulerName::DpmPlusPlus => "dpm++",
            SchedulerName::EulerAncestral => "euler-a",
        }
    }
}

impl fmt::Display for SchedulerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = if s.is_empty() { "pndm" } else { s };
        SchedulerName::ALL
            .iter()
            .copied()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| {
                format!("unknown scheduler {s:?}; expected one of pndm, ddim, dpm++, euler-a")
            })
    }
}

/// Where a job's seeds come from, as the user gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeedSource {
    List(Vec<u64>),
    Range { start: u64, count: u32 },
}

/// A job request as it arrives (from gRPC or the CLI), before validation. Zero and empty
/// values mean "the default".
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    pub mode: String,
    pub model: String,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seeds: Vec<u64>,
    pub seed_range: Option<(u64, u32)>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: Option<f64>,
    pub scheduler: String,
    pub priority: i32,
    pub max_attempts: u32,
    pub idempotency_key: String,
}

/// A validated job. Constructed only by [`validate`], so holding one means every bound held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub mode: Mode,
    pub model: String,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seeds: Vec<u64>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: SchedulerName,
    pub priority: i32,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
}

impl JobSpec {
    pub fn tasks_total(&self) -> u32 {
        // validate() caps prompts x seeds at LIMITS.max_tasks, which fits u32.
        (self.prompts.len() * self.seeds.len()) as u32
    }

    /// The prompt and seed of task `index` (prompt-major: index = prompt * seeds + seed).
    pub fn task_at(&self, index: u32) -> Option<(&str, u64)> {
        let n_seeds = self.seeds.len();
        let i = index as usize;
        if n_seeds == 0 || i >= self.prompts.len() * n_seeds {
            return None;
        }
        Some((&self.prompts[i / n_seeds], self.seeds[i % n_seeds]))
    }

    /// Every task of the job, in index order.
    pub fn tasks(&self) -> impl Iterator<Item = (u32, &str, u64)> + '_ {
        self.prompts
            .iter()
            .enumerate()
            .flat_map(move |(p, prompt)| {
                self.seeds.iter().enumerate().map(move |(s, seed)| {
                    ((p * self.seeds.len() + s) as u32, prompt.as_str(), *seed)
                })
            })
    }

    /// The message a worker needs to render task `index` of job `job` at `attempt`.
    pub fn task_spec(
        &self,
        job: JobId,
        index: u32,
        attempt: Attempt,
        prefix: &str,
    ) -> Option<TaskSpec> {
        let (prompt, seed) = self.task_at(index)?;
        Some(TaskSpec {
            task: TaskRef { job, index },
            attempt,
            mode: self.mode,
            model: self.model.clone(),
            prompt: prompt.to_string(),
            negative_prompt: self.negative_prompt.clone(),
            seed,
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler,
            object_key: object_key(prefix, job, index, seed),
        })
    }
}

/// One image to render: everything a worker needs, with no database in reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task: TaskRef,
    pub attempt: Attempt,
    pub mode: Mode,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: SchedulerName,
    pub object_key: String,
}

/// The storage key of a task's image: `{prefix}/jobs/{job_id}/{task_index:06}-{seed}.png`
/// (no leading slash when the prefix is empty).
pub fn object_key(prefix: &str, job: JobId, index: u32, seed: u64) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("jobs/{job}/{index:06}-{seed}.png")
    } else {
        format!("{prefix}/jobs/{job}/{index:06}-{seed}.png")
    }
}

fn valid_model_name(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_side(field: &'static str, value: u32) -> Result<u32, InvalidField> {
    let value = if value == 0 { DEFAULT_SIDE } else { value };
    if value % 8 != 0 {
        return Err(invalid(field, format!("{value} is not a multiple of 8")));
    }
    if !(LIMITS.min_side..=LIMITS.max_side).contains(&value) {
        return Err(invalid(
            field,
            format!(
                "{value} is outside [{}, {}]",
                LIMITS.min_side, LIMITS.max_side
            ),
        ));
    }
    Ok(value)
}

/// The one validation of user input. Every field is checked against [`LIMITS`]; the first
/// problem found is returned, naming its field.
pub fn validate(req: &JobRequest) -> Result<JobSpec, InvalidField> {
    let mode = req.mode.parse::<Mode>().map_err(|e| invalid("mode", e))?;

    let model = req.model.trim();
    if model.is_empty() {
        return Err(invalid("model", "is required"));
    }
    if model.len() > LIMITS.max_model_name_bytes || !valid_model_name(model) {
        return Err(invalid(
            "model",
            format!(
                "{model:?} is not a model folder name (letters, digits, '.', '_', '-'; at most {} bytes)",
                LIMITS.max_model_name_bytes
            ),
        ));
    }

    if req.prompts.is_empty() {
        return Err(invalid("prompts", "at least one prompt is required"));
    }
    if req.prompts.len() > LIMITS.max_prompts {
        return Err(invalid(
            "prompts",
            format!(
                "{} prompts; at most {} per job",
                req.prompts.len(),
                LIMITS.max_prompts
            ),
        ));
    }
    for (i, p) in req.prompts.iter().enumerate() {
        if p.len() > LIMITS.max_prompt_bytes {
            return Err(invalid(
                "prompts",
                format!(
                    "prompt {i} is {} bytes; at most {}",
                    p.len(),
                    LIMITS.max_prompt_bytes
                ),
            ));
        }
        if p.contains('\0') {
            return Err(invalid(
                "prompts",
                format!("prompt {i} contains a NUL character"),
            ));
        }
    }
    if req.negative_prompt.len() > LIMITS.max_prompt_bytes {
        return Err(invalid(
            "negative_prompt",
            format!(
                "{} bytes; at most {}",
                req.negative_prompt.len(),
                LIMITS.max_prompt_bytes
            ),
        ));
    }
    if req.negative_prompt.contains('\0') {
        return Err(invalid("negative_prompt", "contains a NUL character"));
    }

    let seeds = match (&req.seed_range, req.seeds.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(
                "seeds",
                "give either seeds or seed_range, not both",
            ));
        }
        (None, true) => return Err(invalid("seeds", "at least one seed is required")),
        (None, false) => {
            if req.seeds.len() as u64 > LIMITS.max_tasks {
                return Err(invalid(
                    "seeds",
                    format!("at most {} seeds", LIMITS.max_tasks),
                ));
            }
            req.seeds.clone()
        }
        (Some((start, count)), true) => {
            if *count == 0 {
                return Err(invalid("seed_range.count", "must be at least 1"));
            }
            if u64::from(*count) > LIMITS.max_tasks {
                return Err(invalid(
                    "seed_range.count",
                    format!("{count} seeds; at most {}", LIMITS.max_tasks),
                ));
            }
            if start.checked_add(u64::from(*count) - 1).is_none() {
                return Err(invalid(
                    "seed_range.start",
                    "start + count - 1 exceeds the u64 range",
                ));
            }
            (0..u64::from(*count)).map(|i| start + i).collect()
        }
    };

    let tasks = req.prompts.len() as u64 * seeds.len() as u64;
    if tasks > LIMITS.max_tasks {
        return Err(invalid(
            "seeds",
            format!(
                "prompts x seeds = {tasks} images; at most {} per job",
                LIMITS.max_tasks
            ),
        ));
    }

    let width = check_side("width", req.width)?;
    let height = check_side("height", req.height)?;

    let steps = if req.steps == 0 {
        DEFAULT_STEPS
    } else {
        req.steps
    };
    if steps > LIMITS.max_steps {
        return Err(invalid(
            "steps",
            format!("{steps} is outside [1, {}]", LIMITS.max_steps),
        ));
    }

    let guidance_scale = req.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
    if !guidance_scale.is_finite() || !(0.0..=LIMITS.max_guidance).contains(&guidance_scale) {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{guidance_scale} must be a finite number in [0, {}]",
                LIMITS.max_guidance
            ),
        ));
    }

    let scheduler = req
        .scheduler
        .parse::<SchedulerName>()
        .map_err(|e| invalid("scheduler", e))?;

    if req.priority.abs() > LIMITS.max_priority {
        return Err(invalid(
            "priority",
            format!(
                "{} is outside [-{m}, {m}]",
                req.priority,
                m = LIMITS.max_priority
            ),
        ));
    }

    let max_attempts = if req.max_attempts == 0 {
        DEFAULT_MAX_ATTEMPTS
    } else {
        req.max_attempts
    };
    if max_attempts > LIMITS.max_attempts {
        return Err(invalid(
            "max_attempts",
            format!("{max_attempts} is outside [1, {}]", LIMITS.max_attempts),
        ));
    }

    let key = req.idempotency_key.trim();
    if key.len() > LIMITS.max_idempotency_key_bytes {
        return Err(invalid(
            "idempotency_key",
            format!(
                "{} bytes; at most {}",
                key.len(),
                LIMITS.max_idempotency_key_bytes
            ),
        ));
    }

    Ok(JobSpec {
        mode,
        model: model.to_string(),
        prompts: req.prompts.clone(),
        negative_prompt: req.negative_prompt.clone(),
        seeds,
        width,
        height,
        steps,
        guidance_scale,
        scheduler,
        priority: req.priority,
        max_attempts,
        idempotency_key: (!key.is_empty()).then(|| key.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok_request() -> JobRequest {
        JobRequest {
            model: "tiny".into(),
            prompts: vec!["a".into(), "b".into()],
            seed_range: Some((42, 3)),
            width: 64,
            height: 64,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in_and_tasks_expand_prompt_major() {
        let spec = validate(&ok_request()).expect("valid");
        assert_eq!(spec.steps, DEFAULT_STEPS);
        assert_eq!(spec.scheduler, SchedulerName::Pndm);
        assert_eq!(spec.seeds, vec![42, 43, 44]);
        assert_eq!(spec.tasks_total(), 6);
        let tasks: Vec<_> = spec.tasks().collect();
        assert_eq!(tasks[0], (0, "a", 42));
        assert_eq!(tasks[4], (4, "b", 43));
        assert_eq!(spec.task_at(5), Some(("b", 44)));
        assert_eq!(spec.task_at(6), None);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut JobRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("width", Box::new(|r| r.width = 65)),
            ("height", Box::new(|r| r.height = 4096)),
            ("steps", Box::new(|r| r.steps = 1001)),
            (
                "guidance_scale",
                Box::new(|r| r.guidance_scale = Some(f64::NAN)),
            ),
            (
                "guidance_scale",
                Box::new(|r| r.guidance_scale = Some(-1.0)),
            ),
            ("scheduler", Box::new(|r| r.scheduler = "lms".into())),
            ("model", Box::new(|r| r.model = "../etc".into())),
            ("model", Box::new(|r| r.model = String::new())),
            ("prompts", Box::new(|r| r.prompts.clear())),
            ("prompts", Box::new(|r| r.prompts = vec!["x".repeat(5000)])),
            ("seeds", Box::new(|r| r.seeds = vec![1])),
            (
                "seed_range.count",
                Box::new(|r| r.seed_range = Some((0, 0))),
            ),
            (
                "seed_range.start",
                Box::new(|r| r.seed_range = Some((u64::MAX, 2))),
            ),
            ("seeds", Box::new(|r| r.seed_range = Some((0, 100_000)))),
            ("mode", Box::new(|r| r.mode = "video".into())),
            ("priority", Box::new(|r| r.priority = 1000)),
            ("max_attempts", Box::new(|r| r.max_attempts = 11)),
            (
                "idempotency_key",
                Box::new(|r| r.idempotency_key = "k".repeat(129)),
            ),
        ];
        for (field, mutate) in cases {
            let mut req = ok_request();
            mutate(&mut req);
            let err = validate(&req).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn object_keys_follow_the_layout() {
        let job: JobId = "8f0c3c1e-0000-4000-8000-000000000001"
            .parse()
            .expect("uuid");
        assert_eq!(
            object_key("farm", job, 7, 42),
            format!("farm/jobs/{job}/000007-42.png")
        );
        assert_eq!(
            object_key("", job, 7, 42),
            format!("jobs/{job}/000007-42.png")
        );
    }

    proptest! {
        #[test]
        fn validation_never_panics(
            width in any::<u32>(), height in any::<u32>(), steps in any::<u32>(),
            guidance in proptest::option::of(any::<f64>()), start in any::<u64>(), count in any::<u32>(),
            seeds in proptest::collection::vec(any::<u64>(), 0..4),
            prompts in proptest::collection::vec(".{0,40}", 0..4),
            scheduler in ".{0,8}", model in ".{0,20}", priority in any::<i32>(),
        ) {
            let req = JobRequest {
                model, prompts, seeds, width, height, steps, scheduler, priority,
                guidance_scale: guidance,
                seed_range: (count % 3 == 0).then_some((start, count)),
                ..Default::default()
            };
            if let Ok(spec) = validate(&req) {
                prop_assert!(spec.width % 8 == 0 && spec.height % 8 == 0);
                prop_assert!(u64::from(spec.tasks_total()) <= LIMITS.max_tasks);
                prop_assert!(spec.tasks().count() as u32 == spec.tasks_total());
            }
        }
    }
}
