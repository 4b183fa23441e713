"""Grouped convolutions: block-diagonal whitening, one (k, k) block of U per group (k = C_in / G)."""

import pytest
import torch
from torch import nn

from helpers import F64_TOL, tol
from prong_ext import WhitenedConv2d, WhitenedLinear, ops, reference, unwhiten, whiten

F64 = torch.float64


def _blocks(groups, k, dtype=F64):
    """Random well-conditioned U blocks (G, k, k) whose entries are not round numbers."""
    return torch.eye(k, dtype=dtype) + 0.3 * torch.randn(groups, k, k, dtype=dtype)


def _block_diag(U):
    return torch.block_diag(*U)


# --- the fresh layer is nn.Conv2d ---------------------------------------------------------------

FRESH_CASES = [
    (4, 6, 2, {}),
    (6, 6, 3, {"stride": 2, "padding": 1}),
    (3, 3, 3, {"padding": 1, "padding_mode": "reflect"}),  # depthwise
    (4, 8, 4, {"padding": "same", "dilation": 2, "bias": False}),  # depthwise, multiplier 2
    (6, 3, 3, {"padding": 1, "padding_mode": "circular", "stride": (2, 1)}),
    (4, 4, 4, {"padding": (1, 2), "padding_mode": "replicate", "bias": False}),  # depthwise
]


