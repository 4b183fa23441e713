"""Naive implementations of every prong_ext op.

This module is the single oracle: tests compare the fast paths with it (in float64), benchmarks time
it as the "naive" baseline, and its formulas are docs/algorithm.md's written out with no fusion at all:

- covariance: permute to rows, center, one matmul (diagonal blocks sliced out for groups > 1);
- whitened layers: the two-step form, whitening 1x1 conv by U on the centered (padded) input, then
  the layer's own conv/linear by V with no padding (grouped convs: one 1x1 conv per group);
- eigendecomposition and whitening: a Python loop of torch.linalg.eigh, one layer at a time;
- the fold and the reparametrization (sections 4, 6-8): `fold` (W = V U, b = d - W c), its
  gradient `fold_backward`, and their inverses given U^-1: `from_canonical` (V = W U^-1,
  d = b + W c) and `canonical_gradient` (g_W = g_V U^-T + g_d c^T); one einsum per group of outputs.

Every function computes in its inputs' dtype (pass float64 for an oracle). None of them uses the
fused forms of prong_ext.ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import conv_padding, rows

__all__ = [
    "batched_eigh",
    "canonical_gradient",
    "conv_padding",
    "covariance",
    "fold",
    "fold_backward",
    "from_canonical",
    "whitened_conv2d",
    "whitened_linear",
    "whitening",
]


def covariance(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float64, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased covariance of the features along dim 1.

    Args:
        x: (N, C, *) inputs; for (N, C, H, W) every spatial position is a sample.
        dtype: accumulation dtype.
        groups: G > 1 returns the G diagonal (k, k) blocks of the full covariance, k = C / G.

    Returns:
        mean: (C,), cov: (C, C) = E[(h - mean)(h - mean)^T] (1/count), or its diagonal blocks
        (G, k, k), count: number of rows.
    """
    samples = rows(x).to(dtype)
    count = samples.shape[0]
    mean = samples.mean(0)
    centered = samples - mean
    cov = centered.T @ centered / count
    if groups > 1:
        k = x.shape[1] // groups
        cov = torch.stack([cov[g * k : (g + 1) * k, g * k : (g + 1) * k] for g in range(groups)])
    return mean, cov, count


def whitened_linear(
    x: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor,
) -> torch.Tensor:
    """z = V U (x - c) + d, computed as two matrix products.

    Args:
        x: (*, in), V: (out, in), d: (out,) or None, U: (in, in), c: (in,).

    Returns:
        (*, out)
    """
    return F.linear(F.linear(x - c, U), V, d)


def whitened_conv2d(
    x: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    padding_mode: str = "zeros",
    groups: int = 1,
) -> torch.Tensor:
    """The two-convolution whitened conv: pad h, center, 1x1 conv by U, k x k conv by V unpadded.

    Grouped (G > 1): the 1x1 conv is one conv per group, block U[g] on channels g*k..(g+1)*k-1,
    then the grouped k x k conv by V.

    Args:
        x: (N, C_in, H, W), V: (C_out, C_in / G, kh, kw), d: (C_out,) or None, U: (C_in, C_in)
            or (G, k, k) with k = C_in / G, c: (C_in,); stride, padding, dilation, padding_mode
            and groups (G) as in nn.Conv2d.

    Returns:
        (N, C_out, H_out, W_out)
    """
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pad = conv_padding(padding, tuple(V.shape[2:]), dilation)
    if padding_mode == "zeros":
        h = F.pad(x, pad)
    else:
        h = F.pad(x, pad, mode=padding_mode)
    h = h - c.view(1, -1, 1, 1)
    if groups == 1:
        h = F.conv2d(h, U[:, :, None, None])
    else:
        k = V.shape[1]
        h = torch.cat([F.conv2d(h[:, g * k : (g + 1) * k], U[g][:, :, None, None]) for g in range(groups)], 1)
    return F.conv2d(h, V, d, stride=stride, padding=0, dilation=dilation, groups=groups)


