"""Writes config.json files as transformers itself saves them, one per architecture and
variant, into the folder given (worker/src/model/config/transformers/ holds the committed
output, read by the config unit tests). Re-run after a transformers upgrade:

    .venv-parity/bin/python tests/python/write_configs.py worker/src/model/config/transformers
"""
import json
import os
import sys
import tempfile

from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=7, vocab_size=300)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

VARIANTS = {
    "llama": (LlamaConfig, {}),
    "llama-llama3-rope": (LlamaConfig, dict(rope_parameters=LLAMA3, max_position_embeddings=131072)),
    "llama-linear-rope": (LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral": (MistralConfig, {}),
    "mistral-no-window": (MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2-sliding": (Qwen2Config, dict(use_sliding_window=True, sliding_window=16, max_window_layers=3)),
    "qwen3": (Qwen3Config, dict(head_dim=32)),
    "gemma3": (Gemma3TextConfig, dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16)),
    "gemma3-linear-rope": (Gemma3TextConfig, dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, (cls, kw) in VARIANTS.items():
        c = cls(**{**SHAPE, **kw})
        with tempfile.TemporaryDirectory() as d:
            c.save_pretrained(d)
            text = open(os.path.join(d, "config.json")).read()
        json.loads(text)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
