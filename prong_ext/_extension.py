"""Loading of the optional compiled extension `prong_ext._C`, and Python entry points to its ops.

The package works without it (pure torch path) and says so once, at the first request. A `_C`
compiled against another torch than the installed one is not loaded: the build records its torch
in prong_ext/_build_info.py (setup.py), read here without importing `_C`, and a mismatch is named
in one warning at import, with the command that rebuilds it.

Loading `_C` defines the `prong_ext` torch.library namespace (csrc/prong_ext.cpp):

    prong_ext::batched_eigh(Tensor[] mats) -> (Tensor[] eigenvalues, Tensor[] eigenvectors, Tensor info)
    prong_ext::whitening(Tensor[] covs, float eps, str kind) -> (Tensor[] U, Tensor[] U_inv)

with CPU kernels (LAPACK through ATen) and, when built with CUDA, CUDA kernels (batched cuSOLVER,
one call per size/dtype group). This module registers their fake kernels for torch.compile.
"""

import importlib
import importlib.util
import warnings

import torch

_C = None
_error: Exception | str | None = None
_warned = False
_REBUILD = "pip install --no-build-isolation ."


def _build_info():
    """The module prong_ext._build_info that the build of `_C` wrote beside it (the torch, CUDA and
    arch list `_C` was compiled against), or None: no `_C`, or one built before that record existed."""
    try:
        if importlib.util.find_spec(f"{__package__}._C") is None:
            return None
        return importlib.import_module(f"{__package__}._build_info")
    except (ImportError, ValueError):
        return None


def _torch_mismatch() -> str | None:
    """The message when `_C` was compiled against another torch than the one installed, else None.

    Read from the record, without importing `_C`: a `_C` built against another torch usually fails
    to import with an undefined C++ symbol, or worse, imports and misbehaves."""
    info = _build_info()
    built = getattr(info, "torch_version", None)
    if built is None or built == str(torch.__version__):
        return None
    cuda = getattr(info, "cuda_version", None)
    return (
        f"prong_ext._C was built against torch {built}"
        + (f" (CUDA {cuda})" if cuda else "")
        + f" but torch {torch.__version__} is installed; the compiled ops are disabled and the "
        f"pure torch path is used. Rebuild prong_ext against this torch, in its source folder: "
        f"`{_REBUILD}` (`pip install --no-build-isolation -e .` for an editable install)."
    )


_mismatch = _torch_mismatch()
if _mismatch is not None:
    _error = _mismatch
    _warned = True  # this warning is the one; available() does not add a second
    warnings.warn(_mismatch, stacklevel=2)
else:
    try:
        from . import _C  # noqa: F811  (loading registers the C++ ops of the prong_ext namespace)
    except ImportError as exc:  # not built, or built against another torch without a record
        _error = exc


def available() -> bool:
    """True when `prong_ext._C` is importable; warns once when it is not."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"prong_ext._C is not available ({_error}); using the pure torch path. "
            f"Build it with `{_REBUILD}` to enable the compiled ops.",
            stacklevel=2,
        )
    return _C is not None


def unavailable_reason() -> str | None:
    """Why `_C` did not load (not built, or built against another torch), or None when it did.
    Says nothing to the user (`available()` warns)."""
    return None if _C is not None else str(_error)


def cuda_built() -> bool:
    """True when `_C` was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


_REBUILD_CUDA = f'TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=/usr/local/cuda {_REBUILD}'
_warned_no_cuda = False


def no_cuda_kernels_message() -> str:
    """Why `_C` cannot take CUDA tensors, with the command that builds it with CUDA."""
    return (
        "prong_ext._C was built without CUDA (a CPU torch, no CUDA toolkit, or "
        "PRONG_EXT_FORCE_CPU=1 at build time): it has CPU kernels only. With a CUDA torch and the "
        f"CUDA toolkit installed, rebuild it in prong_ext's source folder: `{_REBUILD_CUDA}`"
    )


def warn_no_cuda_kernels() -> None:
    """Says once that CUDA tensors take the torch path because `_C` has no CUDA kernels."""
    global _warned_no_cuda
    if not _warned_no_cuda:
        _warned_no_cuda = True
        warnings.warn(
            no_cuda_kernels_message() + ". Until then CUDA eigendecompositions take the torch path "
            "(torch.linalg.eigh).",
            stacklevel=4,
        )


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
