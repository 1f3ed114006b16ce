"""PyTorch baseline for the distillation benchmark (worker/benches/distill.rs): one KD step as
Distillery's Trainer does it: teacher forward without gradients, student forward, loss
(T^2 * KL(teacher || student) + ce_weight * CE(student, next token)) summed over positions and
divided by the batch's tokens, computed in f32, backward, global-norm clipping, AdamW (betas 0.9,
0.95, eps 1e-8, weight decay on matrices only). transformers' Llama, random weights, the given
attention implementation and threads; `bf16` runs the teacher's and the student's forward (and so
the student's backward) under torch.autocast("cpu", dtype=torch.bfloat16), master weights and
optimizer state f32, the loss in f32. Speaks the line protocol of bench_common.py.

usage: bench_distill.py TEACHER_JSON STUDENT_JSON BATCH SEQ THREADS {sdpa,eager} {f32,bf16}
       TEMPERATURE CE_WEIGHT MAX_GRAD_NORM WEIGHT_DECAY LR"""
import json
import sys
from contextlib import nullcontext

sys.path.insert(0, __import__("os").path.dirname(__file__))
import bench_common  # noqa: E402


def main():
    teacher_cfg, student_cfg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    batch, seq, threads = (int(x) for x in sys.argv[3:6])
    attn, dtype = sys.argv[6], sys.argv[7]
    temp, ce_weight, max_norm, wd, lr = (float(x) for x in sys.argv[8:13])
    torch = bench_common.set_threads(threads)
    import torch.nn.functional as F

    teacher, chosen = bench_common.llama(teacher_cfg, attn)
    teacher.eval().requires_grad_(False)
    student, _ = bench_common.llama(student_cfg, attn)
    student.train()
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    ids = torch.randint(0, teacher_cfg["vocab_size"], (batch, seq + 1))
    inputs, targets = ids[:, :seq], ids[:, 1:]
    if dtype == "bf16":
        cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif dtype == "f32":
        cast = nullcontext
    else:
        raise SystemExit(f"dtype {dtype!r}: use f32 or bf16")

    def step():
        with torch.no_grad(), cast():
            t = teacher(inputs).logits
        with cast():
            s = student(inputs).logits
        s, t = s.float(), t.float()
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        loss = temp * temp * kl
        if ce_weight != 0.0:
            log_p1 = log_ps if temp == 1.0 else F.log_softmax(s, dim=-1)
            ce = -log_p1.gather(-1, targets.unsqueeze(-1)).sum()
            loss = loss + ce_weight * ce
        (loss / (batch * seq)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, oneDNN kernel selection, AdamW state
    bench_common.serve(step, {"attn": chosen, "dtype": dtype})


if __name__ == "__main__":
    main()
