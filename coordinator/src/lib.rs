//! Distillery's coordinator: the campaign spec, the pure state machine, its sled store, the gRPC
//! services and the `coordinator` CLI. See ARCHITECTURE.md for the map.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod cli;
pub mod demo;
pub mod engine;
pub mod faults;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod limits;
pub mod machine;
pub mod phases;
pub mod plan;
pub mod progress_view;
pub mod report;
pub mod server;
pub mod source_model;
pub mod spec;
pub mod store;
