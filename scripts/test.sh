#!/usr/bin/env bash
# Every test this project has that runs without a GPU, on a fresh Debian machine with rustup.
# It installs what it needs first (the pinned toolchain and the thumb target; g++ for the CUDA
# kernels' CPU emulation; the firmware step installs qemu-system-arm and defmt-print), then runs:
# a parse of every shell script and of the Python inside bench/'s, format check, clippy
# -D warnings, all host tests, the no_std build of the core for thumbv7em-none-eabihf, and the
# firmware in QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain (rust-toolchain.toml) and the Cortex-M4F target"
command -v rustup >/dev/null || { echo "rustup is required: https://rustup.rs" >&2; exit 1; }
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup target add thumbv7em-none-eabihf >/dev/null
rustup component add rustfmt clippy >/dev/null

step "a C++20 compiler (host/tests/cuda_kernels_emulated.rs runs the CUDA kernels on the CPU)"
if printf '#include <barrier>\nint main() { std::barrier b(1); }\n' |
    "${CXX:-c++}" -std=c++20 -x c++ -fsyntax-only - 2>/dev/null; then
    echo "$("${CXX:-c++}" --version | head -n 1)"
else
    apt_cmd="apt-get install -y --no-install-recommends g++"
    echo "no C++20 compiler: installing one ($apt_cmd)"
    if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
    { "${as_root[@]}" apt-get update && "${as_root[@]}" $apt_cmd; } || {
        echo "could not install g++; run: sudo $apt_cmd" >&2
        exit 1
    }
fi

step "shell scripts parse (bench/ runs only on a GPU machine: a typo there costs a GPU session)"
for script in scripts/*.sh bench/*.sh; do
    bash -n "$script"
done

step "the Python inside bench/ scripts compiles (skipped without python3)"
if command -v python3 >/dev/null; then
    python3 - bench/*.sh <<'PY'
import re, sys
total = 0
for path in sys.argv[1:]:
    blocks = re.findall(r"<<'PY'\n(.*?)\nPY\n", open(path).read(), re.S)
    for i, block in enumerate(blocks):
        compile(block, f"{path}, Python block {i + 1}", "exec")
    total += len(blocks)
assert total, "no Python blocks found in bench/*.sh"
print(f"{total} Python blocks compile")
PY
else
    echo "python3 is not installed here: skipped"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "host tests"
cargo test --workspace --locked

step "qdylora-core builds for thumbv7em-none-eabihf (no_std, no alloc)"
cargo build -p qdylora-core --target thumbv7em-none-eabihf --locked
cargo build -p qdylora-core --target thumbv7em-none-eabihf --features defmt --locked

step "firmware in QEMU (scripts/firmware.sh)"
bash scripts/firmware.sh

step "all tests passed"
