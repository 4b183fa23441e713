"""The whitening 1x1 conv folded into the following conv's (or linear's) weights, and its adjoint.

    W[o, i, t] = sum_j V[o, j, t] U[j, i]                  (every tap t = (kh, kw))
    b[o]       = d[o] - sum_{i, t} W[o, i, t] c[i]

    gV[o, j, t] = sum_i (gW[o, i, t] - gb[o] c[i]) U[j, i]
    gd          = gb

A linear layer is the one-tap case: V (O, I).

Kernels `fold_kernel` and `fold_bwd_kernel`; their launches (`fold_weights_launch`,
`fold_weights_backward_launch`: grid and keyword arguments, for `wrap_triton`) and the launchers
that run them (`fold_weights`, `fold_weights_backward`). Every launch takes `precision`, "ieee"
(default) or "tf32x3" (tensor cores, precision.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .precision import check_precision

__all__ = [
    "accumulates_in_f64",
    "block_sizes",
    "dot_mode",
    "fold_bwd_kernel",
    "fold_kernel",
    "fold_weights",
    "fold_weights_backward",
    "fold_weights_backward_launch",
    "fold_weights_launch",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _row_tile(pid, n_col_tiles, O, I, T, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile (pid // n_col_tiles, pid % n_col_tiles) of a GEMM (O * T, I) x (I, I) whose rows are the
    (o, t) pairs: its rows and columns (int64), their masks, and each row's output o and tap t.
    O * T is formed in int64: O and T arrive as i32 when each fits, their product may not."""
    rows = (pid // n_col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = ((pid % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    return rows, cols, rows < tl.cast(O, tl.int64) * T, cols < I, rows // T, rows % T


@triton.jit
def _row_tile_i32(pid, n_col_tiles, O, I, T, KW, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """`_row_tile` for O * T + BLOCK_R < 2^31, its row index split into (o, t) and t into
    (t // KW, t % KW) by 32-bit divisions (a 64-bit division is a subroutine call, whose registers
    spill the tensor-core tiles): rows, cols, their masks, o (int64), t (int32) and the tap's
    (kh, kw) indices (int64)."""
    rows32 = (pid // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    taps = tl.cast(T, tl.int32)  # T < 2^31 here, even where it is passed as an i64
    width = tl.cast(KW, tl.int32)
    rows = rows32.to(tl.int64)
    cols = ((pid % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    t = rows32 % taps
    kh_kw = ((t // width).to(tl.int64), (t % width).to(tl.int64))
    return rows, cols, rows < O * T, cols < I, (rows32 // taps).to(tl.int64), t, kh_kw


@triton.jit
def _tap_rows(
    pid,
    n_col_tiles,
    O,
    I,
    T,
    KW,
    stride_o,
    stride_kh,
    stride_kw,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_I32: tl.constexpr,
):
    """The row tile of `_row_tile_i32` (ROWS_I32) or `_row_tile`: rows, cols, their masks, o, t,
    and each row's offset o * stride_o + kh * stride_kh + kw * stride_kw in a (O, I, kh, kw)
    tensor."""
    if ROWS_I32:
        rows, cols, mask_r, mask_c, o, t, kh_kw = _row_tile_i32(
            pid, n_col_tiles, O, I, T, KW, BLOCK_R, BLOCK_C
        )
        row = o * stride_o + kh_kw[0] * stride_kh + kh_kw[1] * stride_kw
    else:
        rows, cols, mask_r, mask_c, o, t = _row_tile(pid, n_col_tiles, O, I, T, BLOCK_R, BLOCK_C)
        row = o * stride_o + (t // KW) * stride_kh + (t % KW) * stride_kw
    return rows, cols, mask_r, mask_c, o, t, row


@triton.jit
def fold_kernel(
    v_ptr,
    d_ptr,
    u_ptr,
    c_ptr,
    w_ptr,
    b_ptr,
    O,
    I,
    T,
    KW,
    stride_vo,
    stride_vi,
    stride_vkh,
    stride_vkw,
    stride_u0,
    stride_u1,
    stride_c,
    stride_d,
    n_col_tiles,
    n_w_programs,
    HAS_D: tl.constexpr,
    ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HALF_DOT: tl.constexpr,
    ROWS_I32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """W = V U per tap and b = d - W c, in one launch.

        W[o, i, t] = sum_j V[o, j, t] U[j, i]
        b[o]       = d[o] - sum_{i, t} W[o, i, t] c[i] = d[o] - sum_{j, t} V[o, j, t] (U c)[j]

    Programs [0, n_w_programs) compute W as the GEMM (O * T, I) x (I, I) whose rows are the
    (o, t) pairs: tile (pid // n_col_tiles, pid % n_col_tiles) of BLOCK_R rows and BLOCK_I columns,
    reduced over j in BLOCK_K steps. The programs after them compute b for BLOCK_O channels each,
    through u = U c (the second form: it needs no W from other programs). Accumulation is float32,
    float64 when ACC_F64. W is contiguous (O, I, kh, kw) with t = kh * KW + kw; b is contiguous (O,).

    W's products: V and U in acc_ty through tl.dot's INPUT_PRECISION ("ieee" or "tf32x3"), or, when
    HALF_DOT, V and U as loaded (both float16 or both bfloat16: exact products, float32 sums).
    b's are FMA products in acc_ty in every mode. ROWS_I32: the row index split in 32 bits
    (`_row_tile_i32`, the tf32x3 launches); otherwise in 64.
    """
    pid = tl.program_id(0)
    if ACC_F64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    if pid < n_w_programs:
        rows, cols, mask_r, mask_c, o, t, v_row = _tap_rows(
            pid, n_col_tiles, O, I, T, KW, stride_vo, stride_vkh, stride_vkw, BLOCK_R, BLOCK_I, ROWS_I32
        )
        if HALF_DOT:  # V and U multiplied in their own 16-bit dtype
            dot_ty = v_ptr.dtype.element_ty
        else:
            dot_ty = acc_ty
        acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=acc_ty)
        for k0 in range(0, I, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = ks < I
            a = tl.load(
                v_ptr + v_row[:, None] + ks[None, :] * stride_vi,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            ).to(dot_ty)
            u = tl.load(
                u_ptr + ks[:, None] * stride_u0 + cols[None, :] * stride_u1,
                mask=mask_k[:, None] & mask_c[None, :],
                other=0.0,
            ).to(dot_ty)
            if HALF_DOT:
                acc = tl.dot(a, u, acc, out_dtype=tl.float32)
            else:
                # out_dtype explicit: Triton 3.6 defaults it to float32 and rejects a float64 acc
                acc = tl.dot(a, u, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        w_off = o[:, None] * I * T + cols[None, :] * T + t[:, None]
        tl.store(
            w_ptr + w_off,
            acc.to(w_ptr.dtype.element_ty),
            mask=mask_r[:, None] & mask_c[None, :],
        )
    else:
        offs_o = ((pid - n_w_programs) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        mask_o = offs_o < O
        acc_b = tl.zeros((BLOCK_O,), dtype=acc_ty)
        for j0 in range(0, I, BLOCK_K):
            js = (j0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_j = js < I
            # u[j] = sum_i U[j, i] c[i] for this block of j
            uc = tl.zeros((BLOCK_K,), dtype=acc_ty)
            for i0 in range(0, I, BLOCK_I):
                iis = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
                mask_ii = iis < I
                u = tl.load(
                    u_ptr + js[:, None] * stride_u0 + iis[None, :] * stride_u1,
                    mask=mask_j[:, None] & mask_ii[None, :],
                    other=0.0,
                ).to(acc_ty)
                cc = tl.load(c_ptr + iis * stride_c, mask=mask_ii, other=0.0).to(acc_ty)
                uc += tl.sum(u * cc[None, :], axis=1)
            for t in range(0, T):
                tap = (t // KW).to(tl.int64) * stride_vkh + (t % KW).to(tl.int64) * stride_vkw
                v = tl.load(
                    v_ptr + offs_o[:, None] * stride_vo + js[None, :] * stride_vi + tap,
                    mask=mask_o[:, None] & mask_j[None, :],
                    other=0.0,
                ).to(acc_ty)
                acc_b += tl.sum(v * uc[None, :], axis=1)
        if HAS_D:
            bias = tl.load(d_ptr + offs_o * stride_d, mask=mask_o, other=0.0).to(acc_ty) - acc_b
        else:
            bias = -acc_b
        tl.store(b_ptr + offs_o, bias.to(b_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def fold_bwd_kernel(
    gw_ptr,
    gb_ptr,
    u_ptr,
    c_ptr,
    gv_ptr,
    gd_ptr,
    O,
    I,
    T,
    KW,
    stride_gwo,
    stride_gwi,
    stride_gwkh,
    stride_gwkw,
    stride_gb,
    stride_u0,
    stride_u1,
    stride_c,
    n_col_tiles,
    ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROWS_I32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The adjoint of `fold_kernel`, in one launch.

        gV[o, j, t] = sum_i (gW[o, i, t] - gb[o] c[i]) U[j, i]          gd[o] = gb[o]

    The GEMM (O * T, I) x (I, I) with rows (o, t): tile (pid // n_col_tiles, pid % n_col_tiles) of
    BLOCK_R rows and BLOCK_J columns j, reduced over i in BLOCK_K steps with the centering
    gW - gb c^T formed in registers. The column-0 programs also copy gb to gd (rows with t = 0).
    gV is contiguous (O, I, kh, kw), gd contiguous (O,). The products are tl.dot's of acc_ty
    operands with INPUT_PRECISION ("ieee" or "tf32x3"; the centred operand is float32 for every
    input dtype). ROWS_I32 as in `fold_kernel`.
    """
    pid = tl.program_id(0)
    if ACC_F64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    rows, cols, mask_r, mask_c, o, t, gw_row = _tap_rows(
        pid, n_col_tiles, O, I, T, KW, stride_gwo, stride_gwkh, stride_gwkw, BLOCK_R, BLOCK_J, ROWS_I32
    )
    gb = tl.load(gb_ptr + o * stride_gb, mask=mask_r, other=0.0)
    gb_acc = gb.to(acc_ty)
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=acc_ty)
    for k0 in range(0, I, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = ks < I
        cc = tl.load(c_ptr + ks * stride_c, mask=mask_k, other=0.0).to(acc_ty)
        a = tl.load(
            gw_ptr + gw_row[:, None] + ks[None, :] * stride_gwi,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        ).to(acc_ty)
        a = a - gb_acc[:, None] * cc[None, :]
        # U^T block: element (i, j) = U[j, i]
        ut = tl.load(
            u_ptr + cols[None, :] * stride_u0 + ks[:, None] * stride_u1,
            mask=mask_k[:, None] & mask_c[None, :],
            other=0.0,
        ).to(acc_ty)
        acc = tl.dot(a, ut, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)  # see fold_kernel
    gv_off = o[:, None] * I * T + cols[None, :] * T + t[:, None]
    tl.store(gv_ptr + gv_off, acc.to(gv_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])
    first_col = pid % n_col_tiles == 0
    # tl.where, not & first_col: Triton 3.9's interpreter rejects a block mask & a scalar condition
    tl.store(gd_ptr + o, gb.to(gd_ptr.dtype.element_ty), mask=tl.where(first_col, mask_r & (t == 0), False))


# True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)
_INTERPRETED = not isinstance(fold_kernel, triton.runtime.jit.JITFunction)


def block_sizes(f64: bool, precision: str = "ieee") -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_I (BLOCK_J), BLOCK_K, BLOCK_O) for the default 4 warps.

    No register spills on sm_80 or sm_90 (64 x 64 x 32 float32 FMA tiles spill). No num_warps launch
    option: the launch stays the plain one under torch.compile. precision="tf32x3" (tensor cores)
    takes 64 x 32 tiles with 32-bit row splits (ROWS_I32): 64 rows give sm_90 its wgmma (one
    warpgroup, m64), and of the 64 x 64, 64 x 32 and 32 x 64 tiles with 4 or 8 warps it is the one
    that spills under neither Triton 3.6 nor 3.8 (compile_check). Each tf32x3 dot reduces 16 input
    features from zero (precision.py).
    """
    if f64:
        return (32, 32, 16, 32)
    return (64, 32, 16, 32) if precision == "tf32x3" else (32, 64, 16, 32)


def dot_mode(precision: str, f64: bool, weight_dtype: torch.dtype, u_dtype: torch.dtype) -> tuple[str, bool]:
    """(INPUT_PRECISION, HALF_DOT) of a fold launch: "ieee" for precision="ieee" or float64
    accumulation (f64); otherwise "tf32x3", with HALF_DOT when the weight-shaped input and U are
    both float16 or both bfloat16, so that their products are exact in float32.

    Under Triton's interpreter bfloat16 operands are not multiplied as they are: its dot takes
    them for their raw bits (Triton 3.6 and 3.8), so there they go through float32 like the rest."""
    check_precision(precision)
    if precision == "ieee" or f64:
        return "ieee", False
    half = (torch.float16,) if _INTERPRETED else (torch.float16, torch.bfloat16)
    return "tf32x3", weight_dtype in half and u_dtype == weight_dtype


def _taps(t: torch.Tensor, name: str) -> tuple[int, int, int, int, tuple[int, int, int, int]]:
    """(O, I, T, KW, (stride_o, stride_i, stride_kh, stride_kw)) of a 2-D or 4-D weight."""
    if t.dim() == 2:
        return t.shape[0], t.shape[1], 1, 1, (t.stride(0), t.stride(1), 0, 0)
    if t.dim() == 4:
        O, I, kh, kw = t.shape
        return O, I, kh * kw, kw, tuple(t.stride())
    raise ValueError(f"{name} must be (O, I) or (O, I, kh, kw), got shape {tuple(t.shape)}")


def _shape_args(
    t: torch.Tensor,
    name: str,
    prefix: str,
    U: torch.Tensor,
    c: torch.Tensor,
    vec: torch.Tensor | None,
    vec_name: str,
) -> dict:
    """Checks the arguments of a fold launch and returns the kernel arguments of their shapes
    and strides: O, I, T, KW, stride_{prefix}o/i/kh/kw (t's), stride_u0, stride_u1, stride_c.

    t is the weight-shaped input (V, or gW for the backward), vec its per-output vector (d, which
    may be None, or gb)."""
    O, I, T, KW, strides = _taps(t, name)
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if tuple(U.shape) != (I, I):
        raise ValueError(f"U must have shape {(I, I)}, got {tuple(U.shape)}")
    if tuple(c.shape) != (I,):
        raise ValueError(f"c must have shape {(I,)}, got {tuple(c.shape)}")
    for other, u in (("U", U), ("c", c)):
        if u.dtype not in _DTYPES:
            raise TypeError(f"{other} must be a float tensor, got {u.dtype}")
        if u.device != t.device:
            raise ValueError(f"{other} is on {u.device}, expected {t.device}")
    if vec is not None and (tuple(vec.shape) != (O,) or vec.device != t.device):
        raise ValueError(
            f"{vec_name} must have shape {(O,)} on {t.device}, got {tuple(vec.shape)} on {vec.device}"
        )
    args = dict(O=O, I=I, T=T, KW=KW, stride_u0=U.stride(0), stride_u1=U.stride(1), stride_c=c.stride(0))
    args.update({f"stride_{prefix}{dim}": st for dim, st in zip(("o", "i", "kh", "kw"), strides)})
    return args


def _rows_i32(input_precision: str, O: int, T: int, block_r: int, rows_i64: bool | None) -> bool:
    """ROWS_I32 of a fold launch: the tf32x3 launches split their row indices in 32 bits unless
    the last row tile can reach 2^31 (or rows_i64 asks for int64); the ieee launches keep the
    int64 row indices their tiles were sized with."""
    if input_precision != "tf32x3":
        return False
    return not (O * T + block_r >= 2**31 if rows_i64 is None else rows_i64)


def accumulates_in_f64(*ts: torch.Tensor | None) -> bool:
    """Whether the fold kernels accumulate in float64: when any of their inputs is float64."""
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def fold_weights_launch(
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    precision: str = "ieee",
    rows_i64: bool | None = None,
) -> tuple[tuple[int], dict] | None:
    """The launch of `fold_weights` writing into W (V's shape, contiguous) and b ((O,), contiguous).

    Returns (grid, kernel keyword arguments), or None when there is nothing to compute. rows_i64
    (int64 row indices for precision="tf32x3": the path of weights past 2^31 (o, tap) rows)
    overrides the heuristic; tests use it to reach that path with small weights.
    """
    check_precision(precision)
    shape = _shape_args(V, "V", "v", U, c, d, "d")
    O, I, T = shape["O"], shape["I"], shape["T"]
    if O == 0:
        return None
    f64 = accumulates_in_f64(V, U, c, d)
    input_precision, half_dot = dot_mode(precision, f64, V.dtype, U.dtype)
    block_r, block_i, block_k, block_o = block_sizes(f64, input_precision)
    n_col = triton.cdiv(I, block_i)
    n_w = triton.cdiv(O * T, block_r) * n_col if I > 0 else 0
    n_b = triton.cdiv(O, block_o)
    kwargs = dict(
        v_ptr=V,
        d_ptr=d if d is not None else V,
        u_ptr=U,
        c_ptr=c,
        w_ptr=W,
        b_ptr=b,
        stride_d=d.stride(0) if d is not None else 0,
        n_col_tiles=max(n_col, 1),
        n_w_programs=n_w,
        HAS_D=d is not None,
        ACC_F64=f64,
        INPUT_PRECISION=input_precision,
        HALF_DOT=half_dot,
        ROWS_I32=_rows_i32(input_precision, O, T, block_r, rows_i64),
        BLOCK_R=block_r,
        BLOCK_I=block_i,
        BLOCK_K=block_k,
        BLOCK_O=block_o,
        **shape,
    )
    return (n_w + n_b,), kwargs


def fold_weights(
    V: torch.Tensor, d: torch.Tensor | None, U: torch.Tensor, c: torch.Tensor, *, precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical weights of a whitened layer, W = V U per tap and b = d - W c, in one launch.

        W[o, i, t] = sum_j V[o, j, t] U[j, i]          b[o] = d[o] - sum_{i, t} W[o, i, t] c[i]

    b is computed as d - sum_{j, t} V[o, j, t] (U c)[j] from unrounded values, in float32 (float64
    when any input is float64), so for half-precision V it is the rounding of the exact bias.

    Args:
        V: (O, I) or (O, I, kh, kw), any strides; float32, float16, bfloat16 or float64.
        d: (O,) or None (zeros).
        U: (I, I), any float dtype and strides.
        c: (I,), any float dtype and strides.
        precision: W's products: "ieee" (default, float32 FMA) or "tf32x3" (tensor cores: V and U
            in one 16-bit dtype multiplied as they are, other pairs through tf32x3), W's error
            against float64 at most twice that of torch's V @ U at V's precision (precision.py).
            float64 inputs take float64 products in both modes; b takes FMA products in both.

    Returns:
        W: V's shape, contiguous, V's dtype. b: (O,), V's dtype.
    """
    W = torch.empty(V.shape, dtype=V.dtype, device=V.device)
    b = torch.empty(V.shape[0], dtype=V.dtype, device=V.device)
    launch = fold_weights_launch(V, d, U, c, W, b, precision=precision)
    if launch is not None:
        grid, kwargs = launch
        fold_kernel[grid](**kwargs)
    return W, b


def fold_weights_backward_launch(
    gW: torch.Tensor,
    gb: torch.Tensor,
    U: torch.Tensor,
    c: torch.Tensor,
    gV: torch.Tensor,
    gd: torch.Tensor,
    *,
    precision: str = "ieee",
    rows_i64: bool | None = None,
) -> tuple[tuple[int], dict] | None:
    """The launch of `fold_weights_backward` writing into gV (gW's shape, contiguous) and gd ((O,)).

    precision "tf32x3" takes tf32x3 products for every input dtype but float64: the operand
    gW - gb c^T is float32. rows_i64 as in `fold_weights_launch`."""
    check_precision(precision)
    shape = _shape_args(gW, "gW", "gw", U, c, gb, "gb")
    O, I, T = shape["O"], shape["I"], shape["T"]
    if O == 0 or I == 0:
        return None
    f64 = accumulates_in_f64(gW, gb, U, c)
    input_precision, _ = dot_mode(precision, f64, gW.dtype, U.dtype)
    block_r, block_j, block_k, _ = block_sizes(f64, input_precision)
    n_row = triton.cdiv(O * T, block_r)
    n_col = triton.cdiv(I, block_j)
    kwargs = dict(
        gw_ptr=gW,
        gb_ptr=gb,
        u_ptr=U,
        c_ptr=c,
        gv_ptr=gV,
        gd_ptr=gd,
        stride_gb=gb.stride(0),
        n_col_tiles=n_col,
        ACC_F64=f64,
        INPUT_PRECISION=input_precision,
        ROWS_I32=_rows_i32(input_precision, O, T, block_r, rows_i64),
        BLOCK_R=block_r,
        BLOCK_J=block_j,
        BLOCK_K=block_k,
        **shape,
    )
    return (n_row * n_col,), kwargs


def fold_weights_backward(
    gW: torch.Tensor, gb: torch.Tensor, U: torch.Tensor, c: torch.Tensor, *, precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `fold_weights` with respect to V and d, in one launch.

        gV[o, j, t] = sum_i (gW[o, i, t] - gb[o] c[i]) U[j, i]          gd = gb

    Args:
        gW: (O, I) or (O, I, kh, kw), any strides. gb: (O,).
        U: (I, I). c: (I,).
        precision: "ieee" (default) or "tf32x3" (tensor cores: tf32x3 products of the float32
            gW - gb c^T and U), as in `fold_weights`.

    Returns:
        gV: gW's shape, contiguous, gW's dtype. gd: (O,), a copy of gb in gb's dtype.
    """
    gV = torch.empty(gW.shape, dtype=gW.dtype, device=gW.device)
    gd = torch.empty(gb.shape, dtype=gb.dtype, device=gb.device)
    launch = fold_weights_backward_launch(gW, gb, U, c, gV, gd, precision=precision)
    if launch is not None:
        grid, kwargs = launch
        fold_bwd_kernel[grid](**kwargs)
    elif gW.shape[0] > 0:  # I == 0: no weights, the bias gradient still passes through
        gV.zero_()
        gd.copy_(gb)
    return gV, gd
