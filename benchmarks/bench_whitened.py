"""Whitened conv and linear layers, forward + backward: "plain" (F.conv2d / F.linear with the
canonical W, b: the cost of the unwhitened layer), "naive" (reference.whitened_conv2d: pad, center,
1x1 conv by U, then the k x k conv by V unpadded; reference.whitened_linear: two matmuls) and
"prong" (ops.whitened_conv2d / ops.whitened_linear, backend='auto': the fold W = V U, b = d - W c,
then one plain conv/linear) on the same inputs, float32.

The layer sits inside a network: its input requires a gradient, so backward computes the input's
gradient and the parameters' (V, d; W, b for plain). U and c are buffers (no gradient).

Floors, relative to the plain layer's fwd+bwd (3 products of 2*N*Ho*Wo*C_out*C_in*k^2 flops):
- prong (fold, forward W = V U and backward g_V = g_W U^T, 2*C_out*C_in^2*k^2 flops each):
  1 + 2*C_in / (3*N*Ho*Wo), at most 1.083 when N*H*W >= 8*C_in;
- naive (1x1 conv by U on the padded input, forward and input gradient):
  1 + (2/3) * C_in / (C_out*k^2) * (Hp*Wp) / (Ho*Wo); its forward alone adds C_in/(C_out*k^2).
- linear (rows r, square n x n): the fold costs 2*n^3 against the naive form's 2*r*n^2 (forward
  and input gradient of the U product), so ops.whitened_linear folds only when n_out <= r and
  otherwise computes the naive form itself: at r <= n the best exact speedup over naive is 1.0,
  and at r -> infinity it tends to 5/3.

At the full size CUDA also times "prong-tf32x3": prong with precision="tf32x3" (the fold and its
gradient on the tensor cores, within twice the error of float32 products;
triton_kernels/precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import sync

from prong_ext import ops, reference

IMPLS = ("plain", "naive", "prong")
TENSOR_CORES = "prong-tf32x3"  # CUDA, full size: prong with precision="tf32x3"

# conv: (N, C, H, k) with C_in = C_out = C, W = H, stride 1, padding k // 2
CONV_SHAPES = {
    "full": [
        (16, 64, 32, 3),
        (16, 128, 16, 3),
        (32, 256, 8, 3),
        (32, 64, 32, 1),
        (16, 128, 16, 1),
        (32, 256, 8, 1),
    ],
    "quick": [(16, 128, 16, 3), (16, 128, 16, 1)],
    "tiny": [(2, 4, 5, 3), (2, 4, 5, 1)],
}
# linear: (rows, n) square n x n
LINEAR_SHAPES = {
    "full": [(256, 1024), (64, 1024), (2048, 512)],
    "quick": [(256, 1024)],
    "tiny": [(3, 6), (7, 4)],
}
# CUDA: the convs of a ResNet-18 on 32x32 images at batch 128 (in full also the last stage, 512
# channels at 4x4, whose fold floor of 1.17 is above the goal of 1.10), linear layers at batches
# past the width, where the fold is the cheaper form
CUDA_CONV_SHAPES = {
    "full": [
        (128, 64, 32, 3),
        (128, 128, 16, 3),
        (128, 256, 8, 3),
        (128, 512, 4, 3),
        (128, 128, 16, 1),
        (128, 256, 8, 1),
    ],
    "quick": [(128, 64, 32, 3), (128, 128, 16, 3), (128, 256, 8, 3), (128, 128, 16, 1)],
    "tiny": CONV_SHAPES["tiny"],
}
CUDA_LINEAR_SHAPES = {
    "full": [(4096, 1024), (1024, 1024), (8192, 512)],
    "quick": [(4096, 1024)],
    "tiny": LINEAR_SHAPES["tiny"],
}


@dataclass(frozen=True)
class Case:
    kind: str  # "conv" or "linear"
    n: int  # batch (rows for linear)
    c: int  # channels / features
    h: int = 0
    k: int = 0
    impl: str = "prong"

    @property
    def group(self) -> str:
        if self.kind == "conv":
            return f"whitened conv{self.k}x{self.k} fwd+bwd N={self.n} C={self.c} {self.h}x{self.h}"
        return f"whitened linear fwd+bwd {self.c}x{self.c} batch={self.n}"

    @property
    def id(self) -> str:
        if self.kind == "conv":
            return f"conv{self.k}x{self.k}-{self.n}x{self.c}x{self.h}x{self.h}-{self.impl}"
        return f"linear{self.c}-batch{self.n}-{self.impl}"

    @property
    def shape(self) -> dict:
        if self.kind == "conv":
            return {"N": self.n, "C_in": self.c, "C_out": self.c, "H": self.h, "W": self.h, "k": self.k}
        return {"rows": self.n, "in": self.c, "out": self.c}


def cases(size: str, device: str) -> list[Case]:
    cuda = device == "cuda"
    convs = (CUDA_CONV_SHAPES if cuda else CONV_SHAPES)[size]
    linears = (CUDA_LINEAR_SHAPES if cuda else LINEAR_SHAPES)[size]
    impls = IMPLS + ((TENSOR_CORES,) if cuda and size == "full" else ())
    out = [Case("conv", n, c, h, k, impl) for n, c, h, k in convs for impl in impls]
    out += [Case("linear", r, n, impl=impl) for r, n in linears for impl in impls]
    return out


def floors(case: Case) -> dict:
    """Flops of the plain fwd+bwd and the floor ratios of prong and naive to it."""
    c = case.c
    if case.kind == "conv":
        k, pad = case.k, case.k // 2
        out_area, pad_area = case.h * case.h, (case.h + 2 * pad) ** 2
        plain = 3 * 2 * case.n * out_area * c * c * k * k
        fold = 2 * 2 * c * c * c * k * k
        naive = 2 * 2 * case.n * pad_area * c * c
        return {"flops": plain, "prong_floor": 1 + fold / plain, "naive_floor": 1 + naive / plain}
    r = case.n
    plain = 3 * 2 * r * c * c
    whiten_rows = 2 * 2 * r * c * c
    prong = 2 * 2 * c * c * c if c <= r else whiten_rows  # ops.whitened_linear's choice
    return {"flops": plain, "prong_floor": 1 + prong / plain, "naive_floor": 1 + whiten_rows / plain}


def make_inputs(case: Case, device: str) -> dict:
    """x, V, d, U, c (and the canonical W, b), float32, with a non-trivial whitening."""
    g = torch.Generator().manual_seed(0)
    c = case.c
    if case.kind == "conv":
        x = torch.randn(case.n, c, case.h, case.h, generator=g)
        V = torch.randn(c, c, case.k, case.k, generator=g) / (c * case.k * case.k) ** 0.5
    else:
        x = torch.randn(case.n, c, generator=g)
        V = torch.randn(c, c, generator=g) / c**0.5
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    U = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5)[:, None] * q.T
    t = {
        "x": x,
        "V": V,
        "d": torch.randn(c, generator=g) * 0.1,
        "U": U.float(),
        "c": torch.randn(c, generator=g) * 0.1,
    }
    t = {k: v.to(device) for k, v in t.items()}
    W, b = ops.fold(t["V"], t["d"], t["U"], t["c"])
    t["W"], t["b"] = W, b
    for name in ("x", "V", "d", "W", "b"):
        t[name] = t[name].detach().requires_grad_(True)
    return t


def make_runner(case: Case, device: str, t: dict | None = None):
    """fn() -> (output, gradients), one forward and backward, synchronized."""
    t = make_inputs(case, device) if t is None else t
    x, V, d, U, c = t["x"], t["V"], t["d"], t["U"], t["c"]
    pad = case.k // 2
    precision = "tf32x3" if case.impl == TENSOR_CORES else "ieee"
    impl = "prong" if case.impl == TENSOR_CORES else case.impl
    if case.kind == "conv":
        forward = {
            "plain": lambda: F.conv2d(x, t["W"], t["b"], 1, pad),
            "naive": lambda: reference.whitened_conv2d(x, V, d, U, c, 1, pad),
            "prong": lambda: ops.whitened_conv2d(x, V, d, U, c, 1, pad, backend="auto", precision=precision),
        }[impl]
    else:
        forward = {
            "plain": lambda: F.linear(x, t["W"], t["b"]),
            "naive": lambda: reference.whitened_linear(x, V, d, U, c),
            "prong": lambda: ops.whitened_linear(x, V, d, U, c, backend="auto", precision=precision),
        }[impl]
    params = [x, t["W"], t["b"]] if impl == "plain" else [x, V, d]
    with torch.no_grad():
        shape = forward().shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)

    def fn():
        out = forward()
        grads = torch.autograd.grad(out, params, grad_out)
        sync(device)
        return out, grads

    return fn


def test_whitened(timed, case, device):
    timed(
        make_runner(case, device),
        group=case.group,
        op=f"whitened_{case.kind}",
        impl=case.impl,
        shape=case.shape,
        dtype="float32",
        device=device,
        **floors(case),
    )
