#!/usr/bin/env bash
# Compile the CUDA kernels with plain nvcc (no torch headers) so they never rot on CPU-only machines.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "csrc/compile_check.sh: nvcc not found; skipping the CUDA compile check"
    exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for source in "$here"/*.cu; do
    nvcc -std=c++17 -O3 -arch=sm_90 -Xcompiler -Wall -c "$source" -o "$out/$(basename "$source" .cu).o"
    echo "nvcc OK: csrc/$(basename "$source")"
done
