"""PyTorch baseline for the forward benchmark (worker/benches/forward.rs): transformers' Llama
with the given shape, random weights, under torch.inference_mode(), in f32 or under
torch.autocast("cpu", dtype=torch.bfloat16), with the given attention implementation and
threads. Speaks the line protocol of bench_common.py.

usage: bench_forward.py CONFIG_JSON BATCH SEQ THREADS {sdpa,eager} {f32,bf16}"""
import json
import sys
from contextlib import nullcontext

sys.path.insert(0, __import__("os").path.dirname(__file__))
import bench_common  # noqa: E402


def main():
    cfg = json.loads(sys.argv[1])
    batch, seq, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    attn, dtype = sys.argv[5], sys.argv[6]
    torch = bench_common.set_threads(threads)
    model, chosen = bench_common.llama(cfg, attn)
    model.eval()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    if dtype == "bf16":
        cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif dtype == "f32":
        cast = nullcontext
    else:
        raise SystemExit(f"dtype {dtype!r}: use f32 or bf16")

    def step():
        with torch.inference_mode(), cast():
            logits = model(ids).logits
        assert logits.shape == (batch, seq, cfg["vocab_size"])

    step()  # warm-up: first-call allocation and oneDNN kernel selection
    bench_common.serve(step, {"attn": chosen, "dtype": dtype})


if __name__ == "__main__":
    main()
