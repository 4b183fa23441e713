"""Covariance of conv-layer inputs: "naive" (reference.covariance: permute to rows, center, one
matmul) vs "prong" (ops.covariance, backend='auto': Triton on CUDA, the fused torch path on the
CPU), on the same NCHW float32 input (contiguous and channels_last), products in float32 for both;
the peer "torch.cov" (rows permuted, correction=0) beside them.

Floor: M = N*H*W rows of C features; the symmetric product is M*C*(C+1)/2 multiply-adds, about
M*C^2 flops; the input is read once (4*M*C bytes) and the (C, C) result written in float64.

On CUDA the shapes are larger (32 to 128 MiB inputs): the GPU goal is read bandwidth, prong's
4*M*C bytes over its time as a share of the memory's peak, at least 70% for C <= 256, and a
smaller input would time the launch rather than the reads. At the full size CUDA also times
"prong-tf32x3": ops.covariance with precision="tf32x3" (the kernel's products on the tensor cores,
within twice the error of the float32 products; triton_kernels/precision.py) on the same input.
At every size CUDA times "prong-deterministic": ops.covariance under
torch.use_deterministic_algorithms(True), whose row splits are summed after the launch instead of
with atomics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from common import sync

from prong_ext import ops, reference

IMPLS = ("naive", "prong", "torch.cov")  # torch.cov: a peer (rows permuted, correction=0)
TENSOR_CORES = "prong-tf32x3"  # CUDA, full size: prong with precision="tf32x3"
DETERMINISTIC = "prong-deterministic"  # CUDA: prong under torch.use_deterministic_algorithms(True)
LAYOUTS = ("contiguous", "channels_last")

# (N, C, H) with W = H: ResNet-like conv inputs
SHAPES = {
    "full": [(32, 64, 32), (32, 128, 16), (16, 256, 8), (32, 256, 8)],
    "quick": [(16, 64, 32), (32, 256, 8)],
    "tiny": [(2, 5, 4)],
}
# CUDA: N=256 CIFAR-sized activations (64 to 128 MiB of float32) and, in full, C = 512 (outside
# the bandwidth goal) and an ImageNet-sized first stage
CUDA_SHAPES = {
    "full": [(256, 64, 32), (256, 128, 32), (256, 256, 16), (128, 64, 56), (256, 512, 8)],
    "quick": [(256, 64, 32), (256, 128, 32), (256, 256, 16)],
    "tiny": SHAPES["tiny"],
}


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    layout: str
    impl: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.h)

    @property
    def group(self) -> str:
        return f"covariance N={self.n} C={self.c} {self.h}x{self.h} {self.layout}"

    @property
    def id(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.h}-{self.layout}-{self.impl}"


def cases(size: str, device: str) -> list[Case]:
    shapes = (CUDA_SHAPES if device == "cuda" else SHAPES)[size]
    impls = IMPLS + ((TENSOR_CORES,) if device == "cuda" and size == "full" else ())
    impls += (DETERMINISTIC,) if device == "cuda" else ()
    return [Case(n, c, h, layout, impl) for n, c, h in shapes for layout in LAYOUTS for impl in impls]


def floor_counts(case: Case) -> dict:
    m = case.n * case.h * case.h
    return {"flops": m * case.c * case.c, "bytes": 4 * m * case.c + 8 * case.c * case.c}


def make_input(case: Case, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=g).add_(0.5).to(device)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(True) inside when on (the setting restored after)."""
    if not on:
        yield
        return
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def make_runner(case: Case, device: str, x: torch.Tensor | None = None):
    """fn() -> (mean, cov, count), synchronized."""
    x = make_input(case, device) if x is None else x
    if case.impl == "naive":

        def fn():
            out = reference.covariance(x, dtype=torch.float32)
            sync(device)
            return out

    elif case.impl in ("prong", TENSOR_CORES, DETERMINISTIC):
        precision = "tf32x3" if case.impl == TENSOR_CORES else "ieee"
        deterministic = case.impl == DETERMINISTIC

        def fn():
            with deterministic_algorithms(deterministic):
                out = ops.covariance(x, backend="auto", precision=precision)
            sync(device)
            return out

    else:

        def fn():
            rows = x.movedim(1, -1).reshape(-1, case.c)
            out = rows.mean(0), torch.cov(rows.T, correction=0), rows.shape[0]
            sync(device)
            return out

    return fn


def test_covariance(timed, case, device):
    counts = floor_counts(case)
    timed(
        make_runner(case, device),
        group=case.group,
        op="covariance",
        impl=case.impl,
        shape=list(case.shape),
        layout=case.layout,
        dtype="float32",
        device=device,
        **counts,
    )
