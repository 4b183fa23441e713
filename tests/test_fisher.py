"""The exact Fisher block of prong_ext.experiments.fisher against a per-sample autograd loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

import prong_ext
from prong_ext.experiments import fisher


def reference_fisher(model, param, x, extra=None):
    """F = 1/N sum_n sum_y p(y|x_n) g g^T, g = d log p(y|x_n) / d param, one sample at a time."""
    params = [param] + ([extra] if extra is not None else [])
    total = None
    for n in range(x.shape[0]):
        logp = F.log_softmax(model(x[n : n + 1]).double(), dim=-1)[0]
        for y in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[y], params, retain_graph=True)
            g = torch.cat([gr.double().flatten() for gr in grads])
            term = logp[y].exp().detach() * torch.outer(g, g)
            total = term if total is None else total + term
    return total / x.shape[0]


def tiny_mlp(batchnorm=False):
    torch.manual_seed(1)
    return fisher.build_mlp(5, 4, 2, 3, batchnorm).double()


@pytest.mark.parametrize("layer_index", [0, 1, 2])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_plain_layers(layer_index, batchnorm):
    model = tiny_mlp(batchnorm)
    x = torch.randn(7, 5, dtype=torch.float64)
    if batchnorm:  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(x * 3 + 1)
    model.eval()
    layer = fisher.linear_layers(model)[layer_index]
    got = fisher.exact_fisher(model, layer, x, chunk=3)
    want = reference_fisher(model, layer.weight, x)
    assert got.shape == (layer.weight.numel(),) * 2
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_b = fisher.exact_fisher(model, layer, x, include_bias=True)
    torch.testing.assert_close(
        got_b, reference_fisher(model, layer.weight, x, layer.bias), rtol=1e-10, atol=1e-12
    )


def whitened_copy(model, x):
    white = prong_ext.whiten(copy.deepcopy(model))
    prong = prong_ext.Prong(white, None, num_samples=x.shape[0], eps=1e-2)
    prong.reparametrize(x)
    white.eval()
    return white


@pytest.mark.parametrize("layer_index", [0, 1])
def test_whitened_layer_native_and_canonical(layer_index):
    model = tiny_mlp().float()
    x = torch.randn(9, 5) * torch.tensor([3.0, 0.1, 1.0, 2.0, 0.5]) + 2.0
    white = whitened_copy(model, x)
    layer = fisher.linear_layers(white)[layer_index]
    assert isinstance(layer, prong_ext.WhitenedLinear)
    assert not torch.allclose(layer.U, torch.eye(layer.U.shape[0]))  # really whitened
    # native coordinates: the gradient w.r.t. V
    got = fisher.exact_fisher(white, layer, x)
    want = reference_fisher(white, layer.V, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # canonical coordinates: equal to the Fisher of the plain network w.r.t. W
    model.eval()
    plain = reference_fisher(model, fisher.linear_layers(model)[layer_index].weight, x)
    torch.testing.assert_close(
        fisher.exact_fisher(white, layer, x, coords="canonical"), plain, rtol=1e-3, atol=1e-6
    )
    # and the two differ: whitening changes the metric
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()


def test_condition_number():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([1.0, 2.0, 5.0, 50.0], dtype=torch.float64)) @ q.T
    cond, lam = fisher.condition_number(m)
    assert cond == pytest.approx(50.0, rel=1e-10)
    torch.testing.assert_close(lam, torch.tensor([1.0, 2.0, 5.0, 50.0], dtype=torch.float64))
    cond, _ = fisher.condition_number(torch.zeros(3, 3))
    assert cond == float("inf")
