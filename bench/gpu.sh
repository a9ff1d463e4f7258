#!/usr/bin/env bash
# GPU benchmarks for issue 7, run on the GPU machine (no Rust there) with a binary built
# elsewhere; see bench/README.md. Ours and the peer run in one invocation, because the
# machine's speed drifts between runs: only the ratio from one run is comparable.
#
#   bench/gpu.sh dequant QDYLORA_BIN   NF4 + double-quant dequantization, bf16 out: qdylora's
#                                      NVRTC kernel (checked bit-exact against the CPU first)
#                                      next to bitsandbytes' dequantize_4bit, same shape
#   bench/gpu.sh train                 training throughput: not built yet (issue 7)
#
# Environment:
#   BNB_WHEEL_DIR  folder holding the bitsandbytes 0.50.2 wheel (needed when `import
#                  bitsandbytes` fails; bench/README.md says how to fetch it)
#   PYTHON         python with torch + CUDA (default python3)
#   ROWS COLS BLOCKSIZE ITERS WARMUP   shape and timing (default 11008 4096 64 100 10)
#
# Not yet run on a GPU machine: written in a session without one.
set -euo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

mode=${1:-}
case "$mode" in
train)
    echo "bench/gpu.sh train: training-throughput mode is not built yet, see issue 7" >&2
    exit 2
    ;;
dequant) ;;
*) usage ;;
esac

bin=${2:-}
[[ -n "$bin" && -x "$bin" ]] || {
    echo "bench/gpu.sh dequant: give the path of a qdylora binary built with --features cuda" >&2
    exit 2
}

PYTHON=${PYTHON:-python3}
ROWS=${ROWS:-11008} COLS=${COLS:-4096} BLOCKSIZE=${BLOCKSIZE:-64}
ITERS=${ITERS:-100} WARMUP=${WARMUP:-10}
# libnvrtc.so.13 and libcuda.so.1 are opened at run time.
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 1. Ours. It exits non-zero (and this script stops) if the GPU output is not bit-exact.
ours_json=$("$bin" gpu-dequant --json --rows "$ROWS" --cols "$COLS" --blocksize "$BLOCKSIZE" \
    --iters "$ITERS" --warmup "$WARMUP")

# 2. The peer, installed from a wheel when missing (the GPU machine has no network).
if ! "$PYTHON" -c 'import bitsandbytes' 2>/dev/null; then
    [[ -n "${BNB_WHEEL_DIR:-}" ]] || {
        echo "bitsandbytes is not installed: set BNB_WHEEL_DIR to the folder of its wheel" >&2
        exit 2
    }
    site=$(mktemp -d /tmp/bnb-site.XXXXXX)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" \
        "$BNB_WHEEL_DIR"/bitsandbytes-*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

OURS_JSON=$ours_json "$PYTHON" - <<'PY'
import json, os, statistics
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

ours = json.loads(os.environ["OURS_JSON"])
rows, cols, bs = ours["rows"], ours["cols"], ours["blocksize"]
iters, warmup = ours["iters"], ours["warmup"]


def median_us(fn):
    """Median of `iters` calls, each between two CUDA events, after `warmup` calls (as ours)."""
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


torch.manual_seed(0)
w = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda") * 0.02
q, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
out = torch.empty_like(w)
bnb_us = median_us(lambda: F.dequantize_4bit(q, st, out=out))
copy = torch.empty_like(w)
copy_us = median_us(lambda: copy.copy_(out))

# The bytes qdylora counts (host/src/gpu/traffic.rs), taken from bnb's own tensors: packed
# codes, 8-bit absmax, f32 nested absmax, the 256-entry map read; bf16 output written.
bnb_bytes = (q.numel() * q.element_size() + st.absmax.numel() * st.absmax.element_size()
             + st.state2.absmax.numel() * 4 + st.state2.code.numel() * 4 + out.numel() * 2)
ours_bf16 = ours["bf16"]
if bnb_bytes != ours_bf16["bytes"]:
    print(f"note: byte counts differ (bitsandbytes {bnb_bytes}, qdylora {ours_bf16['bytes']})")
bnb_gbps = bnb_bytes / (bnb_us * 1e-6) / 1e9
copy_gbps = 2 * out.numel() * 2 / (copy_us * 1e-6) / 1e9

print(f"NF4 + double-quant dequantization of {rows}x{cols}, blocksize {bs}, bf16 out, "
      f"on {torch.cuda.get_device_name()} (median of {iters} after {warmup}, CUDA events)")
print(f"  qdylora (cudarc + NVRTC)   {ours_bf16['median_us']:8.1f} us  "
      f"{ours_bf16['gb_per_s']:7.0f} GB/s  (bit-exact with the CPU core: {ours['bit_exact']})")
print(f"  bitsandbytes {bnb.__version__:<13} {bnb_us:8.1f} us  {bnb_gbps:7.0f} GB/s")
print(f"  torch bf16 copy (ceiling)  {copy_us:8.1f} us  {copy_gbps:7.0f} GB/s")
print(f"  qdylora f32 out            {ours['f32']['median_us']:8.1f} us  "
      f"{ours['f32']['gb_per_s']:7.0f} GB/s")
print(f"ratio qdylora / bitsandbytes (bf16 out): {ours_bf16['gb_per_s'] / bnb_gbps:.2f}x  "
      f"(issue 7 target: >= 2,500 GB/s)")
print(json.dumps({"qdylora": ours, "bitsandbytes": {"version": bnb.__version__,
      "median_us": bnb_us, "bytes": bnb_bytes, "gb_per_s": bnb_gbps},
      "bf16_copy_gb_per_s": copy_gbps}))
PY
