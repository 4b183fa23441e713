"""The low level of prong_ext: statistics, eigendecompositions, whitening and whitened layers.

Every op takes `backend`:
- "auto" (default): the fastest path available for the inputs' device: Triton kernels for CUDA
  tensors, the compiled extension `_C` for eigendecompositions where it is built (for CUDA
  tensors: built with CUDA; a CPU-only `_C` sends them to the torch path and says so once), the
  torch path otherwise;
- "torch": plain PyTorch (the CPU path; fused, unlike prong_ext.reference);
- "triton": the Triton kernels (on CPU tensors only through the interpreter, TRITON_INTERPRET=1);
- "extension": the compiled `_C` ops (batched_eigh, whitening).
Asking for a backend that is not available raises (also "extension" for CUDA tensors when `_C`
was built without CUDA: the message gives the command that rebuilds it).

Conventions (docs/algorithm.md): a whitened layer computes z = V U (h - c) + d; its canonical parameters are
W = V U (for convs, at every tap) and b = d - W c (summed over taps).

Where each piece is:
- statistics (mean and covariance of layer inputs): CovarianceAccumulator and covariance here; the
  Triton op prong_ext::cov_accumulate in _triton_ops.py (kernel: triton_kernels/covariance.py);
- eigendecompositions and whitening matrices: batched_eigh and whitening here (torch path); the
  compiled ops in _extension.py (csrc/);
- the fold W = V U, b = d - W c, its inverse from_canonical (V = W U^-1, d = b + W c) and the
  whitened layers: fold, from_canonical, whitened_linear, whitened_conv2d here (dispatch; the
  torch forms and the weight-shaped products mul_in, centre_term, outer_taps, taps_sum are
  _common.py's, exported here); the Triton op prong_ext::fold and its backward in _triton_ops.py
  (kernels: triton_kernels/whiten_conv.py); the projection that uses them in _reparam.py;
- the naive forms of all of these, the tests' oracle: reference.py.

Grouped convolutions (groups G > 1) whiten block-diagonally: the input's C channels form G blocks
of k = C / G, U is (G, k, k) (block g acts on channels g*k..(g+1)*k-1) and output channel o, of
group g(o) = o // (C_out / G), sees only its block: W[o] = V[o] U[g(o)], b[o] = d[o] - W[o] c_g(o).

Mixed precision: under torch.autocast the fold (W, b), the activation form's bias and the
statistics run with autocast off (in the parameters' / the accumulator's dtype); the layer's own
linear or conv runs under autocast as the plain layer's would.

Precision of the Triton kernels' products (CUDA): `precision`, on covariance,
CovarianceAccumulator, fold, whitened_linear and whitened_conv2d, is "ieee" (float32 FMA products,
no tensor cores) or "tf32x3" (tensor cores: three TF32 products per float32 product, or the exact
products of 16-bit V and U in the fold), whose error against float64 is at most twice that of the
same computation in plain torch at the inputs' precision (float32 matmul with TF32 off;
triton_kernels/precision.py). None, the default of every `precision`, takes the process-wide
setting of set_matmul_precision ("ieee" unless set), read when the call is made (when an
accumulator is made), so that the whitened layers' forward and backward and Prong's statistics
follow it without new arguments. The torch path (CPU tensors, grouped layers, the activation form)
ignores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _common, _extension
from ._common import (
    all_finite,
    centre_term,
    conv_padding,
    finalize,
    full_precision,
    mul_in,
    outer,
    outer_taps,
    rows,
    taps_sum,
)
from .triton_kernels.precision import PRECISIONS, check_precision

__all__ = [
    "CovarianceAccumulator",
    "batched_eigh",
    "centre_term",
    "covariance",
    "fold",
    "fold_is_cheaper",
    "from_canonical",
    "get_matmul_precision",
    "mul_in",
    "outer_taps",
    "set_matmul_precision",
    "taps_sum",
    "whitened_conv2d",
    "whitened_linear",
    "whitening",
]

_BACKENDS = ("auto", "torch", "triton", "extension")

# What precision=None means: see set_matmul_precision.
_matmul_precision = PRECISIONS[0]


def set_matmul_precision(precision: str) -> None:
    """Sets what `precision=None` (the default of covariance, CovarianceAccumulator, fold,
    whitened_linear and whitened_conv2d) means from now on, for the Triton kernels on CUDA.

    Args:
        precision: "ieee" (float32 FMA products, no tensor cores; the initial setting) or "tf32x3"
            (tensor cores; error against float64 at most twice that of plain torch at the inputs'
            precision, triton_kernels/precision.py).

    Raises:
        ValueError: precision is not one of ("ieee", "tf32x3").

    The setting is read at each call (at construction for an accumulator), so it reaches the
    whitened layers' fold (forward and backward) and the statistics of a Prong window opened
    after it. A torch.compile graph keeps the precision it was traced with; changing the setting
    makes the next call trace again (a module global that Dynamo guards).
    """
    global _matmul_precision
    _matmul_precision = check_precision(precision)


def get_matmul_precision() -> str:
    """The precision that `precision=None` takes now (see set_matmul_precision)."""
    return _matmul_precision


def _resolve_precision(precision: str | None) -> str:
    """precision, checked; the process-wide setting for None."""
    return _matmul_precision if precision is None else check_precision(precision)


def _check_backend(backend: str, allowed: tuple[str, ...], op: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{backend=} is not one of {_BACKENDS}")
    if backend not in allowed:
        raise ValueError(f"{op} has no {backend!r} backend; choose one of {allowed}")


def _triton_backend():
    """The module prong_ext._triton_ops, imported at the first use (so that its kernels are
    defined after the caller chose TRITON_INTERPRET), or None when Triton or its kernels cannot
    be imported."""
    try:
        from . import _triton_ops
    except ImportError:
        return None
    return _triton_ops


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "triton":
        triton_ops = _triton_backend()
        if triton_ops is None:
            raise RuntimeError("backend='triton' was requested but Triton is not installed")
        off_gpu = sorted({str(t.device) for t in tensors if not t.is_cuda})
        if off_gpu and not triton_ops.INTERPRETED:
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, got tensors on {off_gpu}; Triton's "
                "interpreter runs the kernels on CPU tensors when TRITON_INTERPRET=1 is set before "
                "prong_ext is imported; or use backend='auto' or 'torch'"
            )
        return True
    if backend == "auto":
        return all(t.is_cuda for t in tensors) and _triton_backend() is not None
    return False


def _is_cuda(t: torch.Tensor) -> bool:
    """Whether t is a CUDA tensor: the device test of the extension's dispatch."""
    return t.is_cuda


