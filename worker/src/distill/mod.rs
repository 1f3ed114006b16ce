//! Knowledge distillation of a pruned student from its teacher (DESIGN.md §6): the loss
//! ([`loss`]), AdamW with warmup + cosine and clipping ([`optim`]), deterministic multi-domain
//! data with dynamic batch loading ([`data`]), and the data-parallel loop with exact checkpoints
//! ([`train`]).

pub mod data;
pub mod hidden;
pub mod loss;
pub mod optim;
pub mod train;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fused;
#[cfg(test)]
mod tests_hidden;
