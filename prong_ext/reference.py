"""Naive implementations of every prong_ext op.

This module is the single oracle: tests compare the fast paths with it (in float64), benchmarks time
it as the "naive" baseline, and its formulas are docs/algorithm.md's written out with no fusion at all:

- covariance: permute to rows, center, one matmul (diagonal blocks sliced out for groups > 1);
- whitened layers: the two-step form, whitening 1x1 conv by U on the centered (padded) input, then
  the layer's own conv/linear by V with no padding (grouped convs: one 1x1 conv per group);
- eigendecomposition and whitening: a Python loop of torch.linalg.eigh, one layer at a time.

Every function computes in its inputs' dtype (pass float64 for an oracle). None of them uses the
fused forms of prong_ext.ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import conv_padding, rows

__all__ = [
    "batched_eigh",
    "conv_padding",
    "covariance",
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
