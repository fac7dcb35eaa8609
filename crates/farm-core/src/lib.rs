//! The farm's vocabulary: ids, states, the job spec and its ONE validation, seed expansion and
//! the storage key layout. Pure data and pure functions: this crate does no IO.

mod capability;
mod ids;
mod redact;
mod spec;
mod status;

pub use capability::{model_key, BatchKey, Capabilities, Unfit};
pub use ids::{Attempt, JobId, TaskRef, WorkerId};
pub use redact::redact_url;
pub use spec::{
    inspect_image, object_key, parse_priority, published_model_dir, validate, ImageInfo,
    InvalidField, JobRequest, JobSpec, Mode, SchedulerName, SeedSource, TaskSpec, TrainRequest,
    TrainSpec, LIMITS, PRIORITY_CLASSES,
};
pub use status::{JobStatus, TaskStatus, UnknownStatus};
