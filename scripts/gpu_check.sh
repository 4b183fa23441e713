#!/usr/bin/env bash
# GPU checks for a lent GPU machine (torch with CUDA preinstalled, no network), in under 10 minutes:
#   1. builds the extension in place for the local GPU (pip install --no-build-isolation -e .,
#      else setup.py build_ext --inplace),
#   2. runs the CUDA-marked tests (pytest -m cuda),
#   3. runs the eigh benchmark (pytest-benchmark JSON, or the script's own timer without it),
#      then `make bench` when the Makefile has that target, else pytest benchmarks.
# Everything (logs, JSON, summary.txt) goes to OUTDIR. Usage: scripts/gpu_check.sh OUTDIR
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 540, the whole run).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
# step NAME MAX_S CMD...: runs CMD with a timeout of min(MAX_S, time left), logs to OUT/NAME.log
step() {
    local name=$1 max=$2 t rc
    shift 2
    t=$(left)
    (( t > max )) && t=$max
    if (( t < 10 )); then
        echo "$name: skipped (out of time)" | tee -a "$OUT/summary.txt"
        return 1
    fi
    local t0=$(date +%s)
    timeout -k 10 "$t" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $t s)$([ $rc = 124 ] && echo ', TIMED OUT')" \
        | tee -a "$OUT/summary.txt"
    return $rc
}
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PRONG_EXT_NO_EXTENSION PRONG_EXT_FORCE_CPU
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

{
    date -u
    nvidia-smi || true
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    "$PY" -m pip list 2>/dev/null | grep -i -E "torch|triton|pytest|cupy|setuptools|ninja|nvidia-cusolver" || true
    command -v nvcc && nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1

# 1. Build for the local GPU (torch picks its arch when TORCH_CUDA_ARCH_LIST is unset).
if ! step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    step build_inplace 300 "$PY" setup.py build_ext --inplace || { echo "build failed" >>"$OUT/summary.txt"; }
fi
step ext_info 60 "$PY" -c "
import torch, prong_ext
from prong_ext import _extension as E
print('available', E.available(), 'cuda_built', E.cuda_built(), 'cuSOLVER (build, runtime, XsyevBatched)', E.cusolver_info())
" && cat "$OUT/ext_info.log" >>"$OUT/summary.txt"

# 2. CUDA tests.
step test_cuda 200 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" tests
tail -n 3 "$OUT/test_cuda.log" >>"$OUT/summary.txt"

# 3. Benchmarks.
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    step bench_eigh 150 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_eigh.py \
        --benchmark-json="$OUT/bench_eigh.json" --benchmark-columns=min,median,max,rounds
else
    step bench_eigh 150 "$PY" benchmarks/bench_eigh.py --out "$OUT/bench_eigh.md"
fi
if [ -f Makefile ] && grep -q '^bench:' Makefile; then
    # PY=... points the Makefile at this machine's Python; -o keeps make from (re)creating .venv,
    # which needs the network.
    step bench_all 200 make -o .venv/.deps-installed bench PY="$PY" PIP="$PY -m pip"
else
    step bench_all 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-json="$OUT/bench_all.json"
fi
echo "total: $(( ${GPU_CHECK_BUDGET_S:-540} - $(left) )) s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
