"""Whitening matrices (U, U^-1) of a whole network's layers: "naive" (reference.whitening: a
Python loop of torch.linalg.eigh, one layer at a time) vs "prong" (ops.whitening,
backend='auto': the compiled extension where it is built, one batched eigh per size group of the
torch path otherwise), on the same float64 covariances (what prong_ext.Prong passes).

Layer sets (input widths of the whitened layers, i.e. the covariance sizes):
- resnet18: the CNN of bench_e2e (3x3 stem, 1x1 shortcuts, classifier): 3, 64 x6, 128 x5,
  256 x5, 512 x4;
- autoencoder: 784, 1000, 500, 250, 30, 250, 500, 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bench_e2e import AE_SIZES, resnet18, whitened_widths
from common import spd_covariances, sync

from prong_ext import ops, reference

IMPLS = ("naive", "prong")
EPS = 1e-2


def layer_sets(size: str) -> dict[str, list[int]]:
    if size == "tiny":
        return {"resnet18-w4": whitened_widths(resnet18(4)), "autoencoder-tiny": AE_SIZES["tiny"][:-1]}
    sets = {"resnet18": whitened_widths(resnet18(64))}
    if size == "full":
        sets["autoencoder"] = AE_SIZES["full"][:-1]
    return sets


@dataclass(frozen=True)
class Case:
    layers: str
    sizes: tuple[int, ...]
    dtype: str
    impl: str

    @property
    def group(self) -> str:
        return f"whitening {self.layers} ({len(self.sizes)} matrices) {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.layers}-{self.dtype}-{self.impl}"


def cases(size: str, device: str) -> list[Case]:
    return [
        Case(name, tuple(sizes), "float64", impl)
        for name, sizes in layer_sets(size).items()
        for impl in IMPLS
    ]


def make_runner(case: Case, device: str, covs: list[torch.Tensor] | None = None):
    """fn() -> (U list, U^-1 list), synchronized."""
    if covs is None:
        covs = spd_covariances(list(case.sizes), getattr(torch, case.dtype), device)
    if case.impl == "naive":

        def fn():
            out = reference.whitening(covs, EPS)
            sync(device)
            return out

    else:

        def fn():
            out = ops.whitening(covs, EPS, backend="auto")
            sync(device)
            return out

    return fn


def test_whitening(timed, case, device):
    timed(
        make_runner(case, device),
        group=case.group,
        op="whitening",
        impl=case.impl,
        shape={"sizes": list(case.sizes)},
        dtype=case.dtype,
        device=device,
        flops=sum(9 * n**3 for n in case.sizes),  # ~9 n^3 for eigenvalues and eigenvectors
    )
