#!/usr/bin/env bash
# Build prong_ext's sdist and, from the UNPACKED sdist (never from the checkout), a wheel; check both.
#
#   scripts/build_wheel.sh         the CUDA wheel (`make wheel`; works on a fresh machine):
#     1. creates the CUDA venv when missing (torch 2.14.1 CUDA 13.0 build from the local wheel
#        store) and makes sure its build and check tools are installed (quick when present);
#     2. builds the sdist into dist/ and unpacks it in a temporary folder;
#     3. builds the wheel there: TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" pip wheel --no-build-isolation
#        --no-deps, so a file missing from the sdist (csrc/cuda/ included) fails the build;
#     4. checks with cuobjdump that _C holds sm_80 and sm_90 code (cubins) and sm_90 PTX, which the
#        driver compiles for GPUs newer than sm_90;
#     5. installs the wheel into the CUDA venv and runs the check below from outside the checkout,
#        plus the compiled ops torch.ops.prong_ext.batched_eigh / whitening (CPU kernels: this
#        machine may have no GPU).
#   scripts/build_wheel.sh --venv-only   step 1 alone (.ci/run makes the venv while other checks run).
#   scripts/build_wheel.sh --cpu   the quick CPU check (`make wheel-cpu`): steps 2-3 with the CPU
#        torch of the build venv (.venv, `make build`'s), then installs the wheel into a FRESH venv
#        (that same torch from the local wheel store, then the wheel with its dependencies) and
#        runs the check there.
#
# The check, from a temporary folder: prong_ext is imported from site-packages, _C loads
# (_extension.available()) and its recorded torch version (_build_info) is the installed one, a
# whitened model (prong_ext.whiten) is re-whitened by Prong.reparametrize with its outputs unchanged,
# and the `prong-ext` script runs.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"),
# PRONG_EXT_CUDA_VENV (default .venv-cuda; a relative path is taken from the checkout, an absolute
# one lets several checkouts share one CUDA venv), PRONG_EXT_CUDA_TORCH (default torch==2.14.1),
# PRONG_EXT_CPU_VENV (--cpu: the build venv, default .venv; it must hold torch, setuptools>=77, ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=cuda
case ${1:-} in
    "") ;;
    --cpu) MODE=cpu ;;
    --venv-only) VENV_ONLY=1 ;;
    *) echo "usage: scripts/build_wheel.sh [--cpu | --venv-only]" >&2; exit 2 ;;
