"""Batched eigendecomposition of realistic layer sets: "naive" (reference.batched_eigh, a loop of
torch.linalg.eigh) vs "prong" (the compiled prong_ext::batched_eigh: one batched cuSOLVER call
per size group on CUDA, LAPACK over the intra-op threads on the CPU), plus "cupy" on CUDA where
cupy imports: CuPy's batched eigh, one cupy.linalg.eigh per size group on the stacked matrices of
that size (cuSOLVER's syevjBatched); a size whose stacked call fails or returns a wrong
decomposition is decomposed one matrix at a time instead, and the case's extra info names those
sizes (cupy_looped_sizes). Each case pairs them on the same inputs (sample covariances, 2n
samples each) in one group. The GPU goal: prong at least 20x faster than the loop.

Layer sets (the input width of every whitened layer = the size of its covariance):
  resnet18:    3, 64 x4, 128 x4, 256 x4, 512 x4 (convs) and 512 (classifier)
  vgg16:       3, 64, 64, 128, 128, 256 x3, 512 x6 (convs) and 4096, 4096 (classifier inputs;
               the first classifier's 25088 inputs are too wide to whiten). CUDA only: on the
               CPU the two 4096 matrices would take most of the suite's time budget, so the CPU
               runs "vgg16-convs" (the same set without them) instead.
  tiny:        3, 5, 40 (the smoke test's size)
Dtypes: float32 on the CPU; on CUDA float64 (what prong_ext.Prong decomposes) and, in size full,
float32 too.

Run: pytest benchmarks/bench_eigh.py [--bench-size quick] [--bench-device cpu], or without
pytest-benchmark `python benchmarks/bench_eigh.py [--device cpu] [--out FILE.md]`, which times the
same cases (median of a few runs) and prints a markdown table with the device and versions.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, median_time, pick_device, spd_covariances, sync  # noqa: E402

from prong_ext import _extension, reference  # noqa: E402

LAYER_SETS = {
    "resnet18": [3] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4 + [512],
    "vgg16": [3, 64, 64, 128, 128, 256, 256, 256] + [512] * 6 + [4096, 4096],
    "vgg16-convs": [3, 64, 64, 128, 128, 256, 256, 256] + [512] * 6,
    "tiny": [3, 5, 40],
}
SETS = {
    ("full", "cuda"): ["resnet18", "vgg16"],
    ("full", "cpu"): ["resnet18", "vgg16-convs"],
    ("quick", "cuda"): ["resnet18", "vgg16"],
    ("quick", "cpu"): ["resnet18"],
    ("tiny", "cuda"): ["tiny"],
    ("tiny", "cpu"): ["tiny"],
}

try:
    import cupy  # noqa: F401

    HAVE_CUPY = True
except Exception:  # not installed, or no usable GPU
    HAVE_CUPY = False


@dataclass(frozen=True)
class Case:
    layers: str
    dtype: str
    impl: str

    @property
    def sizes(self) -> list[int]:
        return LAYER_SETS[self.layers]

    @property
    def group(self) -> str:
        return f"eigh {self.layers} ({len(self.sizes)} matrices) {self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.layers}-{self.dtype}-{self.impl}"


def cases(size: str, device: str) -> list[Case]:
    if device == "cuda":
        dtypes = ["float64", "float32"] if size == "full" else ["float64"]
    else:
        dtypes = ["float32"]
    impls = ["naive", "prong"] + (["cupy"] if device == "cuda" and HAVE_CUPY else [])
    return [Case(layers, dtype, impl) for layers in SETS[size, device] for dtype in dtypes for impl in impls]


def make_runner(case: Case, device: str):
    """A function that decomposes every matrix of the case once and waits for the device."""
    if case.impl == "prong":
        reason = _extension.unavailable_reason()
        if reason is not None:
            pytest.skip(f"prong_ext._C is not built ({reason})")
        if device == "cuda" and not _extension.cuda_built():
            pytest.skip("prong_ext._C was built without CUDA")
    covs = spd_covariances(case.sizes, getattr(torch, case.dtype), device)
    if case.impl == "naive":

        def run():
            reference.batched_eigh(covs)
            sync(device)

    elif case.impl == "prong":

        def run():
            _extension.batched_eigh(covs)
            sync(device)

    elif case.impl == "cupy":
        run, looped = cupy_runner(covs)
        run.cupy_looped_sizes = looped

    else:
        raise ValueError(case.impl)
    return run


def cupy_runner(covs: list[torch.Tensor]):
    """(run, looped sizes): run() decomposes every matrix with CuPy, one cupy.linalg.eigh per
    size on the stacked matrices of that size (a batched call), and waits for the device.

    Each stacked call is tried once here: a size whose call raises, or whose result does not
    reconstruct its matrices (relative residual above 1e-3), is decomposed one matrix at a time
    (cupy's single-matrix eigh, syevd) and listed in the looped sizes."""
    import cupy as cp

    by_size: dict[int, list[torch.Tensor]] = {}
    for c in covs:
        by_size.setdefault(c.shape[-1], []).append(c)
    stacks, looped = [], []
    for n, group in by_size.items():
        a = cp.array(torch.stack(group))  # a copy CuPy owns
        try:
            w, v = cp.linalg.eigh(a)
            residual = cp.linalg.norm((v * w[:, None, :]) @ v.swapaxes(-1, -2) - a) / cp.linalg.norm(a)
            batched = bool(residual < 1e-3)
        except Exception:  # cuSOLVER's batched Jacobi refuses some sizes
            batched = False
        stacks.append((a, batched))
        if not batched:
            looped.append(n)

    def run():
        for a, batched in stacks:
            if batched:
                cp.linalg.eigh(a)
            else:
                for m in a:
                    cp.linalg.eigh(m)
        cp.cuda.Device().synchronize()

    return run, looped


def test_eigh(timed, case, device):
    run = make_runner(case, device)
    extra = {}
    if hasattr(run, "cupy_looped_sizes"):
        extra["cupy_looped_sizes"] = run.cupy_looped_sizes
    timed(
        run,
        group=case.group,
        op="batched_eigh",
        impl=case.impl,
        layers=case.layers,
        sizes=case.sizes,
        dtype=case.dtype,
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        **extra,
    )


def _versions(device: str) -> str:
    line = f"Python {platform.python_version()}, torch {torch.__version__}"
    if device == "cuda":
        info = _extension.cusolver_info()
        line += f", CUDA {torch.version.cuda}, cuSOLVER {info[1] if info else '?'}"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description="batched eigh: naive loop vs prong_ext (markdown table)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", default="full", choices=("full", "quick", "tiny"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    times = {}
    for case in cases(args.size, device):
        times[case] = median_time(make_runner(case, device), args.rounds)[0]
    lines = [
        f"Device: {device_name(device)}. {_versions(device)}.",
        f"Median wall time of one call over {args.rounds} rounds after one warm-up (device synchronized).",
        "",
        "| layer set | dtype | impl | median ms | naive / impl |",
        "|---|---|---|---:|---:|",
    ]
    for case, t in times.items():
        base = times[Case(case.layers, case.dtype, "naive")]
        lines.append(
            f"| {case.layers} ({len(case.sizes)}) | {case.dtype} | {case.impl} "
            f"| {1e3 * t:.1f} | {base / t:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
