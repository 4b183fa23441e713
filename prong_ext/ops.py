"""The low level of prong_ext: statistics, eigendecompositions, whitening and whitened layers.

Every op takes `backend`:
- "auto" (default): the fastest path available for the inputs' device: Triton kernels for CUDA
  tensors, the compiled extension `_C` for eigendecompositions where it is built, the torch path
  otherwise;
- "torch": plain PyTorch (the CPU path; fused, unlike prong_ext.reference);
- "triton": the Triton kernels (on CPU tensors only through the interpreter, TRITON_INTERPRET=1);
- "extension": the compiled `_C` ops (batched_eigh, whitening).
Asking for a backend that is not available raises.

Conventions (PRONG.md): a whitened layer computes z = V U (h - c) + d; its canonical parameters are
W = V U (for convs, at every tap) and b = d - W c (summed over taps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _extension, reference

__all__ = [
    "CovarianceAccumulator",
    "batched_eigh",
    "covariance",
    "fold",
    "mul_in",
    "taps_sum",
    "whitened_conv2d",
    "whitened_linear",
    "whitening",
]

_BACKENDS = ("auto", "torch", "triton", "extension")


def _check_backend(backend: str, allowed: tuple[str, ...], op: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{backend=} is not one of {_BACKENDS}")
    if backend not in allowed:
        raise ValueError(f"{op} has no {backend!r} backend; choose one of {allowed}")


def _triton_ops():
    """prong_ext._triton_ops, or None when Triton (or its kernels) cannot be imported."""
    try:
        from . import _triton_ops
    except ImportError:
        return None
    return _triton_ops


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "triton":
        if _triton_ops() is None:
            raise RuntimeError("backend='triton' was requested but Triton is not installed")
        return True
    if backend == "auto":
        return all(t.is_cuda for t in tensors) and _triton_ops() is not None
    return False


def _use_extension(backend: str) -> bool:
    if backend == "extension":
        if not _extension.available():
            raise RuntimeError(
                "backend='extension' was requested but prong_ext._C is not built; "
                "install with `pip install --no-build-isolation .`"
            )
        return True
    return backend == "auto" and _extension.available()


# ---------------------------------------------------------------------------------------------
# Statistics


class CovarianceAccumulator:
    """Streaming mean and covariance of C features, merged batch by batch (Chan et al.).

    Each batch is shifted by an estimate of its mean before its outer products are summed, the
    shift is removed exactly, and batches are merged exactly, so data with a large mean and a
    small spread keeps its relative accuracy. Running totals are kept in float64. On the Triton
    path (CUDA, float32 products) one kernel launch per batch accumulates into float32 sums
    shifted by the first sample.

    Args:
        num_features: C.
        dtype: dtype of the per-batch products: float32 (default, fast) or float64. Inputs of
            any floating dtype are upcast to it; float64 inputs always use float64.
        backend: "auto", "torch" or "triton".
    """

    def __init__(self, num_features: int, *, dtype: torch.dtype = torch.float32, backend: str = "auto"):
        _check_backend(backend, ("auto", "torch", "triton"), "CovarianceAccumulator")
        if num_features < 1:
            raise ValueError(f"{num_features=} must be >= 1")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{dtype=} must be torch.float32 or torch.float64")
        self.num_features = num_features
        self.dtype = dtype
        self.backend = backend
        self.count = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.m2: torch.Tensor | None = None  # (C, C) float64: sum (h - mean)(h - mean)^T
        self._triton_state = None  # (shift, s1, s2) in float32 while Triton accumulates

    def update(self, x: torch.Tensor) -> None:
        """Merges a batch. x: (N, C, *) with C = num_features; every position is a sample."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected an input of shape (N, {self.num_features}, *), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating point input, got {x.dtype}")
        if x.numel() == 0:
            return
        triton_ok = x.dtype != torch.float64 and self.dtype == torch.float32
        if self.backend == "triton" and not triton_ok:
            raise ValueError(
                f"backend='triton' takes float32 products of float32/16 inputs, got a {x.dtype} "
                f"input with dtype={self.dtype}"
            )
        if self._triton_state is not None or (self.count == 0 and triton_ok and _use_triton(self.backend, x)):
            self._update_triton(x)
            return
        dtype = torch.float64 if x.dtype == torch.float64 else self.dtype
        n, mean, m2 = _batch_moments(x, dtype)
        self._merge(n, mean, m2)

    def _update_triton(self, x: torch.Tensor) -> None:
        if x.dim() == 3:  # (N, C, L): the kernel reads (M, C) and (N, C, H, W)
            x = x.unsqueeze(-1)
        elif x.dim() > 4:
            x = x.flatten(3)
        if self._triton_state is None:
            c = self.num_features
            self._triton_state = (
                reference._rows(x[:1])[0].float(),  # the shift: the first sample
                torch.zeros(c, device=x.device, dtype=torch.float32),
                torch.zeros(c, c, device=x.device, dtype=torch.float32),
            )
        _triton_ops().cov_accumulate(x, *self._triton_state)
        self.count += x.numel() // self.num_features

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns mean (C,), biased covariance (C, C) in float64 and the sample count."""
        if self.count == 0:
            raise ValueError("CovarianceAccumulator has no samples")
        if self._triton_state is not None:
            shift, s1, s2 = (t.double() for t in self._triton_state)
            offset = s1 / self.count
            return shift + offset, s2 / self.count - torch.outer(offset, offset), self.count
        return self.mean, self.m2 / self.count, self.count

    def state_dict(self) -> dict:
        mean, cov, count = self.compute() if self.count else (None, None, 0)
        return {"count": count, "mean": mean, "m2": None if cov is None else cov * count}

    def load_state_dict(self, state: dict) -> None:
        self._triton_state = None
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]


def _batch_moments(x: torch.Tensor, dtype: torch.dtype) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, float64 mean and float64 centered sum of outer products of one (N, C, *) batch.

    The rows are shifted by an estimate of the mean (computed in `dtype`) and the shift is
    removed exactly afterwards, M2 = G - n (mean - shift)(mean - shift)^T, so no float64 pass
    over the data is needed. Products are taken in `dtype` (lower precisions upcast on the fly).
    NCHW-like inputs with 8x8 images or larger are read in place: every example is a (C, L)
    block with positions contiguous, so G = sum_n X_n X_n^T, one GEMM per example accumulated in
    place, with no transposing copy.
    """
    c = x.shape[1]
    positions = x[0, 0].numel() if x.dim() > 2 else 1
    if positions >= 64 and x.stride(1) != 1 and c > 1:
        xs = x.flatten(2)  # (N, C, L)
        shift = xs[0].mean(-1, dtype=dtype)  # the first example's mean: close to the batch's
        centered = xs - shift[:, None]
        gram = centered.new_zeros(c, c)
        for example in centered:
            gram.addmm_(example, example.T)
        sums = centered.sum((0, 2))
    else:
        rows = x.movedim(1, -1).reshape(-1, c)  # a view for (M, C) and channels_last inputs
        shift = rows.mean(0, dtype=dtype)
        centered = rows - shift
        gram = centered.T @ centered
        sums = centered.sum(0)
    n = x.numel() // c
    offset = sums.double() / n
    return n, shift.double() + offset, gram.double() - n * torch.outer(offset, offset)


