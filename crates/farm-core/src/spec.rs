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
    pub max_image_bytes: usize,
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
    max_image_bytes: 16 * 1024 * 1024,
};

pub const DEFAULT_SIDE: u32 = 512;
pub const DEFAULT_STEPS: u32 = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_STRENGTH: f64 = 0.8;

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

/// Named priority classes; any integer in `[-LIMITS.max_priority, LIMITS.max_priority]` works
/// too. Higher goes first; ageing lifts a waiting task one level per ageing period.
pub const PRIORITY_CLASSES: &[(&str, i32)] =
    &[("low", -10), ("normal", 0), ("high", 10), ("urgent", 50)];

/// `low`, `normal`, `high`, `urgent` or an integer.
pub fn parse_priority(s: &str) -> Result<i32, String> {
    let s = s.trim();
    if let Some((_, p)) = PRIORITY_CLASSES.iter().find(|(name, _)| *name == s) {
        return Ok(*p);
    }
    s.parse::<i32>().map_err(|_| {
        let names: Vec<&str> = PRIORITY_CLASSES.iter().map(|(n, _)| *n).collect();
        format!(
            "priority {s:?}: use one of {} or an integer in [-{m}, {m}]",
            names.join(", "),
            m = LIMITS.max_priority
        )
    })
}

/// What kind of image a task makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Text to image from noise.
    #[serde(rename = "txt2img")]
    Txt2Img,
    /// SDEdit: an init image noised to `strength` and denoised with the prompt.
    #[serde(rename = "img2img")]
    Img2Img,
    /// Legacy inpainting: img2img that keeps the mask's black region.
    #[serde(rename = "inpaint")]
    Inpaint,
    /// VAE encode and decode of the init image.
    #[serde(rename = "reconstruct")]
    Reconstruct,
    /// Fine-tune the model's UNet on an image-caption dataset and publish the result.
    #[serde(rename = "finetune")]
    Finetune,
}

impl Mode {
    pub const ALL: &'static [Mode] = &[
        Mode::Txt2Img,
        Mode::Img2Img,
        Mode::Inpaint,
        Mode::Reconstruct,
        Mode::Finetune,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
            Mode::Inpaint => "inpaint",
            Mode::Reconstruct => "reconstruct",
            Mode::Finetune => "finetune",
        }
    }

    pub fn needs_init_image(self) -> bool {
        matches!(self, Mode::Img2Img | Mode::Inpaint | Mode::Reconstruct)
    }

    pub fn needs_mask(self) -> bool {
        matches!(self, Mode::Inpaint)
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = if s.is_empty() { "txt2img" } else { s };
        Mode::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown mode {s:?}; expected txt2img, img2img, inpaint, reconstruct or finetune")
            })
    }
}

/// What validation needs to know of an uploaded image (read from its header only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub bytes: usize,
}

/// Reads an uploaded image's format and size from its header: PNG and JPEG are accepted.
pub fn inspect_image(field: &'static str, bytes: &[u8]) -> Result<ImageInfo, InvalidField> {
    if bytes.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    if bytes.len() > LIMITS.max_image_bytes {
        return Err(invalid(
            field,
            format!("{} bytes; at most {}", bytes.len(), LIMITS.max_image_bytes),
        ));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| invalid(field, "is not an image; send a PNG or JPEG"))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(invalid(field, format!("is {format:?}; send a PNG or JPEG")));
    }
    let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| invalid(field, format!("cannot be read: {e}")))?;
    Ok(ImageInfo {
        width,
        height,
        bytes: bytes.len(),
    })
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
    /// img2img and inpaint: how much of the schedule to run, in [0, 1] (default 0.8).
    pub strength: Option<f64>,
    /// A model folder whose VAE replaces the model's own (empty: the model's).
    pub vae: String,
    pub init_image: Option<ImageInfo>,
    pub mask: Option<ImageInfo>,
    /// Called with the job as JSON when the job ends (empty: none).
    pub webhook_url: String,
    /// finetune only.
    pub train: Option<TrainRequest>,
}

