"""Ahead-of-time compile of every Triton kernel, in every dtype configuration used, for sm_90 and sm_80.

Needs no GPU (ptxas ships with triton). Run with TRITON_INTERPRET unset:

    python -m prong_ext.triton_kernels.compile_check [--arch 90 80] [--only TEXT]

Prints one line per kernel / configuration / arch (shared memory, and from cuobjdump registers,
stack, tensor-core instructions and local-memory stores and loads: spills) and exits non-zero when
any of them fails: no cubin, too much shared memory, or tensor-core instructions (HMMA, HGMMA) in
an "ieee" configuration or none in a tf32, tf32x3 or 16-bit-dot one.
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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from .covariance import block_sizes as cov_block_sizes  # noqa: E402
from .covariance import cov_accum_kernel  # noqa: E402
from .covariance import num_warps as cov_num_warps  # noqa: E402
from .whiten_conv import block_sizes, dot_mode, fold_bwd_kernel, fold_kernel  # noqa: E402

# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
_SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
_TORCH_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _signature(fn, pointers: dict[str, str], constexprs: dict, int_type: str) -> dict[str, str]:
    """name -> type string for every argument of fn: pointers as given, constexprs, ints as int_type
    ("i32", "i64", or "i64s": the strides i64, the other ints i32)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif int_type == "i64s":
            sig[name] = "i64" if name.startswith("stride_") else "i32"
        else:
            sig[name] = int_type
    return sig


def _configs():
    """(label, kernel, pointer types, constexprs, int type, num_warps) for every configuration the
    launchers use (num_warps None: Triton's default, 4).

    Integer arguments are i32 at run time when they fit (the common case) and specialized to
    constants when they equal 1 (the row dims R1, R2 of merged layouts). The fold kernels are also
    built with i64 integers, the path of tensors past 2^31 elements; the covariance, whose launches
    take at most MAX_ROWS = 2^30 rows (sizes in i32), with i64 strides ("i64s": inputs past 2^31
    elements), for every dtype in both precision modes ("ieee", "tf32x3"), with and without
    atomics. The fold's tf32x3 launches, whose rows are split in 32 bits (ROWS_I32), are built with
    int64 ones too (weights past 2^31 (o, tap) rows) and i64 integers.
    """
    rows = {"rows=3d": {}, "rows=2d": {"R1": 1}, "rows=1d": {"R1": 1, "R2": 1}}
    for x in ("fp32", "fp16", "bf16"):
        pointers = {"x_ptr": _TRITON_TYPES[x], "shift_ptr": "*fp32", "s1_ptr": "*fp32", "s2_ptr": "*fp32"}
        for precision in ("ieee", "tf32", "tf32x3"):
            # the launcher's tiles: those of precision="ieee" for allow_tf32's single TF32 products
            block_r, widest = cov_block_sizes(2**20, "tf32x3" if precision == "tf32x3" else "ieee")
            block_cs = [16 << i for i in range(widest.bit_length() - 4)]  # 16 ... widest
            for atomics in (False, True):
                for block_c in block_cs:
                    base = f"x={x} {precision} atomics={int(atomics)} BLOCK_C={block_c}"
                    first = x == "fp32" and precision == "ieee" and not atomics and block_c == widest
                    constexprs = {
                        "BLOCK_R": block_r,
                        "BLOCK_C": block_c,
                        "INPUT_PRECISION": precision,
                        "USE_ATOMICS": atomics,
                    }
                    warps = cov_num_warps(block_c, precision)
                    for layout, spec in rows.items():
                        if layout != "rows=3d" and not first:
                            continue
                        yield (
                            f"{base} {layout}",
                            cov_accum_kernel,
                            pointers,
                            {**constexprs, **spec},
                            "i32",
                            warps,
                        )
                    if block_c == widest and precision != "tf32":
                        yield f"{base} rows=3d", cov_accum_kernel, pointers, constexprs, "i64s", warps
    for v in ("fp32", "fp16", "bf16", "fp64"):
        f64 = v == "fp64"
        for uc in dict.fromkeys(("fp32", v)):  # buffers in float32, or cast with the module
            if f64 and uc != "fp64":
                continue  # float64 V is the gradcheck case, with float64 buffers
            for precision in ("ieee",) if f64 else ("ieee", "tf32x3"):
                input_precision, half_dot = dot_mode(precision, f64, _TORCH_TYPES[v], _TORCH_TYPES[uc])
                block_r, block_i, block_k, block_o = block_sizes(f64, input_precision)
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
                        INPUT_PRECISION=input_precision,
                        HALF_DOT=half_dot,
                        ROWS_I32=input_precision == "tf32x3",
                        BLOCK_R=block_r,
                        BLOCK_I=block_i,
                        BLOCK_K=block_k,
                        BLOCK_O=block_o,
                    )
                    label = f"V={v} U,c={uc} has_d={int(has_d)} {precision}{' 16-bit dot' * half_dot}"
                    yield label, fold_kernel, pointers, constexprs, "i32", None
                    if has_d and constexprs["ROWS_I32"]:  # tf32x3's int64 (o, tap) rows, i64 integers
                        i64_rows = dict(constexprs, ROWS_I32=False)
                        yield f"{label} rows=i64", fold_kernel, pointers, i64_rows, "i64", None
                    if v == "fp32" and has_d:
                        yield label, fold_kernel, pointers, constexprs, "i64", None
                        yield f"{label} T=1", fold_kernel, pointers, dict(constexprs, T=1, KW=1), "i32", None
                pointers = {
                    "gw_ptr": _TRITON_TYPES[v],
                    "gb_ptr": _TRITON_TYPES[v],
                    "u_ptr": _TRITON_TYPES[uc],
                    "c_ptr": _TRITON_TYPES[uc],
                    "gv_ptr": _TRITON_TYPES[v],
                    "gd_ptr": _TRITON_TYPES[v],
                }
                constexprs = dict(
                    ACC_F64=f64,
                    INPUT_PRECISION=input_precision,
                    ROWS_I32=input_precision == "tf32x3",
                    BLOCK_R=block_r,
                    BLOCK_J=block_i,
                    BLOCK_K=block_k,
                )
                label = f"gW={v} U,c={uc} {precision}"
                yield label, fold_bwd_kernel, pointers, constexprs, "i32", None
                if constexprs["ROWS_I32"]:
                    i64_rows = dict(constexprs, ROWS_I32=False)
                    yield f"{label} rows=i64", fold_bwd_kernel, pointers, i64_rows, "i64", None
                if v == "fp32":
                    yield label, fold_bwd_kernel, pointers, constexprs, "i64", None
                    yield f"{label} T=1", fold_bwd_kernel, pointers, dict(constexprs, T=1, KW=1), "i32", None


