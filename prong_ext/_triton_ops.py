"""The Triton kernels of prong_ext as torch.library ops, with fakes and autograd.

    prong_ext::cov_accumulate(Tensor x, Tensor shift, Tensor(a!) s1, Tensor(b!) s2,
                              bool allow_tf32=False, str precision="ieee") -> ()
    prong_ext::fold(Tensor V, Tensor? d, Tensor U, Tensor c, str precision="ieee") -> (Tensor, Tensor)
    prong_ext::fold_backward(Tensor gW, Tensor gb, Tensor U, Tensor c, str precision="ieee")
        -> (Tensor, Tensor)

precision is the kernels' products: "ieee" (float32 FMA, the default) or "tf32x3" (tensor cores,
within twice the error of torch at the inputs' precision: triton_kernels/precision.py). It is an
argument of the ops, so a torch.compile graph records the mode it was traced with. The fold's
backward (and the double backward) takes the forward's precision. The torch path for tensors off
the GPU ignores it.

With compiled Triton (the normal case) the ops are `torch.library.triton_op`s: CUDA tensors launch
the kernels through `wrap_triton`, so torch.compile sees the kernels themselves; tensors on other
devices take the torch path (prong_ext._common's fold, at the kernels' accumulation dtype). Under
the Triton interpreter (TRITON_INTERPRET=1, kernels run on CPU tensors) they are
`torch.library.custom_op`s calling the launchers, with explicit fakes.

Registration is fragment-style only: the C++ extension may define other ops of the namespace.

Autocast: the public functions and the fold's autograd formulas run the ops with autocast off, so
under torch.autocast the fold and its backward keep their inputs' dtypes (float32 parameters give
a float32 fold) on every path, the torch fallback included.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from triton.runtime.jit import JITFunction

from . import _common
from ._common import full_precision
from .triton_kernels.covariance import cov_accum_kernel, cov_accumulate_launches
from .triton_kernels.whiten_conv import (
    accumulates_in_f64,
    fold_bwd_kernel,
    fold_kernel,
    fold_weights_backward_launch,
    fold_weights_launch,
)

__all__ = ["cov_accumulate", "fold", "fold_backward", "INTERPRETED"]

#: True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = not isinstance(fold_kernel, JITFunction)

_COV_SCHEMA = (
    "(Tensor x, Tensor shift, Tensor(a!) s1, Tensor(b!) s2, bool allow_tf32=False, "
    'str precision="ieee") -> ()'
)
_FOLD_SCHEMA = '(Tensor V, Tensor? d, Tensor U, Tensor c, str precision="ieee") -> (Tensor, Tensor)'
_FOLD_BWD_SCHEMA = '(Tensor gW, Tensor gb, Tensor U, Tensor c, str precision="ieee") -> (Tensor, Tensor)'


# --- plain torch, for devices Triton does not run on -------------------------------------------


def _acc_dtype(*ts: Tensor | None) -> torch.dtype:
    """The fold kernels' accumulation dtype for these inputs."""
    return torch.float64 if accumulates_in_f64(*ts) else torch.float32


def _cov_torch(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor) -> None:
    y = _common.rows(x).to(torch.float32) - shift
    s1.add_(y.sum(0))
    s2.add_(y.T @ y)


