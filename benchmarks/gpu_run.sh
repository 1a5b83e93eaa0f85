#!/usr/bin/env bash
# The GPU table from one command on a lent GPU machine, sized for one lease (15 minutes of device time in
# all, the machine's start included; 10 minutes a command): the default (part 1) ends well inside one
# 8-minute command on an H200, most important rows first; --part 2 runs what does not fit.
#   bash benchmarks/gpu_run.sh             # part 1: build, GPU tests, H100 bounds, 8B end to end (diag, obs), per op
#   bash benchmarks/gpu_run.sh --part 2    # 8B end to end at 128 sequences, the naive Hessian baseline
#   bash benchmarks/gpu_run.sh --tiny      # toy sizes, no build: checks the script end to end (CI, on the CPU)
#   --results=DIR                          # another output folder
# Estimated on paper for an H200 (not measured; the log prints every section's real time):
#   part 1: editable install + CUDA extension build (nvcc, 4 sources, sm_80/sm_90) ~90 s; sensilora env ~5 s;
#           pytest -m gpu (Triton JIT of ~33 variants, the selection tests) ~90 s; H100 bounds (SASS counts of
#           cubins compiled there) ~15 s; random bf16 LLaMA-3.1-8B shape built on the GPU ~20 s; end to end at
#           32 x 2048 tokens, diag and obs (warm-up + repeats; obs: 32.7 GB of grams, 32 Cholesky of 14336^2)
#           ~90 s; per-op rows at the 8B shapes ~60 s.  Total ~6.5 min.
#   part 2: install (kept if the machine is still warm) ~10-90 s; 8B built again ~20 s; end to end at
#           128 x 2048 tokens ~120 s; naive Hessian baseline (torch.func, warm) ~60 s.  Total ~4-5 min.
# Every step's output and exit status go to <results>/gpu_run_part<N>.log (gpu_run_tiny.log); a failing step does not
# stop the later ones (a failed extension build falls back to a build without it, with the reason in the
# log); the script exits non-zero if any step failed. The interpreter is ${PYTHON:-python3}, which must
# import torch (a plain `python` may be missing or another interpreter on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=""
part=1
results=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=--tiny ;;
    --part) part="${2:-}"; shift ;;
    --part=*) part="${1#--part=}" ;;
    --results=*) results="${1#--results=}" ;;
    *) echo "gpu_run.sh: unknown argument $1 (use --tiny, --part 1|2, --results=DIR)" >&2; exit 2 ;;
  esac
  shift
done
case "$part" in 1|2) ;; *) echo "gpu_run.sh: --part is 1 or 2, got $part" >&2; exit 2 ;; esac
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_run.sh: $PYTHON cannot import torch; set PYTHON=/path/to/the/python/that/has/torch" >&2
  exit 2
fi
mkdir -p "$results"
log="$results/gpu_run_part$part.log"
[ -n "$tiny" ] && log="$results/gpu_run_tiny.log"
: > "$log"
failed=0
start=$SECONDS
step() {
  local began=$SECONDS
  echo "== $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== exit $status after $((SECONDS - began)) s (total $((SECONDS - start)) s): $*" | tee -a "$log"
  [ "$status" -eq 0 ] || failed=1
  return "$status"
}
# CUDA_HOME from the real toolkit: a wrapper nvcc on PATH makes torch guess a CUDA_HOME without headers.
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda /usr/local/cuda-1[0-9]* /opt/cuda; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$candidate"
      break
    fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}  python=$PYTHON  part=$part" | tee -a "$log"
if [ -z "$tiny" ]; then
  if ! step "$PYTHON" -m pip install --no-deps --no-build-isolation -e . ; then
    echo "the CUDA extension did not build (reason above); installing without it" | tee -a "$log"
    SENSILORA_BUILD_CUDA=0 step "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
  fi
fi
step "$PYTHON" -m sensilora env
if [ "$part" = 1 ]; then
  step "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py
fi
if [ -n "$tiny" ]; then
  step "$PYTHON" -m benchmarks.run_all --tiny --results "$results"
else
  step "$PYTHON" -m benchmarks.run_all --part "$part" --results "$results"
fi
echo "gpu_run.sh: part $part done in $((SECONDS - start)) s" | tee -a "$log"
exit "$failed"
