"""Tests of the compiled ops prong_ext::batched_eigh and prong_ext::whitening (csrc/).

The oracle is float64 LAPACK (torch.linalg.eigh on the CPU). Eigenvectors are never compared
directly (signs and repeated eigenspaces are arbitrary): the tests check the eigenvalues, the
reconstruction Q diag(lam) Q^T = A and the orthonormality Q^T Q = I, and for the whitening the
defining identities U Sigma U^T = diag(lam / (lam + eps)) (PCA), U = Sigma_eps^-1/2 (ZCA, a unique
matrix function) and U U^-1 = I. Errors are measured in units of the dtype's epsilon times the
norm of the input. CUDA tests are marked and skipped without a GPU; the file is skipped when
`_C` is not built.
"""

import math

import pytest
import torch

from prong_ext import _extension

if _extension.unavailable_reason() is not None:
    pytest.skip(f"prong_ext._C is not built ({_extension.unavailable_reason()})", allow_module_level=True)

OPS = torch.ops.prong_ext
DTYPES = [torch.float32, torch.float64]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA"),
        ],
    ),
]


def _sym(n, dtype, device, eigenvalues=None, generator=None):
    """Symmetric (n, n) Q diag(eigenvalues) Q^T built in float64 (random spectrum when None)."""
    g = generator
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    lam = torch.randn(n, dtype=torch.float64, generator=g) if eigenvalues is None else eigenvalues.double()
    a = (q * lam) @ q.mT
    return ((a + a.mT) / 2).to(device=device, dtype=dtype)


def _tol(dtype, n):
    return 32 * torch.finfo(dtype).eps * math.sqrt(max(n, 1))


def _check_eigh(mats, values, vectors):
    assert len(values) == len(vectors) == len(mats)
    for i, (a, w, q) in enumerate(zip(mats, values, vectors)):
        n = a.shape[0]
        assert w.shape == (n,) and q.shape == (n, n), i
        assert w.dtype == q.dtype == a.dtype and w.device == q.device == a.device, i
        assert w.is_contiguous() and q.is_contiguous(), i
        a64 = a.detach().cpu().double()
        w64, q64 = w.cpu().double(), q.cpu().double()
        norm = max(torch.linalg.matrix_norm(a64, 2).item(), 1e-300)
        tol = _tol(a.dtype, n)
        ref = torch.linalg.eigvalsh(a64)
        assert torch.all(w64[1:] >= w64[:-1]), f"mats[{i}]: eigenvalues not ascending"
        assert (w64 - ref).abs().max().item() <= tol * norm, f"mats[{i}] (n={n}): eigenvalues"
        recon = (q64 * w64) @ q64.mT
        assert (recon - a64).abs().max().item() <= tol * norm, f"mats[{i}] (n={n}): Q diag(lam) Q^T != A"
        eye = torch.eye(n, dtype=torch.float64)
        assert (q64.mT @ q64 - eye).abs().max().item() <= tol, f"mats[{i}] (n={n}): Q^T Q != I"


def _run_eigh(mats):
    values, vectors, info = OPS.batched_eigh(mats)
    assert info.dtype == torch.int32 and info.shape == (len(mats),) and info.device == mats[0].device
    assert info.cpu().eq(0).all(), info
    return values, vectors