def _tool(name: str) -> str | None:
    """The path of one of the CUDA binaries that ship with Triton, or None."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


# SASS opcodes of the tensor cores (mma.sync is HMMA, wgmma HGMMA) and of local memory (spills)
_TENSOR_CORE_OPS = ("HMMA", "HGMMA")
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _sass_stats(cubin: bytes, kernel: str) -> dict[str, int] | None:
    """Registers and stack bytes per thread of `kernel` (cuobjdump -res-usage) and, over its SASS,
    the count of tensor-core instructions ("mma") and of local-memory stores and loads ("stl",
    "ldl": register spills, or the frames of calls); None without cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+)", usage)
    ops = [op.group(1) for op in _OPCODE.finditer(sass)]
    return {
        "regs": int(m.group(1)) if m else -1,
        "stack": int(m.group(2)) if m else -1,
        "mma": sum(op in _TENSOR_CORE_OPS for op in ops),
        "stl": ops.count("STL"),
        "ldl": ops.count("LDL"),
    }


def _expects_tensor_cores(constexprs: dict) -> bool:
    """Whether a configuration's products are the tensor cores': tf32 or tf32x3 dots, or 16-bit ones."""
    return bool(constexprs.get("HALF_DOT")) or constexprs.get("INPUT_PRECISION", "ieee") != "ieee"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--only", default="", help="compile the configurations whose line contains this")
    args = parser.parse_args(argv)
    failures = 0
    total = 0
    for label, fn, pointers, constexprs, int_type, warps in _configs():
        src = triton.compiler.ASTSource(
            fn=fn, signature=_signature(fn, pointers, constexprs, int_type), constexprs=constexprs
        )
        for arch in args.arch:
            name = f"{fn.__name__:18s} sm_{arch} {int_type:4s} w{warps or 4} {label:56s}"
            if args.only not in name:
                continue
            total += 1
            start = time.perf_counter()
            try:
                options = {"num_warps": warps or 4}
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
                shared = compiled.metadata.shared
                limit = _SHARED_LIMIT.get(arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"needs {shared} B of shared memory, sm_{arch} has {limit} B")
                status = f"ok    {time.perf_counter() - start:5.2f}s shared={shared}B"
                stats = _sass_stats(compiled.asm["cubin"], fn.__name__)
                if stats is not None:
                    status += " regs={regs} stack={stack}B mma={mma} stl={stl} ldl={ldl}".format(**stats)
                    if _expects_tensor_cores(constexprs) != (stats["mma"] > 0):
                        want = "tensor-core" if _expects_tensor_cores(constexprs) else "no tensor-core"
                        raise RuntimeError(f"{want} instructions expected, found {stats['mma']}")
            except Exception as exc:  # report every failure, keep going
                failures += 1
                first_line = (str(exc).strip().splitlines() or [""])[0]
                status = f"FAIL  {type(exc).__name__}: {first_line}"
                traceback.print_exc(file=sys.stderr)
            print(f"{name} {status}", flush=True)
    print(f"compile_check: {total - failures}/{total} compiled, triton {triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
