//! The bf16 matrix multiply with f32 accumulation, dispatched at run time.
