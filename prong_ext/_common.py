"""Helpers that several modules of prong_ext share; each is written here once.

- autocast and checks: `full_precision`, `all_finite`;
- reshapes: `rows` (a layer input as samples x features), `conv_padding` (nn.Conv2d's padding
  as F.pad amounts);
- statistics: `outer` (a b^T, or its diagonal blocks for grouped layers), `finalize` (mean and
  covariance from sums about a shift);
- the weight-shaped products of the fold (docs/algorithm.md, sections 6-7): `mul_in`,
  `centre_term`, `outer_taps`, `taps_sum`, and the torch forms of the fold, of its gradient and
  of its inverse, `fold`, `fold_backward` and `from_canonical`, which the torch path of
  prong_ext.ops and the Triton ops' path for tensors off the GPU run.

Nothing here imports another module of prong_ext. The naive forms the tests compare against are
in prong_ext.reference, which does not use the products above.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "all_finite",
    "centre_term",
    "conv_padding",
    "finalize",
    "fold",
    "fold_backward",
    "from_canonical",
    "full_precision",
    "mul_in",
    "num_groups",
    "outer",
    "outer_taps",
    "rows",
    "taps_sum",
]


def full_precision(device: torch.device):
    """A context that turns autocast off for `device`'s type (a no-op outside autocast), so that
    what runs inside keeps its inputs' dtypes (float32 parameters stay float32)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether all its entries are finite, with one device-to-host copy per device
    (not one per tensor): the tensors of one shape, dtype and device are checked as one stack."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    per_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
    for (_, _, device), idx in groups.items():
        stacked = torch.stack([tensors[i] for i in idx])
        order, flags = per_device.setdefault(device, ([], []))
        order.extend(idx)
        flags.append(torch.isfinite(stacked).reshape(len(idx), -1).all(1))
    out = [True] * len(tensors)
    for order, flags in per_device.values():
        for i, ok in zip(order, torch.cat(flags).tolist()):
            out[i] = ok
    return out


def rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (N * prod(*), C): every position of every sample is one row of C features.

    A view where the strides allow it ((M, C) and channels_last inputs)."""
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got {tuple(x.shape)}")
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def conv_padding(
    padding: str | int | tuple[int, int],
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """nn.Conv2d's padding as explicit (left, right, top, bottom) amounts for F.pad."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        amounts = []
        for k, dil in zip(reversed(kernel_size), reversed(dilation)):
            total = dil * (k - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)
    if isinstance(padding, int):
        padding = (padding, padding)
    return (padding[1], padding[1], padding[0], padding[0])


# ---------------------------------------------------------------------------------------------
# Statistics


