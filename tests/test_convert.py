import pytest
import torch
from torch import nn

from helpers import MODELS, data, eval_out, rel
from prong_ext import Prong, WhitenedConv2d, WhitenedLinear, unwhiten, whiten


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whiten_keeps_outputs_and_unwhiten_gives_them_back(name):
    build, shape = MODELS[name]
    model = build()
    x = data(shape)
    before = eval_out(model, x)
    params = {id(p) for p in model.parameters()}
    whiten(model)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert {id(p) for p in model.parameters()} == params  # the same parameter objects
    assert rel(eval_out(model, x), before) <= 1e-6

    Prong(model, interval=1, num_samples=64).reparametrize(x)
    whitened = eval_out(model, x)
    unwhiten(model)
    assert not any(isinstance(m, (WhitenedLinear, WhitenedConv2d)) for m in model.modules())
    assert rel(eval_out(model, x), whitened) <= 1e-5


def test_whiten_single_layer_and_grouped_conv():
    layer = whiten(nn.Linear(3, 2))
    assert isinstance(layer, WhitenedLinear) and layer.groups == 1
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 4, 5, 5)
    before = grouped(x)
    weight = grouped[0].weight
    whiten(grouped)
    assert isinstance(grouped[0], WhitenedConv2d) and isinstance(grouped[1], WhitenedConv2d)
    assert grouped[0].groups == 2 and grouped[0].V is weight
    assert grouped[0].U.shape == (2, 2, 2) and torch.equal(grouped[0].U, torch.eye(2).expand(2, 2, 2))
    assert grouped[0].c.shape == (4,)
    assert torch.equal(grouped(x), before)


def test_whiten_keeps_an_existing_optimizer_working():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    whiten(model)
    before = model[0].V.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].V, before)


def test_unwhiten_preserves_dtype_and_requires_grad():
    layer = WhitenedConv2d(2, 3, 3, bias=False, dtype=torch.float64)
    layer.V.requires_grad_(False)
    plain = unwhiten(layer)
    assert type(plain) is nn.Conv2d and plain.bias is None
    assert plain.weight.dtype == torch.float64 and not plain.weight.requires_grad