# ---- batched_eigh ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_sizes_and_dtypes_one_call(device):
    # Sizes across the syevj (<= 32) / batched syev (> 32) boundary, repeated sizes form groups.
    sizes = [1, 2, 3, 17, 31, 32, 33, 64, 123, 3, 17, 256, 600]
    mats = [_sym(n, DTYPES[k % 2], device) for k, n in enumerate(sizes)]
    mats += [_sym(n, torch.float32, device) for n in (17, 64)]  # same size, other dtype
    originals = [m.clone() for m in mats]
    values, vectors = _run_eigh(mats)
    _check_eigh(mats, values, vectors)
    for m, o in zip(mats, originals):
        assert torch.equal(m, o), "an input was written"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_wrapper_matches_float64_lapack(device, dtype):
    mats = [_sym(n, dtype, device) for n in (5, 40, 5)]
    values, vectors = _extension.batched_eigh(mats)
    _check_eigh(mats, values, vectors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ill_conditioned(device, dtype):
    n = 80
    spectra = [
        torch.logspace(0, -12, n),  # condition number 1e12
        torch.logspace(0, -12, 20),  # on the syevj path too
        -torch.logspace(3, -9, n),
    ]
    mats = [_sym(len(s), dtype, device, s) for s in spectra]
    _check_eigh(mats, *_run_eigh(mats))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_and_repeated(device, dtype):
    rank_def = []
    for n, r in ((50, 7), (24, 3)):
        x = torch.randn(n, r, dtype=torch.float64)
        rank_def.append((x @ x.mT).to(device=device, dtype=dtype))
    repeated = [
        _sym(60, dtype, device, torch.tensor([1.0] * 30 + [2.0] * 20 + [-3.0] * 10)),
        _sym(16, dtype, device, torch.full((16,), 4.0)),
        4 * torch.eye(40, dtype=dtype, device=device),
        torch.zeros(33, 33, dtype=dtype, device=device),
        torch.ones(10, 10, dtype=dtype, device=device),
    ]
    mats = rank_def + repeated
    _check_eigh(mats, *_run_eigh(mats))


@pytest.mark.parametrize("device", DEVICES)
def test_lower_triangle_only(device):
    # Like torch.linalg.eigh(UPLO='L'): the strict upper triangle is never read.
    a = _sym(37, torch.float64, device)
    b = a.tril() + 5 * torch.rand_like(a).triu(1)
    # b's decomposition is a's, within _check_eigh's float64 bounds (one call on both, but the
    # CUDA batch may not be bitwise alike at different offsets)
    _check_eigh([a, a], *_run_eigh([a, b]))


@pytest.mark.parametrize("device", DEVICES)
def test_many_matrices_per_group(device):
    # More than 64 matrices of one size: the CUDA copy-out kernels take 64 per launch.
    mats = [_sym(n, torch.float32, device) for n in [4] * 70 + [34] * 66]
    _check_eigh(mats, *_run_eigh(mats))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = _sym(48, torch.float64, device)
    big = torch.zeros(96, 96, dtype=torch.float64, device=device)
    big[::2, ::2] = base
    mats = [base.mT, big[::2, ::2], base.to(torch.float32).t()]
    _check_eigh(mats, *_run_eigh(mats))


@pytest.mark.parametrize("device", DEVICES)
def test_retry_paths(device, monkeypatch):
    # The test hook PRONG_EXT_DEBUG_EIGH_FAIL (csrc/eigh_common.h) simulates non-convergence.
    mats = [_sym(n, torch.float32, device) for n in (5, 40, 40, 12)]
    # 1 and 3 fail their float32 attempt (CUDA: every GPU attempt): retried in float64 / on the CPU.
    monkeypatch.setenv("PRONG_EXT_DEBUG_EIGH_FAIL", "1,3")
    _check_eigh(mats, *_run_eigh(mats))
    # 2 fails everywhere: info says so, its eigenpairs are NaN, the others are right.
    monkeypatch.setenv("PRONG_EXT_DEBUG_EIGH_FAIL", "2:all")
    values, vectors, info = OPS.batched_eigh(mats)
    assert info.device == mats[0].device and info.cpu().tolist() == [0, 0, 1, 0]
    assert values[2].isnan().all() and vectors[2].isnan().all()
    keep = [0, 1, 3]
    _check_eigh([mats[i] for i in keep], [values[i] for i in keep], [vectors[i] for i in keep])
    with pytest.raises(torch.linalg.LinAlgError, match=r"mats\[2\] did not converge"):
        _extension.batched_eigh(mats)
    with pytest.raises(RuntimeError, match=r"covs\[2\] did not converge"):
        _extension.whitening(mats, 1e-2, "pca")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["batched_eigh", "whitening"])