/// A fine-tuning request as it arrives; zero means "the default".
#[derive(Debug, Clone, Default)]
pub struct TrainRequest {
    /// The name the trained model is published under.
    pub output_model: String,
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: Option<f64>,
    /// Square training size in pixels; 0: the model's own.
    pub resolution: u32,
    pub checkpoint_every: u32,
    /// Files uploaded with the job.
    pub dataset_files: usize,
    /// Or a prefix in the farm's storage holding the dataset.
    pub dataset_prefix: String,
}

/// A validated fine-tuning job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub output_model: String,
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub resolution: Option<u32>,
    /// Save (and upload) a checkpoint every this many steps.
    pub checkpoint_every: u32,
    /// The storage prefix of the dataset (set by the coordinator for uploaded files).
    pub dataset: Option<String>,
}

pub const MAX_TRAIN_STEPS: u32 = 1_000_000;
pub const MAX_TRAIN_BATCH: u32 = 64;

fn check_train(
    req: &JobRequest,
    mode: Mode,
    model: &str,
) -> Result<Option<TrainSpec>, InvalidField> {
    let Some(train) = &req.train else {
        if mode == Mode::Finetune {
            return Err(invalid(
                "output_model",
                "finetune needs an output model name and a dataset",
            ));
        }
        return Ok(None);
    };
    if mode != Mode::Finetune {
        return Err(invalid(
            "output_model",
            "only finetune jobs publish a model",
        ));
    }
    let output = train.output_model.trim();
    if output.is_empty() {
        return Err(invalid(
            "output_model",
            "is required: the name the trained model is published under",
        ));
    }
    check_model_name("output_model", output)?;
    if output == model {
        return Err(invalid("output_model", "must differ from the base model"));
    }
    let steps = if train.steps == 0 { 100 } else { train.steps };
    if steps > MAX_TRAIN_STEPS {
        return Err(invalid(
            "train_steps",
            format!("{steps} is outside [1, {MAX_TRAIN_STEPS}]"),
        ));
    }
    let batch_size = train.batch_size.max(1);
    if batch_size > MAX_TRAIN_BATCH {
        return Err(invalid(
            "batch_size",
            format!("{batch_size} is outside [1, {MAX_TRAIN_BATCH}]"),
        ));
    }
    let learning_rate = train.learning_rate.unwrap_or(1e-4);
    if !learning_rate.is_finite() || learning_rate <= 0.0 || learning_rate > 1.0 {
        return Err(invalid(
            "learning_rate",
            format!("{learning_rate} must be a number in (0, 1]"),
        ));
    }
    let resolution = match train.resolution {
        0 => None,
        r if r % 8 != 0 || r > LIMITS.max_side => {
            return Err(invalid(
                "resolution",
                format!("{r} must be a multiple of 8 in [8, {}]", LIMITS.max_side),
            ))
        }
        r => Some(r),
    };
    let checkpoint_every = if train.checkpoint_every == 0 {
        steps.div_ceil(10)
    } else {
        train.checkpoint_every
    };
    let prefix = train.dataset_prefix.trim().trim_matches('/');
    if train.dataset_files == 0 && prefix.is_empty() {
        return Err(invalid(
            "dataset",
            "is empty: upload images with captions, or name a storage prefix",
        ));
    }
    if train.dataset_files > 0 && !prefix.is_empty() {
        return Err(invalid(
            "dataset",
            "give either files or a storage prefix, not both",
        ));
    }
    if prefix.split('/').any(|part| part == ".." || part == ".") {
        return Err(invalid(
            "dataset",
            format!("{prefix:?} is not a storage prefix"),
        ));
    }
    if !req.prompts.iter().all(|p| p.trim().is_empty()) {
        return Err(invalid(
            "prompts",
            "finetune jobs take their captions from the dataset, not prompts",
        ));
    }
    Ok(Some(TrainSpec {
        output_model: output.to_string(),
        steps,
        batch_size,
        learning_rate,
        resolution,
        checkpoint_every,
        dataset: (!prefix.is_empty()).then(|| prefix.to_string()),
    }))
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
    #[serde(default = "default_strength")]
    pub strength: f64,
    #[serde(default)]
    pub vae: Option<String>,
    /// Storage key of the init image (set by the coordinator once it is stored).
    #[serde(default)]
    pub init_image: Option<String>,
    /// Storage key of the inpainting mask.
    #[serde(default)]
    pub mask: Option<String>,
    /// An http(s) URL the coordinator POSTs the job to when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// finetune jobs: what to train and publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainSpec>,
}