def covariance(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float32, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased covariance of the features along dim 1 of x.

    Args:
        x: (N, C, *) of any floating dtype; for (N, C, H, W) every spatial position is a sample.
        dtype: dtype of the products (float32 or float64; float64 for float64 inputs); results
            are float64.
        backend: "auto", "torch" or "triton".

    Returns:
        mean: (C,), cov: (C, C), count.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got {tuple(x.shape)}")
    acc = CovarianceAccumulator(x.shape[1], dtype=dtype, backend=backend)
    acc.update(x)
    return acc.compute()


# ---------------------------------------------------------------------------------------------
# Eigendecompositions and whitening


def _check_finite(mats: list[torch.Tensor], what: str) -> None:
    bad = [i for i, m in enumerate(mats) if not bool(torch.isfinite(m).all())]
    if bad:
        raise ValueError(f"{what} {bad} hold NaN or Inf values")


def _check_square(mats: list[torch.Tensor]) -> None:
    for i, m in enumerate(mats):
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix {i} must be square (n, n), got {tuple(m.shape)}")


def batched_eigh(
    mats: list[torch.Tensor], *, backend: str = "auto"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eigendecomposition of symmetric matrices of mixed sizes.

    The torch path stacks the matrices of equal size, dtype and device and makes one batched
    torch.linalg.eigh call per group; the extension path makes one batched cuSOLVER (or LAPACK)
    call per group.

    Args:
        mats: (n_i, n_i) symmetric matrices, float32 or float64.
        backend: "auto", "torch" or "extension".

    Returns:
        eigenvalues (n_i,) ascending and eigenvectors (n_i, n_i) as columns, per matrix.

    Raises:
        ValueError: a matrix is not square, or holds NaN/Inf (the message lists their indices).
    """
    _check_backend(backend, ("auto", "torch", "extension"), "batched_eigh")
    mats = list(mats)
    _check_square(mats)
    _check_finite(mats, "matrices")
    if _use_extension(backend):
        return _extension.batched_eigh(mats)
    values: list[torch.Tensor | None] = [None] * len(mats)
    vectors: list[torch.Tensor | None] = [None] * len(mats)
    for idx, lam, q in _grouped_eigh(mats):
        for k, i in enumerate(idx):
            values[i], vectors[i] = lam[k], q[k]
    return values, vectors


def _grouped_eigh(mats: list[torch.Tensor]):
    """Yields (indices, eigenvalues (B, n), eigenvectors (B, n, n)): one torch.linalg.eigh call
    per group of matrices of equal size, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[0], m.dtype, m.device), []).append(i)
    for idx in groups.values():
        lam, q = torch.linalg.eigh(torch.stack([mats[i] for i in idx]))
        yield idx, lam, q


