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
from common import spd_covariances  # noqa: E402

import prong_ext  # noqa: E402
from helpers import RoundingBound, assert_within, cond, gamma, unit_roundoff  # noqa: E402

DEVICE = "cpu"
F64_U = unit_roundoff(torch.float64)


def _outputs(module, case_type=None):
    """{group: {impl: output}} of every tiny case of a bench module."""
    out = {}
    for case in module.cases("tiny", DEVICE):
        out.setdefault(case.group, {})[case.impl] = module.make_runner(case, DEVICE)()
    return out


def test_covariance_cases_agree():
    groups = _outputs(bench_covariance)
    assert groups
    for case in bench_covariance.cases("tiny", DEVICE):
        if case.impl != "naive":
            continue
        impls = groups[case.group]
        x = bench_covariance.make_input(case, DEVICE)  # what the runners read (seeded)
        rows = x.movedim(1, -1).reshape(-1, case.c).double()
        y = (rows - rows.mean(0)).abs()
        # float32 sums of the M rows, one rounding each for the centring, the division and ops'
        # removal of its shift: each within gamma_(M + 3) of the sizes of their terms, so any
        # two within twice it
        g = 2 * gamma(len(rows) + 3)
        m1, c1, n1 = impls["naive"]
        for impl in ("prong", "torch.cov"):
            m2, c2, n2 = impls[impl]
            assert n1 == n2
            assert_within(m2, m1, g * rows.abs().mean(0), f"{case.group} {impl} mean")
            assert_within(c2, c1, g * (y.T @ y) / len(rows), f"{case.group} {impl} covariance")


