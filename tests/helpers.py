"""Small models and comparisons shared by the tests."""

import torch
from torch import nn


def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16, bias=bias), nn.Tanh(), nn.Linear(16, 9, bias=bias), nn.Tanh(), nn.Linear(9, 5)
    )


def cnn(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=bias),
        nn.ReLU(),
        nn.Conv2d(6, 5, 1, bias=bias),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
    )


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def grouped_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


MODELS = {
    "mlp": (mlp, (12,)),
    "mlp_nobias": (lambda: mlp(bias=False), (12,)),
    "cnn": (cnn, (3, 8, 8)),
    "cnn_nobias": (lambda: cnn(bias=False), (3, 8, 8)),
    "bn_cnn": (bn_cnn, (3, 8, 8)),
    "grouped_cnn": (grouped_cnn, (4, 8, 8)),
}


def data(shape, n=64, seed=1):
    """Inputs with a non-zero mean and correlated features, so whitening does something."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    mix = torch.randn(shape[0], shape[0], generator=g) / shape[0] ** 0.5
    x = torch.einsum("ij,nj...->ni...", torch.eye(shape[0]) + mix, x)
    return x + 0.5 + torch.arange(shape[0]).view(-1, *([1] * (len(shape) - 1))) * 0.1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output in eval mode (BN on running statistics), training mode restored."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(mode)
    return out


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to `dtype`."""
    return torch.finfo(dtype).eps / 2


def tol(dtype: torch.dtype, n: int = 1, scale: float = 1.0) -> dict:
    """rtol and atol for torch.testing.assert_close of a result computed in `dtype` (float32 state,
    say) against a more precise reference, from the precision instead of assert_close's defaults.

    A sum or dot product of n terms computed in `dtype` is off by at most gamma_n * sum |a_i b_i|,
    gamma_n = n u / (1 - n u) ~ n u (Higham, Accuracy and Stability of Numerical Algorithms, 3.1),
    in whatever order the terms are added: the bound holds for every BLAS blocking, SIMD width and
    number of threads, where a tolerance fitted to one machine's rounding does not. `n` counts the
    roundings that can add up along the longest chain (the reduction length, plus one per
    elementwise step); `scale` is the size of the terms, sum |a_i b_i| (atol = rtol * scale covers
    results that cancel to much less than their terms). The factor 2 leaves room for the rounding
    of the inputs themselves (a float64 reference of float32 operands is not their exact result).
    """
    r = 2 * n * unit_roundoff(dtype)
    return {"rtol": r, "atol": r * scale}


# float64 computed two ways (another order of the same sums, an eigendecomposition of a
# well-conditioned matrix): up to ~1000 roundings of terms of size up to ~10. assert_close's
# float64 defaults (1e-7) are five orders looser and would not notice a float32 step in the path.
F64_TOL = tol(torch.float64, n=1000, scale=10.0)


def cond(*mats: torch.Tensor) -> float:
    """The largest 2-norm condition number of the (batched) matrices: how much the rounding of a
    result that went through their inverses can grow."""
    return max(torch.linalg.cond(m.detach().double()).max().item() for m in mats)
