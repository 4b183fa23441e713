"""Which path CUDA tensors take, checked on the CPU where possible.

- A compiled `_C` without CUDA kernels never receives CUDA tensors: backend='auto' takes the torch
  path and says so once, backend='extension' raises naming the problem and the rebuild command.
  Tested here by making ops' device test (`ops._is_cuda`) report CPU tensors as CUDA ones, with
  `_extension.cuda_built` set either way, so the CPU `_C` stands in for both builds.
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
