"""Makes a tiny random model with transformers itself and saves it the way transformers saves
(current format: rope_parameters, layer_types, dtype), for the parity tests.

usage: hf_make_model.py ARCH OUT_DIR [--dtype float32|bfloat16] [--shard-bytes N] [--seed S]
       hf_make_model.py --batch < [{"arch", "out", "dtype", "shard_bytes", "seed"}, ...]

ARCH: llama3 (Llama with llama3 RoPE scaling), mistral (sliding window 5), qwen2 (biases,
sliding window on the upper layers), qwen3 (q/k norms), gemma3 (GeGLU, (1+w) norms, q/k and
pre/post norms, sliding layers with their own RoPE base, linear scaling on the global ones).
Every parameter, norms included, is drawn at random so that a norm read as w instead of 1 + w,
or a missing bias, shows in the logits.
"""
import argparse
import json
import sys

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make(arch):
    if arch == "llama3":
        return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=5, tie_word_embeddings=False,
                                                rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True, use_sliding_window=True,
                                            sliding_window=5, max_window_layers=2))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=False))
    if arch == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(
            **SHAPE, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    raise SystemExit(f"unknown arch {arch}")


def save(arch, out, dtype="float32", shard_bytes=0, seed=0):
    torch.manual_seed(seed)
    model = make(arch)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                # Around 1 for w-scaled norms; around 0 for Gemma's (1 + w).
                center = 0.0 if arch == "gemma3" else 1.0
                t.copy_(center + 0.3 * torch.randn_like(t))
            else:
                t.copy_(0.25 * torch.randn_like(t))
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(out, **kw)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--batch":
        for job in json.load(sys.stdin):
            save(**job)
        return
    p = argparse.ArgumentParser()
    p.add_argument("arch")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shard-bytes", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    save(a.arch, a.out, a.dtype, a.shard_bytes, a.seed)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
