"""Which path CUDA tensors take, checked on the CPU where possible.

- A compiled `_C` without CUDA kernels never receives CUDA tensors: backend='auto' takes the torch
  path and says so once, backend='extension' raises naming the problem and the rebuild command.
  Tested here by making ops' device test (`ops._is_cuda`) report CPU tensors as CUDA ones, with
  `_extension.cuda_built` set either way, so the CPU `_C` stands in for both builds.
- Batched cuSOLVER calls address their batch with 32-bit ints: `_C.batch_chunk` (the pure
  function csrc/cuda/eigh_cuda.cpp splits batches with) keeps n * n * count <= INT32_MAX; on a GPU
  a lowered limit (the test hook PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS) splits small batches.
The tests marked `cuda` run the same paths on a GPU.
"""

import copy
import warnings

import pytest
import torch

from helpers import F64_TOL, MODELS, data
from prong_ext import Prong, _extension, ops, whiten

needs_c = pytest.mark.skipif(_extension._C is None, reason="prong_ext._C is not built")


def _covs(device="cpu"):
    g = torch.Generator().manual_seed(4)
    out = []
    for n in (3, 5, 3):
        a = torch.randn(2 * n, n, dtype=torch.float64, generator=g)
        out.append((a.T @ a / (2 * n)).to(device))
    return out


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors look like CUDA tensors to ops' dispatch; the 'CUDA built' flag of `_C` is
    whatever the test sets (False unless it sets it); the extension's calls are recorded and the
    once-only warning is re-armed."""
    monkeypatch.setattr(ops, "_is_cuda", lambda t: True)
    monkeypatch.setattr(_extension, "cuda_built", lambda: False)
    monkeypatch.setattr(_extension, "_warned_no_cuda", False)
    calls = []
    for name in ("batched_eigh", "whitening"):
        real = getattr(_extension, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_extension, name, spy)
    return calls


def _no_cuda_warnings(caught):
    return [w for w in caught if "built without CUDA" in str(w.message)]


@needs_c
def test_auto_takes_the_torch_path_for_cuda_tensors_and_says_so_once(fake_cuda):
    covs = _covs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u, u_inv = ops.whitening(covs, 1e-2, "zca")
        values, vectors = ops.batched_eigh(covs)
        ops.whitening(covs, 1e-2)
    assert fake_cuda == []
    said = _no_cuda_warnings(caught)
    assert len(said) == 1, [str(w.message) for w in caught]
    message = str(said[0].message)
    assert "CPU kernels only" in message and "pip install --no-build-isolation" in message
    assert "torch path" in message
    # the torch path's results, bitwise
    ref_u, ref_u_inv = ops.whitening(covs, 1e-2, "zca", backend="torch")
    ref_values, ref_vectors = ops.batched_eigh(covs, backend="torch")
    for got, want in zip(u + u_inv + values + vectors, ref_u + ref_u_inv + ref_values + ref_vectors):
        assert torch.equal(got, want)


@needs_c
@pytest.mark.parametrize("op", ["whitening", "batched_eigh"])
def test_extension_backend_raises_for_cuda_tensors_without_cuda_kernels(fake_cuda, op):
    args = (_covs(), 1e-2) if op == "whitening" else (_covs(),)
    with pytest.raises(RuntimeError) as info:
        getattr(ops, op)(*args, backend="extension")
    message = str(info.value)
    assert "backend='extension' got CUDA tensors" in message
    assert "built without CUDA" in message
    rebuild = 'TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .'
    assert rebuild in message
    assert fake_cuda == []


@needs_c
def test_a_cuda_built_extension_takes_cuda_tensors(fake_cuda, monkeypatch):
    monkeypatch.setattr(_extension, "cuda_built", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.whitening(_covs(), 1e-2)
        ops.batched_eigh(_covs(), backend="extension")
    assert fake_cuda == ["whitening", "batched_eigh"]
    assert not _no_cuda_warnings(caught)


@needs_c
def test_cpu_tensors_take_the_extension(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_built", lambda: False)
    calls = []
    real = _extension.whitening
    monkeypatch.setattr(_extension, "whitening", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.whitening(_covs(), 1e-2)
    assert calls == [1] and not _no_cuda_warnings(caught)


@needs_c
def test_prong_on_cuda_tensors_without_cuda_kernels_whitens_on_the_torch_path(fake_cuda, monkeypatch):
    """One batched call on the torch path: no failed extension call retried matrix by matrix."""
    build, shape = MODELS["grouped_cnn"]
    model = whiten(build())
    twin = copy.deepcopy(model)
    x = data(shape, n=32)
    seen = []
    real = ops.whitening

    def recording(mats, eps, kind="pca", *, backend="auto"):
        seen.append((backend, len(list(mats))))
        return real(mats, eps, kind, backend=backend)

    monkeypatch.setattr(ops, "whitening", recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prong = Prong(model, num_samples=32)
        prong.reparametrize(x)
        prong.reparametrize(x)
    assert fake_cuda == []
    assert len(_no_cuda_warnings(caught)) == 1
    assert [backend for backend, _ in seen] == ["auto", "auto"]  # no per-matrix retries

    monkeypatch.setattr(ops, "_use_extension", lambda backend, tensors: False)  # the torch path
    twin_prong = Prong(twin, num_samples=32)
    twin_prong.reparametrize(x)
    twin_prong.reparametrize(x)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.cuda
def test_cuda_tensors_take_a_path_with_kernels():
    covs = _covs("cuda")
    ref_u, _ = ops.whitening([c.cpu() for c in covs], 1e-2, "zca", backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u, _ = ops.whitening(covs, 1e-2, "zca")
    for got, want in zip(u, ref_u):
        torch.testing.assert_close(got.cpu(), want, **F64_TOL)
    if _extension._C is None:
        return
    if _extension.cuda_built():
        ops.whitening(covs, 1e-2, backend="extension")
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            ops.whitening(covs, 1e-2, backend="extension")


# ---- batched cuSOLVER calls in chunks ---------------------------------------------------------

INT32_MAX = 2**31 - 1
needs_batch_chunk = pytest.mark.skipif(
    not hasattr(_extension._C, "batch_chunk"), reason="prong_ext._C is not built, or built before batch_chunk"
)


@needs_batch_chunk
def test_batch_chunk_keeps_every_call_within_int32(monkeypatch):
    """Matrices per batched cuSOLVER call: n * n * count <= INT32_MAX, as many as that allows."""
    monkeypatch.delenv("PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS", raising=False)
    chunk = _extension._C.batch_chunk
    for n in (2, 32, 33, 100, 1000, 46340):
        count = chunk(n, 10**12)
        assert count * n * n <= INT32_MAX < (count + 1) * n * n, n
        assert chunk(n, 10**12) == chunk(n, 10**12, INT32_MAX)
        assert chunk(n, count - 1) == count - 1 and chunk(n, 0) == 0
    assert chunk(33, 10**7) == 1971977  # a depthwise-like batch of 10^7 33 x 33 blocks: 6 calls
    assert chunk(0, 5) == 5
    assert chunk(46341, 1) == 0  # one matrix alone passes 2^31 elements
    assert chunk(10, 100, 350) == 3 and chunk(10, 100, 99) == 0
    with pytest.raises(ValueError, match="non-negative"):
        chunk(-1, 3)


@needs_batch_chunk
def test_batch_chunk_test_hook(monkeypatch):
    monkeypatch.setenv("PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS", str(4 * 33 * 33 + 5))
    assert _extension._C.batch_chunk(33, 10) == 4
    assert _extension._C.batch_chunk(33, 10, INT32_MAX) == 10  # an explicit limit wins
    monkeypatch.setenv("PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS", "many")
    with pytest.raises(ValueError, match="expected a positive integer"):
        _extension._C.batch_chunk(33, 10)


def _sym_batch(n, count, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(count, n, n, dtype=torch.float64, generator=g)
    return list(((a + a.mT) / 2).to(dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not _extension.cuda_built(), reason="prong_ext._C built without CUDA")
@pytest.mark.parametrize("batched_syev", [True, False], ids=["xsyev_batched", "syevd"])
def test_cuda_batched_solvers_in_chunks(monkeypatch, batched_syev):
    """The limit lowered to 3 * 33 * 33 elements: 60 8 x 8 matrices go in two syevjBatched calls
    (51 + 9), 10 33 x 33 ones in four XsyevBatched calls (3 + 3 + 3 + 1) and 5 40 x 40 float64
    ones in three (2 + 2 + 1), each chunk size with its own buffer query."""
    monkeypatch.setenv("PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS", str(3 * 33 * 33))
    if not batched_syev:
        monkeypatch.setenv("PRONG_EXT_NO_XSYEV_BATCHED", "1")
    assert _extension._C.batch_chunk(8, 60) == 51 and _extension._C.batch_chunk(33, 10) == 3
    mats = _sym_batch(8, 60, torch.float32, 1) + _sym_batch(33, 10, torch.float32, 2)
    mats += _sym_batch(40, 5, torch.float64, 3)
    values, vectors = _extension.batched_eigh([m.cuda() for m in mats])
    for i, (a, w, q) in enumerate(zip(mats, values, vectors)):
        a64, w64, q64 = a.double(), w.cpu().double(), q.cpu().double()
        n = a.shape[0]
        tol = 32 * torch.finfo(a.dtype).eps * n**0.5 * torch.linalg.matrix_norm(a64, 2).item()
        assert (w64 - torch.linalg.eigvalsh(a64)).abs().max().item() <= tol, i
        assert ((q64 * w64) @ q64.mT - a64).abs().max().item() <= tol, i
        eye = torch.eye(n, dtype=torch.float64)
        assert (q64.mT @ q64 - eye).abs().max().item() <= 32 * torch.finfo(a.dtype).eps * n**0.5, i
