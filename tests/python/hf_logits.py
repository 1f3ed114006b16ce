"""Logits of a Hugging Face model directory from transformers (CPU, f32), for parity tests.

usage: hf_logits.py MODEL_DIR '[[token ids]]'  ->  JSON {"logits": [...], "shape": [...],
"missing": [...], "unexpected": [...], "warnings": [...]} on stdout.
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
    model_dir, ids = sys.argv[1], json.loads(sys.argv[2])
    capture = Capture()
    hf_logging.get_logger().addHandler(capture)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)).logits
    json.dump(
        {
            "logits": logits.flatten().tolist(),
            "shape": list(logits.shape),
            "missing": list(info.get("missing_keys", [])),
            "unexpected": list(info.get("unexpected_keys", [])),
            "warnings": capture.messages + [str(w.message) for w in caught],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