def test_nan_inf_raise_naming_indices_and_write_nothing(device, op):
    mats = [_sym(n, torch.float32, device) for n in (3, 40, 5, 40, 7)]
    mats[1][2, 3] = float("nan")
    mats[3][0, 0] = float("inf")
    originals = [m.clone() for m in mats]
    with pytest.raises(ValueError, match=r"NaN or Inf in (mats|covs)\[1, 3\]"):
        if op == "batched_eigh":
            _extension.batched_eigh(mats)
        else:
            _extension.whitening(mats, 1e-3, "pca")
    for m, o in zip(mats, originals):
        assert torch.equal(m.isnan(), o.isnan()) and torch.equal(m.nan_to_num(), o.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    good = _sym(4, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"mats\[1\] must be a square"):
        OPS.batched_eigh([good, torch.zeros(3, 4, device=device)])
    with pytest.raises(RuntimeError, match=r"mats\[0\] must be float32 or float64"):
        OPS.batched_eigh([good.to(torch.float16)])
    with pytest.raises(RuntimeError, match="no tensor arguments|at least one matrix"):
        OPS.batched_eigh([])
    assert _extension.batched_eigh([]) == ([], [])
    with pytest.raises(ValueError, match=r"eps=0 must be > 0"):
        OPS.whitening([good], 0.0, "pca")
    with pytest.raises(ValueError, match=r"kind='pcaa' must be 'pca' or 'zca'"):
        OPS.whitening([good], 1e-3, "pcaa")


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA")
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="on one device"):
        OPS.batched_eigh([torch.eye(3, device="cuda"), torch.eye(3)])


# ---- whitening ------------------------------------------------------------------------------


def _cov(n, dtype, device, rank=None):
    r = rank or n
    x = torch.randn(4 * n, r, dtype=torch.float64) @ torch.randn(r, n, dtype=torch.float64) / math.sqrt(r)
    x = x - x.mean(0)
    return (x.mT @ x / x.shape[0]).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_whitening_identities(device, dtype, kind):
    eps = 1e-2
    covs = [_cov(n, dtype, device) for n in (1, 3, 20, 45, 20)] + [_cov(50, dtype, device, rank=5)]
    u_list, u_inv_list = _extension.whitening(covs, eps, kind)
    assert len(u_list) == len(u_inv_list) == len(covs)
    for i, (s, u, u_inv) in enumerate(zip(covs, u_list, u_inv_list)):
        n = s.shape[0]
        assert u.shape == u_inv.shape == (n, n) and u.dtype == u_inv.dtype == dtype and u.device == s.device
        assert u.is_contiguous() and u_inv.is_contiguous()
        s64, u64, ui64 = s.cpu().double(), u.cpu().double(), u_inv.cpu().double()
        lam, q = torch.linalg.eigh(s64)
        lam = lam.clamp_min(0)
        target = torch.diag(lam / (lam + eps))
        if kind == "zca":
            target = q @ target @ q.mT
            u_ref = (q * (lam + eps).rsqrt()) @ q.mT
        # Errors grow with the condition number of Sigma + eps I; observed well below this bound.
        tol = _tol(dtype, n) * math.sqrt(1 + lam.max().item() / eps)
        if kind == "zca":
            assert (u64 - u_ref).abs().max().item() <= tol * u_ref.abs().max().item(), f"covs[{i}]: U"
        assert (u64 @ s64 @ u64.mT - target).abs().max().item() <= tol, f"covs[{i}]: U Sigma U^T"
        eye = torch.eye(n, dtype=torch.float64)
        assert (u64 @ ui64 - eye).abs().max().item() <= tol, f"covs[{i}]: U U^-1"
        assert (ui64 @ u64 - eye).abs().max().item() <= tol, f"covs[{i}]: U^-1 U"


@pytest.mark.parametrize("device", DEVICES)
def test_whitening_clamps_negative_eigenvalues(device):
    lam = torch.tensor([-1e-3, 0.0, 1.0, 4.0])
    s = _sym(4, torch.float64, device, lam)
    eps = 0.5
    (u,), (u_inv,) = _extension.whitening([s], eps, "pca")
    lam_c = lam.clamp_min(0).double()
    # float64: s's eigenvalues are lam within 2 _tol ||s|| (the eigensolver's bound, and the
    # rounding of building s); (lam + eps)^(-1/2) and (lam + eps)^(1/2) move them at most
    # eps^(-3/2) / 2 and eps^(-1/2) / 2 times as much (the clamp at 0 is 1-Lipschitz); svdvals
    # adds _tol times the matrix's norm
    t = _tol(torch.float64, 4)
    lam_err = 2 * t * lam.abs().max().item()
    torch.testing.assert_close(
        torch.linalg.svdvals(u.cpu()).sort().values,
        (lam_c + eps).rsqrt().sort().values,
        rtol=0,
        atol=lam_err * eps**-1.5 / 2 + t * eps**-0.5,
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(u_inv.cpu()).sort().values,
        (lam_c + eps).sqrt().sort().values,
        rtol=0,
        atol=lam_err * eps**-0.5 / 2 + t * (lam.max().item() + eps) ** 0.5,
    )