def batched_eigh(mats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eigendecomposition of each symmetric matrix, one torch.linalg.eigh call per matrix.

    Returns:
        eigenvalues (ascending) and eigenvectors (columns), one pair per matrix.
    """
    values, vectors = [], []
    for m in mats:
        lam, q = torch.linalg.eigh(m)
        values.append(lam)
        vectors.append(q)
    return values, vectors


def whitening(
    covs: list[torch.Tensor], eps: float, kind: str = "pca"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whitening matrices U and their inverses from covariances (docs/algorithm.md).

    Sigma = Q diag(lam) Q^T with lam clamped at 0;
    pca: U = diag(lam + eps)^-1/2 Q^T,     U^-1 = Q diag(lam + eps)^1/2;
    zca: U = Q diag(lam + eps)^-1/2 Q^T,   U^-1 = Q diag(lam + eps)^1/2 Q^T.

    Args:
        covs: (n_i, n_i) symmetric matrices.
        eps: > 0, added to every eigenvalue.
        kind: "pca" or "zca".
    """
    if kind not in ("pca", "zca"):
        raise ValueError(f"{kind=} must be 'pca' or 'zca'")
    values, vectors = batched_eigh(covs)
    us, u_invs = [], []
    for lam, q in zip(values, vectors):
        scale = lam.clamp_min(0) + eps
        u = scale.rsqrt()[:, None] * q.T
        u_inv = q * scale.sqrt()
        if kind == "zca":
            u, u_inv = q @ u, u_inv @ q.T
        us.append(u)
        u_invs.append(u_inv)
    return us, u_invs


# ---------------------------------------------------------------------------------------------
# The fold and the reparametrization, one group of outputs at a time


def _group_slices(outputs: int, groups: int, k: int) -> list[tuple[slice, slice]]:
    """(outputs, input channels) of each group: outputs g*O/G..(g+1)*O/G-1 see channels g*k..(g+1)*k-1."""
    per = outputs // groups
    return [(slice(g * per, (g + 1) * per), slice(g * k, (g + 1) * k)) for g in range(groups)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _per_group(equation: str, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torch.einsum(equation, a[outputs of g], m_g) for each group g, over a's outputs in order;
    m (k, k) is one block for all outputs, m (G, k, k) block g for group g."""
    blocks = m if m.dim() == 3 else m.unsqueeze(0)
    slices = _group_slices(a.shape[0], blocks.shape[0], blocks.shape[1])
    return _cat([torch.einsum(equation, a[o], block) for block, (o, _) in zip(blocks, slices)])


def _by_channel(c: torch.Tensor, like: torch.Tensor) -> list[tuple[slice, slice]]:
    k = like.shape[1]
    return _group_slices(like.shape[0], c.numel() // k if k else 1, k)


def _centre(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_{i, t} W[o, i, t] c[g(o) k + i] for each output o."""
    return _cat([torch.einsum("oi...,i->o", W[o], c[i]) for o, i in _by_channel(c, W)])


def _times_taps(g: torch.Tensor, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """g[o] c[g(o) k + i] at every tap of a weight shaped like `like` (broadcastable to it)."""
    dims = like.dim()
    return _cat(
        [
            g[o].reshape((-1,) + (1,) * (dims - 1)) * c[i].reshape((1, -1) + (1,) * (dims - 2))
            for o, i in _by_channel(c, like)
        ]
    )


def fold(
    V: torch.Tensor, d: torch.Tensor | None, U: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical parameters of a whitened layer (docs/algorithm.md, sections 1, 6, 7).

        W[o, i, t] = sum_j V[o, j, t] U_g(o)[j, i]
        b[o]       = d[o] - sum_{i, t} W[o, i, t] c[g(o) k + i]

    Args:
        V: (O, k) or (O, k, kh, kw); d: (O,) or None (zero); U: (k, k), or (G, k, k) for a grouped
            layer (output o in group g(o) = o // (O / G)); c: (G k,) or None (zero).

    Returns:
        W (V's shape) and b (O,); b is d when c is None.
    """
    W = _per_group("oj...,ji->oi...", V, U)
    if c is None:
        return W, d
    wc = _centre(W, c)
    return W, (-wc if d is None else d - wc)


def fold_backward(
    gW: torch.Tensor, gb: torch.Tensor | None, U: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of `fold` with respect to V and d from those of W and b (section 6).

        gV[o, j, t] = sum_i (gW[o, i, t] - gb[o] c[g(o) k + i]) U_g(o)[j, i]
        gd          = gb

    Args:
        gW: (O, k) or (O, k, kh, kw); gb: (O,) or None (zero); U and c as in `fold`.

    Returns:
        gV (gW's shape) and gd (gb itself).
    """
    a = gW if gb is None or c is None else gW - _times_taps(gb, c, gW)
    return _per_group("oi...,ji->oj...", a, U), gb


def from_canonical(
    W: torch.Tensor, b: torch.Tensor | None, U_inv: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parameters that `fold` maps to (W, b) for the coefficients (U, c): the last step of a
    reparametrization (section 4).

        V[o, j, t] = sum_i W[o, i, t] U_g(o)^-1[i, j]
        d[o]       = b[o] + sum_{i, t} W[o, i, t] c[g(o) k + i]

    Args:
        W: (O, k) or (O, k, kh, kw); b: (O,) or None; U_inv: U^-1 per block, shaped as U in `fold`;
            c: (G k,) or None (zero).

    Returns:
        V (W's shape) and d (O,); d is b when b or c is None.
    """
    V = _per_group("oi...,ij->oj...", W, U_inv)
    return V, (b if b is None or c is None else b + _centre(W, c))


def canonical_gradient(
    gV: torch.Tensor, gd: torch.Tensor | None, U_inv: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inverse of `fold_backward`: a covector in (V, d) as one in the canonical (W, b)
    (section 8).

        gW[o, i, t] = sum_j gV[o, j, t] U_g(o)^-1[i, j] + gd[o] c[g(o) k + i]
        gb          = gd

    Args:
        gV: (O, k) or (O, k, kh, kw); gd: (O,) or None (zero); U_inv and c as in `from_canonical`.

    Returns:
        gW (gV's shape) and gb (gd itself).
    """
    gW = _per_group("oj...,ij->oi...", gV, U_inv)
    return (gW if gd is None or c is None else gW + _times_taps(gd, c, gV)), gd
