#!/usr/bin/env bash
# Builds `worker` with the `cuda` feature (candle CUDA + NCCL) on a machine with no GPU and no
# CUDA installed, from PyPI's CUDA 13.0 wheels and a link-time libcuda stub (../shared/GPU.md).
# The binary lands in target/cuda/release/worker; carry it to a GPU machine and run
# scripts/gpu-check.sh there. Tools are cached under $CUDA_TOOLS (default target/cuda-tools).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${CUDA_TOOLS:-$ROOT/target/cuda-tools}
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  python3 -m venv "$TOOLS/venv"
fi
# Pinned to CUDA 13.0: candle's kernels are PTX the driver JIT-compiles, and driver 580 rejects newer PTX.
"$TOOLS/venv/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-nvjitlink==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.27.7
SP=$("$TOOLS/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
CU=$SP/nvidia/cu13
NCCL=$SP/nvidia/nccl
[ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"   # nvcc.profile links from $(TOP)/lib64

# A CUDA_HOME of symlinks.
H=$TOOLS/cuda-home
rm -rf "$H"
mkdir -p "$H/include" "$H/lib64/stubs"
ln -s "$CU/bin" "$H/bin"
ln -s "$CU/nvvm" "$H/nvvm"
for f in "$CU"/include/* "$NCCL"/include/*; do ln -sf "$f" "$H/include/$(basename "$f")"; done
for lib in "$CU"/lib/*.so* "$NCCL"/lib/*.so*; do
  b=$(basename "$lib")
  ln -sf "$lib" "$H/lib64/$b"
  ln -sf "$lib" "$H/lib64/${b%%.so*}.so"           # unversioned name for the linker
done

# libcuda is the driver's: link against a stub whose functions all return CUDA_ERROR_NO_DEVICE.
(cd "$ROOT" && cargo fetch -q)
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
{
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$CU/include/cuda.h" || true
  grep -ohE 'pub (unsafe )?fn cu[A-Z][A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/.*fn //' || true
} | sed -E 's/\s*\($//' | sort -u | awk '{print "int " $1 "(void) { return 100; }"}' > "$TOOLS/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$H/lib64/stubs/libcuda.so" "$TOOLS/libcuda_stub.c"
cp "$H/lib64/stubs/libcuda.so" "$H/lib64/stubs/libcuda.so.1"

export CUDA_HOME=$H CUDA_PATH=$H CUDA_ROOT=$H PATH=$H/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=$(nproc)
export LIBRARY_PATH=$H/lib64:$H/lib64/stubs
cd "$ROOT"
export CARGO_TARGET_DIR=$ROOT/target/cuda   # keeps the CPU build in target/ untouched
cargo build --release -p distillery-worker --features cuda --bin worker
# A stripped, compressed copy small enough to carry to a GPU machine (gpu-check.sh takes it as is).
strip --strip-all -o "$CARGO_TARGET_DIR/release/worker.carry" "$CARGO_TARGET_DIR/release/worker"
gzip -9 -f "$CARGO_TARGET_DIR/release/worker.carry"
echo "built $ROOT/target/cuda/release/worker with the cuda feature (sm_${CUDA_COMPUTE_CAP}); to carry: $CARGO_TARGET_DIR/release/worker.carry.gz ($(du -h "$CARGO_TARGET_DIR/release/worker.carry.gz" | cut -f1))"
