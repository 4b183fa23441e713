"""Loading of the optional compiled extension `prong_ext._C`, and Python entry points to its ops.

The package works without it (pure torch path) and says so once, at the first request.

Loading `_C` defines the `prong_ext` torch.library namespace (csrc/prong_ext.cpp):

    prong_ext::batched_eigh(Tensor[] mats) -> (Tensor[] eigenvalues, Tensor[] eigenvectors, Tensor info)
    prong_ext::whitening(Tensor[] covs, float eps, str kind) -> (Tensor[] U, Tensor[] U_inv)

with CPU kernels (LAPACK through ATen) and, when built with CUDA, CUDA kernels (batched cuSOLVER,
one call per size/dtype group). This module registers their fake kernels for torch.compile.
"""

import warnings

import torch

_C = None
_error: Exception | None = None
_warned = False

try:
    from . import _C  # noqa: F811  (loading registers the C++ ops of the prong_ext namespace)
except ImportError as exc:  # not built, or built against another torch
    _error = exc


def available() -> bool:
    """True when `prong_ext._C` is importable; warns once when it is not."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"prong_ext._C is not available ({_error}); using the pure torch path. "
            "Build it with `pip install --no-build-isolation .` to enable the compiled ops.",
            stacklevel=2,
        )
    return _C is not None


def cuda_built() -> bool:
    """True when `_C` was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


def cusolver_info() -> tuple[int, int, bool] | None:
    """(cuSOLVER version at build time, at run time, cusolverDnXsyevBatched usable), or None.

    Versions read major * 1000 + minor * 100 + patch. None when `_C` lacks CUDA.
    """
    return None if _C is None else _C.cusolver_info()


def _require() -> None:
    if _C is None:
        raise RuntimeError(f"prong_ext._C is not available ({_error}); build it to use the compiled ops")


def batched_eigh(mats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eigendecomposition of symmetric matrices of mixed sizes in one call (torch.linalg.eigh each).

    Only the lower triangle is read. On CUDA the matrices are grouped by size and dtype, one
    batched cuSOLVER call per group; a matrix that does not converge is retried in float64, then
    on the CPU.

    Args:
        mats: (n_i, n_i) symmetric float32/float64 matrices, all on one device.

    Returns:
        eigenvalues: (n_i,) ascending, and eigenvectors: (n_i, n_i) with the eigenvectors as
        columns, both contiguous, in the dtype of mats[i].

    Raises:
        ValueError: a matrix holds NaN or Inf (the message names their indices).
        torch.linalg.LinAlgError: a matrix did not converge on any attempt (not checked while
            torch.compile traces, where it would need a graph break).
    """
    _require()
    mats = list(mats)
    if not mats:
        return [], []
    values, vectors, info = torch.ops.prong_ext.batched_eigh(mats)
    if not torch.compiler.is_compiling():
        failed = torch.nonzero(info).flatten().tolist()
        if failed:
            raise torch.linalg.LinAlgError(
                f"prong_ext.batched_eigh: the eigendecomposition of mats{failed} did not converge "
                "(also retried in float64 and on the CPU)"
            )
    return list(values), list(vectors)


def whitening(
    covs: list[torch.Tensor], eps: float, kind: str = "pca"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whitening transforms U and U^-1 of every covariance at once (docs/algorithm.md).

    With Sigma = Q diag(lam) Q^T, lam clamped >= 0:
    pca: U = diag(lam + eps)^-1/2 Q^T, U^-1 = Q diag(lam + eps)^1/2;
    zca: U = Q diag(lam + eps)^-1/2 Q^T, U^-1 = Q diag(lam + eps)^1/2 Q^T.

    Args:
        covs: (n_i, n_i) symmetric float32/float64 covariances, all on one device.
        eps: > 0, added to the eigenvalues.
        kind: 'pca' or 'zca'.

    Returns:
        U and U_inv: (n_i, n_i) each, contiguous, in the dtype of covs[i].
    """
    _require()
    covs = list(covs)
    if not covs:
        return [], []
    u, u_inv = torch.ops.prong_ext.whitening(covs, float(eps), kind)
    return list(u), list(u_inv)


def _register_fakes() -> None:
    @torch.library.register_fake("prong_ext::batched_eigh")
    def _(mats):
        values = [m.new_empty(m.shape[:-1]) for m in mats]
        vectors = [m.new_empty(m.shape) for m in mats]
        return values, vectors, mats[0].new_empty((len(mats),), dtype=torch.int32)

    @torch.library.register_fake("prong_ext::whitening")
    def _(covs, eps, kind):
        torch._check(eps > 0, lambda: f"prong_ext.whitening: eps={eps} must be > 0")
        torch._check(
            kind in ("pca", "zca"), lambda: f"prong_ext.whitening: kind={kind!r} must be 'pca' or 'zca'"
        )
        return [c.new_empty(c.shape) for c in covs], [c.new_empty(c.shape) for c in covs]


if _C is not None:
    _register_fakes()