def outer(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """a b^T (C, C) for groups == 1; its G diagonal (k, k) blocks (G, k, k) otherwise."""
    if groups == 1:
        return torch.outer(a, b)
    return a.view(groups, -1, 1) * b.view(groups, 1, -1)


def finalize(
    count: int, shift: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased covariance from sums about a shift over `count` rows.

        mean = shift + s1 / n          cov = s2 / n - (s1 / n) (s1 / n)^T

    Args:
        count: n, the number of rows summed.
        shift: (C,); s1: (C,) = sum_r (x_r - shift); s2: (C, C) = sum_r (x_r - shift)(x_r - shift)^T.

    Returns:
        mean (C,) and cov (C, C), in s1's and s2's dtype.
    """
    if count <= 0:
        raise ValueError(f"{count=} must be > 0")
    m1 = s1 / count
    return shift.to(s1.dtype) + m1, s2 / count - torch.outer(m1, m1)


# ---------------------------------------------------------------------------------------------
# The fold's products


def num_groups(w: torch.Tensor, c: torch.Tensor) -> int:
    """G of a weight w (O, k, *taps) and a centre c (G * k,), checked."""
    k, n = w.shape[1], c.numel()
    if n == k:
        return 1
    if k == 0 or n % k or w.shape[0] % (n // k):
        raise ValueError(
            f"c with {n} entries does not split into groups of the weight's {k} input features "
            f"with {w.shape[0]} outputs divisible by the number of groups"
        )
    return n // k


def taps_sum(w: torch.Tensor) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I) summed over the taps; (O, I) as it is."""
    return w.flatten(2).sum(-1) if w.dim() > 2 else w


def mul_in(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Multiplies a weight-shaped tensor on its input-feature dimension, at every tap.

    out[o, j, *t] = sum_i a[o, i, *t] m[i, j]                  (m: (I, J))
    out[o, j, *t] = sum_i a[o, i, *t] m[g(o), i, j]            (m: (G, k, J), g(o) = o // (O / G))

    The grouped form is a grouped convolution's: output o sees the block of its group only. Both
    are one (batched) GEMM over the (o, tap) rows.

    Args:
        a: (O, I) or (O, I, kh, kw); m: (I, J), or (G, I, J) with G dividing O.

    Returns:
        (O, J) or (O, J, kh, kw), contiguous.
    """
    if m.dim() == 3:
        groups = m.shape[0]
        if a.shape[1] != m.shape[1] or a.shape[0] % groups:
            raise ValueError(
                f"mul_in: a {tuple(a.shape)} does not fit blocks m {tuple(m.shape)}: expected "
                f"a.shape[1] == {m.shape[1]} and a.shape[0] divisible by {groups}"
            )
        by_group = a.movedim(1, -1).reshape(groups, -1, a.shape[1])  # (G, O / G * taps, k)
        out = (by_group @ m).view(a.shape[0], *a.shape[2:], m.shape[2])
        return out.movedim(-1, 1).clone(memory_format=torch.contiguous_format)
    if a.dim() == 2:
        return a @ m
    # One GEMM over the (o, tap) rows; the layout changes touch only weight-sized tensors.
    by_tap = a.movedim(1, -1).reshape(-1, a.shape[1])
    out = (by_tap @ m).view(a.shape[0], *a.shape[2:], m.shape[1])
    # clone, not contiguous(): oneDNN conv backward mishandled the odd strides that a
    # "contiguous" view keeps on size-1 dims (1x1 kernels): heap corruption in torch 2.13 CPU
    return out.movedim(-1, 1).clone(memory_format=torch.contiguous_format)


def centre_term(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """W c summed over the taps, per output: what the centre c takes off the bias.

    out[o] = sum_{i, *t} w[o, i, *t] c[g(o) * k + i],  k = w.shape[1], G = c.numel() / k,
    g(o) = o // (O / G). G = 1 is taps_sum(w) @ c.

    Args:
        w: (O, k) or (O, k, kh, kw); c: (G * k,).

    Returns:
        (O,)
    """
    groups = num_groups(w, c)
    if groups == 1:
        return taps_sum(w) @ c
    ws = taps_sum(w).reshape(groups, -1, w.shape[1])  # (G, O / G, k)
    return (ws @ c.view(groups, -1, 1)).reshape(w.shape[0])


def outer_taps(g: torch.Tensor, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """g c^T at every tap of a weight shaped like `like`, per group.

    out[o, i, *t] = g[o] c[g(o) * k + i],  k = like.shape[1], G = c.numel() / k. For a linear
    weight (O, I) it is torch.outer(g, c).

    Args:
        g: (O,); c: (G * k,); like: (O, k) or (O, k, kh, kw).

    Returns:
        like's shape, contiguous.
    """
    groups = num_groups(like, c)
    if groups == 1:
        product = torch.outer(g, c)
    else:
        product = (g.view(groups, -1, 1) * c.view(groups, 1, -1)).reshape(like.shape[:2])
    if like.dim() == 2:
        return product
    return product.view(*product.shape, *([1] * (like.dim() - 2))).expand(like.shape).contiguous()


def fold(
    V: torch.Tensor, d: torch.Tensor | None, U: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W = V U at every tap (per group for U (G, k, k)) and b = d - centre_term(W, c), in the
    inputs' dtype (autocast as the caller set it). b is d when c is None."""
    W = mul_in(V, U)
    if c is None:
        return W, d
    wc = centre_term(W, c)
    return W, (-wc if d is None else d - wc)


def fold_backward(
    gW: torch.Tensor, gb: torch.Tensor, U: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `fold` with respect to V and d: gV = (gW - gb c^T) U^T at every tap (per
    group), gd = gb (the same tensor)."""
    return mul_in(gW - outer_taps(gb, c, gW), U.mT), gb


def from_canonical(
    W: torch.Tensor, b: torch.Tensor | None, U_inv: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, d) that `fold` maps to (W, b) with the coefficients (U, c): V = W U^-1 at every tap
    (per group), d = b + centre_term(W, c); d is b when b or c is None."""
    V = mul_in(W, U_inv)
    if b is None or c is None:
        return V, b
    return V, b + centre_term(W, c)
