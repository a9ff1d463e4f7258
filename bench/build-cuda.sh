#!/usr/bin/env bash
# Builds the `cuda` binary on a machine with no GPU and no CUDA toolkit (issue 7).
#
#   bench/build-cuda.sh [OUTPUT]        # default OUTPUT: ./qdylora-cuda
#
# CUDA 13.0 comes from NVIDIA's PyPI wheels (nvcc, headers, cuBLAS, cuRAND, NVRTC); candle's own
# kernels are compiled by that nvcc for sm_90 (H100). The driver library is only needed when the
# binary runs, so a link-time stand-in with libcuda's SONAME is generated from the driver
# functions cudarc declares. Pinned to 13.0.x: newer nvcc wheels emit PTX that driver 580 rejects.
# Cold build on 2 cores: about 15 minutes (most of it candle's kernels).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/qdylora-cuda}
toolkit=${QDYLORA_CUDA_TOOLKIT:-$HOME/.cache/qdylora/cuda13}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$toolkit/nvidia/cu13/bin/nvcc" ]; then
    echo "fetching the CUDA 13.0 toolkit wheels into $toolkit"
    mkdir -p "$toolkit/wheels"
    python3 -m pip download --quiet --no-deps -d "$toolkit/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
    for wheel in "$toolkit"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$toolkit"
    done
    chmod +x "$toolkit"/nvidia/cu13/bin/* "$toolkit"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
cuda_home=$toolkit/nvidia/cu13
lib=$cuda_home/lib

# The linker wants unversioned names.
for name in cublas cublasLt nvrtc cudart; do
    ln -sf "lib$name.so.13" "$lib/lib$name.so"
done
ln -sf libcurand.so.10 "$lib/libcurand.so"

# libcuda.so stand-in: every cu* function cudarc can call, as an empty symbol, SONAME libcuda.so.1
# (the real driver library is found by that name at run time).
if [ ! -e "$lib/libcuda.so" ]; then
    cd "$root"
    cargo fetch --quiet
    registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
    sys=$(ls -d "$registry"/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -n 1)
    grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/^pub unsafe fn //' | sort -u |
        sed 's/.*/void &(void) {}/' >"$lib/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$lib/libcuda_stub.c"
fi
ln -sf libcuda.so "$lib/libcuda.so.1"

export CUDA_HOME=$cuda_home CUDA_ROOT=$cuda_home CUDA_PATH=$cuda_home
export PATH=$cuda_home/bin:$PATH
export LIBRARY_PATH=$lib${LIBRARY_PATH:+:$LIBRARY_PATH}

# Apart from the default build's target dir, so neither rebuilds the other's candle.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda}
cd "$root"
cargo build --release -p qdylora --features cuda
target=$CARGO_TARGET_DIR
strip -o "$out" "$target/release/qdylora"
echo "built $out ($(du -h "$out" | cut -f1)); it needs libcuda.so.1 (the NVIDIA driver) and the CUDA 13"
echo "libraries (cuBLAS, cuRAND, NVRTC) at run time: bench/gpu.sh sets LD_LIBRARY_PATH"
