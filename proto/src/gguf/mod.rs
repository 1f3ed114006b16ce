//! GGUF, llama.cpp's model file, read without candle so the coordinator (shape checks at
//! submit) and the worker (import) accept exactly the same files: the container
//! ([`reader`]), ggml's tensor types ([`ggml_type`]), dequantization to f32 ([`dequant`]), and
//! what Hugging Face model a file holds ([`hf`]: `config.json` and tensor names).

pub mod dequant;
pub mod ggml_type;
pub mod hf;
pub mod reader;

pub use ggml_type::GgmlType;
pub use hf::{import, Arch, Fixup, HfImport, TensorImport};
pub use reader::{Array, GgufError, GgufFile, TensorInfo, Value};
