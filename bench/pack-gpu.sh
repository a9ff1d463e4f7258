#!/usr/bin/env bash
# Packs what a GPU machine with no Rust and no network needs besides the repository into `.gpu/`
# (ignored by git), small enough to travel with the working tree (the lent machines take 64 MiB
# in all; see bench/README.md, "a session on a lent GPU machine"):
#
#   bench/pack-gpu.sh [BINARY]    # BINARY: a qdylora built by bench/build-cuda.sh (default:
#                                 # build one now, into a temporary file)
#
#   .gpu/qdylora-cuda.xz          the binary, xz-compressed (~55 MB -> ~7 MB: most of it is
#                                 candle's PTX text); bench/gpu.sh unpacks a `.xz` itself
#   .gpu/bitsandbytes-*.whl       the peer's bitsandbytes 0.50.2 wheel with only the libraries
#                                 a CUDA 13 torch loads (cpu, cuda130, cuda132): 43 MB -> ~7 MB.
#                                 The files kept are byte for byte the published wheel's, and
#                                 RECORD lists exactly them, so pip installs it as usual
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
pack=$root/.gpu
limit=$((64 * 1024 * 1024))
bnb_version=0.50.2

mkdir -p "$pack"
work=$(mktemp -d /tmp/qdylora-pack.XXXXXX)
trap 'rm -rf "$work"' EXIT

binary=${1:-}
if [[ -z "$binary" ]]; then
    binary=$work/qdylora-cuda
    "$root/bench/build-cuda.sh" "$binary"
fi
[[ -x "$binary" ]] || {
    echo "bench/pack-gpu.sh: $binary is not an executable (build it with bench/build-cuda.sh)" >&2
    exit 2
}
xz -T0 -9 --stdout "$binary" >"$pack/qdylora-cuda.xz.tmp"
mv "$pack/qdylora-cuda.xz.tmp" "$pack/qdylora-cuda.xz"

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_24_x86_64 -d "$work/wheel" \
    "bitsandbytes==$bnb_version"
# Replaced only once the download worked (an offline rerun keeps the old one).
rm -f "$pack"/bitsandbytes-*.whl
WHEEL=$(ls "$work"/wheel/bitsandbytes-*.whl) OUT_DIR=$pack python3 - <<'PY'
import os, re, zipfile

src = os.environ["WHEEL"]
dst = os.path.join(os.environ["OUT_DIR"], os.path.basename(src))
# bitsandbytes picks libbitsandbytes_cuda{torch.version.cuda}.so; the GPU machine's torch is a
# CUDA 13 build. The other CUDA, ROCm and XPU builds are ~110 MB of what it would never load.
unused = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(src) as whl, zipfile.ZipFile(dst + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
    kept = [i for i in whl.infolist() if not unused.search(i.filename)]
    dropped = len(whl.infolist()) - len(kept)
    for info in kept:
        data = whl.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not unused.search(l.split(",")[0])).encode()
        out.writestr(info, data)
os.replace(dst + ".tmp", dst)
print(f"{os.path.basename(dst)}: {dropped} unused libraries left out")
PY

# What travels: tracked files and untracked ones git does not ignore (those present), plus
# the carried .gpu/.
tree=$(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
packed=$(du -cb "$pack"/* | tail -n 1 | cut -f1)
ls -l "$pack"
echo "working tree $((tree / 1048576)) MiB + .gpu $((packed / 1048576)) MiB" \
    "= $(((tree + packed) / 1048576)) MiB of the 64 MiB that travel"
if ((tree + packed > limit)); then
    echo "bench/pack-gpu.sh: over the 64 MiB a lent GPU machine takes" >&2
    exit 1
fi
