"""PyTorch baseline for the forward benchmark: transformers' Llama with the given shape, random
weights, f32, eager attention, the given thread count. Prints JSON {"tokens_per_s", "seconds"}."""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    cfg, batch, seq, reps, threads = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).float().eval()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    with torch.no_grad():
        model(ids)
        start = time.perf_counter()
        for _ in range(reps):
            model(ids)
        secs = (time.perf_counter() - start) / reps
    json.dump({"tokens_per_s": batch * seq / secs, "seconds": secs}, sys.stdout)


if __name__ == "__main__":
    main()
