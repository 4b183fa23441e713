#!/usr/bin/env bash
# Build the CUDA wheel of prong_ext into dist/ and check it (`make wheel`; works on a fresh machine).
#
#   1. creates .venv-cuda when missing (torch 2.14.1 CUDA 13.0 build from the local wheel store),
#      and makes sure its build and check tools are installed (idempotent, quick when present);
#   2. builds the wheel: TORCH_CUDA_ARCH_LIST="8.0;9.0" pip wheel --no-build-isolation --no-deps;
#   3. checks with cuobjdump that _C holds sm_80 and sm_90 code;
#   4. installs the wheel into .venv-cuda and imports it from outside the checkout: cuda_built()
#      is True and the ops torch.ops.prong_ext.batched_eigh / whitening exist and run (CPU kernels:
#      this machine may have no GPU).
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
# PRONG_EXT_CUDA_VENV (default .venv-cuda; a relative path is taken from the checkout, an absolute
# one lets several checkouts share one CUDA venv), PRONG_EXT_CUDA_TORCH (default torch==2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

VENV=${PRONG_EXT_CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${PRONG_EXT_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
unset PRONG_EXT_NO_EXTENSION PRONG_EXT_FORCE_CPU
case $VENV in
    /*) ;;
    *) VENV="$ROOT/$VENV" ;;
esac
PY="$VENV/bin/python"
log() { printf '[build_wheel] %s\n' "$*"; }

[ -x "$CUDA_HOME/bin/nvcc" ] || { log "no nvcc in CUDA_HOME=$CUDA_HOME"; exit 1; }

start=$(date +%s)
if [ ! -x "$PY" ]; then
    log "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q -U pip
fi
# triton brings cuobjdump; pip returns at once when everything is already there.
"$PY" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja pybind11 numpy pytest "triton==3.8.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
"$PY" -c "import torch, sys; assert torch.version.cuda, 'torch in $VENV has no CUDA'; print('[build_wheel] torch', torch.__version__, 'CUDA', torch.version.cuda)"

log "building the wheel for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
mkdir -p dist
pytag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
rm -f dist/prong_ext-*-"$pytag"-"$pytag"-linux_*.whl
t0=$(date +%s)
"$PY" -m pip wheel --no-build-isolation --no-deps -q -w dist . 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls -t dist/prong_ext-*-"$pytag"-"$pytag"-linux_*.whl 2>/dev/null | head -n1)
[ -n "$wheel" ] || { log "no wheel was built"; exit 1; }
log "built $wheel in $(( $(date +%s) - t0 )) s"

# cuobjdump: the toolkit's, else the one bundled with triton.
CUOBJDUMP=$(command -v cuobjdump || true)
[ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ -z "$CUOBJDUMP" ]; then
    CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
fi
[ -x "$CUOBJDUMP" ] || { log "cuobjdump not found"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m zipfile -e "$wheel" "$tmp/whl"
so=$(ls "$tmp"/whl/prong_ext/_C*.so)
elfs=$("$CUOBJDUMP" --list-elf "$so")
echo "$elfs"
for arch in sm_80 sm_90; do
    grep -q "\.$arch\.cubin" <<<"$elfs" || { log "no $arch code in $(basename "$so")"; exit 1; }
done
log "cuobjdump: sm_80 and sm_90 code present"

log "installing into $VENV and importing"
"$PY" -m pip install -q --no-deps --force-reinstall "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
(cd "$tmp" && "$PY" - <<'PYEOF'
import torch
import prong_ext
from prong_ext import _extension

assert "site-packages" in prong_ext.__file__, prong_ext.__file__
assert _extension.available(), _extension._error
assert _extension.cuda_built(), "the wheel's _C was built without CUDA"
assert hasattr(torch.ops.prong_ext, "batched_eigh") and hasattr(torch.ops.prong_ext, "whitening")
a = torch.randn(40, 40, dtype=torch.float64)
a = a + a.mT
w, q = _extension.batched_eigh([a])
assert torch.allclose((q[0] * w[0]) @ q[0].mT, a, atol=1e-10)
print("[build_wheel] import ok:", prong_ext.__file__, "cuSOLVER (build, runtime, XsyevBatched):",
      _extension.cusolver_info())
PYEOF
)
log "done in $(( $(date +%s) - start )) s"
