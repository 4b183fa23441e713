"""The change of coordinates of one whitened layer and of its optimizer state
(docs/algorithm.md, sections 4, 8 and 10).

`project` gives a layer's new {V, d, U, c} keeping its function; `moved_moments` the optimizer
state that follows, per Prong's optimizer_state and second_moment policies; `write` puts both in
place; `scale_moments` follows a diagonal rescaling of V.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import ops
from ._common import mul_in, outer_taps

__all__ = [
    "FIRST_MOMENTS",
    "SECOND_MOMENTS",
    "SECOND_MOMENT_POLICIES",
    "moved_moments",
    "project",
    "scale_moments",
    "write",
]

#: per-parameter state that is a running sum of gradients: moved as a covector
FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
#: per-coordinate magnitudes: through a re-whitening per the second_moment policy, scaled through
#: a rescaling
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
#: what a re-whitening does to the second moments of V under optimizer_state="transform"
SECOND_MOMENT_POLICIES = ("keep", "reset", "diagonal")


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
    optimizer,
    policy: str,
    layer: nn.Module,
    new: dict,
    old: tuple,
    inverse,
    warned: set,
    second_moment: str = "keep",
) -> dict:
    """New optimizer state for the layer's V (computed, not yet written): per first moment, the
    covector of the same (W, b) gradient in the new coordinates, and the second moments per
    `second_moment`; {"reset": True} for the policy "reset"; {} for "keep" or no optimizer.

    A first moment m of (V, d) moves with the gradients (docs/algorithm.md section 8): at every
    tap of output row o, with A = U' U^-1 (per group) and a = U' (c - c'),

        m_V'[o] = A m_V[o] + a m_d[o]          m_d' = m_d

    The second moments (Adam's exp_avg_sq and AMSGrad's max_exp_avg_sq), per `second_moment`:

    - "keep": left as they are.
    - "reset": Adam restarts on V: its first and second moments are zeroed, and its `step` too
      where its state has one, so that Adam's bias correction weighs the fresh estimates as at
      the start of training (with the step kept, 1 - beta2^step would be ~1 and the update up to
      (1 - beta2)^-1/2 times too large for ~1 / (1 - beta2) updates; over a zeroed second moment
      a transformed first moment would have no bound per coordinate). d's state is kept: its
      coordinates do not change.
    - "diagonal": v, V's second moment, taken as the diagonal of E[g g^T] over the coordinates
      (V[o], d[o]) with no correlation between them, and carried through the map above:
      E[g_V' g_V'^T] = A diag(v_V[o]) A^T + a v_d[o] a^T, whose diagonal is

          v_V'[o, j] = sum_i A_ji^2 v_V[o, i] + a_j^2 v_d[o]          v_d' = v_d

      exact where A is a scaled permutation and c' = c (or no bias). The map is monotone, so
      max_exp_avg_sq, carried alike, stays >= exp_avg_sq.

    Args:
        optimizer: the optimizer, or None.
        policy: "transform", "reset" or "keep".
        layer: the whitened layer; new: its new {V, d, U, c}; old: its old (U, c), in float64.
        inverse: old U (float64) -> U^-1, called only when a moment needs it.
        warned: optimizer state keys already warned about (updated).
        second_moment: "keep", "reset" or "diagonal" (used with policy "transform" only).
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
    present = [key for key in SECOND_MOMENTS if isinstance(state_v.get(key), torch.Tensor)]
    if second_moment == "reset" and present:
        # the first moments too: over a fresh second moment a transformed one is unbounded
        restarted = [key for key in FIRST_MOMENTS if isinstance(state_v.get(key), torch.Tensor)]
        out.update({key: torch.zeros_like(state_v[key]) for key in restarted + present})
        step = state_v.get("step")
        if step is not None:
            out["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else type(step)(0)
    elif second_moment == "diagonal" and present:
        if u_inv_old is None:
            u_inv_old = inverse(u_old)
        squares = _squared_change(new, u_inv_old, c_old)
        for key in present:
            v_d = state_d.get(key)
            out[key] = _carry_diagonal(state_v[key], v_d if isinstance(v_d, torch.Tensor) else None, *squares)
    return out


def _squared_change(new: dict, u_inv_old: torch.Tensor, c_old: torch.Tensor | None) -> tuple:
    """(A * A, a * a): the elementwise squares of the map of V's gradient, A = U' U^-1 ((C, C)
    or blocks (G, k, k)), and of d's gradient into it, a = U' (c - c') ((G * k,), per group; None
    without bias). Float64."""
    u_new = new["U"]
    change = u_new @ u_inv_old
    if c_old is None:
        return change.square(), None
    shift = (c_old - new["c"]).view(*u_new.shape[:-1], 1)  # (C, 1) or (G, k, 1)
    return change.square(), (u_new @ shift).flatten().square()


def _carry_diagonal(
    v_v: torch.Tensor, v_d: torch.Tensor | None, change_sq: torch.Tensor, shift_sq: torch.Tensor | None
) -> torch.Tensor:
    """v_V'[o, j] = sum_i A_ji^2 v_V[o, i] + a_j^2 v_d[o] at every tap (float64), per group.

    Args:
        v_v: V-shaped second moment; v_d: (O,) d's, or None; change_sq: A * A; shift_sq: a * a or
            None (see _squared_change).
    """
    out = mul_in(v_v.to(torch.float64), change_sq.mT)
    if v_d is not None and shift_sq is not None:
        out = out + outer_taps(v_d.to(torch.float64), shift_sq, out)
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
    state = optimizer.state[layer.V]
    for key, value in moments.items():
        if isinstance(state.get(key), torch.Tensor):
            state[key].copy_(value)
        else:  # a step counter kept as a number
            state[key] = value


def scale_moments(optimizer, layer: nn.Module, factor: torch.Tensor) -> None:
    """Follows V's division by factor (a rescaling): its first moments times factor, its second
    moments times factor^2. The change is diagonal, so this is exact for the first moments and is
    the "diagonal" carry of moved_moments for the second: every second_moment policy takes it.
    Call without grad."""
    state = optimizer.state.get(layer.V, {})
    for key in FIRST_MOMENTS + SECOND_MOMENTS:
        if isinstance(state.get(key), torch.Tensor):
            power = 2 if key in SECOND_MOMENTS else 1
            state[key].mul_(factor.pow(power).to(state[key].dtype))
