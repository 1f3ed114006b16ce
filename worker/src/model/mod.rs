//! The model core: Llama-family config, a trainable candle implementation, and Hugging Face
//! directory I/O.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod io;
pub mod llama;
pub mod perplexity;
pub mod test_model;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use llama::{ForwardOptions, KvCache, Llama, Probe};
