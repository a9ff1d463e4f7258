#!/usr/bin/env bash
# The firmware's tests in QEMU, on a fresh Debian machine with rustup.
#
#  1. Installs what is missing, and only that: the thumb target and llvm-tools (rustup),
#     qemu-system-arm (apt-get, with sudo when not root) and defmt-print (cargo install, pinned).
#     Where it cannot, it stops with a message naming the one command that would.
#  2. fmt and clippy -D warnings on firmware-demo/.
#  3. The on-target unit tests (defmt-test) in QEMU.
#  4. The main binary in QEMU at every adapter budget preset, with its flash and RAM use, and
#     each run compared with the host: `qdylora generate` at the rank the firmware logged, then
#     the firmware_compare tool (tests/examples/) checks the rank against the host's budget math,
#     the generated tokens (identical) and the logits (within its tolerance). The comparison is
#     also shown to fail on a tampered log.
#  5. Failure paths that must end in a logged defmt error and a failure exit code, never a hang:
#     a damaged self-check input, a damaged and a truncated adapter bundle (exit 1), a panic
#     (exit 101) and a HardFault (exit 3).
#
# The firmware embeds the committed firmware-demo/assets/ (made by scripts/firmware-assets.sh);
# this script does not run the host demo. It builds the host CLI (`cargo build --release -p
# qdylora`, about 5 minutes the first time) and the comparator in the project's target dir.
#
# Sizes come from llvm-size (rustup's llvm-tools, Berkeley format): flash = text + data (the
# initial values of .data live in flash), static RAM = data + bss. The stack peak is what the
# firmware measures itself (stack painting) and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cd firmware-demo

DEFMT_PRINT_VERSION=1.2.0
TARGET=thumbv7em-none-eabihf
PRESETS=(budget-64k budget-256k budget-1m)
# Each preset's adapter RAM in bytes (firmware-demo/src/budget.rs), for the host's budget math.
declare -A BUDGET_BYTES=([budget-64k]=65536 [budget-256k]=262144 [budget-1m]=1048576)
ASSETS=(model.qdm adapter.qdyl prompts.txt prompts.rs)
# Seconds one QEMU run may take before the runner kills it (every run here takes 2 s at most).
export QDYLORA_QEMU_TIMEOUT=${QDYLORA_QEMU_TIMEOUT:-60}

# Logs of the runs, checked after each one.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf 'firmware.sh: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# Runs "$@" as root: directly, through sudo, or not at all.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}

install_tools() {
    command -v rustup >/dev/null || fail "rustup is missing; install it from https://rustup.rs"
    # rust-toolchain.toml pins the toolchain; these are no-ops when already installed.
    rustup target add "$TARGET" >/dev/null ||
        fail "could not add the target; run: rustup target add $TARGET"
    rustup component add llvm-tools >/dev/null ||
        fail "could not add llvm-tools; run: rustup component add llvm-tools"

    if command -v qemu-system-arm >/dev/null; then
        echo "qemu-system-arm: $(qemu-system-arm --version | head -n 1)"
    else
        local apt_cmd="apt-get install -y --no-install-recommends qemu-system-arm"
        echo "qemu-system-arm is missing: installing it ($apt_cmd)"
        { as_root apt-get update && as_root $apt_cmd; } ||
            fail "could not install qemu-system-arm; run: sudo $apt_cmd"
    fi

    if command -v defmt-print >/dev/null; then
        echo "defmt-print: $(defmt-print --version)"
    else
        local cargo_cmd="cargo install defmt-print --version $DEFMT_PRINT_VERSION --locked"
        echo "defmt-print is missing: installing it ($cargo_cmd)"
        $cargo_cmd || fail "could not install defmt-print; run: $cargo_cmd"
        # cargo installs into ~/.cargo/bin, which a fresh shell may not have on PATH yet.
        command -v defmt-print >/dev/null || export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
        command -v defmt-print >/dev/null ||
            fail "defmt-print was installed but is not on PATH; add ${CARGO_HOME:-$HOME/.cargo}/bin to PATH"
    fi
}

# The built ELF of the main binary for a profile.
elf_path() {
    local dir
    dir=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    printf '%s/%s/%s/qdylora-firmware-demo' "$dir" "$TARGET" "$1"
}

# Builds the host CLI and the comparator (release, from the workspace root); sets $qdylora and
# $compare to their paths.
build_host_tools() {
    local dir
    (cd "$root" && cargo build --release --locked -p qdylora) ||
        fail "could not build the host CLI; run from the repository root: cargo build --release -p qdylora"
    (cd "$root" && cargo build --release --locked -p qdylora-tests --example firmware_compare) ||
        fail "could not build the comparator; run from the repository root: cargo build --release -p qdylora-tests --example firmware_compare"
    dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    qdylora="$dir/release/qdylora"
    compare="$dir/release/examples/firmware_compare"
}

# Runs the host at the rank a firmware log reports and compares the two:
# compare_with_host LOG BUDGET_BYTES. Returns non-zero on any difference.
compare_with_host() {
    local log=$1 budget=$2 rank host_json="${1%.log}.host.jsonl"
    rank=$(sed -n 's/.*adapter rank \([0-9]*\) of.*/\1/p' "$log" | head -n 1)
    if [ -z "$rank" ]; then
        echo "$log: no 'adapter rank' line" >&2
        return 1
    fi
    local prompt_args=()
    while IFS= read -r prompt; do
        prompt_args+=(--prompt "$prompt")
    done <assets/prompts.txt
    if ! (cd "$root" && "$qdylora" generate --model host/assets/demo-base \
        --adapter firmware-demo/assets/adapter.qdyl --rank "$rank" --json "${prompt_args[@]}") \
        >"$host_json"; then
        echo "the host's qdylora generate failed at rank $rank" >&2
        return 1
    fi
    "$compare" check --log "$log" --host "$host_json" --bundle assets/adapter.qdyl \
        --budget "$budget"
}

