#!/usr/bin/env bash
# A venv with the GPU machine's torch and Triton, for rehearsing its check on this CPU machine:
#
#   scripts/device_venv.sh          makes it when missing or incomplete; prints its python
#
# PRONG_EXT_DEVICE_VENV (default ~/.cache/prong_ext/venv-device): torch 2.11.0 (the CUDA 13.0 build
# of the GPU machine's image, with its CUDA libraries, about 5 GB) and the triton it pins (3.6.0),
# pytest, pytest-benchmark, pybind11, ninja, setuptools < 82 (torch 2.11's bound) and numpy < 2.4:
# Triton 3.6's interpreter turns one-element arrays into ints, which numpy 2.4 refuses. `make
# gpu-check-rehearsal` runs scripts/gpu_check.sh's dry run with it; CI also runs
# `scripts/triton_check.sh 3.6.0 --tests` in it (PRONG_EXT_TRITON_VENV pointing here).
set -euo pipefail
VENV=${PRONG_EXT_DEVICE_VENV:-$HOME/.cache/prong_ext/venv-device}
PY="$VENV/bin/python"
log() { printf '[device-venv] %s\n' "$*" >&2; }
check="import numpy, pytest, pytest_benchmark, pybind11, ninja, torch, triton
assert torch.__version__.startswith('2.11.0') and torch.version.cuda, torch.__version__
assert triton.__version__ == '3.6.0', triton.__version__
assert tuple(int(p) for p in numpy.__version__.split('.')[:2]) < (2, 4), numpy.__version__"
if ! "$PY" -c "$check" >/dev/null 2>&1; then
    start=$(date +%s)
    log "making $VENV (torch 2.11.0 CUDA 13.0, triton 3.6.0, numpy < 2.4; about 5 GB)"
    mkdir -p "$(dirname "$VENV")"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q torch==2.11.0 "numpy<2.4" pytest pytest-benchmark pybind11 ninja \
        "setuptools>=77,<82" wheel 2>&1 | { grep -v "^WARNING: Location" || true; }
    "$PY" -c "$check"
    log "ready in $(( $(date +%s) - start )) s"
fi
echo "$PY"
