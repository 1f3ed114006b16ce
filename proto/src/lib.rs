//! The wire schema of Distillery (`proto/distillery/v1`) and the artifact transfer format, and
//! the dependency-free code both the coordinator and the worker run: model shapes, the memory
//! plan of a distillation rank, judge statistics, and the GGUF reader (so submit-time checks
//! accept exactly the files workers load).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("distillery.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("distillery_descriptor");
}

pub use v1::*;

pub mod artifact;
pub mod bradley_terry;
pub mod client;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod gguf;
pub mod judge_agreement;
pub mod judge_stats;
pub mod length_control;
pub mod memplan;
pub mod py_json;
pub mod shape;
