"""The change of coordinates of one whitened layer and of its optimizer state
(docs/algorithm.md, sections 4, 8 and 10).

`project` gives a layer's new {V, d, U, c} keeping its function; `moved_moments` the optimizer
state that follows, per Prong's optimizer_state policy; `write` puts both in place;
`scale_moments` follows a diagonal rescaling of V.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import ops
from ._common import mul_in, outer_taps

__all__ = ["FIRST_MOMENTS", "SECOND_MOMENTS", "moved_moments", "project", "scale_moments", "write"]

#: per-parameter state that is a running sum of gradients: moved as a covector
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
#: per-coordinate magnitudes: kept through a re-whitening, scaled through a rescaling
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def project(layer: nn.Module, mean: torch.Tensor, u: torch.Tensor, u_inv: torch.Tensor) -> tuple[dict, tuple]:
    """New {V, d, U, c} in float64 keeping W and b (docs/algorithm.md), and the old (U, c)."""
    f64 = torch.float64
    V, U_old = layer.V.detach().to(f64), layer.U.to(f64)
    d = None if layer.d is None else layer.d.detach().to(f64)
    c_old = None if d is None else layer.c.to(f64)
    W, b = ops.fold(V, d, U_old, c_old)
    c = mean if d is not None else torch.zeros_like(mean)
    new_v, new_d = ops.from_canonical(W, b, u_inv, c)  # V = W U^-1, d = b + W c (b None: no bias)
    return {"V": new_v, "d": new_d, "U": u, "c": c}, (U_old, c_old)


def moved_moments(
    optimizer, policy: str, layer: nn.Module, new: dict, old: tuple, inverse, warned: set
) -> dict:
    """New optimizer state for the layer's V (computed, not yet written): per first moment, the
    covector of the same (W, b) gradient in the new coordinates; {"reset": True} for the policy
    "reset"; {} for "keep" or no optimizer.

    Args:
        optimizer: the optimizer, or None.
        policy: "transform", "reset" or "keep".
        layer: the whitened layer; new: its new {V, d, U, c}; old: its old (U, c), in float64.
        inverse: old U (float64) -> U^-1, called only when a first moment needs it.
        warned: optimizer state keys already warned about (updated).
    """
    if optimizer is None or policy == "keep":
        return {}
    if policy == "reset":
        return {"reset": True}
    out = {}
    f64 = torch.float64
    u_old, c_old = old
    u_inv_old = None
    state_v = optimizer.state.get(layer.V, {})
    state_d = optimizer.state.get(layer.d, {}) if layer.d is not None else {}
    _warn_untransformed(optimizer, warned, state_v, state_d)
    for key in FIRST_MOMENTS:
        g_v = state_v.get(key)
        if not isinstance(g_v, torch.Tensor):
            continue
        g_d = state_d.get(key)
        g_d = g_d.to(f64) if isinstance(g_d, torch.Tensor) else None
        if u_inv_old is None:
            u_inv_old = inverse(u_old)
        # the covector in theta = (W, b): g_W = g_V U^-T + g_d c^T (at every tap), and back
        # to the new coordinates: g_V' = (g_W - g_d c'^T) U'^T; g_d' = g_d
        g_w = mul_in(g_v.to(f64), u_inv_old.mT)
        if g_d is not None:
            g_w = g_w + outer_taps(g_d, c_old, g_w) - outer_taps(g_d, new["c"], g_w)
        out[key] = mul_in(g_w, new["U"].mT)
    return out


def _warn_untransformed(optimizer, warned: set, *states: dict) -> None:
    """Warns once per key about per-parameter optimizer state that no transform maps to the
    new coordinates (RMSprop's square_avg, Adamax's exp_inf, Adagrad's sum, ...)."""
    known = set(FIRST_MOMENTS) | set(SECOND_MOMENTS)
    keys = {
        key
        for state in states
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.dim() > 0 and key not in known
    }
    new = sorted(keys - warned)
    if new:
        warned.update(new)
        warnings.warn(
            f"Prong cannot transform the optimizer state {new} of {type(optimizer).__name__} to "
            "the new coordinates and keeps it as it is; its first moments "
            f"{list(FIRST_MOMENTS)} are transformed. optimizer_state='reset' drops the "
            "whitened parameters' state at every re-whitening instead",
            stacklevel=3,
        )


def write(layer: nn.Module, new: dict, optimizer, moments: dict) -> None:
    """Copies the new {V, d, U, c} into the layer (the same objects, so the optimizer keeps
    tracking them) and the moved moments into the optimizer's state. Call without grad."""
    for attr, value in new.items():
        if value is not None:
            getattr(layer, attr).copy_(value)
    if not moments:
        return
    if moments.get("reset"):
        optimizer.state.pop(layer.V, None)
        if layer.d is not None:
            optimizer.state.pop(layer.d, None)
        return
    for key, value in moments.items():
        optimizer.state[layer.V][key].copy_(value)


def scale_moments(optimizer, layer: nn.Module, factor: torch.Tensor) -> None:
    """Follows V's division by factor (a rescaling): its first moments times factor, its second
    moments times factor^2. Call without grad."""
    state = optimizer.state.get(layer.V, {})
    for key in FIRST_MOMENTS + SECOND_MOMENTS:
        if isinstance(state.get(key), torch.Tensor):
            power = 2 if key in SECOND_MOMENTS else 1
            state[key].mul_(factor.pow(power).to(state[key].dtype))