llvm_size() {
    local host
    host=$(rustc -vV | sed -n 's/^host: //p')
    "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-size" "$@"
}

# Runs a feature set of the main binary that must fail: checks the exit code and the log line.
expect_failure() {
    local name=$1 want_code=$2 want_line=$3
    shift 3
    local log="$logs/$name.log" code=0
    cargo run --release --locked "$@" >"$log" 2>&1 || code=$?
    cat "$log"
    [ "$code" -eq "$want_code" ] ||
        fail "$name: exit code $code, expected $want_code (124 would be a QEMU timeout)"
    grep -q "$want_line" "$log" || fail "$name: no log line matching '$want_line'"
    echo "ok: $name exits $code with a defmt error line"
}

step "tools"
install_tools
for asset in "${ASSETS[@]}"; do
    [ -f "assets/$asset" ] ||
        fail "firmware-demo/assets/$asset is missing; make the assets with: bash scripts/firmware-assets.sh"
done
start=$(now)
build_host_tools
echo "host CLI and comparator build: $(since "$start")"

step "cargo fmt --check, clippy -D warnings (firmware-demo)"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

step "on-target unit tests (defmt-test in QEMU)"
start=$(now)
cargo test --no-run --locked
echo "build: $(since "$start")"
start=$(now)
test_log="$logs/tests.log"
cargo test --locked 2>&1 | tee "$test_log" || fail "on-target tests failed (log above)"
on_target_tests=$(grep -c 'running `' "$test_log" || true)
[ "$on_target_tests" -gt 0 ] || fail "no on-target test ran"
echo "QEMU test runs: $(since "$start") for $on_target_tests tests"

step "main binary at every adapter budget preset, compared with the host"
sizes=()
for preset in "${PRESETS[@]}"; do
    features=(--no-default-features --features "$preset")
    start=$(now)
    cargo build --release --locked "${features[@]}"
    echo "$preset build: $(since "$start")"
    start=$(now)
    run_log="$logs/$preset.log"
    cargo run --release --locked "${features[@]}" 2>&1 | tee "$run_log" ||
        fail "$preset: the firmware run failed (log above)"
    echo "$preset QEMU run: $(since "$start")"
    grep -q 'self-check passed' "$run_log" || fail "$preset: no 'self-check passed' line"
    compare_with_host "$run_log" "${BUDGET_BYTES[$preset]}" ||
        fail "$preset: the firmware's result differs from the host's (above)"
    rank=$(sed -n 's/.*adapter rank \([0-9]*\) of.*/\1/p' "$run_log" | head -n 1)
    stack=$(sed -n 's/.*stack peak: \([0-9]*\) bytes.*/\1/p' "$run_log")
    read -r text data bss _ < <(llvm_size "$(elf_path release)" | tail -n 1)
    sizes+=("$(printf '%-12s %5d %9d %11d %11d' "$preset" "$rank" $((text + data)) $((data + bss)) "${stack:-0}")")
done

step "the comparison fails on a tampered firmware log"
# sed scripts, each changing the first match only: a logit, the rank, a chosen token, the list of
# generated tokens.
tampers=(
    '0,/ logits \[/s/ logits \[[^,]*/ logits [1000.0/'
    's/adapter rank [0-9]* of/adapter rank 16 of/'
    '0,/ step 0 token /s/ step 0 token \([0-9]*\)/ step 0 token \11/'
    '0,/ generated \[/s/ generated \[\([0-9]*\)/ generated [\11/'
)
for edit in "${tampers[@]}"; do
    tampered="$logs/tampered.log"
    sed "$edit" "$logs/budget-64k.log" >"$tampered"
    ! cmp -s "$tampered" "$logs/budget-64k.log" || fail "tamper '$edit' changed nothing"
    if compare_with_host "$tampered" "${BUDGET_BYTES[budget-64k]}" >"$logs/tampered.out" 2>&1; then
        fail "the comparator accepted a log tampered with '$edit'"
    fi
    echo "ok: rejected after '$edit':"
    grep -m 1 -A 1 '^Error' "$logs/tampered.out" || tail -n 2 "$logs/tampered.out"
done

step "failure paths end in a defmt error line and a failure exit code"
expect_failure "damaged input" 1 'ERROR.*BufferLength' --features damaged-input
expect_failure "damaged bundle" 1 'ERROR.*BundleDamaged' --features damaged-bundle
expect_failure "truncated bundle" 1 'ERROR.*BundleTruncated' --features truncated-bundle
expect_failure "panic" 101 'ERROR.*panic' --example crash_panic
expect_failure "HardFault" 3 'ERROR.*HardFault' --example crash_hardfault

step "flash and RAM per preset (bytes; llvm-size: flash = text + data, static RAM = data + bss)"
printf '%-12s %5s %9s %11s %11s\n' preset rank flash 'static RAM' 'stack peak'
printf '%s\n' "${sizes[@]}"

step "firmware tests passed"
echo "firmware: $((on_target_tests + ${#PRESETS[@]} + ${#tampers[@]} + 5)) passed, 0 failed"
