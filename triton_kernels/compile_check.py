"""Ahead-of-time compile of every Triton kernel, in every dtype configuration used, for sm_90 and sm_80.

Needs no GPU (ptxas ships with triton). Run with TRITON_INTERPRET unset:

    python -m prong_ext.triton_kernels.compile_check [--arch 90 80]

Prints one line per kernel / configuration / arch and exits non-zero when any of them fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# Kernels defined under the interpreter cannot be compiled; refuse before importing them.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from .covariance import DEFAULT_BLOCK_C, DEFAULT_BLOCK_R, cov_accum_kernel  # noqa: E402
from .whiten_conv import block_sizes, fold_bwd_kernel, fold_kernel  # noqa: E402

# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
_SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}


def _signature(fn, pointers: dict[str, str], constexprs: dict, int_type: str) -> dict[str, str]:
    """name -> type string for every argument of fn: pointers as given, constexprs, ints as int_type."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = int_type
    return sig


def _configs():
    """(label, kernel, pointer types, constexprs, int type) for every configuration the launchers use.

    Integer arguments are i32 at run time when they fit (the common case) and specialized to
    constants when they equal 1 (the row dims R1, R2 of merged layouts); each kernel is also built
    with i64 integers, the path of tensors past 2^31 elements.
    """
    rows = {"rows=3d": {}, "rows=2d": {"R1": 1}, "rows=1d": {"R1": 1, "R2": 1}}
    for x in ("fp32", "fp16", "bf16"):
        for tf32 in (False, True):
            for atomics in (False, True):
                for block_c in (16, DEFAULT_BLOCK_C):
                    pointers = {
                        "x_ptr": _TRITON_TYPES[x],
                        "shift_ptr": "*fp32",
                        "s1_ptr": "*fp32",
                        "s2_ptr": "*fp32",
                    }
                    base = f"x={x} tf32={int(tf32)} atomics={int(atomics)} BLOCK_C={block_c}"
                    first = x == "fp32" and not tf32 and not atomics and block_c == DEFAULT_BLOCK_C
                    for layout, spec in rows.items():
                        if layout != "rows=3d" and not first:
                            continue
                        constexprs = {
                            "BLOCK_R": DEFAULT_BLOCK_R,
                            "BLOCK_C": block_c,
                            "ALLOW_TF32": tf32,
                            "USE_ATOMICS": atomics,
                            "ROWS_I64": False,
                            **spec,
                        }
                        yield f"{base} {layout}", cov_accum_kernel, pointers, constexprs, "i32"
                    if first:
                        constexprs = dict(constexprs, ROWS_I64=True)
                        yield f"{base} rows=i64", cov_accum_kernel, pointers, constexprs, "i64"
    for v in ("fp32", "fp16", "bf16", "fp64"):
        f64 = v == "fp64"
        block_r, block_i, block_k, block_o = block_sizes(f64)
        for uc in dict.fromkeys(("fp32", v)):  # buffers in float32, or cast with the module
            if f64 and uc != "fp64":
                continue  # float64 V is the gradcheck case, with float64 buffers
            for has_d in (False, True):
                pointers = {
                    "v_ptr": _TRITON_TYPES[v],
                    "d_ptr": _TRITON_TYPES[v],
                    "u_ptr": _TRITON_TYPES[uc],
                    "c_ptr": _TRITON_TYPES[uc],
                    "w_ptr": _TRITON_TYPES[v],
                    "b_ptr": _TRITON_TYPES[v],
                }
                constexprs = dict(
                    HAS_D=has_d,
                    ACC_F64=f64,
                    BLOCK_R=block_r,
                    BLOCK_I=block_i,
                    BLOCK_K=block_k,
                    BLOCK_O=block_o,
                )
                label = f"V={v} U,c={uc} has_d={int(has_d)}"
                yield label, fold_kernel, pointers, constexprs, "i32"
                if v == "fp32" and has_d:
                    yield label, fold_kernel, pointers, constexprs, "i64"
                    yield f"{label} T=1", fold_kernel, pointers, dict(constexprs, T=1, KW=1), "i32"
            pointers = {
                "gw_ptr": _TRITON_TYPES[v],
                "gb_ptr": _TRITON_TYPES[v],
                "u_ptr": _TRITON_TYPES[uc],
                "c_ptr": _TRITON_TYPES[uc],
                "gv_ptr": _TRITON_TYPES[v],
                "gd_ptr": _TRITON_TYPES[v],
            }
            constexprs = dict(ACC_F64=f64, BLOCK_R=block_r, BLOCK_J=block_i, BLOCK_K=block_k)
            label = f"gW={v} U,c={uc}"
            yield label, fold_bwd_kernel, pointers, constexprs, "i32"
            if v == "fp32":
                yield label, fold_bwd_kernel, pointers, constexprs, "i64"
                yield f"{label} T=1", fold_bwd_kernel, pointers, dict(constexprs, T=1, KW=1), "i32"


def _resources(cubin: bytes) -> str:
    """Registers and local memory (spills, stack) per thread from cuobjdump, or '' without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return f" regs={m.group(1)} stack={m.group(2)}B local={m.group(3)}B" if m else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    args = parser.parse_args(argv)
    failures = 0
    total = 0
    for label, fn, pointers, constexprs, int_type in _configs():
        src = triton.compiler.ASTSource(
            fn=fn, signature=_signature(fn, pointers, constexprs, int_type), constexprs=constexprs
        )
        for arch in args.arch:
            total += 1
            start = time.perf_counter()
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                shared = compiled.metadata.shared
                limit = _SHARED_LIMIT.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} has {limit} B")
                resources = _resources(compiled.asm["cubin"])
                status = f"ok    {time.perf_counter() - start:5.2f}s shared={shared}B{resources}"
            except Exception as exc:  # report every failure, keep going
                failures += 1
                first_line = (str(exc).strip().splitlines() or [""])[0]
                status = f"FAIL  {type(exc).__name__}: {first_line}"
                traceback.print_exc(file=sys.stderr)
            print(f"{fn.__name__:18s} sm_{arch} {int_type} {label:53s} {status}", flush=True)
    print(f"compile_check: {total - failures}/{total} compiled, triton {triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
