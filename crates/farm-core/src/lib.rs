//! The farm's vocabulary: ids, states, the job spec and its ONE validation, seed expansion and
//! the storage key layout. Pure data and pure functions: this crate does no IO.

mod ids;
mod redact;
mod spec;
mod status;

pub use ids::{Attempt, JobId, TaskRef, WorkerId};
pub use redact::redact_url;
pub use spec::{
    inspect_image, object_key, validate, ImageInfo, InvalidField, JobRequest, JobSpec, Mode,
    SchedulerName, SeedSource, TaskSpec, TrainRequest, TrainSpec, LIMITS,
};
pub use status::{JobStatus, TaskStatus, UnknownStatus};