def _use_extension(backend: str, tensors: list[torch.Tensor]) -> bool:
    """Whether the compiled `_C` takes `tensors`: it must be built, and built with CUDA for CUDA
    tensors. Where it cannot, backend='extension' raises and 'auto' takes the torch path (saying
    once why, for CUDA tensors and a `_C` without CUDA)."""
    if backend not in ("auto", "extension"):
        return False
    if backend == "extension" and not _extension.available():
        raise RuntimeError(
            "backend='extension' was requested but prong_ext._C is not built; "
            "install with `pip install --no-build-isolation .`"
        )
    if not _extension.available():
        return False
    if any(_is_cuda(t) for t in tensors) and not _extension.cuda_built():
        if backend == "extension":
            raise RuntimeError(
                "backend='extension' got CUDA tensors, but " + _extension.no_cuda_kernels_message()
            )
        _extension.warn_no_cuda_kernels()
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Statistics


def _check_groups(num_features: int, groups: int) -> int:
    """k = num_features // groups, after checking that groups is a positive divisor."""
    if not isinstance(groups, int) or groups < 1 or num_features % groups:
        raise ValueError(f"{groups=} must be a positive int dividing {num_features=}")
    return num_features // groups


class CovarianceAccumulator:
    """Streaming mean and covariance of C features, merged batch by batch (Chan et al.).

    Each batch is shifted by an estimate of its mean before its outer products are summed, the
    shift is removed exactly, and batches are merged exactly, so data with a large mean and a
    small spread keeps its relative accuracy. Running totals are kept in float64. On the Triton
    path (CUDA, float32 products, groups == 1) one kernel launch per batch sums its rows less a
    float32 shift (the running mean; the first sample for the first batch) in float32, and the
    sums join float64 totals, merged exactly as on the torch path: however many batches, the
    rounding is that of one batch's float32 sums. Under torch.autocast the products still run in
    `dtype` (autocast is turned off inside).

    With groups G > 1 only the G diagonal (k, k) blocks (k = C / G) of the covariance are
    accumulated, by batched matmuls (no C x C product): the statistics of a grouped convolution,
    whose group g sees channels g*k..(g+1)*k-1 only.

    Args:
        num_features: C.
        groups: G, a divisor of C; 1 (default) for the full covariance.
        dtype: dtype of the per-batch products: float32 (default, fast) or float64. Inputs of
            any floating dtype are upcast to it; float64 inputs always use float64.
        backend: "auto", "torch" or "triton" (groups == 1 only; "auto" takes the torch path for
            groups > 1).
        precision: the Triton kernel's products: "ieee" (float32 FMA) or "tf32x3" (tensor cores,
            the error of each batch's sums against float64 at most twice that of torch's float32
            matmul of the shifted rows with TF32 off); None (default): get_matmul_precision() at
            construction, kept as `self.precision`. The torch path ignores it.
    """

    def __init__(
        self,
        num_features: int,
        *,
        groups: int = 1,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        precision: str | None = None,
    ):
        _check_backend(backend, ("auto", "torch", "triton"), "CovarianceAccumulator")
        self.precision = _resolve_precision(precision)
        if num_features < 1:
            raise ValueError(f"{num_features=} must be >= 1")
        _check_groups(num_features, groups)
        if groups > 1 and backend == "triton":
            raise ValueError(
                f"backend='triton' accumulates the full covariance (groups=1) only, got {groups=}; "
                "use backend='auto' or 'torch'"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{dtype=} must be torch.float32 or torch.float64")
        self.num_features = num_features
        self.groups = groups
        self.dtype = dtype
        self.backend = backend
        self.count = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        # float64 sum (h - mean)(h - mean)^T: (C, C), or its diagonal blocks (G, k, k)
        self.m2: torch.Tensor | None = None
        self._triton_state = None  # (shift, s1, s2) in float32 while Triton accumulates

    def update(self, x: torch.Tensor) -> None:
        """Merges a batch. x: (N, C, *) with C = num_features; every position is a sample."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected an input of shape (N, {self.num_features}, *), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating point input, got {x.dtype}")
        if x.numel() == 0:
            return
        triton_ok = x.dtype != torch.float64 and self.dtype == torch.float32 and self.groups == 1
        if self.backend == "triton" and not triton_ok:
            raise ValueError(
                f"backend='triton' takes float32 products of float32/16 inputs, got a {x.dtype} "
                f"input with dtype={self.dtype}"
            )
        with full_precision(x.device):
            if self._triton_state is not None and (self.backend == "torch" or _triton_backend() is None):
                self._settle_triton()  # a restored Triton state continued on the torch path
            if self._triton_state is not None or (
                self.count == 0 and triton_ok and _use_triton(self.backend, x)
            ):
                self._update_triton(x)
                return
            dtype = torch.float64 if x.dtype == torch.float64 else self.dtype
            n, mean, m2 = _batch_moments(x, dtype, self.groups)
            self._merge(n, mean, m2)

    def _update_triton(self, x: torch.Tensor) -> None:
        """One kernel launch sums the batch's rows less a float32 shift, in float32 from zero;
        the sums join float64 totals about the same shift (an exact merge). The shift is the
        running mean rounded to float32 (the first sample for the first batch): before a batch
        the totals move to it (Chan's delta delta^T term), so the rounding is that of one batch's
        float32 sums of small centred terms, whatever the number of batches."""
        if x.dim() == 3:  # (N, C, L): the kernel reads (M, C) and (N, C, H, W)
            x = x.unsqueeze(-1)
        elif x.dim() > 4:
            x = x.flatten(3)
        c = self.num_features
        if self._triton_state is None:
            f64 = {"device": x.device, "dtype": torch.float64}
            first = rows(x[:1])[0].float()
            shift, s1, s2 = first, torch.zeros(c, **f64), torch.zeros(c, c, **f64)
        else:  # about shift + delta: s1 - n delta and s2 - s1 delta^T - delta s1^T + n delta delta^T
            old, s1, s2 = self._triton_state
            shift = (old.double() + s1 / self.count).float()
            delta = shift.double() - old.double()
            s2 = s2 - torch.outer(s1, delta) - torch.outer(delta, s1) + self.count * torch.outer(delta, delta)
            s1 = s1 - self.count * delta
        b1 = torch.zeros(c, device=x.device, dtype=torch.float32)
        b2 = torch.zeros(c, c, device=x.device, dtype=torch.float32)
        _triton_backend().cov_accumulate(x, shift, b1, b2, precision=self.precision)
        self._triton_state = (shift, s1 + b1.double(), s2 + b2.double())
        self.count += x.numel() // c

    def _settle_triton(self) -> None:
        """Turns the Triton path's shifted float64 sums into the torch path's mean and m2."""
        shift, s1, s2 = (t.double() for t in self._triton_state)
        offset = s1 / self.count
        self.mean, self.m2 = shift + offset, s2 - self.count * torch.outer(offset, offset)
        self._triton_state = None

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + outer(delta, delta, self.groups) * (self.count * n / total)
        self.count = total

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns mean (C,), biased covariance in float64 and the sample count.

        The covariance is (C, C) for groups == 1, its diagonal blocks (G, k, k) otherwise.
        """
        if self.count == 0:
            raise ValueError("CovarianceAccumulator has no samples")
        if self._triton_state is not None:
            return *finalize(self.count, *self._triton_state), self.count
        return self.mean, self.m2 / self.count, self.count

    def state_dict(self) -> dict:
        """The raw running state (copies), so that a restored accumulator continues bitwise.

        Keys: num_features, groups, count and, on the torch path, mean (C,) and m2 (the float64
        centred sums, (C, C) or (G, k, k); None before the first sample), on the Triton path
        shift (C,) float32 (the last batch's shift), s1 (C,) and s2 (C, C), the float64 sums of
        (x - shift) and (x - shift)(x - shift)^T over every sample.
        """
        state = {"num_features": self.num_features, "groups": self.groups, "count": self.count}
        if self._triton_state is not None:
            state.update(zip(("shift", "s1", "s2"), (t.clone() for t in self._triton_state)))
        else:
            state["mean"] = None if self.mean is None else self.mean.clone()
            state["m2"] = None if self.m2 is None else self.m2.clone()
        return state

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restores what state_dict() returned (also the older {count, mean, m2} form).

        Args:
            state: a state_dict() of an accumulator with the same num_features and groups.
            device: where to put the restored tensors; None leaves them where they are.

        Raises:
            ValueError: num_features, groups or a tensor's shape does not match this accumulator.
        """
        for key in ("num_features", "groups"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict has {key}={state[key]}, this accumulator {key}={getattr(self, key)}"
                )
        c, g = self.num_features, self.groups
        count = int(state["count"])
        if "s1" in state:
            if g != 1:
                raise ValueError(f"state_dict holds Triton sums (groups=1), this accumulator has groups={g}")
            names, shapes = ("shift", "s1", "s2"), ((c,), (c,), (c, c))
        else:
            names, shapes = ("mean", "m2"), ((c,), (c, c) if g == 1 else (g, c // g, c // g))
        tensors = [state[n] for n in names]
        for name, t, shape in zip(names, tensors, shapes):
            if count and (t is None or tuple(t.shape) != shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(
                    f"state_dict's {name} has shape {got}, expected {shape} (num_features={c}, groups={g})"
                )
        if device is not None:
            tensors = [None if t is None else t.to(device) for t in tensors]
        self.count = count
        if "s1" in state:
            self.mean = self.m2 = None
            self._triton_state = tuple(tensors) if count else None
        else:
            self._triton_state = None
            self.mean, self.m2 = tensors if count else (None, None)


def _batch_moments(
    x: torch.Tensor, dtype: torch.dtype, groups: int = 1
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, float64 mean and float64 centered sum of outer products of one (N, C, *) batch.

    The rows are shifted by an estimate of the mean (computed in `dtype`) and the shift is
    removed exactly afterwards, M2 = G - n (mean - shift)(mean - shift)^T, so no float64 pass
    over the data is needed. Products are taken in `dtype` (lower precisions upcast on the fly).
    NCHW-like inputs with 8x8 images or larger are read in place: every example is a (C, L)
    block with positions contiguous, so G = sum_n X_n X_n^T, one GEMM per example accumulated in
    place, with no transposing copy. With groups > 1, M2 is the (G, k, k) diagonal blocks, one
    batched GEMM over the groups.
    """
    c = x.shape[1]
    k = c // groups
    positions = x[0, 0].numel() if x.dim() > 2 else 1
    if positions >= 64 and x.stride(1) != 1 and c > 1:
        xs = x.flatten(2)  # (N, C, L)
        shift = xs[0].mean(-1, dtype=dtype)  # the first example's mean: close to the batch's
        centered = xs - shift[:, None]
        if groups == 1:
            gram = centered.new_zeros(c, c)
            for example in centered:
                gram.addmm_(example, example.T)
        else:
            gram = centered.new_zeros(groups, k, k)
            for example in centered.unflatten(1, (groups, k)):  # (G, k, L)
                gram.baddbmm_(example, example.mT)
        sums = centered.sum((0, 2))
    else:
        samples = rows(x)
        shift = samples.mean(0, dtype=dtype)
        centered = samples - shift
        if groups == 1:
            gram = centered.T @ centered
        else:
            blocks = centered.reshape(-1, groups, k).transpose(0, 1)  # (G, M, k)
            gram = blocks.mT @ blocks
        sums = centered.sum(0)
    n = x.numel() // c
    offset = sums.double() / n
    return n, shift.double() + offset, gram.double() - n * outer(offset, offset, groups)


def covariance(
    x: torch.Tensor,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased covariance of the features along dim 1 of x.

    Args:
        x: (N, C, *) of any floating dtype; for (N, C, H, W) every spatial position is a sample.
        groups: G dividing C; G > 1 gives only the G diagonal (k, k) blocks, k = C / G.
        dtype: dtype of the products (float32 or float64; float64 for float64 inputs); results
            are float64.
        backend: "auto", "torch" or "triton" (groups == 1 only).
        precision: the Triton kernel's products, "ieee" or "tf32x3", or None for
            get_matmul_precision() (see CovarianceAccumulator).

    Returns:
        mean: (C,), cov: (C, C) (groups == 1) or (G, k, k), count.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got {tuple(x.shape)}")
    acc = CovarianceAccumulator(x.shape[1], groups=groups, dtype=dtype, backend=backend, precision=precision)
    acc.update(x)
    return acc.compute()


# ---------------------------------------------------------------------------------------------
# Eigendecompositions and whitening


def _check_finite(mats: list[torch.Tensor], what: str) -> None:
    bad = [i for i, ok in enumerate(all_finite(mats)) if not ok]
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
    if _use_extension(backend, mats):
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
    """Whitening matrices U and U^-1 for every layer in one call (docs/algorithm.md).

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
    if _use_extension(backend, covs):
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


def fold(
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor | None,
    *,
    backend: str = "torch",
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical parameters of a whitened layer: W = V U (at every tap), b = d - W c.

    Gradients reach V and d through the fold: g_V = (g_W - g_b c^T) U^T at every tap, g_d = g_b.
    Grouped layers (U of G blocks) fold per group: W[o] = V[o] U[g(o)], b = d - centre_term(W, c).
    Runs with autocast off: float32 parameters give a float32 fold under torch.autocast.

    Args:
        V: (O, I) or (O, I, kh, kw); d: (O,) or None; U: (I, I), or (G, I, I) for a grouped
            conv (I = C_in / G); c: (I,) or (G * I,), or None (zero).
        backend: "torch" (the default, on every device: the fold of canonical() and of the
            reparametrizations), "auto" (the fold of the layers' forward: the Triton kernel for
            CUDA tensors with U (I, I), torch otherwise) or "triton" (U (I, I) only).
        precision: the Triton kernel's products for W and for the gradient of V: "ieee" (float32
            FMA) or "tf32x3" (tensor cores; 16-bit V and U of one dtype multiplied exactly), the
            error against float64 at most twice that of torch's V @ U at V's precision; None
            (default): get_matmul_precision(). The torch path ignores it.

    Returns:
        W with V's shape, b: (O,) or None when both d and c are None.
    """
    _check_backend(backend, ("auto", "torch", "triton"), "fold")
    precision = _resolve_precision(precision)
    if U.dim() == 3 and backend == "triton":  # the Triton kernel folds a single block only
        raise ValueError(
            f"backend='triton' folds groups=1 layers only, got U of {U.shape[0]} blocks; "
            "use backend='auto' or 'torch'"
        )
    with full_precision(V.device):
        if U.dim() == 2 and _use_triton(backend, V, U):
            triton_ops = _triton_backend()
            if c is None:  # no centre: b is d itself (or no bias at all)
                return triton_ops.fold(V, None, U, U.new_zeros(U.shape[0]), precision=precision)[0], d
            return triton_ops.fold(V, d, U, c, precision=precision)
        return _common.fold(V, d, U, c)


def from_canonical(
    W: torch.Tensor, b: torch.Tensor | None, U_inv: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parameters (V, d) of a whitened layer with coefficients (U, c) whose canonical
    parameters are (W, b): V = W U^-1 (at every tap), d = b + W c; the inverse of `fold`, and the
    last step of a reparametrization (docs/algorithm.md, section 4). Runs with autocast off.

    Args:
        W: (O, I) or (O, I, kh, kw); b: (O,) or None; U_inv: U^-1, (I, I) or (G, I, I) (per
            block); c: (I,) or (G * I,), or None (zero).

    Returns:
        V with W's shape, d: (O,), or b when b or c is None.
    """
    with full_precision(W.device):
        return _common.from_canonical(W, b, U_inv, c)


def _apply_blocks(U: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """U c for U (C, C); the block-diagonal product, block g on c's g-th slice, for U (G, k, k)."""
    if U.dim() == 2:
        return U @ c
    return (U @ c.view(U.shape[0], -1, 1)).reshape(c.shape)


def _activation_bias(V, d, U, c):
    """Bias when the whitening is applied to the activations instead of folded:
    z = V (U h) + d - V U c (summed over taps, per group), since pad(U h) = U pad(h) for every
    padding mode. Runs with autocast off, like the fold."""
    if c is None:
        return d
    with full_precision(V.device):
        vuc = centre_term(V, _apply_blocks(U, c))
        return -vuc if d is None else d - vuc


def fold_is_cheaper(x: torch.Tensor, V: torch.Tensor, groups: int = 1, *, backend: str = "auto") -> bool:
    """Whether whitened_linear and whitened_conv2d fold (W, b) for the input x, rather than
    whiten the activations.

    The fold costs C_out * taps * k^2 (k = C_in / G), whitening the activations
    positions * G * k^2 (for the forward pass, and as much again for the backward): fold when
    C_out * taps <= positions * G. backend='triton' always folds (it is the Triton fold kernel
    that was asked for).

    Args:
        x: the layer's input; V: (C_out, k) or (C_out, k, kh, kw); groups: G.
        backend: the backend the layer is called with.
    """
    positions = x.numel() // max(V.shape[1] * groups, 1)
    return backend == "triton" or V[:, 0].numel() <= positions * groups


def whitened_linear(
    x: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor | None,
    U: torch.Tensor,
    c: torch.Tensor | None,
    *,
    backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """z = V U (x - c) + d.

    Picks the cheaper exact form from the shapes: folding (W, b) costs out * in^2 per pass,
    whitening the activations costs rows * in^2 (rows = x.numel() / in). The fold is used when
    out <= rows; a small batch through a wide layer whitens the activations instead. Under
    torch.autocast the fold runs in the parameters' dtype and F.linear under autocast, as
    nn.Linear's; the activation form runs both products under autocast.

    Args:
        x: (*, in); V: (out, in); d: (out,) or None; U: (in, in); c: (in,) or None (zero).
        backend: "auto", "torch" or "triton" (the fold kernel).
        precision: the fold kernel's products, "ieee" or "tf32x3", or None (default) for
            get_matmul_precision() (see fold).

    Returns:
        (*, out)
    """
    _check_backend(backend, ("auto", "torch", "triton"), "whitened_linear")
    precision = _resolve_precision(precision)
    _check_layer(x, V, U, c, dim=-1)
    if not fold_is_cheaper(x, V, backend=backend):
        # here rows < out, so centering x (rows * in) costs less than moving c into the bias
        return F.linear(F.linear(x if c is None else x - c, U), V, d)
    W, b = fold(V, d, U, c, backend=backend, precision=precision)
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
    groups: int = 1,
    *,
    backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """The whitened convolution conv(U (pad(h) - c), V) + d as one conv: the 1x1 whitening
    conv is folded into the following conv's weights and bias. Where the fold would cost more
    than whitening the activations (C_out * kh * kw > G * N * H * W, small images through wide
    layers), the 1x1 whitening conv (grouped for G > 1) runs on the input instead, with the
    centre in the bias. Under torch.autocast the fold and the bias run in the parameters'
    dtype and the convs under autocast, as nn.Conv2d's.

    Args:
        x: (N, C_in, H, W) or (C_in, H, W); V: (C_out, C_in / G, kh, kw); d: (C_out,) or None;
            U: (C_in, C_in) for G = 1, (G, C_in / G, C_in / G) for G > 1 (block g whitens
            channels g*k..(g+1)*k-1); c: (C_in,) or None (zero); stride, padding, dilation,
            padding_mode and groups (G) as in nn.Conv2d.
        backend: "auto", "torch" or "triton" (the fold kernel; groups == 1 only, "auto" takes
            the torch fold for G > 1).
        precision: the fold kernel's products, "ieee" or "tf32x3", or None (default) for
            get_matmul_precision() (see fold).

    Returns:
        (N, C_out, H_out, W_out)
    """
    _check_backend(backend, ("auto", "torch", "triton"), "whitened_conv2d")
    precision = _resolve_precision(precision)
    if backend == "triton" and groups != 1:
        raise ValueError(f"backend='triton' folds groups=1 convolutions only, got {groups=}")
    _check_layer(x, V, U, c, dim=-3, groups=groups)
    if fold_is_cheaper(x, V, groups, backend=backend):
        W, b = fold(V, d, U, c, backend=backend, precision=precision)
    else:
        x = F.conv2d(x, U.reshape(-1, V.shape[1])[:, :, None, None], groups=groups)
        W, b = V, _activation_bias(V, d, U, c)
    if padding_mode != "zeros":
        dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        pad = conv_padding(padding, tuple(V.shape[2:]), dil)
        return F.conv2d(F.pad(x, pad, mode=padding_mode), W, b, stride, 0, dilation, groups)
    return F.conv2d(x, W, b, stride, padding, dilation, groups)


def _check_layer(x, V, U, c, dim, groups=1):
    if not isinstance(groups, int) or groups < 1 or V.shape[0] % groups:
        raise ValueError(f"{groups=} must be a positive int dividing the {V.shape[0]} outputs")
    k = V.shape[1]
    n_in = k * groups
    if x.dim() == 0 or x.shape[dim] != n_in:
        raise ValueError(
            f"input of shape {tuple(x.shape)} has {x.shape[dim] if x.dim() else 0} features "
            f"at dim {dim}, the layer expects {n_in}"
        )
    shape = (n_in, n_in) if groups == 1 else (groups, k, k)
    if U.shape != shape:
        raise ValueError(f"U must have shape {shape}, got {tuple(U.shape)}")
    if c is not None and c.shape != (n_in,):
        raise ValueError(f"c must have shape ({n_in},), got {tuple(c.shape)}")
