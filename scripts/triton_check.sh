#!/usr/bin/env bash
# The Triton kernels under another Triton than .venv's pinned one, from this checkout's sources:
#
#   scripts/triton_check.sh VERSION [--tests] [compile_check arguments, e.g. --arch 90]
#
# always the compile check (every kernel configuration compiled for sm_90 and sm_80, no GPU needed);
# with --tests also the kernels' tests under that Triton's interpreter (tests/test_triton_kernels.py
# and tests/test_precision_modes.py, TRITON_INTERPRET=1). `make compile-check-36` runs it for 3.6.0,
# the GPU machine's Triton; `make triton-39` for 3.9.0, the newest supported, with --tests.
#
# The venv, PRONG_EXT_TRITON_VENV (default ~/.cache/prong_ext/venv-t<VERSION>), is made when missing
# or when it lacks that Triton: torch 2.13.0 (CPU, the local wheel store), triton==VERSION, numpy,
# and with --tests pytest. Another venv holding that Triton is used as it is (CI: 3.6.0 in the GPU
# machine's venv of scripts/device_venv.sh, torch 2.11.0). prong_ext is not installed there. The compile check runs in a temporary
# folder holding a stub package prong_ext (an empty __init__.py) whose triton_kernels is a link to
# the checkout's triton_kernels/, so the module runs under its installed name,
# prong_ext.triton_kernels.compile_check. The tests import the whole package: a temporary prong_ext
# of links to the checkout's files (its _C too, when built: built for .venv's torch 2.13.0, it is
# skipped with a warning under another torch), with triton_kernels linked in the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSION=${1:?usage: scripts/triton_check.sh VERSION [--tests] [compile_check arguments]}
shift
TESTS=0
if [ "${1:-}" = --tests ]; then
    TESTS=1
    shift
fi
VENV=${PRONG_EXT_TRITON_VENV:-$HOME/.cache/prong_ext/venv-t$VERSION}
PY="$VENV/bin/python"
log() { printf '[triton-check %s] %s\n' "$VERSION" "$*"; }
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

start=$(date +%s)
needs="import numpy, torch, triton; assert triton.__version__ == '$VERSION', triton.__version__"
[ $TESTS = 1 ] && needs="import pytest; $needs"
if ! "$PY" -c "$needs" >/dev/null 2>&1; then
    log "making $VENV (torch 2.13.0 CPU, triton $VERSION, numpy$([ $TESTS = 1 ] && echo ', pytest'))"
    mkdir -p "$(dirname "$VENV")"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    quiet_pip "$PY" -m pip install -q torch==2.13.0 "triton==$VERSION" numpy $([ $TESTS = 1 ] && echo pytest)
    log "venv ready in $(( $(date +%s) - start )) s"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stub/prong_ext" "$tmp/package/prong_ext"
: >"$tmp/stub/prong_ext/__init__.py"
ln -s "$ROOT/triton_kernels" "$tmp/stub/prong_ext/triton_kernels"
(cd "$tmp/stub" && PYTHONDONTWRITEBYTECODE=1 env -u TRITON_INTERPRET "$PY" -m prong_ext.triton_kernels.compile_check "$@")

if [ $TESTS = 1 ]; then
    for f in "$ROOT"/prong_ext/*; do
        name=$(basename "$f")
        [ "$name" = triton_kernels ] || [ "$name" = __pycache__ ] || ln -s "$f" "$tmp/package/prong_ext/$name"
    done
    ln -s "$ROOT/triton_kernels" "$tmp/package/prong_ext/triton_kernels"
    log "the kernels' tests under the interpreter"
    (cd "$tmp/package" && PYTHONDONTWRITEBYTECODE=1 TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider \
        "$ROOT/tests/test_triton_kernels.py" "$ROOT/tests/test_precision_modes.py")
fi
log "done in $(( $(date +%s) - start )) s"
