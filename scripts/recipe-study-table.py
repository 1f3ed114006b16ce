#!/usr/bin/env python3
"""The recipe study's table (scripts/recipe-study.sh writes everything it reads):
recipe-study-table.py OUT TOKENS SEQ_LEN SEED WALL_SECONDS."""
import json, os, sys
out, tokens, seq_len, seed, wall = sys.argv[1:6]
ev = lambda n: json.load(open(f"{out}/models/{n}.eval.json")) if os.path.exists(f"{out}/models/{n}.eval.json") else None
st = lambda n: json.load(open(f"{out}/status/{n}.json"))
def shape(n, r=-1):
    m = st(n)["rounds"][r]["metrics"].get("shape") or {}
    return "{}/{}/{}/{}".format(*(int(m.get(k, 0)) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_layers")))
def row(label, n, kind, note=""):
    e = ev(f"{n}-{kind}")
    if e is None:
        return f"| {label} | – | – | – | – | {note or st(n)['state']} |"
    return f"| {label} | {shape(n)} | {e['params']/1e6:.1f}M | {e['perplexity']:.2f} | {e['kd_loss']:.3f} | {note} |"
t = ev("teacher")
print(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized) -> ~70% on the KJV Bible; {int(tokens):,} distillation tokens per student, seq_len {seq_len}, micro-batch 4, bf16 compute, seed {seed}; validation {t['tokens']:,} tokens; wall {int(wall)//60} min {int(wall)%60} s for all campaigns on 2 cores.\n")
print("| model | shape (hidden/MLP/heads/layers) | params | val perplexity | val KL(teacher‖student) | note |")
print("|---|---|---|---|---|---|")
print(f"| teacher | 576/1536/9/30 | {t['params']/1e6:.1f}M | {t['perplexity']:.2f} | 0 | |")
print(row("pruned, Minitron (activation) importance", "activation", "pruned", "no training"))
print(row("pruned, weight magnitude", "magnitude", "pruned", "no training"))
print(row("pruned, random channels", "random", "pruned", "no training"))
print(row("forward KL (the default)", "activation", "student"))
print(row("cross-entropy only", "ce", "student"))
print(row("reverse KL", "reverse_kl", "student"))
print(row("forward KL + intermediate states", "hidden", "student", "cosine, auto pairs"))
print(row("depth-only (prefer = depth)", "depth", "student", "width-only = the forward KL row"))
print(row("two rounds, 85% then 70%", "two_rounds", "student", f"round 0 {shape('two_rounds', 0)}"))
s = st("search")
cands = s["rounds"][0].get("candidates", [])
desc = "; ".join("{}{}: {:.3f}".format("{hidden_size}/{intermediate_size}/{num_attention_heads}/{num_layers}".format(**c["shape"]), " (winner)" if c.get("winner") else "", c["score"] if c.get("score") is not None else float("nan")) for c in cands)
print(row("candidate search winner", "search", "student", "candidates' KD scores: " + desc))
c = st("corrected")["rounds"][0]["metrics"]
ce = ev("corrected-corrected_teacher")
note = "corrected teacher ppl {:.2f}".format(ce["perplexity"]) if ce else ""
print(row("with teacher correction", "corrected", "student", note))
