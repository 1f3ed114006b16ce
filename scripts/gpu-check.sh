#!/usr/bin/env bash
# Runs the GPU checks where a GPU is present: NCCL all-reduce = CPU sum, a distillation step on
# the GPU = the same step on the CPU, and distillation throughput (SmolLM2-135M shape).
# Usage: scripts/gpu-check.sh [WORKER_BINARY[.gz]] [cuda:N]  (from scripts/build-cuda.sh).
# Without a GPU it says so and exits 0 (skipped).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/cuda/release/worker}
DEV=${2:-cuda:0}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIPPED gpu-check: no GPU here (nvidia-smi finds none)"
  exit 0
fi
if [[ "$BIN" == *.gz ]]; then
  gunzip -c "$BIN" > /tmp/distillery-worker && chmod +x /tmp/distillery-worker && BIN=/tmp/distillery-worker
fi
# CUDA runtime libraries: from the CUDA_HOME the build made, or from the machine's Python
# (PyTorch's nvidia-* wheels), or the system's.
LIBS=()
if [ -d "$ROOT/target/cuda-tools/cuda-home/lib64" ]; then LIBS+=("$ROOT/target/cuda-tools/cuda-home/lib64"); fi
if command -v python3 >/dev/null 2>&1; then
  NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
  if [ -n "$NV" ]; then
    while IFS= read -r d; do LIBS+=("$d"); done < <(find "$NV/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null)
  fi
fi
export LD_LIBRARY_PATH=$(IFS=:; echo "${LIBS[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ldd "$BIN" | grep -q "not found"; then
  echo "missing libraries for $BIN:"; ldd "$BIN" | grep "not found"; exit 1
fi
nvidia-smi -L
"$BIN" gpu-check --device "$DEV"
