//! Kernels of our own for the CPU, as candle custom ops: fused ops with a backward
//! ([`fused`]) and the bf16 matrix multiply ([`gemm`]).

pub mod fused;
pub mod gemm;
