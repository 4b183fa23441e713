"""Shared setup of the benchmark suite (pytest-benchmark).

Options (each also read from an environment variable, so `benchmarks/run.py` and a plain
`pytest benchmarks/...` behave the same):

    --bench-size {full,quick,tiny}   PRONG_BENCH_SIZE, default full: which shape list every file
                                     benchmarks (tiny is for the smoke test only)
    --bench-device {auto,cpu,cuda}   PRONG_BENCH_DEVICE, default auto: cuda when available
    --bench-threads N                PRONG_BENCH_THREADS, default 0: torch's default CPU threads

Every bench file defines `cases(size, device) -> list` and a test taking the fixture `case`;
`pytest_generate_tests` below parametrizes it. Timing goes through the `timed` fixture: it warms
the function up, sizes the number of rounds to a time budget and calls `benchmark.pedantic`. The
functions it times synchronize the device themselves (see `sync`).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

# The bench files import their neighbours (naive.py, bench_e2e.py) by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUDGET_S, ROUNDS, pick_device, plan_rounds  # noqa: E402

SIZES = ("full", "quick", "tiny")


def pytest_addoption(parser):
    group = parser.getgroup("prong_ext benchmarks")
    group.addoption(
        "--bench-size",
        choices=SIZES,
        default=os.environ.get("PRONG_BENCH_SIZE", "full"),
        help="shape list to benchmark: full, quick or tiny (env PRONG_BENCH_SIZE)",
    )
    group.addoption(
        "--bench-device",
        choices=("auto", "cpu", "cuda"),
        default=os.environ.get("PRONG_BENCH_DEVICE", "auto"),
        help="device to benchmark on (env PRONG_BENCH_DEVICE); auto: cuda when available",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("PRONG_BENCH_THREADS", "0")),
        help="torch CPU threads (env PRONG_BENCH_THREADS); 0 keeps torch's default",
    )


def pytest_configure(config):
    try:
        threads = config.getoption("bench_threads")
    except ValueError:
        threads = int(os.environ.get("PRONG_BENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def _size(config) -> str:
    try:
        return config.getoption("bench_size")
    except ValueError:  # the option is not registered (conftest loaded late)
        return os.environ.get("PRONG_BENCH_SIZE", "full")


def _device(config) -> str:
    try:
        choice = config.getoption("bench_device")
    except ValueError:
        choice = os.environ.get("PRONG_BENCH_DEVICE", "auto")
    return pick_device(choice)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.module.cases(_size(metafunc.config), _device(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def device(request) -> str:
    return _device(request.config)


@pytest.fixture(scope="session")
def size(request) -> str:
    return _size(request.config)


@pytest.fixture(scope="session", autouse=True)
def _bench_env():
    torch.manual_seed(0)
    yield


@pytest.fixture
def timed(benchmark, size):
    """timed(fn, group=..., **extra) -> median seconds: warms fn up (`warmup` calls, then one
    more that sizes the rounds to the size's time budget), then benchmark.pedantic. fn must
    synchronize the device before it returns. With --benchmark-disable the median is the time of
    the sizing call."""

    def run(fn, *, group: str, warmup: int = 1, **extra):
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        rounds = plan_rounds(once, BUDGET_S[size], *ROUNDS[size])
        benchmark.group = group
        benchmark.extra_info.update(extra)
        benchmark.extra_info.setdefault("python", platform.python_version())
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(benchmark, "stats", None)
        return stats.stats.median if stats is not None else once

    return run
