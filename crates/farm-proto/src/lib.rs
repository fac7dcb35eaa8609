//! The `farm.v1` gRPC API, generated from `proto/farm/v1/farm.proto`. No logic lives here.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("farm.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("farm_descriptor");
}