fn default_strength() -> f64 {
    DEFAULT_STRENGTH
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
            strength: self.strength,
            vae: self.vae.clone(),
            init_image: self.init_image.clone(),
            mask: self.mask.clone(),
            train: self.train.clone(),
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
    #[serde(default = "default_strength")]
    pub strength: f64,
    #[serde(default)]
    pub vae: Option<String>,
    #[serde(default)]
    pub init_image: Option<String>,
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub train: Option<TrainSpec>,
}

/// The storage folder a finetune job publishes model `name` to: `{prefix}/models/{name}`;
/// its `model_index.json` is written last, so a folder with one is complete.
pub fn published_model_dir(prefix: &str, name: &str) -> String {
    format!("{prefix}/models/{name}")
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

fn check_model_name(field: &'static str, name: &str) -> Result<(), InvalidField> {
    if name.len() > LIMITS.max_model_name_bytes || !valid_model_name(name) {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a model folder name (letters, digits, '.', '_', '-'; at most {} bytes)",
                LIMITS.max_model_name_bytes
            ),
        ));
    }
    Ok(())
}

/// Checks the init image and mask against the mode, and gives the image size (width,
/// height) the job renders at when one is given.
fn check_inputs(req: &JobRequest, mode: Mode) -> Result<Option<(u32, u32)>, InvalidField> {
    if !mode.needs_init_image() {
        if req.init_image.is_some() {
            return Err(invalid(
                "init_image",
                "only img2img, inpaint and reconstruct take an init image",
            ));
        }
        if req.mask.is_some() {
            return Err(invalid("mask", "only inpaint takes a mask"));
        }
        return Ok(None);
    }
    let init = req.init_image.ok_or_else(|| {
        invalid(
            "init_image",
            format!("{} needs an init image", mode.as_str()),
        )
    })?;
    for (field, side) in [("init_image", init.width), ("init_image", init.height)] {
        if side % 8 != 0 || !(LIMITS.min_side..=LIMITS.max_side).contains(&side) {
            return Err(invalid(
                field,
                format!(
                    "is {}x{}; both sides must be multiples of 8 in [{}, {}]",
                    init.width, init.height, LIMITS.min_side, LIMITS.max_side
                ),
            ));
        }
    }
    for (field, given, actual) in [
        ("width", req.width, init.width),
        ("height", req.height, init.height),
    ] {
        if given != 0 && given != actual {
            return Err(invalid(
                field,
                format!("{given} differs from the init image's {actual}; leave it out to use the image's size"),
            ));
        }
    }
    match (mode.needs_mask(), req.mask) {
        (true, None) => return Err(invalid("mask", "inpaint needs a mask (white = repaint)")),
        (false, Some(_)) => return Err(invalid("mask", "only inpaint takes a mask")),
        (true, Some(mask)) => {
            if u64::from(mask.width) * u64::from(init.height)
                != u64::from(mask.height) * u64::from(init.width)
            {
                return Err(invalid(
                    "mask",
                    format!(
                        "is {}x{} but the init image is {}x{}; a mask of another size must have the same aspect ratio",
                        mask.width, mask.height, init.width, init.height
                    ),
                ));
            }
        }
        (false, None) => {}
    }
    Ok(Some((init.width, init.height)))
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
    check_model_name("model", model)?;
    let vae = req.vae.trim();
    if !vae.is_empty() {
        check_model_name("vae", vae)?;
    }

    let train = check_train(req, mode, model)?;
    let finetune_prompts = [String::new()];
    let prompts: &[String] = if train.is_some() {
        &finetune_prompts
    } else {
        &req.prompts
    };
    if prompts.is_empty() {
        return Err(invalid("prompts", "at least one prompt is required"));
    }
    if prompts.len() > LIMITS.max_prompts {
        return Err(invalid(
            "prompts",
            format!(
                "{} prompts; at most {} per job",
                prompts.len(),
                LIMITS.max_prompts
            ),
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
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
        (None, true) if train.is_some() => vec![0],
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

    if train.is_some() && seeds.len() > 1 {
        return Err(invalid(
            "seeds",
            "a finetune job trains once: give at most one seed",
        ));
    }
    let tasks = prompts.len() as u64 * seeds.len() as u64;
    if tasks > LIMITS.max_tasks {
        return Err(invalid(
            "seeds",
            format!(
                "prompts x seeds = {tasks} images; at most {} per job",
                LIMITS.max_tasks
            ),
        ));
    }

    let (width, height) = match check_inputs(req, mode)? {
        Some(size) => size,
        None => (
            check_side("width", req.width)?,
            check_side("height", req.height)?,
        ),
    };

    let strength = req.strength.unwrap_or(DEFAULT_STRENGTH);
    if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
        return Err(invalid(
            "strength",
            format!("{strength} must be a number in [0, 1]"),
        ));
    }

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

    let webhook_url = check_webhook_url(&req.webhook_url)?;

    Ok(JobSpec {
        mode,
        model: model.to_string(),
        prompts: prompts.to_vec(),
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
        strength,
        vae: (!vae.is_empty()).then(|| vae.to_string()),
        init_image: None,
        mask: None,
        webhook_url,
        train,
    })
}

/// The longest `webhook_url` accepted, in bytes.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// An http:// or https:// URL with a host, at most [`MAX_WEBHOOK_URL_BYTES`]; empty is none.
fn check_webhook_url(url: &str) -> Result<Option<String>, InvalidField> {
    let url = url.trim();
    if url.is_empty() {
        return Ok(None);
    }
    if url.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(invalid(
            "webhook_url",
            format!("{} bytes; at most {MAX_WEBHOOK_URL_BYTES}", url.len()),
        ));
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url["https://".len()..]
    } else if lower.starts_with("http://") {
        &url["http://".len()..]
    } else {
        return Err(invalid("webhook_url", "must be an http:// or https:// URL"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "webhook_url",
            "contains whitespace or control characters",
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("webhook_url", "has no host"));
    }
    Ok(Some(url.to_string()))
}

#[cfg(test)]
mod webhook_url_tests {
    use super::*;

    #[test]
    fn webhook_urls_are_http_or_https_with_a_host() {
        assert_eq!(check_webhook_url(""), Ok(None));
        assert_eq!(
            check_webhook_url(" https://example.com/hook?x=1 "),
            Ok(Some("https://example.com/hook?x=1".into()))
        );
        assert!(check_webhook_url("http://127.0.0.1:9000").is_ok());
        for bad in [
            "ftp://example.com",
            "example.com/hook",
            "https://",
            "http://:80/x",
            "https://exa mple.com",
            "javascript:alert(1)",
        ] {
            let e = check_webhook_url(bad).expect_err(bad);
            assert_eq!(e.field, "webhook_url");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_BYTES));
        assert!(check_webhook_url(&long).is_err());
    }
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
    fn priority_classes_and_integers_parse() {
        assert_eq!(parse_priority("high"), Ok(10));
        assert_eq!(parse_priority("low"), Ok(-10));
        assert_eq!(parse_priority("-3"), Ok(-3));
        assert!(parse_priority("soon")
            .unwrap_err()
            .contains("low, normal, high, urgent"));
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
            ("strength", Box::new(|r| r.strength = Some(1.5))),
            ("strength", Box::new(|r| r.strength = Some(f64::INFINITY))),
            ("vae", Box::new(|r| r.vae = "a/b".into())),
            (
                "init_image",
                Box::new(|r| r.init_image = Some(info(64, 64))),
            ),
            ("init_image", Box::new(|r| r.mode = "img2img".into())),
            (
                "init_image",
                Box::new(|r| {
                    r.mode = "img2img".into();
                    r.init_image = Some(info(100, 64));
                }),
            ),
            (
                "width",
                Box::new(|r| {
                    r.mode = "img2img".into();
                    r.init_image = Some(info(128, 64));
                    r.width = 64;
                }),
            ),
            (
                "mask",
                Box::new(|r| {
                    r.mode = "inpaint".into();
                    r.init_image = Some(info(64, 64));
                }),
            ),
            (
                "mask",
                Box::new(|r| {
                    r.mode = "inpaint".into();
                    r.init_image = Some(info(128, 64));
                    r.width = 0;
                    r.mask = Some(info(64, 64));
                }),
            ),
            (
                "mask",
                Box::new(|r| {
                    r.mode = "img2img".into();
                    r.init_image = Some(info(64, 64));
                    r.mask = Some(info(64, 64));
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut req = ok_request();
            mutate(&mut req);
            let err = validate(&req).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    fn info(width: u32, height: u32) -> ImageInfo {
        ImageInfo {
            width,
            height,
            bytes: 100,
        }
    }

    fn train(output: &str) -> TrainRequest {
        TrainRequest {
            output_model: output.into(),
            steps: 6,
            dataset_files: 3,
            ..Default::default()
        }
    }

    #[test]
    fn finetune_jobs_are_one_task_with_their_own_bounds() {
        let mut req = ok_request();
        req.mode = "finetune".into();
        req.prompts.clear();
        req.seed_range = None;
        req.train = Some(train("mine"));
        let spec = validate(&req).expect("valid");
        assert_eq!(spec.tasks_total(), 1);
        let t = spec.train.expect("train");
        assert_eq!(
            (t.steps, t.batch_size, t.learning_rate, t.checkpoint_every),
            (6, 1, 1e-4, 1)
        );

        let cases: Vec<(&str, TrainRequest)> = vec![
            ("output_model", train("")),
            ("output_model", train("tiny")),
            ("output_model", train("../x")),
            (
                "resolution",
                TrainRequest {
                    resolution: 100,
                    ..train("m")
                },
            ),
            (
                "batch_size",
                TrainRequest {
                    batch_size: 65,
                    ..train("m")
                },
            ),
            (
                "learning_rate",
                TrainRequest {
                    learning_rate: Some(f64::NAN),
                    ..train("m")
                },
            ),
            (
                "dataset",
                TrainRequest {
                    dataset_files: 0,
                    ..train("m")
                },
            ),
            (
                "dataset",
                TrainRequest {
                    dataset_prefix: "a/../b".into(),
                    dataset_files: 0,
                    ..train("m")
                },
            ),
        ];
        for (field, t) in cases {
            let mut r = req.clone();
            r.train = Some(t);
            assert_eq!(validate(&r).expect_err(field).field, field);
        }
        let mut with_prompt = req.clone();
        with_prompt.prompts = vec!["a caption".into()];
        assert_eq!(
            validate(&with_prompt).expect_err("prompts").field,
            "prompts"
        );
        let mut txt = ok_request();
        txt.train = Some(train("m"));
        assert_eq!(
            validate(&txt).expect_err("output_model").field,
            "output_model"
        );
    }

    #[test]
    fn image_modes_take_their_size_from_the_init_image() {
        let mut req = ok_request();
        req.mode = "inpaint".into();
        req.width = 0;
        req.height = 0;
        req.init_image = Some(info(128, 64));
        req.mask = Some(info(256, 128));
        req.strength = Some(0.5);
        let spec = validate(&req).expect("valid");
        assert_eq!(
            (spec.mode, spec.width, spec.height, spec.strength),
            (Mode::Inpaint, 128, 64, 0.5)
        );
    }

    #[test]
    fn uploaded_images_are_checked_from_their_header() {
        let mut png = Vec::new();
        image::RgbImage::new(64, 40)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        assert_eq!(
            inspect_image("init_image", &png).expect("png"),
            ImageInfo {
                width: 64,
                height: 40,
                bytes: png.len()
            }
        );
        assert_eq!(
            inspect_image("mask", b"GIF89a....").expect_err("gif").field,
            "mask"
        );
        assert!(inspect_image("init_image", b"").is_err());
        assert!(inspect_image("init_image", &png[..20]).is_err());
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
                prop_assert!((0.0..=1.0).contains(&spec.strength));
                prop_assert!(spec.width % 8 == 0 && spec.height % 8 == 0);
                prop_assert!(u64::from(spec.tasks_total()) <= LIMITS.max_tasks);
                prop_assert!(spec.tasks().count() as u32 == spec.tasks_total());
            }
        }
    }
}
