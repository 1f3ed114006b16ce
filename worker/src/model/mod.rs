//! The model core: Llama-family config, a trainable candle implementation, and Hugging Face
//! directory I/O.

pub mod chat;
pub mod config;
pub mod generate;
pub mod generation_config;
pub mod gguf;
pub mod io;
pub mod llama;
pub mod ops;
pub mod perplexity;
pub mod test_model;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use llama::{ForwardOptions, KvCache, Llama, Probe};

/// Largest absolute elementwise difference of two tensors of one shape, in f64 (how tests and
/// callers check that two models or passes agree).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<f64> {
    let d = (a.to_dtype(candle_core::DType::F64)? - b.to_dtype(candle_core::DType::F64)?)?;
    d.abs()?.max_all()?.to_scalar::<f64>()
}
