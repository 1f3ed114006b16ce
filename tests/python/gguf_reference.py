"""The reference side of the GGUF import tests: llama.cpp's own Python package (gguf-py) writes
the files and dequantizes them, and transformers makes the models.

usage: gguf_reference.py --batch < [JOB, ...]   (one process, so torch is imported once)

Jobs:
  {"job": "blocks", "out": DIR}
      DIR/blocks.gguf: for every type Distillery dequantizes, a 3-row tensor of random raw
      blocks (random bytes, the f16 scale fields replaced by random finite f16 values) named
      after the type, written with GGUFWriter (raw_dtype); DIR/<name>.f32: gguf-py's
      dequantization of the tensor as read back from the file, little-endian f32. The file
      also carries metadata of every value type (arrays of arrays included). Prints nothing.
  {"job": "requant", "in": IN, "out": OUT, "ref": REF, "plan": {tensor: type}}
      OUT: IN with the planned tensors quantized again to IQ4_NL / IQ4_XS (a plain
      nearest-value quantizer: gguf-py has none for these types), metadata and other tensors
      copied; REF: the same file with every tensor replaced by gguf-py's dequantization (F32).
  {"job": "convert", "arch": A, "out": DIR, "seed": S}
      DIR/hf: a tiny random model made and saved by transformers; DIR/model.gguf: it converted
      the way llama.cpp's convert_hf_to_gguf.py does (gguf-py's tensor name map, Q/K permuted
      for llama, Gemma norms stored as 1 + w, llama3 RoPE as rope_freqs), F32 tensors;
      DIR/config_expected.json: the model's config as transformers saves a config.
"""
import json
import os
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

# (type, byte offsets of the f16 fields in one block)
TYPES = [
    (T.F32, None), (T.F16, None), (T.BF16, None),
    (T.Q4_0, [0]), (T.Q4_1, [0, 2]), (T.Q5_0, [0]), (T.Q5_1, [0, 2]), (T.Q8_0, [0]),
    (T.Q2_K, [80, 82]), (T.Q3_K, [108]), (T.Q4_K, [0, 2]), (T.Q5_K, [0, 2]), (T.Q6_K, [208]),
    (T.IQ4_NL, [0]), (T.IQ4_XS, [0]),
]


def finite_f16(rng, n):
    """Random f16 bit patterns that are neither infinite nor NaN (subnormals included)."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(0xBFFF)  # clear the top exponent bit: finite
    return bits


def random_blocks(rng, qtype, f16_fields, rows):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    per_row = 2 if block == 256 else 4 if block == 32 else 8
    cols = block * per_row
    if qtype == T.F32:
        bits = rng.integers(0, 1 << 32, rows * cols, dtype=np.uint32)
        bits[(bits & 0x7F800000) == 0x7F800000] &= np.uint32(0xBFFFFFFF)
        return bits.view(np.uint8).reshape(rows, cols * 4)
    if qtype == T.F16:
        return finite_f16(rng, rows * cols).view(np.uint8).reshape(rows, cols * 2)
    if qtype == T.BF16:
        bits = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)
        return bits.view(np.uint8).reshape(rows, cols * 2)
    raw = rng.integers(0, 256, (rows * per_row, size), dtype=np.uint8)
    for off in f16_fields:
        raw[:, off:off + 2] = finite_f16(rng, rows * per_row).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, per_row * size)


def blocks(out):
    rng = np.random.default_rng(20240611)
    path = os.path.join(out, "blocks.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -7)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -9)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "grüße")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc"])
    w.add_key_value("t.nested", [[1, 2], [3, 4, 5]], V.ARRAY, sub_type=V.ARRAY)
    for qtype, fields in TYPES:
        w.add_tensor(qtype.name, random_blocks(rng, qtype, fields, 3), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for t in gguf.GGUFReader(path).tensors:
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        ref.astype("<f4").tofile(os.path.join(out, f"{t.name}.f32"))


KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                   dtype=np.float32)


def nearest(x, scale):
    """Index of the IQ4 value nearest x / scale, per element (scale broadcast)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(scale == 0, 0, x / np.where(scale == 0, 1, scale))
    return np.abs(y[..., None] - KVALUES).argmin(-1).astype(np.uint8)


def pack_nibbles(q):
    """ggml's 32-element nibble layout: byte i holds elements i (low) and i + 16 (high)."""
    return q[..., :16] | (q[..., 16:] << 4)


def quantize_iq4_nl(x):
    b = x.reshape(-1, 32)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16)
    q = nearest(b, d.astype(np.float32))
    return np.concatenate([d.view(np.uint8), pack_nibbles(q)], axis=-1)


def quantize_iq4_xs(x):
    b = x.reshape(-1, 8, 32)
    s = np.abs(b).max(-1) / 127
    d = (s.max(-1, keepdims=True) / 31).astype(np.float16)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(d32 == 0, 32, np.clip(np.round(s / np.where(d32 == 0, 1, d32)) + 32, 0, 63))
    ls = ls.astype(np.uint8)
    q = nearest(b, (d32 * (ls.astype(np.float32) - 32))[..., None])
    high = ((ls >> 4) & 3).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))
    scales_h = high.sum(-1, dtype=np.uint16)[:, None]
    low = ls & 0x0F
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    return np.concatenate([d.view(np.uint8), scales_h.view(np.uint8), scales_l,
                           pack_nibbles(q).reshape(-1, 128)], axis=-1)