def _fold_torch(V: Tensor, d: Tensor | None, U: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(V, d, U, c)
    W, b = _common.fold(V.to(acc), None if d is None else d.to(acc), U.to(acc), c.to(acc))
    return W.to(V.dtype), b.to(V.dtype)


def _fold_backward_torch(gW: Tensor, gb: Tensor, U: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(gW, gb, U, c)
    gV, _ = _common.fold_backward(gW.to(acc), gb.to(acc), U.to(acc), c.to(acc))
    return gV.to(gW.dtype), gb.clone()


# --- the op bodies ----------------------------------------------------------------------------


def _launch(kernel, grid, kwargs) -> None:
    if INTERPRETED:
        kernel[grid](**kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](**kwargs)


def _runs_triton(t: Tensor) -> bool:
    return t.is_cuda or INTERPRETED


def _cov_accumulate_impl(
    x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, allow_tf32: bool = False, precision: str = "ieee"
) -> None:
    launches = cov_accumulate_launches(x, shift, s1, s2, allow_tf32=allow_tf32, precision=precision)
    if not launches:
        return
    if not _runs_triton(x):
        _cov_torch(x, shift, s1, s2)
        return
    for launch in launches:
        _launch(cov_accum_kernel, launch.grid, launch.kwargs)
        launch.finish()


def _fold_impl(
    V: Tensor, d: Tensor | None, U: Tensor, c: Tensor, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    W = torch.empty(V.shape, dtype=V.dtype, device=V.device)
    b = torch.empty(V.shape[0], dtype=V.dtype, device=V.device)
    launch = fold_weights_launch(V, d, U, c, W, b, precision=precision)  # validates
    if not _runs_triton(V):
        return _fold_torch(V, d, U, c)
    if launch is not None:
        _launch(fold_kernel, *launch)
    return W, b


def _fold_backward_impl(
    gW: Tensor, gb: Tensor, U: Tensor, c: Tensor, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    gV = torch.empty(gW.shape, dtype=gW.dtype, device=gW.device)
    gd = torch.empty(gb.shape, dtype=gb.dtype, device=gb.device)
    launch = fold_weights_backward_launch(gW, gb, U, c, gV, gd, precision=precision)  # validates
    if not _runs_triton(gW) or launch is None:
        return _fold_backward_torch(gW, gb, U, c)
    _launch(fold_bwd_kernel, *launch)
    return gV, gd


def _cov_accumulate_fake(
    x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, allow_tf32: bool = False, precision: str = "ieee"
) -> None:
    return None


def _fold_fake(
    V: Tensor, d: Tensor | None, U: Tensor, c: Tensor, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    return V.new_empty(V.shape), V.new_empty(V.shape[0])


def _fold_backward_fake(
    gW: Tensor, gb: Tensor, U: Tensor, c: Tensor, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    return gW.new_empty(gW.shape), gb.new_empty(gb.shape)


# --- registration -----------------------------------------------------------------------------


def _alias_free(schema: str) -> str:
    return re.sub(r"\(\w+!\)", "(!)", schema)


def _register(name: str, impl, fake, schema: str, mutates_args: tuple[str, ...]):
    qualname = f"prong_ext::{name}"
    if INTERPRETED:
        op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args, schema=schema)
        op.register_fake(fake)
    else:
        # triton_op infers the schema from the annotations (it takes no schema argument); its fake
        # is the body itself, traced with wrap_triton. Check the inferred schema is the one we publish.
        op = torch.library.triton_op(qualname, impl, mutates_args=mutates_args)
        inferred = "(" + str(op._opoverload._schema).split("(", 1)[1]
        if _alias_free(inferred) != _alias_free(schema):
            raise AssertionError(f"{qualname}: inferred schema {inferred} differs from {schema}")
    return op


_cov_op = _register("cov_accumulate", _cov_accumulate_impl, _cov_accumulate_fake, _COV_SCHEMA, ("s1", "s2"))
_fold_op = _register("fold", _fold_impl, _fold_fake, _FOLD_SCHEMA, ())
_fold_bwd_op = _register("fold_backward", _fold_backward_impl, _fold_backward_fake, _FOLD_BWD_SCHEMA, ())


def _setup_context(ctx, inputs, output) -> None:
    """Both ops' inputs are (a weight-shaped tensor, a vector per output or None, U, c,
    precision): the backward keeps U and c, whether the vector was given, the precision, and the
    first input's shape, dtype and device (for the zeros of a gradient that does not flow)."""
    weight, vector, U, c, precision = inputs
    ctx.save_for_backward(U, c)
    ctx.has_vector = vector is not None
    ctx.precision = precision
    ctx.meta = (weight.shape, weight.dtype, weight.device)


def _or_zeros(ctx, g: Tensor | None, per_output: bool = False) -> Tensor:
    shape, dtype, device = ctx.meta
    return torch.zeros(shape[:1] if per_output else shape, dtype=dtype, device=device) if g is None else g


def _fold_autograd(ctx, gW: Tensor | None, gb: Tensor | None):
    U, c = ctx.saved_tensors
    gW, gb = _or_zeros(ctx, gW), _or_zeros(ctx, gb, per_output=True)
    with full_precision(gW.device):
        gV, gd = torch.ops.prong_ext.fold_backward(gW, gb, U, c, ctx.precision)
    return gV, (gd if ctx.has_vector else None), None, None, None


def _fold_backward_autograd(ctx, ggV: Tensor | None, ggd: Tensor | None):
    # (gV, gd) = fold_backward(gW, gb) is linear; its adjoint is fold: (ggW, ggb) = fold(ggV, ggd).
    U, c = ctx.saved_tensors
    ggV = _or_zeros(ctx, ggV)
    with full_precision(ggV.device):
        ggW, ggb = torch.ops.prong_ext.fold(ggV, ggd, U, c, ctx.precision)
    return ggW, ggb, None, None, None


_fold_op.register_autograd(_fold_autograd, setup_context=_setup_context)
_fold_bwd_op.register_autograd(_fold_backward_autograd, setup_context=_setup_context)


# --- public functions -------------------------------------------------------------------------


def cov_accumulate(
    x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, *, allow_tf32: bool = False, precision: str = "ieee"
) -> None:
    """s1 += sum_r (x_r - shift), s2 += sum_r (x_r - shift)(x_r - shift)^T, in place.

    Args:
        x: (M, C) or (N, C, H, W) (rows: every spatial position of every image), any strides;
            float32, float16 or bfloat16.
        shift: (C,) float32. s1: (C,) float32. s2: (C, C) float32, symmetric.
        allow_tf32: single TF32 products on CUDA (float32 accumulation either way), no accuracy
            contract; only with precision="ieee".
        precision: "ieee" (default) or "tf32x3": tensor-core products on CUDA whose error against
            float64 is at most twice that of torch's float32 matmul (TF32 off) of x - shift.
    """
    with full_precision(x.device):
        torch.ops.prong_ext.cov_accumulate(x, shift, s1, s2, allow_tf32, precision)


def fold(
    V: Tensor, d: Tensor | None, U: Tensor, c: Tensor, *, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    """Canonical weights of a whitened layer: W = V U per tap, b = d - sum_{i, taps} W[:, i] c[i].

    Differentiable in V and d (U and c are statistics buffers: they get no gradient). A whitened
    conv is `F.conv2d(x, *fold(V, d, U, c), stride, padding, dilation)`. Runs with autocast off,
    its backward too.

    Args:
        V: (O, I) or (O, I, kh, kw). d: (O,) or None. U: (I, I). c: (I,).
        precision: "ieee" (default) or "tf32x3" (tensor cores on CUDA, for W and the backward's
            gV; error against float64 at most twice that of torch's V @ U at V's precision).

    Returns:
        W (V's shape, contiguous, V's dtype) and b ((O,), V's dtype).
    """
    with full_precision(V.device):
        return torch.ops.prong_ext.fold(V, d, U, c, precision)


def fold_backward(
    gW: Tensor, gb: Tensor, U: Tensor, c: Tensor, *, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    """gV[o, j, t] = sum_i (gW[o, i, t] - gb[o] c[i]) U[j, i] and gd = gb (a copy)."""
    with full_precision(gW.device):
        return torch.ops.prong_ext.fold_backward(gW, gb, U, c, precision)
