"""What transformers makes of config.json texts: for each, the config as AutoConfig loads it
(defaults filled, legacy keys converted) and, per layer, what the modeling code uses: the
attention window, the attention scale, and the RoPE inverse frequencies (from the model's own
rotary-embedding class). Missing keys, key combinations and legacy forms are where a reader can
silently disagree with transformers; this is the reference.

usage: hf_effective_config.py --batch < [config dict, ...]  ->  [{"ok": true, ...} or
{"ok": false, "error": "..."}, ...]
"""
import importlib
import json
import sys
import tempfile

import torch
from transformers import AutoConfig

MODULES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3"}


def effective(d):
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/config.json", "w") as f:
            json.dump(d, f)
        c = AutoConfig.from_pretrained(tmp)
    mt = c.model_type
    mod = importlib.import_module(f"transformers.models.{MODULES[mt]}.modeling_{MODULES[mt]}")
    attn_cls = getattr(mod, f"{PREFIX[mt]}Attention")
    rot_cls = getattr(mod, f"{PREFIX[mt]}RotaryEmbedding")
    rot = rot_cls(c)
    layers = []
    for i in range(c.num_hidden_layers):
        with torch.device("meta"):
            a = attn_cls(c, layer_idx=i)
        if mt == "mistral":
            window = getattr(c, "sliding_window", None)  # applied to every layer
        else:
            window = getattr(a, "sliding_window", None)
        if mt == "gemma3_text":
            kind = c.layer_types[i]
            inv = getattr(rot, f"{kind}_inv_freq")
            scaling = getattr(rot, f"{kind}_attention_scaling")
        else:
            inv, scaling = rot.inv_freq, rot.attention_scaling
        layers.append({"window": window, "scale": a.scaling, "inv_freq": inv.tolist(),
                       "rope_attention_scaling": scaling})
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"ok": True, "model_type": mt, "head_dim": head_dim,
            "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings, "layers": layers}


def main():
    out = []
    for d in json.load(sys.stdin):
        try:
            out.append(effective(d))
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            out.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
