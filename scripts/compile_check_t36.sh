#!/usr/bin/env bash
# The Triton compile check under Triton 3.6.0, the Triton of the GPU machine: every kernel
# configuration of prong_ext.triton_kernels compiled for sm_90 and sm_80 (no GPU needed), from
# this checkout's sources (`make compile-check-36`; `make compile-check` does the same with the
# Triton of .venv).
#
# The venv, PRONG_EXT_T36_VENV (default ~/.cache/prong_ext/venv-t36), is made when missing or when
# it lacks triton 3.6.0: torch 2.13.0 (CPU, the local wheel store), triton==3.6.0, numpy. prong_ext
# is not installed there: the check runs in a temporary folder holding a stub package prong_ext (an
# empty __init__.py: neither _C nor the rest of the package is imported) whose triton_kernels is a
# link to the checkout's triton_kernels/, so the module runs under its installed name,
# prong_ext.triton_kernels.compile_check. Arguments go to compile_check (e.g. --arch 90).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${PRONG_EXT_T36_VENV:-$HOME/.cache/prong_ext/venv-t36}
PY="$VENV/bin/python"
log() { printf '[compile-check-36] %s\n' "$*"; }
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

start=$(date +%s)
if ! "$PY" -c "import numpy, torch, triton; assert triton.__version__ == '3.6.0', triton.__version__" \
    >/dev/null 2>&1; then
    log "making $VENV (torch 2.13.0 CPU, triton 3.6.0, numpy)"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    quiet_pip "$PY" -m pip install -q torch==2.13.0 triton==3.6.0 numpy
    log "venv ready in $(( $(date +%s) - start )) s"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/prong_ext"
: >"$tmp/prong_ext/__init__.py"
ln -s "$ROOT/triton_kernels" "$tmp/prong_ext/triton_kernels"
cd "$tmp"
PYTHONDONTWRITEBYTECODE=1 env -u TRITON_INTERPRET "$PY" -m prong_ext.triton_kernels.compile_check "$@"
log "done in $(( $(date +%s) - start )) s"