# ---- torch.library contract -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    mats = [_sym(n, dt, device) for n, dt in ((3, torch.float32), (9, torch.float64), (3, torch.float32))]
    covs = [_cov(n, torch.float32, device) for n in (4, 6)]
    torch.library.opcheck(OPS.batched_eigh.default, (mats,))
    torch.library.opcheck(OPS.whitening.default, (covs, 1e-3, "pca"))
    torch.library.opcheck(OPS.whitening.default, (covs, 1e-3, "zca"))


def test_torch_compile_fullgraph():
    covs = [_cov(n, torch.float32, "cpu") for n in (4, 6)]

    def f(covs):
        values, _ = _extension.batched_eigh(covs)
        u, u_inv = _extension.whitening(covs, 1e-3, "zca")
        return [v.sum() for v in values], u, u_inv

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(covs), f(covs)):
        # bitwise: the graph calls the same ops (LAPACK on the CPU) on the same matrices
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- CUDA specifics -------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA")
def test_cuda_syevd_fallback_path(monkeypatch):
    # Per-matrix syevd on side streams, the path for cuSOLVER without cusolverDnXsyevBatched.
    monkeypatch.setenv("PRONG_EXT_NO_XSYEV_BATCHED", "1")
    mats = [_sym(n, dt, "cuda") for n, dt in ((40, torch.float32), (40, torch.float32), (100, torch.float64))]
    mats += [_sym(40, torch.float32, "cuda") for _ in range(6)]
    _check_eigh(mats, *_run_eigh(mats))


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA")
def test_cuda_runs_on_current_stream():
    mats = [_sym(n, torch.float32, "cuda") for n in (8, 70, 300)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        values, vectors = _run_eigh(mats)
        u, u_inv = _extension.whitening(mats, 1e-2, "zca")
    torch.cuda.current_stream().wait_stream(stream)
    _check_eigh(mats, values, vectors)
    ref_u, _ = _extension.whitening(mats, 1e-2, "zca")
    # not bitwise (bmm on another stream may take another kernel): both are the float64 ZCA
    # matrix within the bound test_whitening_identities puts on it
    for m, a, b in zip(mats, u, ref_u):
        lam, q = torch.linalg.eigh(m.cpu().double())
        lam = lam.clamp_min(0)
        u_ref = (q * (lam + 1e-2).rsqrt()) @ q.mT
        tol = _tol(m.dtype, m.shape[0]) * math.sqrt(1 + lam.max().item() / 1e-2) * u_ref.abs().max().item()
        for got in (a, b):
            assert (got.cpu().double() - u_ref).abs().max().item() <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA")
def test_cuda_matches_cpu_whitening():
    covs = [_cov(n, torch.float64, "cpu") for n in (3, 33, 64)]
    for kind in ("pca", "zca"):
        u_cpu, ui_cpu = _extension.whitening(covs, 1e-3, kind)
        u_gpu, ui_gpu = _extension.whitening([c.cuda() for c in covs], 1e-3, kind)
        for s, a, b, c, d in zip(covs, u_cpu, u_gpu, ui_cpu, ui_gpu):
            # PCA rows are defined up to sign: compare U^T U = (Sigma + eps)^-1 and
            # U^-1 U^-T = Sigma + eps, which are not. Float64, each side within the eigensolver's
            # backward error _tol ||Sigma|| (grown by ||(Sigma + eps)^-1||^2 for the inverse)
            # plus the roundings of U and of the n-term products, (n + 2) n u in units of the
            # result's norm
            n, lam = s.shape[0], torch.linalg.eigvalsh(s)
            norm, low = lam.abs().max().item(), lam.clamp_min(0).min().item() + 1e-3
            t, r = _tol(torch.float64, n), (n + 2) * n * torch.finfo(torch.float64).eps / 2
            inv_tol = 2 * (t * norm / low**2 + r / low)
            torch.testing.assert_close(a.mT @ a, (b.mT @ b).cpu(), rtol=0, atol=inv_tol)
            torch.testing.assert_close(c @ c.mT, (d @ d.mT).cpu(), rtol=0, atol=2 * (t + r) * (norm + 1e-3))


def test_cusolver_info():
    info = _extension.cusolver_info()
    if not _extension.cuda_built():
        assert info is None
    else:
        build, runtime, batched = info
        assert build >= 11000 and runtime >= 11000 and isinstance(batched, bool)
