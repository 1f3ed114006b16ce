"""PyTorch baseline for the distillation benchmark: one KD step as Distillery does it (teacher
forward without gradients, student forward + backward of T^2*KL(teacher || student) averaged over
tokens, global-norm clipping at 1.0, AdamW), transformers' Llama, f32, eager attention, the given
threads. Prints JSON {"tokens_per_s", "seconds"} (best round, mean step time within a round)."""
import json
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    teacher_cfg, student_cfg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    batch, seq, reps, rounds, threads = (int(x) for x in sys.argv[3:8])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**teacher_cfg, attn_implementation="eager")).float().eval()
    student = LlamaForCausalLM(LlamaConfig(**student_cfg, attn_implementation="eager")).float().train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    ids = torch.randint(0, teacher_cfg["vocab_size"], (batch, seq))
    temp = 1.0

    def step():
        with torch.no_grad():
            t = teacher(ids).logits
        s = student(ids).logits
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        loss = temp * temp * (log_pt.exp() * (log_pt - log_ps)).sum() / (batch * seq)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - start) / reps)
    json.dump({"tokens_per_s": batch * seq / best, "seconds": best}, sys.stdout)


if __name__ == "__main__":
    main()
