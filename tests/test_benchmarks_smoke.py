"""Smoke test of the benchmark suite (benchmarks/): every bench file's cases on tiny shapes,
called directly (no timing), with naive and prong checked against each other, the naive PRONG
baseline against prong_ext.Prong, and the runner end to end on the tiny size."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_covariance  # noqa: E402
import bench_e2e  # noqa: E402
import bench_whitened  # noqa: E402
import bench_whitening  # noqa: E402
import naive  # noqa: E402
import run  # noqa: E402

import prong_ext  # noqa: E402

DEVICE = "cpu"


def _outputs(module, case_type=None):
    """{group: {impl: output}} of every tiny case of a bench module."""
    out = {}
    for case in module.cases("tiny", DEVICE):
        out.setdefault(case.group, {})[case.impl] = module.make_runner(case, DEVICE)()
    return out


def test_covariance_cases_agree():
    groups = _outputs(bench_covariance)
    assert groups
    for impls in groups.values():
        m1, c1, n1 = impls["naive"]
        for impl in ("prong", "torch.cov"):
            m2, c2, n2 = impls[impl]
            assert n1 == n2
            torch.testing.assert_close(m2.double(), m1.double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c2.double(), c1.double(), atol=1e-5, rtol=1e-5)


def test_whitened_cases_agree():
    groups = _outputs(bench_whitened)
    assert any("conv" in g for g in groups) and any("linear" in g for g in groups)
    for impls in groups.values():
        outs = [impls[i][0] for i in ("plain", "naive", "prong")]
        for o in outs[1:]:
            torch.testing.assert_close(o, outs[0], atol=1e-4, rtol=1e-4)
        # same input gradient; V and d gradients of naive and prong agree
        torch.testing.assert_close(impls["prong"][1][0], impls["plain"][1][0], atol=1e-4, rtol=1e-4)
        for gn, gp in zip(impls["naive"][1], impls["prong"][1]):
            torch.testing.assert_close(gp, gn, atol=1e-4, rtol=1e-4)


def test_whitening_cases_agree():
    groups = _outputs(bench_whitening)
    assert len(groups) == 2
    for impls in groups.values():
        for a, b in zip(impls["naive"][0], impls["prong"][0]):
            # PCA whitening is unique up to the sign of every row
            torch.testing.assert_close(a.abs(), b.abs(), atol=1e-6, rtol=1e-6)


def test_floors():
    case = bench_whitened.Case("conv", 32, 64, 32, 3)
    f = bench_whitened.floors(case)
    assert f["prong_floor"] == pytest.approx(1 + 2 * 64 / (3 * 32 * 32 * 32))
    lin = bench_whitened.floors(bench_whitened.Case("linear", 256, 1024))
    assert lin["prong_floor"] == lin["naive_floor"]  # the two-step form at batch <= width


@pytest.mark.parametrize("model", ["autoencoder", "resnet18"])
def test_e2e_measure(model):
    for case in bench_e2e.cases("tiny", DEVICE):
        if case.model != model:
            continue
        r = bench_e2e.measure(case, DEVICE, rounds=1)
        assert r["T_s"] > 0
        if case.impl != "sgd":
            assert 0 < r["reparam_share"] < 1
            assert set(r["shares"]) == {"statistics", "eigh", "projection"}


def test_naive_prong_matches_prong():
    """The naive baseline re-whitens to the same function and coordinates as prong_ext.Prong."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(5, 4, 1, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    ).double()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    m_naive = naive.whiten_naive(_copy(base))
    m_prong = prong_ext.whiten(_copy(base))
    before = base(x)
    naive.NaiveProng(m_naive, num_samples=16).reparametrize(x)
    prong_ext.Prong(m_prong, num_samples=16).reparametrize(x)
    torch.testing.assert_close(m_naive(x), before)
    torch.testing.assert_close(m_prong(x), before)
    for a, b in zip(
        [m for m in m_naive.modules() if isinstance(m, naive._NaiveWhitened)],
        [m for m in m_prong.modules() if isinstance(m, prong_ext.nn._Whitened)],
    ):
        torch.testing.assert_close(a.c, b.c)
        torch.testing.assert_close(a.U.abs(), b.U.abs())


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_runner_tiny(tmp_path):
    # one pytest process per file costs seconds: the runner's sections that need it, one thread
    only = "covariance,whitened,e2e"
    rc = run.main(["--size", "tiny", "--out", str(tmp_path), "--only", only, "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device_type"] == DEVICE and data["results"]
    sections = {r["section"] for r in data["ratios"]}
    assert sections == {"covariance", "whitened", "e2e"}
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in data["ratios"])
    text = (tmp_path / "results.md").read_text()
    assert "PRONG/SGD" in text and "naive/prong" in text
    assert (tmp_path / "ratios.png").stat().st_size > 0
