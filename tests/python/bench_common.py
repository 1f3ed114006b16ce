"""What the PyTorch baselines of the worker benchmarks share: thread setup, the model, and the
line protocol the Rust bench drives (worker/benches/common/mod.rs).

Protocol: after setup and warm-up the script prints one JSON line {"ready": true, "info": ...};
then for every stdin line `run N` it runs N iterations and prints {"seconds": mean per
iteration}; it exits at end of input. Everything else goes to stderr."""
import json
import os
import sys
import time


def set_threads(threads):
    """The same thread count for every pool PyTorch may use (intra-op OpenMP/MKL, oneDNN);
    set before torch is imported so OpenMP starts with it, and again through the API."""
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(threads)
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return torch


def llama(cfg, attn):
    """transformers' Llama with this shape, random weights (seed 0), f32, the given attention
    implementation; returns the model and the implementation transformers actually chose."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn)).float()
    chosen = model.config._attn_implementation
    if chosen != attn:
        raise SystemExit(f"asked for attn_implementation={attn!r}, transformers chose {chosen!r}")
    return model, chosen


def serve(step, info):
    """Answers `run N` lines on stdin with the mean seconds of N calls of `step`."""
    import torch
    import transformers

    info = dict(info, torch=torch.__version__, transformers=transformers.__version__,
                threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"))
    print(json.dumps({"ready": True, "info": info}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 2 or parts[0] != "run":
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        n = int(parts[1])
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(json.dumps({"seconds": (time.perf_counter() - start) / n}), flush=True)
