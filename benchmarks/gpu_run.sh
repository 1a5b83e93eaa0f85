#!/usr/bin/env bash
# The whole GPU table from one command on a lent GPU machine (aimed at well under 9 minutes on an H100):
#   bash benchmarks/gpu_run.sh            # build the CUDA extension, run the GPU tests, then the benchmarks,
#                                         # writing benchmarks/results/<gpu>.{json,csv} after every section
#   bash benchmarks/gpu_run.sh --tiny     # toy sizes, no build: checks the script end to end (CI, on the CPU)
#   --results=DIR                         # another output folder
# Every step's output and exit status go to <results>/gpu_run[_tiny].log; a failing step does not stop the
# later ones (a failed extension build falls back to a build without it, with the reason in the log); the
# script exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=""
results=benchmarks/results
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=--tiny ;;
    --results=*) results="${arg#--results=}" ;;
    *) echo "gpu_run.sh: unknown argument $arg (use --tiny, --results=DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$results"
log="$results/gpu_run${tiny:+_tiny}.log"
: > "$log"
failed=0
step() {
  echo "== $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== exit $status: $*" | tee -a "$log"
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
echo "CUDA_HOME=${CUDA_HOME:-unset}" | tee -a "$log"
if [ -z "$tiny" ]; then
  if ! step python -m pip install --no-deps --no-build-isolation -e . ; then
    echo "the CUDA extension did not build (reason above); installing without it" | tee -a "$log"
    SENSILORA_BUILD_CUDA=0 step python -m pip install --no-deps --no-build-isolation -e .
  fi
fi
step python -m sensilora env
step python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py
step python -m benchmarks.run_all $tiny --results "$results"
exit "$failed"
