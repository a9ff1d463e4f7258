#!/usr/bin/env bash
# Makes the files the firmware embeds, firmware-demo/assets/, from a host demo run:
#
#   model.qdm     the device model container (NF4 + double quant)   <- DEMO/export/model.qdm
#   adapter.qdyl  the nested adapter bundle (f32, every rank)       <- DEMO/export/adapter.qdyl
#   prompts.txt   the first $PROMPT_COUNT held-out words of DEMO/data/eval.jsonl as prompts
#                 (the demo's compact template: `enc abcde=`), one per line
#   prompts.rs    the firmware's prompt table: those prompts with their token ids (BOS first)
#                 as `qdylora generate --json` reports them, and the EOS id
#
# usage: scripts/firmware-assets.sh [DEMO]
#   DEMO: an existing `qdylora demo --out DEMO` folder. Without it, the demo runs into a
#   temporary folder first (about 4 minutes on 2 cores).
#
# Builds the host CLI and the firmware_compare tool (release) in the project's target dir. Each
# asset is replaced atomically (temp file, fsync, rename).
set -euo pipefail
cd "$(dirname "$0")/.."

PROMPT_COUNT=${PROMPT_COUNT:-4}
BASE=host/assets/demo-base
ASSETS=firmware-demo/assets

fail() {
    printf 'firmware-assets.sh: %s\n' "$*" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "==> building the host CLI and firmware_compare (release)"
cargo build --release --locked -p qdylora
cargo build --release --locked -p qdylora-tests --example firmware_compare
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
qdylora="$target_dir/release/qdylora"
compare="$target_dir/release/examples/firmware_compare"

if [ $# -ge 1 ]; then
    demo=$1
else
    demo="$work/demo"
    echo "==> qdylora demo --out $demo"
    "$qdylora" demo --out "$demo"
fi
for f in export/model.qdm export/adapter.qdyl data/eval.jsonl; do
    [ -f "$demo/$f" ] || fail "$demo/$f is missing: is $demo a 'qdylora demo' output folder?"
done

echo "==> prompts and their token ids"
"$compare" prompts --eval "$demo/data/eval.jsonl" --count "$PROMPT_COUNT" >"$work/prompts.txt"
prompt_args=()
while IFS= read -r prompt; do
    prompt_args+=(--prompt "$prompt")
done <"$work/prompts.txt"
"$qdylora" generate --model "$BASE" --adapter "$demo/export/adapter.qdyl" --json \
    "${prompt_args[@]}" >"$work/generated.jsonl"
"$compare" prompts-rs --generated "$work/generated.jsonl" --config "$BASE/config.json" \
    >"$work/prompts.rs"
cp "$demo/export/model.qdm" "$demo/export/adapter.qdyl" "$work/"

# Copies $work/NAME to $ASSETS/NAME: temp file next to it, fsync, rename.
install_asset() {
    local tmp="$ASSETS/.$1.tmp"
    cp "$work/$1" "$tmp"
    sync "$tmp"
    mv -f "$tmp" "$ASSETS/$1"
}

mkdir -p "$ASSETS"
for name in model.qdm adapter.qdyl prompts.txt prompts.rs; do
    install_asset "$name"
done
sync "$ASSETS"
echo "==> wrote $ASSETS from $demo:"
ls -l "$ASSETS"
