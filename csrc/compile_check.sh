#!/usr/bin/env bash
# Keep csrc/ from rotting on CPU-only machines:
#  1. compile the CUDA kernels with plain nvcc (no torch headers), for sm_90, any warning (register
#     spills and local memory included) an error;
#  2. type-check the torch bindings against the installed torch's headers (g++ -fsyntax-only). A CPU
#     build of torch lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h); a stand-in
#     with its one define is put on the include path for this check only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    echo "csrc/compile_check.sh: nvcc not found; skipping the CUDA compile check"
    exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for source in "$here"/*.cu; do
    nvcc -std=c++17 -O3 -arch=sm_90 -Xcompiler -Wall -Xptxas --warn-on-spills,--warn-on-local-memory-usage \
        -Werror all-warnings -c "$source" -o "$out/$(basename "$source" .cu).o"
    echo "nvcc OK: csrc/$(basename "$source")"
done

cuda_include=""
for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then cuda_include="$candidate/include"; break; fi
done
if [ -z "$cuda_include" ]; then
    echo "csrc/compile_check.sh: no CUDA include directory with cuda_runtime.h (set CUDA_HOME)" >&2
    exit 1
fi
torch_include="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
python_include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
mkdir -p "$out/shim/c10/cuda/impl"
[ -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
g++ -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -I"$out/shim" -I"$torch_include" -I"$torch_include/torch/csrc/api/include" -I"$cuda_include" \
    -I"$python_include" -I"$here" "$here/bindings.cpp"
echo "g++ -fsyntax-only OK: csrc/bindings.cpp against torch $(python -c 'import torch; print(torch.__version__)')"
