import pytest
import torch

from helpers import F64_TOL, tol
from prong_ext import _extension, ops, reference

EIGH_BACKENDS = [
    "torch",
    pytest.param(
        "extension",
        marks=pytest.mark.skipif(_extension._C is None, reason="prong_ext._C is not built"),
    ),
]


def _mean_tol(x, count):
    """A float32 mean of `count` rows: the bound of that sum, relative to the largest |x|."""
    return tol(torch.float32, n=count, scale=x.abs().max().item())


def _cov_tol(ref_cov, count):
    """A covariance accumulated in float32 over `count` rows: the bound of those sums of
    products of rows less a shift near the mean (up to about 4 variances each)."""
    return tol(torch.float32, n=count + 2, scale=4 * ref_cov.diagonal().max().item())


def _inputs(layout, c, dtype=torch.float32):
    x = torch.randn(5, c, 7, 3, dtype=torch.float64) * torch.rand(c, 1, 1, dtype=torch.float64) + 2.0
    if layout == "rows":
        x = torch.randn(37, c, dtype=torch.float64) @ torch.randn(c, c, dtype=torch.float64) + 3.0
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(5, c + 2, 9, 3, dtype=torch.float64)[:, 1:-1, 1:-1:1, :] + 1.0
    elif layout == "large_images":  # 8x8 and larger: the per-example GEMM path of the torch backend
        x = torch.randn(3, c, 9, 8, dtype=torch.float64) * torch.rand(c, 1, 1, dtype=torch.float64) + 2.0
        x[1:] += torch.randn(2, c, 1, 1, dtype=torch.float64)  # examples with different means
    return x.to(dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("c", [1, 3, 17])
@pytest.mark.parametrize("layout", ["rows", "contiguous", "channels_last", "sliced", "large_images"])
def test_covariance_equals_reference(c, layout, backend):
    x = _inputs(layout, c)
    mean, cov, count = ops.covariance(x, backend=backend)
    ref_mean, ref_cov, ref_count = reference.covariance(x.double())
    assert count == ref_count
    torch.testing.assert_close(mean, ref_mean, **_mean_tol(x, count))
    torch.testing.assert_close(cov, ref_cov, **_cov_tol(ref_cov, count))


@pytest.mark.parametrize("layout", ["contiguous", "large_images"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_covariance_half_inputs_accumulate_in_float32(dtype, layout):
    x = _inputs(layout, 6, dtype)
    _, cov, _ = ops.covariance(x)
    _, ref_cov, _ = reference.covariance(x.double())
    _, naive_cov, _ = reference.covariance(x, dtype=dtype)  # the same computation in `dtype`
    err = (cov - ref_cov).norm()
    assert err <= 2 * (naive_cov.double() - ref_cov).norm() + 1e-7 * ref_cov.norm()
    assert err / ref_cov.norm() < 1e-6


@pytest.mark.parametrize("shape", [(4096, 5), (16, 5, 16, 16)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_covariance_keeps_accuracy_with_large_mean(backend, shape):
    x = torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e3
    _, cov, _ = ops.covariance(x.float(), backend=backend)
    _, ref_cov, _ = reference.covariance(x.float().double())
    assert ((cov - ref_cov).norm() / ref_cov.norm()).item() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulator_streaming_equals_one_pass(backend):
    batches = [_inputs("contiguous", 4) * (i + 1) + i for i in range(3)]
    acc = ops.CovarianceAccumulator(4, backend=backend)
    for b in batches:
        acc.update(b)
    mean, cov, count = acc.compute()
    ref_mean, ref_cov, ref_count = reference.covariance(torch.cat(batches).double())
    assert count == ref_count
    torch.testing.assert_close(mean, ref_mean, **_mean_tol(torch.cat(batches), count))
    torch.testing.assert_close(cov, ref_cov, **_cov_tol(ref_cov, count))
    restored = ops.CovarianceAccumulator(4)
    restored.load_state_dict(acc.state_dict())
    assert torch.equal(restored.compute()[1], cov)  # the same state, the same computation


def test_triton_accumulator_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        ops.CovarianceAccumulator(3, backend="triton").update(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        ops.CovarianceAccumulator(3, dtype=torch.float64, backend="triton").update(torch.randn(4, 3))


def test_accumulator_rejects_bad_input():
    acc = ops.CovarianceAccumulator(3)
    with pytest.raises(ValueError, match=r"\(N, 3, \*\)"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(TypeError, match="floating"):
        acc.update(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()


def _spd(n, rank=None, scale=1.0):
    a = torch.randn(n, rank or n, dtype=torch.float64)
    return a @ a.T * scale / n


@pytest.mark.parametrize("backend", EIGH_BACKENDS)
def test_batched_eigh_mixed_sizes_equals_loop(backend):
    mats = [_spd(n) for n in (1, 4, 7, 4, 12, 1)]
    values, vectors = ops.batched_eigh(mats, backend=backend)
    ref_values, _ = reference.batched_eigh(mats)
    for m, lam, q, ref in zip(mats, values, vectors, ref_values):
        torch.testing.assert_close(lam, ref, **F64_TOL)
        torch.testing.assert_close(q @ torch.diag(lam) @ q.T, m, **F64_TOL)
        torch.testing.assert_close(q.T @ q, torch.eye(len(lam), dtype=q.dtype), **F64_TOL)


@pytest.mark.parametrize("backend", EIGH_BACKENDS)
def test_batched_eigh_names_non_finite_matrices(backend):
    mats = [_spd(3), _spd(2), _spd(3)]
    mats[2][1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"\[2\]"):
        ops.batched_eigh(mats, backend=backend)
    with pytest.raises(ValueError, match="square"):
        ops.batched_eigh([torch.randn(2, 3)], backend=backend)


@pytest.mark.parametrize("backend", EIGH_BACKENDS)
@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_whitening_decorrelates(kind, backend):
    eps = 1e-2
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 4.0
    mean, cov, _ = reference.covariance(x)
    (u,), (u_inv,) = ops.whitening([cov], eps, kind, backend=backend)
    lam, q = torch.linalg.eigh(cov)
    white = (x - mean) @ u.T
    white_cov = white.T @ white / len(x)
    if kind == "pca":
        expected = torch.diag(lam / (lam + eps))
    else:
        expected = q @ torch.diag(lam / (lam + eps)) @ q.T
    # float64 throughout: the bound of U Sigma U^T's sums, in units of |U| |Sigma| |U|^T
    scale = (u.abs() @ cov.abs() @ u.abs().T).max().item()
    torch.testing.assert_close(white_cov, expected, **tol(torch.float64, n=len(x) + 12, scale=scale))
    torch.testing.assert_close(u @ u_inv, torch.eye(6, dtype=torch.float64), **F64_TOL)
    ref_u, ref_u_inv = reference.whitening([cov], eps, kind)
    torch.testing.assert_close(u_inv @ u, ref_u_inv[0] @ ref_u[0], **F64_TOL)


@pytest.mark.parametrize("backend", EIGH_BACKENDS)
def test_whitening_rank_deficient_is_finite(backend):
    covs = [_spd(8, rank=3), torch.zeros(4, 4, dtype=torch.float64), _spd(5, scale=-1e-18)]
    us, u_invs = ops.whitening(covs, 1e-3, backend=backend)
    for u, u_inv in zip(us, u_invs):
        assert torch.isfinite(u).all() and torch.isfinite(u_inv).all()
        assert (torch.linalg.matrix_norm(u, 2) <= 1e-3**-0.5 * (1 + 1e-9)).item()


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_whitening_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        ops.whitening([torch.eye(2)], eps)


def test_whitening_rejects_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        ops.whitening([torch.eye(2)], 0.1, "cholesky")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulator_state_dict_continues_bitwise(backend):
    batches = [_inputs("contiguous", 5) * (i + 1) + i for i in range(4)]
    acc = ops.CovarianceAccumulator(5, backend=backend)
    acc.update(batches[0])
    acc.update(batches[1])
    state = acc.state_dict()
    raw = ("shift", "s1", "s2") if backend == "triton" else ("mean", "m2")
    assert set(raw) <= set(state) and state["count"] == acc.count
    restored = ops.CovarianceAccumulator(5, backend=backend)
    restored.load_state_dict(state)
    acc.update(batches[2])  # the saved state is a copy: the original moves on without it
    restored.update(batches[2])
    for a in (acc, restored):
        a.update(batches[3])
    for got, want in zip(restored.compute(), acc.compute()):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def test_accumulator_state_dict_empty_old_format_device_and_mismatch():
    empty = ops.CovarianceAccumulator(3)
    restored = ops.CovarianceAccumulator(3)
    restored.load_state_dict(empty.state_dict())
    assert restored.count == 0
    x = _inputs("rows", 3)
    acc = ops.CovarianceAccumulator(3)
    acc.update(x)
    mean, cov, count = acc.compute()
    old = {"count": count, "mean": mean, "m2": cov * count}  # the format before the raw state
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.compute()[1], cov, **F64_TOL)  # cov * count / count
    restored.load_state_dict(acc.state_dict(), device="meta")
    assert restored.mean.device.type == "meta" and restored.m2.device.type == "meta"
    with pytest.raises(ValueError, match="num_features"):
        ops.CovarianceAccumulator(4).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match=r"mean has shape \(3,\), expected \(4,\)"):
        ops.CovarianceAccumulator(4).load_state_dict(old)


def test_restored_triton_state_continues_on_the_torch_path():
    batches = [_inputs("contiguous", 4) + i for i in range(2)]
    acc = ops.CovarianceAccumulator(4, backend="triton")
    acc.update(batches[0])
    torch_acc = ops.CovarianceAccumulator(4, backend="torch")
    torch_acc.load_state_dict(acc.state_dict())
    torch_acc.update(batches[1])
    _, ref_cov, ref_count = reference.covariance(torch.cat(batches).double())
    mean, cov, count = torch_acc.compute()
    assert count == ref_count and torch_acc._triton_state is None
    torch.testing.assert_close(cov, ref_cov, **_cov_tol(ref_cov, count))