def whitening(
    covs: list[torch.Tensor], eps: float, kind: str = "pca", *, backend: str = "auto"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whitening matrices U and U^-1 for every layer in one call (PRONG.md).

    Sigma = Q diag(lam) Q^T, lam clamped at 0:
    pca: U = diag(lam + eps)^-1/2 Q^T,     U^-1 = Q diag(lam + eps)^1/2;
    zca: U = Q diag(lam + eps)^-1/2 Q^T,   U^-1 = Q diag(lam + eps)^1/2 Q^T.
    Cov(U h) = diag(lam / (lam + eps)) for pca. No matrix is inverted.

    Args:
        covs: (n_i, n_i) covariance (or second-moment) matrices; float64 for exact whitening.
        eps: > 0; bounds the step multiplier by eps^-1/2 (the trust-region knob).
        kind: "pca" or "zca".
        backend: "auto", "torch" or "extension".

    Returns:
        U and U^-1 per matrix, in the matrices' dtype.
    """
    _check_backend(backend, ("auto", "torch", "extension"), "whitening")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{eps=} must be a finite number > 0")
    if kind not in ("pca", "zca"):
        raise ValueError(f"{kind=} must be 'pca' or 'zca'")
    covs = list(covs)
    _check_square(covs)
    _check_finite(covs, "matrices")
    if _use_extension(backend):
        return _extension.whitening(covs, float(eps), kind)
    us: list[torch.Tensor | None] = [None] * len(covs)
    u_invs: list[torch.Tensor | None] = [None] * len(covs)
    for idx, lam, q in _grouped_eigh(covs):
        scale = lam.clamp_min(0) + eps
        u = scale.rsqrt().unsqueeze(-1) * q.mT
        u_inv = q * scale.sqrt().unsqueeze(-2)
        if kind == "zca":
            u, u_inv = q @ u, u_inv @ q.mT
        for k, i in enumerate(idx):
            us[i], u_invs[i] = u[k], u_inv[k]
    return us, u_invs


# ---------------------------------------------------------------------------------------------
# Whitened layers


def mul_in(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Multiplies a weight-shaped tensor on its input-feature dimension, at every tap.

    out[o, j, *t] = sum_i a[o, i, *t] m[i, j]

    Args:
        a: (O, I) or (O, I, kh, kw); m: (I, J).

    Returns:
        (O, J) or (O, J, kh, kw), contiguous.
    """
    if a.dim() == 2:
        return a @ m
    # One GEMM over the (o, tap) rows; the layout changes touch only weight-sized tensors.
    rows = a.movedim(1, -1).reshape(-1, a.shape[1])
    out = (rows @ m).view(a.shape[0], *a.shape[2:], m.shape[1])
    # clone, not contiguous(): oneDNN conv backward mishandled the odd strides that a
    # "contiguous" view keeps on size-1 dims (1x1 kernels): heap corruption in torch 2.13 CPU
    return out.movedim(-1, 1).clone(memory_format=torch.contiguous_format)


def fold(
    V: torch.Tensor, d: torch.Tensor | None, U: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical parameters of a whitened layer: W = V U (at every tap), b = d - W c.

    Gradients reach V and d through the fold: g_V = (g_W - g_b c^T) U^T at every tap, g_d = g_b.

    Args:
        V: (O, I) or (O, I, kh, kw); d: (O,) or None; U: (I, I); c: (I,) or None (zero).

    Returns:
        W with V's shape, b: (O,) or None when both d and c are None.
    """
    W = mul_in(V, U)
    if c is None:
        return W, d
    wc = taps_sum(W) @ c
    return W, (-wc if d is None else d - wc)


def taps_sum(w: torch.Tensor) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I) summed over the taps; (O, I) as it is."""
    return w.flatten(2).sum(-1) if w.dim() > 2 else w


def _fold_op(backend, V, d, U, c):
    if _use_triton(backend, V, U):
        if c is None:  # no centre: b is d itself (or no bias at all)
            return _triton_ops().fold(V, None, U, U.new_zeros(U.shape[0]))[0], d
        return _triton_ops().fold(V, d, U, c)
    return fold(V, d, U, c)


def _activation_bias(V, d, U, c):
    """Bias when the whitening is applied to the activations instead of folded:
    z = V (U h) + d - V U c (summed over taps), since pad(U h) = U pad(h) for every padding mode."""
    if c is None:
        return d
    vuc = taps_sum(V) @ (U @ c)
    return -vuc if d is None else d - vuc


def _fold_is_cheaper(x: torch.Tensor, V: torch.Tensor, backend: str) -> bool:
    """The fold costs C_out * taps * C_in^2, whitening the activations positions * C_in^2 (for
    the forward pass, and as much again for the backward): fold when C_out * taps <= positions.
    backend='triton' always folds (it is the Triton fold kernel that was asked for)."""
    positions = x.numel() // max(V.shape[1], 1)
    return backend == "triton" or V[:, 0].numel() <= positions


def whitened_linear(
    x: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor | None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """z = V U (x - c) + d.

    Picks the cheaper exact form from the shapes: folding (W, b) costs out * in^2 per pass,
    whitening the activations costs rows * in^2 (rows = x.numel() / in). The fold is used when
    out <= rows; a small batch through a wide layer whitens the activations instead.

    Args:
        x: (*, in); V: (out, in); d: (out,) or None; U: (in, in); c: (in,) or None (zero).
        backend: "auto", "torch" or "triton" (the fold kernel).

    Returns:
        (*, out)
    """
    _check_backend(backend, ("auto", "torch", "triton"), "whitened_linear")
    _check_layer(x, V, U, c, dim=-1)
    if not _fold_is_cheaper(x, V, backend):
        # here rows < out, so centering x (rows * in) costs less than moving c into the bias
        return F.linear(F.linear(x if c is None else x - c, U), V, d)
    W, b = _fold_op(backend, V, d, U, c)
    return F.linear(x, W, b)


def whitened_conv2d(
    x: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    padding_mode: str = "zeros",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The whitened convolution conv(U (pad(h) - c), V) + d as one conv: the 1x1 whitening
    conv is folded into the following conv's weights and bias. Where the fold would cost more
    than whitening the activations (C_out * kh * kw > N * H * W, small images through wide
    layers), the 1x1 whitening conv runs on the input instead, with the centre in the bias.

    Args:
        x: (N, C_in, H, W) or (C_in, H, W); V: (C_out, C_in, kh, kw); d: (C_out,) or None;
            U: (C_in, C_in); c: (C_in,) or None (zero); stride, padding, dilation and
            padding_mode as in nn.Conv2d.
        backend: "auto", "torch" or "triton" (the fold kernel).

    Returns:
        (N, C_out, H_out, W_out)
    """
    _check_backend(backend, ("auto", "torch", "triton"), "whitened_conv2d")
    _check_layer(x, V, U, c, dim=-3)
    if _fold_is_cheaper(x, V, backend):
        W, b = _fold_op(backend, V, d, U, c)
    else:
        x = F.conv2d(x, U[:, :, None, None])
        W, b = V, _activation_bias(V, d, U, c)
    if padding_mode != "zeros":
        dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        pad = reference.conv_padding(padding, tuple(V.shape[2:]), dil)
        return F.conv2d(F.pad(x, pad, mode=padding_mode), W, b, stride, 0, dilation)
    return F.conv2d(x, W, b, stride, padding, dilation)


def _check_layer(x, V, U, c, dim):
    n_in = V.shape[1]
    if x.dim() == 0 or x.shape[dim] != n_in:
        raise ValueError(
            f"input of shape {tuple(x.shape)} has {x.shape[dim] if x.dim() else 0} features "
            f"at dim {dim}, the layer expects {n_in}"
        )
    if U.shape != (n_in, n_in):
        raise ValueError(f"U must have shape ({n_in}, {n_in}), got {tuple(U.shape)}")
    if c is not None and c.shape != (n_in,):
        raise ValueError(f"c must have shape ({n_in},), got {tuple(c.shape)}")
