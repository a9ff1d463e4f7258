#!/usr/bin/env bash
# Cargo runner (see .cargo/config.toml): boots an ELF on QEMU's mps2-an386 (Cortex-M4F) and
# decodes its defmt log with defmt-print. The exit status is the firmware's semihosting exit
# code (0 success, 1 logged error, 101 panic, 3 HardFault), or 124 when QEMU ran past
# QDYLORA_QEMU_TIMEOUT seconds (default 60) and was killed.
set -euo pipefail
elf=${1:?usage: qemu-run.sh ELF}
timeout "${QDYLORA_QEMU_TIMEOUT:-60}" \
    qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
    -semihosting-config enable=on,target=native -kernel "$elf" |
    defmt-print -e "$elf"
