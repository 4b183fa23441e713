"""Device-to-host syncs of Prong's re-whitening and rescaling: a fixed number, whatever the number
of layers and of blocks (a depthwise conv has one block per channel), where the finiteness checks
took one or two per matrix. Counted on the CPU as the Python-level reads of tensor values (bool(),
.item(), .tolist(), int(), float()), each of which waits for the device on CUDA."""

import pytest
import torch
from torch import nn

from helpers import data
from prong_ext import Prong, ops, whiten

READS = ("__bool__", "__int__", "__float__", "item", "tolist")


def _reads(monkeypatch, fn) -> int:
    """How many tensor values fn reads on the host."""
    count = 0
    with monkeypatch.context() as m:
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counting(self, *args, _real=real, **kwargs):
                nonlocal count
                count += 1
                return _real(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counting)
        fn()
    return count


def _depthwise(channels):
    return whiten(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.Flatten()))


def _linears(layers):
    return whiten(nn.Sequential(*[nn.Linear(6, 6) for _ in range(layers)]))


def _rewhitening_reads(monkeypatch, model, shape, **kwargs):
    prong = Prong(model, num_samples=16, **kwargs)
    x = data(shape, n=16)
    prong.reparametrize(x)  # a first time outside the count: U != I, c != 0
    return _reads(monkeypatch, lambda: prong.reparametrize(x))


def test_rewhitening_reads_do_not_grow_with_blocks(monkeypatch):
    few = _rewhitening_reads(monkeypatch, _depthwise(4), (4, 5, 5))
    many = _rewhitening_reads(monkeypatch, _depthwise(48), (48, 5, 5))
    assert few == many <= 6, (few, many)


def test_rewhitening_reads_do_not_grow_with_layers(monkeypatch):
    few = _rewhitening_reads(monkeypatch, _linears(1), (6,))
    many = _rewhitening_reads(monkeypatch, _linears(8), (6,))
    assert few == many <= 6, (few, many)


def test_rescaling_reads_do_not_grow_with_layers(monkeypatch):
    counts = []
    for layers in (1, 8):
        model = _linears(layers)
        prong = Prong(model, interval=100, num_samples=16, rescale=True)
        x = data((6,), n=16)
        prong.reparametrize(x)
        model(x)
        prong.step()  # the first step re-whitens (reparametrize did already): now it rescales
        model(x)
        counts.append(_reads(monkeypatch, prong.step))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("where", ["statistics", "results", "parameters"])
def test_a_non_finite_block_is_still_named(monkeypatch, where):
    """With one check for all, the layer holding the non-finite value is the one named (the
    retry and keep-the-layer paths are tests/test_robustness.py's)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=4))
    model = whiten(model)
    prong = Prong(model, num_samples=16)
    x = data((8, 5, 5), n=16)
    if where == "statistics":
        x = x.clone()
        x[3, 5, 2, 2] = float("nan")  # channel 5: a block of layer 0 only (layer 1 sees ReLU(NaN))
        with pytest.raises(ValueError, match=r"non-finite input statistics .*\['0', '2'\]"):
            prong.reparametrize(x)
        return
    if where == "results":  # block 6 of layer 0 stays NaN, also when retried: the layer is kept
        real = ops.whitening

        def fake(mats, eps, kind="pca", *, backend="auto"):
            us, u_invs = real(mats, eps, kind, backend=backend)
            us = list(us)
            hit = 6 if backend != "torch" else 0
            if len(us) > hit:
                us[hit] = torch.full_like(us[hit], float("nan"))
            return us, u_invs

        monkeypatch.setattr(ops, "whitening", fake)
        before = model[0].U.clone()
        with pytest.warns(UserWarning, match=r"failed for layer\(s\) \['0'\]"):
            prong.reparametrize(x)
        assert torch.equal(model[0].U, before) and not torch.equal(model[2].U, torch.eye(2).expand(4, 2, 2))
        return
    real_project = Prong._project

    def project(layer, mean, u, u_inv):  # layer 2's new V overflows
        new, old = real_project(layer, mean, u, u_inv)
        if layer is model[2]:
            new["V"] = new["V"].clone()
            new["V"][1, 0, 0, 0] = float("inf")
        return new, old

    monkeypatch.setattr(Prong, "_project", staticmethod(project))
    with pytest.raises(ValueError, match=r"non-finite parameters for layer\(s\) \['2'\]"):
        prong.reparametrize(x)
