"""The exact Fisher block of prong_ext.experiments.fisher against a per-sample autograd loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

import prong_ext
from helpers import RoundingBound, assert_within, gamma, unit_roundoff
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


def fisher_bound(model, layer, x, dtype, coords="native", include_bias=False):
    """Elementwise bound on the rounding error of the Fisher block F = 1/N sum p g g^T when the
    network runs in `dtype` (exact_fisher's or the autograd loop's; the sums over samples and
    classes are float64 in both).

    The logits z and the gradient at the layer's output, delta, come with helpers.RoundingBound's
    bounds: z within E, so p = softmax(z) within p (e^(2 max E) - 1); delta from the gradient
    e_y - p, off by p's error and, cast to `dtype`, one rounding. The layer's input h within its
    bound E_h gives a = U (h - c) (native coordinates of a whitened layer, n_in + 2 roundings if
    computed in `dtype`) or a = h; g = delta a^T rounds once more. First order in the errors,
    F is then off by 1/N sum |p' - p| |g| |g|^T + p (E_g |g|^T + |g| E_g^T), plus the float64
    sums over the N C terms, gamma_(N C + 3) of their sizes."""
    modules, u = list(model), unit_roundoff(dtype)
    bound = RoundingBound(modules, x, dtype)
    i = modules.index(layer)
    _, h, h_err, _, _ = bound.records[i]
    if coords == "native" and hasattr(layer, "U"):
        U, c = layer.U.double(), layer.c.double()
        a = (h - c) @ U.T
        a_err = (h_err + gamma(U.shape[0] + 2, dtype) * (h.abs() + c.abs())) @ U.abs().T
    else:
        a, a_err = h, h_err
    logits, logits_err = bound.out, bound.err
    p = logits.softmax(-1)
    p_err = p * (torch.expm1(2 * logits_err.amax(-1, keepdim=True)) + 4 * unit_roundoff(torch.float64))
    total = err = 0
    for y in range(p.shape[1]):
        start = F.one_hot(torch.tensor(y), p.shape[1]).double() - p
        bound.backward(start, p_err + u * start.abs())
        delta, delta_err = bound.output_grads[i]
        g = (delta[:, :, None] * a[:, None, :]).flatten(1)
        g_err = delta_err[:, :, None] * a.abs()[:, None, :] + delta.abs()[:, :, None] * a_err[:, None, :]
        g_err = g_err.flatten(1) + u * g.abs()
        if include_bias:
            g, g_err = torch.cat([g, delta], 1), torch.cat([g_err, delta_err], 1)
        py, py_err, g_abs = p[:, y, None], p_err[:, y, None], g.abs()
        total = total + (py * g_abs).T @ g_abs
        err = err + (py_err * g_abs).T @ g_abs + (py * g_err).T @ g_abs + (py * g_abs).T @ g_err
    n = x.shape[0]
    return (err + gamma(n * p.shape[1] + 3, torch.float64) * total) / n


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
    # two float64 computations, each within fisher_bound
    assert_within(got, want, 2 * fisher_bound(model, layer, x, torch.float64), "F")
    got_b = fisher.exact_fisher(model, layer, x, include_bias=True)
    want_b = reference_fisher(model, layer.weight, x, layer.bias)
    assert_within(got_b, want_b, 2 * fisher_bound(model, layer, x, torch.float64, include_bias=True), "F")


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
    # The references run in float64 on the same (float32) parameters: exact_fisher's float32
    # network is within fisher_bound in float32, the references within it in float64.
    white64, x64 = copy.deepcopy(white).double(), x.double()
    layer64 = fisher.linear_layers(white64)[layer_index]

    def bound(coords):
        return fisher_bound(white, layer, x, torch.float32, coords) + fisher_bound(
            white64, layer64, x64, torch.float64, coords
        )

    # native coordinates: the gradient w.r.t. V
    got = fisher.exact_fisher(white, layer, x)
    assert_within(got, reference_fisher(white64, layer64.V, x64), bound("native"), "native F")
    # canonical coordinates: equal to the Fisher of the plain network w.r.t. W; of the plain
    # network with the whitened one's W = V U, b = d - W c, which are the plain network's W and b
    # up to the float32 rounding of V, U, c and d (and the float64 projection, less than one)
    model.eval()
    plain64 = copy.deepcopy(model).double()
    layers = zip(fisher.linear_layers(plain64), fisher.linear_layers(white64), fisher.linear_layers(model))
    for mine, theirs, w in layers:
        with torch.no_grad():
            mine.weight.copy_(theirs.V @ theirs.U)
            mine.bias.copy_(theirs.d - mine.weight @ theirs.c)
        vu = theirs.V.abs() @ theirs.U.abs()
        assert_within(mine.weight, w.weight, gamma(4) * vu, "W")
        assert_within(mine.bias, w.bias, gamma(4) * (theirs.d.abs() + vu @ theirs.c.abs()), "b")
    plain = reference_fisher(plain64, fisher.linear_layers(plain64)[layer_index].weight, x64)
    got_canonical = fisher.exact_fisher(white, layer, x, coords="canonical")
    assert_within(got_canonical, plain, bound("canonical"), "canonical F")
    # and the two differ: whitening changes the metric
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()


def test_condition_number():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    m = q @ torch.diag(torch.tensor([1.0, 2.0, 5.0, 50.0], dtype=torch.float64)) @ q.T
    cond, lam = fisher.condition_number(m)
    # float64: building m rounds within gamma_5 n ||m|| (2-norm), the eigensolver adds its
    # backward error 32 eps sqrt(n) ||m|| (test_extension's bound); ||m|| = 50, n = 4
    u = unit_roundoff(torch.float64)
    lam_err = (4 * gamma(5, torch.float64) + 64 * u * 2) * 50.0
    assert abs(cond - 50.0) <= 50.0 * (lam_err / 1.0 + lam_err / 50.0 + 2 * u)
    want = torch.tensor([1.0, 2.0, 5.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(lam, want, rtol=0, atol=lam_err)
    cond, _ = fisher.condition_number(torch.zeros(3, 3))
    assert cond == float("inf")
