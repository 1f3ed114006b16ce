//! The wire schema of Distillery (`proto/distillery/v1`) and the artifact transfer format.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("distillery.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("distillery_descriptor");
}

pub use v1::*;

pub mod artifact;
pub mod client;
pub mod gguf;
pub mod judge_stats;
pub mod shape;
