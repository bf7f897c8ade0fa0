#!/usr/bin/env bash
# Builds Ocellus with `--features cuda` (release, target/cuda) on any Linux machine, GPU or not.
#
# candle compiles its CUDA kernels with nvcc at build time and links cudart, cuBLAS, cuRAND,
# NVRTC and the driver's libcuda. Where no CUDA toolkit is installed (no `nvcc` on PATH and no
# CUDA_HOME), this script installs NVIDIA's CUDA 13.0 toolkit wheels from PyPI into
# target/cuda-toolkit (nvcc, cicc, headers, the libraries: about 1.3 GB) and uses that.
# Where no driver is installed (a build machine), the link uses a stub libcuda.so generated
# from the driver API cudarc binds, as CUDA's own lib64/stubs does; at run time the real
# driver's libcuda.so.1 is loaded, never the stub.
#
#   CUDA_COMPUTE_CAP   the GPU's compute capability for the statically compiled kernels
#                      (default: nvidia-smi's answer, else 90: H100/H200)
#   PYTHON             the python3 that creates the toolkit's venv (default python3)
#
# Running the binary: `target/cuda/env.sh` (written at the end) puts the toolkit's libraries
# on LD_LIBRARY_PATH; then `target/cuda/release/ocellus serve --device cuda:0`.
# Extra arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
toolkit=$root/target/cuda-toolkit

scripts/system-deps.sh

if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
  if [ ! -x "$toolkit/venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$toolkit/venv"
  fi
  # One release throughout: nvcc must match the headers and the runtime it links.
  "$toolkit/venv/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88" \
    "nvidia-cublas>=13.0,<13.1" "nvidia-curand==10.4.0.35"
  CUDA_HOME=$(echo "$toolkit"/venv/lib/python3*/site-packages/nvidia/cu13)
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
fi
nvcc --version | tail -2

# The wheels ship versioned sonames only (libcublas.so.13); the linker looks for libcublas.so.
links=$toolkit/link
mkdir -p "$links"
libdir=$(dirname "$(command -v nvcc)")/../lib
[ -d "$libdir/../lib64" ] && libdir=$libdir/../lib64
for lib in cudart cublas cublasLt curand nvrtc; do
  found=$(ls "$libdir"/lib$lib.so* 2>/dev/null | head -1 || true)
  [ -n "$found" ] && ln -sf "$(readlink -f "$found")" "$links/lib$lib.so"
done
if ! ldconfig -p | grep -q 'libcuda\.so\.1' && [ ! -e "$libdir/stubs/libcuda.so" ]; then
  sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -1)
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn \(.*\)/void \1(void) {}/' | sort -u \
    > "$toolkit/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$toolkit/libcuda_stub.c"
fi

if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d . || true)
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fi
export CUDA_COMPUTE_CAP
echo "compute capability $CUDA_COMPUTE_CAP, libraries in $links"

RUSTFLAGS="${RUSTFLAGS:-} -L native=$links" cargo build --release --locked --features cuda \
  --target-dir target/cuda --bin ocellus "$@"

cat >target/cuda/env.sh <<EOF
# Source this before running target/cuda/release/ocellus: the CUDA libraries it was linked with.
export LD_LIBRARY_PATH=$(readlink -f "$libdir")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
echo "built target/cuda/release/ocellus; run it after: . target/cuda/env.sh"
