//! Fused ops with a backward (RMSNorm, RoPE, SwiGLU, causal attention, the KD loss).
