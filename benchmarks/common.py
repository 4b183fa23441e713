"""Helpers shared by the bench files, the runner and the smoke test: device choice,
synchronization, round planning, a plain timing loop, the machine's roofline and the GPU memory's
nominal peak bandwidth."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

#: seconds of timed rounds per benchmark case, and (min, max) rounds, per size
BUDGET_S = {"full": 1.0, "quick": 0.25, "tiny": 0.0}
ROUNDS = {"full": (3, 40), "quick": (3, 10), "tiny": (1, 1)}


def pick_device(choice: str = "auto") -> str:
    """'cuda' when asked for or (auto) available, else 'cpu'."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--bench-device cuda was requested but CUDA is not available")
    return choice


def sync(device: str | torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def plan_rounds(once: float, budget: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds that fit `budget` seconds for a call taking `once` seconds, within the bounds."""
    if once <= 0:
        return max_rounds
    return max(min_rounds, min(max_rounds, int(budget / once)))


def median_time(fn: Callable[[], object], rounds: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median and all samples of the wall time of fn() (which synchronizes itself)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def spd_covariances(sizes: list[int], dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Sample covariances of 2n samples each, of the given widths (what whitening sees)."""
    g = torch.Generator().manual_seed(seed)
    covs = []
    for n in sizes:
        x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
        x = x - x.mean(0)
        covs.append((x.mT @ x / x.shape[0]).to(device=device, dtype=dtype))
    return covs


def roofline(device: str, quick: bool = False) -> dict:
    """Measured peaks of the device: float32 GEMM GFLOP/s and copy GB/s (read + write).

    They turn the flop and byte counts of a case into a floor time: max(flops / GEMM rate,
    bytes / copy rate).
    """
    n = 1024 if (quick or device == "cpu") else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def gemm():
        torch.mm(a, b)
        sync(device)

    t_gemm, _ = median_time(gemm, 3 if quick else 5)
    m = (1 << 24) if device == "cpu" else (1 << 28)  # 64 MiB / 1 GiB of float32
    src = torch.empty(m, device=device).uniform_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync(device)

    t_copy, _ = median_time(copy, 3 if quick else 5)
    return {
        "gemm_gflops": 2 * n**3 / t_gemm / 1e9,
        "copy_gbps": 2 * 4 * m / t_copy / 1e9,
        "gemm_size": n,
        "copy_mib": 4 * m >> 20,
    }


#: nominal memory bandwidth in GB/s by device name, for a torch that does not report the memory
#: clock and bus width (first match wins: the H100 NVL before the H100 SXM)
NOMINAL_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


def memory_peak(device: str) -> dict:
    """The device memory's nominal peak bandwidth: {"gbps": GB/s or None, "source": how it was found}.

    On CUDA: 2 (double data rate) x memory clock x bus width from torch's device properties, else
    the NOMINAL_GBPS entry of the device's name. None on the CPU and for an unknown GPU; the report
    then falls back to the measured copy rate.
    """
    if torch.device(device).type != "cuda":
        return {"gbps": None, "source": "no GPU"}
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz > 0 and bus_bits > 0:
        gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
        return {"gbps": gbps, "source": f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit (device properties)"}
    for name, gbps in NOMINAL_GBPS:
        if name in props.name:
            return {"gbps": gbps, "source": f"nominal for {name}"}
    return {"gbps": None, "source": f"unknown for {props.name}"}