def copy_metadata(r, writers):
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        value = f.contents()
        if vtype == V.ARRAY and len(value) == 0:
            continue  # gguf-py cannot write empty arrays; a missing list reads as empty
        for w in writers:
            w.add_key_value(f.name, value, vtype, sub_type=f.types[-1] if vtype == V.ARRAY else None)


def raw_rows(t):
    """A tensor's bytes shaped (rows..., bytes per row), what add_tensor takes with raw_dtype."""
    dims = [int(d) for d in reversed(t.shape.tolist())]
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    return np.asarray(t.data).view(np.uint8).reshape(dims[:-1] + [dims[-1] // block * size]), dims


def requant(inp, out, ref, plan):
    r = gguf.GGUFReader(inp)
    arch = r.fields["general.architecture"].contents()
    w, wr = gguf.GGUFWriter(out, arch), gguf.GGUFWriter(ref, arch)
    copy_metadata(r, [w, wr])
    for t in r.tensors:
        raw, dims = raw_rows(t)
        qtype = t.tensor_type
        if t.name in plan:
            x = gguf.quants.dequantize(raw, qtype).reshape(dims)
            qtype = T[plan[t.name]]
            q = quantize_iq4_nl(x) if qtype == T.IQ4_NL else quantize_iq4_xs(x)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = q.reshape(dims[:-1] + [dims[-1] // block * size])
        w.add_tensor(t.name, raw, raw_dtype=qtype)
        wr.add_tensor(t.name, gguf.quants.dequantize(raw, qtype).astype(np.float32))
    for x in (w, wr):
        x.write_header_to_file()
        x.write_kv_data_to_file()
        x.write_tensors_to_file()
        x.close()


SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make(arch):
    """A transformers model llama.cpp represents faithfully (no sliding window on llama or
    qwen2, Gemma's every-sixth-layer pattern, query_pre_attn_scalar = head_dim)."""
    import transformers as tr
    if arch == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**SHAPE, rope_parameters={
            "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    if arch == "llama3":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}))
    if arch == "qwen2":
        return tr.Qwen2ForCausalLM(tr.Qwen2Config(**SHAPE, tie_word_embeddings=True))
    if arch == "qwen3":
        return tr.Qwen3ForCausalLM(tr.Qwen3Config(**SHAPE, head_dim=32))
    if arch == "gemma3":
        return tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(
            **{**SHAPE, "num_hidden_layers": 7}, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    raise SystemExit(f"unknown arch {arch}")


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope, head_dim):
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3, in float32 torch as it computes."""
    import math
    import torch
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def convert(hf_dir, out):
    from safetensors.numpy import load_file
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(hf_dir)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}[c.model_type]
    name = gguf.MODEL_ARCH_NAMES[arch]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters["full_attention"] if name == "gemma3" else c.rope_parameters
    w = gguf.GGUFWriter(out, name)
    w.add_name("distillery-test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if name == "llama":
        w.add_rope_dimension_count(head_dim)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    extra = {}
    if rope["rope_type"] == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(rope, head_dim)
        # llama.cpp's converter assumes 8192 here; the true value lets the config round-trip.
        if rope["original_max_position_embeddings"] != 8192:
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if name == "gemma3":
        # What llama.cpp hard-codes for gemma3 must hold, or the file would not mean this model.
        assert c.query_pre_attn_scalar == head_dim
        assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert c.layer_types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(c.num_hidden_layers)]
        w.add_sliding_window(c.sliding_window)
    for key, tid in [("bos", c.bos_token_id), ("eos", c.eos_token_id), ("pad", c.pad_token_id)]:
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    tmap = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for hf_name, t in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.astype(np.float32)
        if name == "llama" and ".q_proj." in hf_name:
            t = permute(t, c.num_attention_heads)
        if name == "llama" and ".k_proj." in hf_name:
            t = permute(t, c.num_key_value_heads)
        if name == "gemma3" and hf_name.endswith("norm.weight"):
            t = t + 1.0
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new is not None, hf_name
        w.add_tensor(new, np.ascontiguousarray(t))
    for k, t in extra.items():
        w.add_tensor(k, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # The config as transformers saves a config (a model's save adds architectures and dtype).
    c.architectures = None
    c.dtype = None
    with tempfile.TemporaryDirectory() as d:
        c.save_pretrained(d)
        text = open(os.path.join(d, "config.json")).read()
    with open(os.path.join(os.path.dirname(out), "config_expected.json"), "w") as f:
        f.write(text)


def make_and_convert(arch, out, seed):
    import torch
    torch.manual_seed(seed)
    model = make(arch)
    with torch.no_grad():
        for n, t in model.named_parameters():
            if n.endswith("norm.weight"):
                # Around 1 for w-scaled norms; around 0 for Gemma's (1 + w).
                t.copy_((0.0 if arch == "gemma3" else 1.0) + 0.3 * torch.randn_like(t))
            else:
                t.copy_(0.25 * torch.randn_like(t))
    hf = os.path.join(out, "hf")
    model.save_pretrained(hf)
    convert(hf, os.path.join(out, "model.gguf"))


def main():
    assert sys.argv[1:] == ["--batch"], __doc__
    for job in json.load(sys.stdin):
        kind = job["job"]
        if kind == "blocks":
            blocks(job["out"])
        elif kind == "requant":
            requant(job["in"], job["out"], job["ref"], job["plan"])
        elif kind == "convert":
            make_and_convert(job["arch"], job["out"], job["seed"])
        else:
            raise SystemExit(f"unknown job {kind}")


if __name__ == "__main__":
    main()