def test_covariance_deterministic_runner(monkeypatch):
    """prong-deterministic (a CUDA case) runs ops.covariance under deterministic algorithms and
    restores the setting after; on the CPU its result is prong's."""
    seen = []
    covariance = bench_covariance.ops.covariance

    def record(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return covariance(*args, **kwargs)

    monkeypatch.setattr(bench_covariance.ops, "covariance", record)
    out = {}
    for impl in ("prong", bench_covariance.DETERMINISTIC):
        case = bench_covariance.Case(2, 5, 4, "channels_last", impl)
        out[impl] = bench_covariance.make_runner(case, DEVICE)()
    assert seen == [False, True] and not torch.are_deterministic_algorithms_enabled()
    for a, b in zip(out["prong"], out[bench_covariance.DETERMINISTIC]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert bench_covariance.DETERMINISTIC in {c.impl for c in bench_covariance.cases("quick", "cuda")}


def _layer(case, t):
    """The whitened layer the runners compute, for its rounding bound."""
    if case.kind == "linear":
        layer = prong_ext.WhitenedLinear(case.c, case.c)
    else:
        layer = prong_ext.WhitenedConv2d(case.c, case.c, case.k, padding=case.k // 2)
    with torch.no_grad():
        for name in ("V", "d", "U", "c"):
            getattr(layer, name).copy_(t[name])
    return layer


def test_whitened_cases_agree():
    groups = _outputs(bench_whitened)
    assert any("conv" in g for g in groups) and any("linear" in g for g in groups)
    for case in bench_whitened.cases("tiny", DEVICE):
        if case.impl != "plain":
            continue
        impls = groups[case.group]
        t = bench_whitened.make_inputs(case, DEVICE)  # what the runners read (seeded)
        out = impls["plain"][0]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        # three float32 computations of one layer, each within the running bound of its
        # rounding (the plain one's W, b are a float32 fold: the same chain), so pairwise twice it
        bound = RoundingBound([_layer(case, t)], t["x"])
        grads = list(bound.backward(grad_out.double(), torch.zeros_like(out, dtype=torch.float64)).values())
        for impl in ("naive", "prong"):
            assert_within(impls[impl][0], out, 2 * bound.err, f"{case.group} {impl} output")
        # same input gradient; V and d gradients of naive and prong agree
        g_x = 2 * bound.input_grad[1]
        assert_within(impls["prong"][1][0], impls["plain"][1][0], g_x, f"{case.group} input gradient")
        bounds = [g_x] + [2 * b for _, b in grads]
        for gn, gp, b, what in zip(impls["naive"][1], impls["prong"][1], bounds, ("x", "V", "d")):
            assert_within(gp, gn, b, f"{case.group} gradient of {what}")


def test_whitening_cases_agree():
    groups = _outputs(bench_whitening)
    assert len(groups) == 2
    for case in bench_whitening.cases("tiny", DEVICE):
        if case.impl != "naive":
            continue
        impls = groups[case.group]
        covs = spd_covariances(list(case.sizes), torch.float64, DEVICE)  # what the runners read
        for s, a, b in zip(covs, impls["naive"][0], impls["prong"][0]):
            # PCA whitening is unique up to the sign of every row (the spectra are simple)
            bound = _pca_row_bounds(s, bench_whitening.EPS, _eigh_backward_error(s))
            assert_within(a.abs(), b.abs(), bound[:, None], f"{case.group} n={len(s)}")


def _eigh_backward_error(s):
    """2-norm bound on the backward error of a float64 eigensolver on s: 32 eps sqrt(n) ||s||,
    the bound test_extension checks LAPACK and cuSOLVER against."""
    return 64 * F64_U * len(s) ** 0.5 * torch.linalg.matrix_norm(s, 2).item()


def _pca_row_bounds(sigma, eps, err):
    """Bounds on | |U_a| - |U_b| |, row by row, for two float64 PCA whitenings
    U = diag(lam + eps)^-1/2 Q^T of matrices within err (2-norm) of sigma: on each side the
    row's eigenvector turns by at most err / gap (Davis-Kahan, to first order; gap is its
    eigenvalue's distance to the others) and its scale (lam + eps)^-1/2 moves by at most
    err / (2 (lam + eps)) of itself; 2u more for the product. A repeated eigenvalue (gap 0)
    leaves its rows unbounded: their basis is arbitrary."""
    lam = torch.linalg.eigvalsh(sigma).clamp_min(0)
    gap = (lam[:, None] - lam[None, :]).abs().fill_diagonal_(float("inf")).min(1).values
    return 2 * (lam + eps).rsqrt() * (err / gap + err / (2 * (lam + eps)) + 2 * F64_U)


def test_floors():
    case = bench_whitened.Case("conv", 32, 64, 32, 3)
    f = bench_whitened.floors(case)
    # exactly: both are 1 + the correctly rounded quotient of ints of the same ratio
    assert f["prong_floor"] == 1 + 2 * 64 / (3 * 32 * 32 * 32)
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
    inputs = {m: h for m, h, *_ in RoundingBound(base, x, dtype=torch.float64).records}
    naive.NaiveProng(m_naive, num_samples=16).reparametrize(x)
    prong_ext.Prong(m_prong, num_samples=16).reparametrize(x)
    whitened = [m for m in m_prong.modules() if isinstance(m, prong_ext.nn.WhitenedLayer)]
    # float64, before and after each within the running bound of its rounding, plus, after, the
    # projection V = W U^-1 (in_features roundings, grown by U's condition)
    extra = {m: int(m.V.shape[1] * cond(m.U)) + 2 for m in whitened}
    bound = 2 * RoundingBound(m_prong, x, dtype=torch.float64, extra=extra).err
    assert_within(m_naive(x), before, bound, "naive")
    assert_within(m_prong(x), before, bound, "prong")
    plain = [m for m in base.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    naive_layers = [m for m in m_naive.modules() if isinstance(m, naive.NaiveWhitened)]
    for layer, a, b in zip(plain, naive_layers, whitened):
        # the statistics: float64 sums over the layer's input rows (reference.covariance's and
        # the accumulator's), each within gamma_(M + 2) of their terms
        rows = inputs[layer].movedim(1, -1).reshape(-1, layer.weight.shape[1])
        g = 2 * gamma(len(rows) + 2, torch.float64)
        if layer.bias is not None:
            assert_within(a.c, b.c, g * rows.abs().mean(0), "c")
            rows = rows - rows.mean(0)
        else:
            assert torch.equal(a.c, b.c)  # zero: the second moment is whitened
        sigma = rows.T @ rows / len(rows)
        # sigma from either side is within n g ||sigma|| of this one, the eigensolver adds its own
        err = _eigh_backward_error(sigma) + len(sigma) * g * torch.linalg.matrix_norm(sigma, 2).item()
        bound = _pca_row_bounds(sigma, 1e-2, err)  # rows of a repeated eigenvalue: any basis
        assert_within(a.U.abs(), b.U.abs(), bound[:, None], "U")
        # U^T U = (sigma + eps)^-1, a function of sigma whatever the basis: within err grown by
        # ||(sigma + eps)^-1||^2, plus the n-term products' rounding
        low = torch.linalg.eigvalsh(sigma).clamp_min(0).min().item() + 1e-2
        n = len(sigma)
        inv_tol = 2 * (err / low**2 + (n + 2) * n * F64_U / low)
        torch.testing.assert_close(a.U.T @ a.U, b.U.T @ b.U, rtol=0, atol=inv_tol)


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
