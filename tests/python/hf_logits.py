"""Logits of a Hugging Face model directory from transformers (CPU, f32), for parity tests.

usage: hf_logits.py MODEL_DIR '[[token ids]]' [NEW_TOKENS]  ->  JSON {"logits": [...],
"shape": [...], "missing": [...], "unexpected": [...], "warnings": [...], "generated": [[...]]}
on stdout; with NEW_TOKENS, "generated" holds each row's greedy continuation (no EOS stop).

usage: hf_logits.py --batch < [{"dir": ..., "ids": [[...]], "new_tokens": N}, ...]  ->  a JSON
list of the objects above, one per job (one process, so torch is imported once).
"""
import json
import logging
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main():
    if sys.argv[1] == "--batch":
        jobs = json.load(sys.stdin)
        json.dump([run(j["dir"], j["ids"], j.get("new_tokens", 0)) for j in jobs], sys.stdout)
    else:
        new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        json.dump(run(sys.argv[1], json.loads(sys.argv[2]), new_tokens), sys.stdout)


def run(model_dir, ids, new_tokens):
    capture = Capture()
    hf_logging.get_logger().addHandler(capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    hf_logging.get_logger().removeHandler(capture)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)).logits
        generated = []
        if new_tokens:
            model.generation_config.eos_token_id = None
            for row in ids:
                x = torch.tensor([row], dtype=torch.long)
                out = model.generate(x, max_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
                generated.append(out[0, len(row):].tolist())
    return {
        "logits": logits.flatten().tolist(),
        "shape": list(logits.shape),
        "missing": list(info.get("missing_keys", [])),
        "unexpected": list(info.get("unexpected_keys", [])),
        "warnings": capture.messages + [str(w.message) for w in caught],
        "generated": generated,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
