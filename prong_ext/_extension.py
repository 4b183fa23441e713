"""Loading of the optional compiled extension `prong_ext._C`.

The package works without it (pure torch path) and says so once, at the first request.
"""

import warnings

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