esac
log() { printf '[build_wheel%s] %s\n' "$([ $MODE = cpu ] && echo ' --cpu')" "$*"; }
abs() { case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
quiet_pip() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
unset PRONG_EXT_NO_EXTENSION PRONG_EXT_FORCE_CPU TRITON_INTERPRET

start=$(date +%s)
if [ $MODE = cuda ]; then
    VENV=$(abs "${PRONG_EXT_CUDA_VENV:-.venv-cuda}")
    TORCH_SPEC=${PRONG_EXT_CUDA_TORCH:-torch==2.14.1}
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
    [ -x "$CUDA_HOME/bin/nvcc" ] || { log "no nvcc in CUDA_HOME=$CUDA_HOME"; exit 1; }
    PY="$VENV/bin/python"
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        python3 -m venv "$VENV"
        quiet_pip "$PY" -m pip install -q -U pip
    fi
    # triton brings cuobjdump; pip returns at once when everything is already there.
    quiet_pip "$PY" -m pip install -q "$TORCH_SPEC" "setuptools>=77" wheel ninja pybind11 numpy pytest \
        "triton==3.8.0"
    "$PY" -c "import torch; assert torch.version.cuda, 'torch in $VENV has no CUDA'"
    if [ -n "${VENV_ONLY:-}" ]; then
        log "venv $VENV ready in $(( $(date +%s) - start )) s"
        exit 0
    fi
else
    VENV=$(abs "${PRONG_EXT_CPU_VENV:-.venv}")
    PY="$VENV/bin/python"
    [ -x "$PY" ] || { log "no build venv at $VENV (make build creates .venv)"; exit 1; }
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
log "build venv $VENV: torch $torch_version, CUDA $("$PY" -c "import torch; print(torch.version.cuda)")"

tmp=$(mktemp -d)
# In the background: deleting the fresh venv just written (1 GB) can take a minute of disk time.
trap 'rm -rf "$tmp" </dev/null >/dev/null 2>&1 &' EXIT

# The sdist, from the checkout. PRONG_EXT_NO_EXTENSION: MANIFEST.in ships csrc/ whole, so the
# sdist must not depend on which extension this venv's torch would build.
log "building the sdist"
mkdir -p dist "$tmp/sdist"
PRONG_EXT_NO_EXTENSION=1 "$PY" -c \
    'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' "$tmp/sdist" \
    >"$tmp/sdist.log" 2>&1 || { cat "$tmp/sdist.log"; log "the sdist failed"; exit 1; }
sdist=$(ls "$tmp"/sdist/prong_ext-*.tar.gz)
rm -f dist/prong_ext-*.tar.gz
cp "$sdist" dist/
log "built dist/$(basename "$sdist"): $(tar tzf "$sdist" | grep -vc '/$') files"
if tar tzf "$sdist" | grep -E '_build_info\.py$|\.so$|\.pyc$'; then
    log "build outputs of the checkout leaked into the sdist"; exit 1
fi

# The wheel, from the unpacked sdist.
mkdir "$tmp/src"
tar xzf "$sdist" -C "$tmp/src"
src=$(ls -d "$tmp"/src/prong_ext-*/)
pytag=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
wheel_dir=dist
[ $MODE = cpu ] && wheel_dir="$tmp/wheel"  # dist/ keeps the CUDA wheel, the one to ship
mkdir -p "$wheel_dir"
[ $MODE = cuda ] && rm -f dist/prong_ext-*-"$pytag"-"$pytag"-linux_*.whl
log "building the wheel from the unpacked sdist${TORCH_CUDA_ARCH_LIST:+ for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST}"
t0=$(date +%s)
(cd "$src" && quiet_pip "$PY" -m pip wheel --no-build-isolation --no-deps -q -w "$(abs "$wheel_dir")" .)
wheel=$(ls -t "$wheel_dir"/prong_ext-*-"$pytag"-"$pytag"-linux_*.whl 2>/dev/null | head -n1)
[ -n "$wheel" ] || { log "no wheel was built"; exit 1; }
log "built $wheel in $(( $(date +%s) - t0 )) s"
"$PY" -m zipfile -e "$wheel" "$tmp/whl"
so=$(ls "$tmp"/whl/prong_ext/_C*.so)
grep -q "^torch_version = '$torch_version'$" "$tmp/whl/prong_ext/_build_info.py" \
    || { cat "$tmp/whl/prong_ext/_build_info.py"; log "_build_info.py does not record torch $torch_version"; exit 1; }
ls "$tmp"/whl/prong_ext-*.dist-info/licenses/LICENSE >/dev/null

if [ $MODE = cuda ]; then
    # cuobjdump: the toolkit's, else the one bundled with triton.
    CUOBJDUMP=$(command -v cuobjdump || true)
    [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
    if [ -z "$CUOBJDUMP" ]; then
        CUOBJDUMP=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
    fi
    [ -x "$CUOBJDUMP" ] || { log "cuobjdump not found"; exit 1; }
    elfs=$("$CUOBJDUMP" --list-elf "$so")
    echo "$elfs"
    for arch in sm_80 sm_90; do
        grep -q "\.$arch\.cubin" <<<"$elfs" || { log "no $arch code in $(basename "$so")"; exit 1; }
    done
    ptx=$("$CUOBJDUMP" --list-ptx "$so" 2>/dev/null || true)
    echo "$ptx"
    # PTX is kept for the archs listed with +PTX; the default list's is sm_90's
    if [[ $TORCH_CUDA_ARCH_LIST == *"9.0+PTX"* ]] && ! grep -q "\.sm_90\.ptx" <<<"$ptx"; then
        log "no sm_90 PTX in $(basename "$so") (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
        exit 1
    fi
    ptx_archs=$( (grep -o 'sm_[0-9]*\.ptx' <<<"$ptx" || true) | sed 's/\.ptx$//' | sort -u | paste -sd' ' -)
    log "cuobjdump: sm_80 and sm_90 code present; PTX: ${ptx_archs:-none}"
    RUN_VENV=$VENV
    log "installing into $RUN_VENV"
    quiet_pip "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
else
    RUN_VENV="$tmp/fresh"
    log "installing torch==$torch_version, then the wheel, into a fresh venv $RUN_VENV"
    t0=$(date +%s)
    python3 -m venv "$RUN_VENV"
    quiet_pip "$RUN_VENV/bin/python" -m pip install -q "torch==$torch_version"
    quiet_pip "$RUN_VENV/bin/python" -m pip install -q "$wheel"
    log "fresh venv ready in $(( $(date +%s) - t0 )) s"
fi

log "checking the installed wheel from outside the checkout"
mkdir "$tmp/run"
(cd "$tmp/run" && MODE=$MODE "$RUN_VENV/bin/python" - <<'PYEOF'
import os
import warnings

import torch
from torch import nn

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import prong_ext
    from prong_ext import _build_info, _extension

    assert _extension.available(), _extension._error
assert not [w for w in caught if "prong_ext" in str(w.message)], [str(w.message) for w in caught]
assert "site-packages" in prong_ext.__file__, prong_ext.__file__
assert _build_info.torch_version == torch.__version__, (_build_info.torch_version, torch.__version__)
if os.environ["MODE"] == "cuda":
    assert _extension.cuda_built(), "the wheel's _C was built without CUDA"
    assert hasattr(torch.ops.prong_ext, "batched_eigh") and hasattr(torch.ops.prong_ext, "whitening")
    a = torch.randn(40, 40, dtype=torch.float64)
    a = a + a.mT
    w, q = _extension.batched_eigh([a])
    assert torch.allclose((q[0] * w[0]) @ q[0].mT, a, atol=1e-10)
    print("cuSOLVER (build, runtime, XsyevBatched):", _extension.cusolver_info())

# A whitened model, re-whitened from correlated inputs: U changes, the outputs do not.
torch.manual_seed(0)
model = prong_ext.whiten(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)))
x = torch.randn(256, 8) @ torch.randn(8, 8)
before = model(x).detach()
prong = prong_ext.Prong(model, num_samples=256, eps=1e-3)
prong.reparametrize(x)
err = (model(x) - before).abs().max().item()
assert prong.num_reparametrizations == 1 and not torch.equal(model[0].U, torch.eye(8))
assert err < 1e-4, err
print(f"prong_ext {prong_ext.__version__} from {os.path.dirname(prong_ext.__file__)}: _C built for torch "
      f"{_build_info.torch_version} (CUDA {_build_info.cuda_version}, arch {_build_info.cuda_arch_list}); "
      f"Prong.reparametrize kept the outputs (max |dz| = {err:.1e})")
PYEOF
)
(cd "$tmp/run" && "$RUN_VENV/bin/prong-ext" --help >/dev/null)
log "done in $(( $(date +%s) - start )) s"
