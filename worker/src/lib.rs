//! Distillery's worker: the agent that joins a coordinator, and the task runners it drives.
//! The ML code (model, prune, distill, judge) never talks to the network; `agent` and `tasks`
//! do.

pub mod agent;
pub mod cli;
pub mod collective;
pub mod data;
pub mod devices;
pub mod distill;
pub mod gpu_check;
pub mod judge;
pub mod model;
pub mod prune;
pub mod runner;
pub mod serve;
pub mod tasks;