@pytest.mark.parametrize("form", ["fold", "act"])
@pytest.mark.parametrize("c_in,c_out,groups,kwargs", FRESH_CASES)
def test_fresh_grouped_layer_is_nn_conv2d(c_in, c_out, groups, kwargs, form, monkeypatch):
    monkeypatch.setattr(ops, "fold_is_cheaper", lambda *args, **kwargs: form == "fold")
    torch.manual_seed(5)
    plain = nn.Conv2d(c_in, c_out, (3, 2), groups=groups, **kwargs)
    torch.manual_seed(5)
    layer = WhitenedConv2d(c_in, c_out, (3, 2), groups=groups, **kwargs)
    assert layer.V.shape == plain.weight.shape == (c_out, c_in // groups, 3, 2)
    assert torch.equal(layer.V, plain.weight)
    assert (layer.d is None) == (plain.bias is None)
    if plain.bias is not None:
        assert torch.equal(layer.d, plain.bias)
    k = c_in // groups
    assert layer.U.shape == (groups, k, k) and torch.equal(layer.U, torch.eye(k).expand(groups, k, k))
    assert layer.c.shape == (c_in,) and not layer.c.any()
    assert layer.groups == groups and layer.num_features == c_in
    assert f"groups={groups}" in repr(layer)
    W, b = layer.canonical()
    assert torch.equal(W, plain.weight)
    for x in (torch.randn(2, c_in, 9, 7), torch.randn(c_in, 3, 3)):  # batched and unbatched
        assert torch.equal(layer(x), plain(x))


def test_groups_attribute_and_repr():
    assert WhitenedLinear(3, 2).groups == 1 and WhitenedLinear(3, 2).num_features == 3
    plain = WhitenedConv2d(4, 4, 3)
    assert plain.groups == 1 and plain.U.shape == (4, 4) and "groups" not in repr(plain)


# --- random whitening against the oracle, both forms ---------------------------------------------

# (c_in, c_out, groups, kernel, conv kwargs, n, (h, w), form): the fold when C_out * taps <=
# G * N * H * W, else the whitened activations ("act")
ORACLE_CASES = [
    (4, 6, 2, 3, {"padding": 1}, 2, (6, 5), "fold"),
    (6, 9, 3, 3, {"stride": 2, "padding": 2, "dilation": 2}, 2, (7, 6), "fold"),
    (3, 3, 3, 3, {"padding": 1, "padding_mode": "reflect"}, 2, (5, 5), "fold"),  # depthwise
    (4, 32, 2, 3, {"padding": 1}, 1, (2, 2), "act"),
    (6, 24, 3, 2, {"stride": (2, 1), "padding": (0, 1), "padding_mode": "circular"}, 1, (3, 2), "act"),
    (4, 16, 4, 3, {"padding": 1, "padding_mode": "replicate"}, 1, (2, 2), "act"),  # depthwise
]


def _oracle_inputs(c_in, c_out, groups, kernel, n, hw, bias):
    k = c_in // groups
    V = torch.randn(c_out, k, kernel, kernel, dtype=F64, requires_grad=True)
    d = torch.randn(c_out, dtype=F64, requires_grad=True) if bias else None
    U = _blocks(groups, k)
    c = torch.randn(c_in, dtype=F64) if bias else None
    x = torch.randn(n, c_in, *hw, dtype=F64, requires_grad=True)
    return x, V, d, U, c


@pytest.mark.parametrize("case", ORACLE_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_whitened_conv2d_equals_reference(case, bias):
    c_in, c_out, groups, kernel, conv, n, hw, form = case
    x, V, d, U, c = _oracle_inputs(c_in, c_out, groups, kernel, n, hw, bias)
    assert ops.fold_is_cheaper(x, V, groups) == (form == "fold")
    conv = dict(conv)
    padding_mode = conv.pop("padding_mode", "zeros")
    args = (conv.get("stride", 1), conv.get("padding", 0), conv.get("dilation", 1), padding_mode, groups)
    out = ops.whitened_conv2d(x, V, d, U, c, *args)
    c_ref = c if bias else torch.zeros(c_in, dtype=F64)
    ref = reference.whitened_conv2d(x, V, d, U, c_ref, *args)
    torch.testing.assert_close(out, ref, **F64_TOL)
    # the layer agrees with the op
    layer = WhitenedConv2d(c_in, c_out, kernel, groups=groups, bias=bias, padding_mode=padding_mode, **conv)
    layer = layer.double()
    with torch.no_grad():
        layer.V.copy_(V)
        layer.U.copy_(U)
        layer.c.copy_(c_ref)
        if bias:
            layer.d.copy_(d)
    torch.testing.assert_close(layer(x), ref, **F64_TOL)
    inputs = (x, V) if d is None else (x, V, d)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, **F64_TOL)


@pytest.mark.parametrize("form", ["fold", "act"])
def test_grouped_gradcheck(form):
    n, hw = (2, (4, 3)) if form == "fold" else (1, (1, 2))
    x, V, d, U, c = _oracle_inputs(4, 6, 2, 2, n, hw, True)
    assert ops.fold_is_cheaper(x, V, 2) == (form == "fold")

    def f(x, V, d):
        return ops.whitened_conv2d(x, V, d, U, c, 1, 1, 1, "zeros", 2)

    assert torch.autograd.gradcheck(f, (x, V, d))


def test_grouped_fold_gradients_follow_prong_md():
    # g_V[o, j] = sum_i (g_W[o, i] - g_b[o] c_g(o)[i]) U_g(o)[j, i], g_d = g_b, per group
    groups, k, c_out = 3, 2, 6
    V = torch.randn(c_out, k, 3, 3, dtype=F64, requires_grad=True)
    d = torch.randn(c_out, dtype=F64, requires_grad=True)
    U, c = _blocks(groups, k), torch.randn(groups * k, dtype=F64)
    W, b = ops.fold(V, d, U, c)
    gW, gb = torch.randn_like(W), torch.randn_like(b)
    gV, gd = torch.autograd.grad((W, b), (V, d), (gW, gb))
    per = c_out // groups
    for o in range(c_out):
        g = o // per
        a = gW[o] - gb[o] * c[g * k : (g + 1) * k, None, None]
        torch.testing.assert_close(gV[o], torch.einsum("ihw,ji->jhw", a, U[g]), **F64_TOL)
    torch.testing.assert_close(gd, gb, **F64_TOL)


def test_grouped_fold_equals_loops():
    groups, k, c_out = 2, 3, 4
    V = torch.randn(c_out, k, 2, 3, dtype=F64)
    d = torch.randn(c_out, dtype=F64)
    U, c = _blocks(groups, k), torch.randn(groups * k, dtype=F64)
    W, b = ops.fold(V, d, U, c)
    W_none, b_none = ops.fold(V, None, U, c)
    per = c_out // groups
    for o in range(c_out):
        g = o // per
        w = torch.einsum("jhw,ji->ihw", V[o], U[g])
        torch.testing.assert_close(W[o], w, **F64_TOL)
        wc = (w * c[g * k : (g + 1) * k, None, None]).sum()
        torch.testing.assert_close(b[o], d[o] - wc, **F64_TOL)
        torch.testing.assert_close(b_none[o], -wc, **F64_TOL)
    assert torch.equal(W_none, W)


@pytest.mark.parametrize("groups,taps", [(1, ()), (1, (2, 3)), (3, (2, 2))])
def test_reference_fold_forms_equal_loops_and_invert(groups, taps):
    """The oracle's fold and gradient against loops of docs/algorithm.md's formulas; its inverses
    given U^-1 undo them; ops.from_canonical equals reference.from_canonical."""
    k, per = 2, 2
    O = groups * per
    V, gW = torch.randn(O, k, *taps, dtype=F64), torch.randn(O, k, *taps, dtype=F64)
    d, gb = torch.randn(O, dtype=F64), torch.randn(O, dtype=F64)
    U = _blocks(groups, k) if groups > 1 else _blocks(1, k)[0]
    c = torch.randn(groups * k, dtype=F64)
    W, b = reference.fold(V, d, U, c)
    gV, gd = reference.fold_backward(gW, gb, U, c)
    assert gd is gb and reference.fold(V, None, U, None)[1] is None
    for o in range(O):
        u, cg = U.view(groups, k, k)[o // per], c[o // per * k : (o // per + 1) * k]
        w = torch.stack([sum(V[o, j] * u[j, i] for j in range(k)) for i in range(k)])
        torch.testing.assert_close(W[o], w, **F64_TOL)
        torch.testing.assert_close(b[o], d[o] - sum((w[i] * cg[i]).sum() for i in range(k)), **F64_TOL)
        g = torch.stack([sum((gW[o, i] - gb[o] * cg[i]) * u[j, i] for i in range(k)) for j in range(k)])
        torch.testing.assert_close(gV[o], g, **F64_TOL)
    U_inv = torch.linalg.inv(U)
    for got, want in zip(reference.from_canonical(W, b, U_inv, c), (V, d)):
        torch.testing.assert_close(got, want, **F64_TOL)
    for got, want in zip(reference.canonical_gradient(gV, gd, U_inv, c), (gW, gb)):
        torch.testing.assert_close(got, want, **F64_TOL)
    for got, want in zip(ops.from_canonical(W, b, U_inv, c), reference.from_canonical(W, b, U_inv, c)):
        torch.testing.assert_close(got, want, **F64_TOL)


def test_triton_backend_rejects_groups_and_auto_falls_back(monkeypatch):
    x, V, d, U, c = _oracle_inputs(4, 6, 2, 3, 2, (5, 5), True)
    with pytest.raises(ValueError, match="groups=1"):
        ops.whitened_conv2d(x, V, d, U, c, 1, 1, 1, "zeros", 2, backend="triton")
    with pytest.raises(ValueError, match="groups=1"):
        ops.CovarianceAccumulator(4, groups=2, backend="triton")
    # "auto" where Triton would be used (CUDA tensors): grouped layers take the torch fold
    ref = reference.whitened_conv2d(x, V, d, U, c, 1, 1, 1, "zeros", 2)
    monkeypatch.setattr(ops, "_use_triton", lambda backend, *tensors: True)
    torch.testing.assert_close(ops.whitened_conv2d(x, V, d, U, c, 1, 1, 1, "zeros", 2), ref, **F64_TOL)
    acc = ops.CovarianceAccumulator(4, groups=2)
    acc.update(x.detach())
    assert acc.compute()[1].shape == (2, 2, 2)


def test_grouped_shape_errors():
    x, V, d, U, c = _oracle_inputs(4, 6, 2, 3, 2, (5, 5), True)
    with pytest.raises(ValueError, match=r"U must have shape \(2, 2, 2\)"):
        ops.whitened_conv2d(x, V, d, torch.eye(4, dtype=F64), c, groups=2)
    with pytest.raises(ValueError, match="expects 4"):
        ops.whitened_conv2d(x[:, :2], V, d, U, c, groups=2)
    with pytest.raises(ValueError, match="groups=4"):
        ops.whitened_conv2d(x, V, d, U, c, groups=4)  # 6 outputs do not split into 4 groups
    with pytest.raises(ValueError, match="groups=3"):
        ops.CovarianceAccumulator(4, groups=3)


# --- the helpers against explicit loops -------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("taps", [(), (2, 3)])
def test_mul_in_centre_term_outer_taps_equal_loops(groups, taps):
    k, per = 2, 2
    O = groups * per
    a = torch.randn(O, k, *taps, dtype=F64)
    m = torch.randn(groups, k, 3, dtype=F64)  # (G, k, J) with J != k
    c = torch.randn(groups * k, dtype=F64)
    g = torch.randn(O, dtype=F64)
    out = ops.mul_in(a, m if groups > 1 else m[0])
    ct = ops.centre_term(a, c)
    ot = ops.outer_taps(g, c, a)
    assert out.shape == (O, 3, *taps) and out.is_contiguous()
    assert ct.shape == (O,) and ot.shape == a.shape
    for o in range(O):
        gr = o // per
        for j in range(3):
            want = sum(a[o, i] * m[gr, i, j] for i in range(k))
            torch.testing.assert_close(out[o, j], want, **F64_TOL)
        torch.testing.assert_close(ct[o], sum((a[o, i] * c[gr * k + i]).sum() for i in range(k)), **F64_TOL)
        for i in range(k):
            torch.testing.assert_close(
                ot[o, i], torch.full(taps, (g[o] * c[gr * k + i]).item(), dtype=F64), **F64_TOL
            )
    if groups == 1:  # the ungrouped forms
        assert torch.equal(ct, ops.taps_sum(a) @ c)
        if not taps:
            assert torch.equal(ot, torch.outer(g, c))
    with pytest.raises(ValueError):
        ops.centre_term(a, torch.randn(groups * k + 1, dtype=F64))


def test_mul_in_grouped_is_block_diagonal_product():
    a = torch.randn(6, 2, 3, 3, dtype=F64)
    m = torch.randn(3, 2, 2, dtype=F64)
    out = ops.mul_in(a, m)
    # expand a to the dense (6, 6) input dimension: a grouped weight is a dense one with zeros
    dense = torch.zeros(6, 6, 3, 3, dtype=F64)
    for o in range(6):
        g = o // 2
        dense[o, 2 * g : 2 * g + 2] = a[o]
    want = ops.mul_in(dense, _block_diag(m))
    for o in range(6):
        g = o // 2
        torch.testing.assert_close(out[o], want[o, 2 * g : 2 * g + 2], **F64_TOL)


# --- statistics: the diagonal blocks of the covariance --------------------------------------------


def _stat_inputs(layout, c):
    if layout == "rows":
        return torch.randn(41, c, dtype=F64) @ torch.randn(c, c, dtype=F64) + 3.0
    x = torch.randn(3, c, 9, 8, dtype=F64) * torch.rand(c, 1, 1, dtype=F64) + 2.0  # 8x8+: per-example GEMMs
    x = torch.einsum("ij,njhw->nihw", torch.eye(c, dtype=F64) + 0.5 * torch.randn(c, c, dtype=F64), x)
    if layout == "small_images":
        x = x[:, :, :3, :5]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("layout", ["rows", "nchw", "small_images", "channels_last"])
@pytest.mark.parametrize("c,groups", [(6, 2), (6, 3), (5, 5), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_covariance_is_the_diagonal_blocks(layout, c, groups, dtype):
    x = _stat_inputs(layout, c)
    mean, cov, count = ops.covariance(x.to(dtype), groups=groups, dtype=dtype)
    ref_mean, ref_full, ref_count = reference.covariance(x.to(dtype).double())
    k = c // groups
    assert count == ref_count and cov.dtype == F64
    expected = torch.stack([ref_full[g * k : (g + 1) * k, g * k : (g + 1) * k] for g in range(groups)])
    if groups == 1:
        expected = expected[0]
    # accumulated in `dtype` over `count` rows: the bound of those sums, relative to the size of
    # the terms (|x| for the mean; for the covariance the products of rows less a shift near
    # the mean, up to about 4 variances)
    mean_tol, cov_tol = F64_TOL, F64_TOL
    if dtype == torch.float32:
        mean_tol = tol(dtype, n=count, scale=x.abs().max().item())
        cov_tol = tol(dtype, n=count + 2, scale=4 * ref_full.diagonal().max().item())
    torch.testing.assert_close(mean, ref_mean, **mean_tol)
    torch.testing.assert_close(cov, expected, **cov_tol)
    # the same computation as ref_full's, of the same (rounded) input, sliced
    assert torch.equal(reference.covariance(x.to(dtype).double(), groups=groups)[1], expected)


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_accumulator_merges_batches_exactly(groups):
    batches = [_stat_inputs("nchw", 6) * (i + 1) + 3 * i for i in range(3)]
    batches.append(_stat_inputs("small_images", 6))
    acc = ops.CovarianceAccumulator(6, groups=groups, dtype=F64)
    for b in batches:
        acc.update(b)
    mean, cov, count = acc.compute()
    whole = torch.cat([b.flatten(2) for b in batches], 2)
    ref_mean, ref_cov, ref_count = reference.covariance(whole, groups=groups)
    assert count == ref_count and cov.shape == (groups, 6 // groups, 6 // groups)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-12, atol=1e-12)


def test_grouped_accumulator_state_dict_continues_bitwise():
    batches = [_stat_inputs("nchw", 6) + i for i in range(3)]
    acc = ops.CovarianceAccumulator(6, groups=3)
    acc.update(batches[0])
    acc.update(batches[1])
    state = acc.state_dict()
    assert state["groups"] == 3 and torch.equal(state["m2"], acc.m2)
    restored = ops.CovarianceAccumulator(6, groups=3)
    restored.load_state_dict(state)
    for a in (acc, restored):
        a.update(batches[2])
    assert torch.equal(acc.mean, restored.mean) and torch.equal(acc.m2, restored.m2)
    with pytest.raises(ValueError, match="groups"):
        ops.CovarianceAccumulator(6, groups=2).load_state_dict(state)
    with pytest.raises(ValueError, match="groups"):
        ops.CovarianceAccumulator(6).load_state_dict(state)


# --- conversion -----------------------------------------------------------------------------------


def _depthwise_model():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.ReLU(),
        nn.Conv2d(6, 4, 1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()


def test_whiten_unwhiten_round_trip_with_a_depthwise_conv():
    model = _depthwise_model()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    before = model(x)
    whiten(model)
    assert isinstance(model[2], WhitenedConv2d) and model[2].U.shape == (6, 1, 1)
    assert isinstance(model[4], WhitenedConv2d) and model[4].U.shape == (2, 3, 3)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # re-whiten by hand, keeping the function (docs/algorithm.md): V = W U^-1, d = b + W c, per group
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            W, b = layer.canonical()
            groups, k = layer.groups, layer.V.shape[1]
            U = _blocks(groups, k) if groups > 1 else _blocks(1, k)[0]
            c = torch.randn(groups * k, dtype=F64)
            if layer.d is None:  # bias=False layers keep c = 0
                c.zero_()
            layer.U.copy_(U)
            layer.c.copy_(c)
            V, d = reference.from_canonical(W, b, torch.linalg.inv(U), c)
            layer.V.copy_(V)
            if layer.d is not None:
                layer.d.copy_(d)
    assert not torch.equal(model[2].V, model[2].canonical()[0])  # the whitening does something
    whitened = model(x)
    torch.testing.assert_close(whitened, before, **F64_TOL)
    unwhiten(model)
    assert type(model[2]) is nn.Conv2d and model[2].groups == 6 and model[4].groups == 2
    assert model[2].weight.shape == (6, 1, 3, 3) and model[4].bias is None
    torch.testing.assert_close(model(x), whitened, rtol=1e-12, atol=1e-12)
