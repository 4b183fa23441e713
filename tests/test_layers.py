import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import F64_TOL
from prong_ext import WhitenedConv2d, WhitenedLinear, ops, reference


def _random_whitening(n, dtype=torch.float64):
    a = torch.randn(n, n, dtype=dtype)
    return torch.eye(n, dtype=dtype) + 0.3 * a, torch.randn(n, dtype=dtype)


def test_linear_init_matches_nn_linear():
    torch.manual_seed(3)
    plain = nn.Linear(7, 5)
    torch.manual_seed(3)
    layer = WhitenedLinear(7, 5)
    assert torch.equal(layer.V, plain.weight) and torch.equal(layer.d, plain.bias)
    assert torch.equal(layer.U, torch.eye(7)) and torch.equal(layer.c, torch.zeros(7))
    x = torch.randn(4, 7)
    assert torch.equal(layer(x), plain(x))
    assert set(dict(layer.named_parameters())) == {"V", "d"}
    assert set(layer.state_dict()) == {"V", "d", "U", "c"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": "same", "dilation": 2},
        {"padding": (1, 2), "bias": False},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular", "stride": (2, 1)},
    ],
)
def test_conv_init_and_forward_match_nn_conv2d(kwargs):
    torch.manual_seed(5)
    plain = nn.Conv2d(3, 4, (3, 2), **kwargs)
    torch.manual_seed(5)
    layer = WhitenedConv2d(3, 4, (3, 2), **kwargs)
    assert torch.equal(layer.V, plain.weight)
    x = torch.randn(2, 3, 9, 7)
    # bitwise: at init U = I and c = 0, so the fold W = V I, b = d - W 0 (or the 1x1 conv by I)
    # is exact, and what remains is the plain layer's own F.conv2d on the same tensors
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(layer(x[0]), plain(x[0]))


def test_canonical_properties():
    layer = WhitenedConv2d(3, 4, 3, dtype=torch.float64)
    U, c = _random_whitening(3)
    layer.U.copy_(U)
    layer.c.copy_(c)
    W, b = layer.canonical()
    expected_W = torch.einsum("ojhw,ji->oihw", layer.V.detach(), U)
    torch.testing.assert_close(W, expected_W, **F64_TOL)
    torch.testing.assert_close(b, layer.d.detach() - torch.einsum("oihw,i->o", expected_W, c), **F64_TOL)
    torch.testing.assert_close(layer.weight, W, **F64_TOL)
    torch.testing.assert_close(layer.bias, b, **F64_TOL)
    assert not layer.weight.requires_grad
    layer.weight = torch.zeros(4, 3, 3, 3)  # writes through: V = W U^-1, d keeps b (test_dropin.py)
    assert layer.V.abs().max().item() == 0.0
    torch.testing.assert_close(layer.bias, b, **F64_TOL)


@pytest.mark.parametrize("n_in,n_out,rows", [(1, 3, 5), (17, 4, 6), (5, 9, 2), (6, 6, 1)])
def test_whitened_linear_equals_reference(n_in, n_out, rows):
    # (5, 9, 2) and (6, 6, 1) take the whiten-the-activations form, the others the fold
    V = torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
    d = torch.randn(n_out, dtype=torch.float64, requires_grad=True)
    U, c = _random_whitening(n_in)
    x = torch.randn(rows, n_in, dtype=torch.float64, requires_grad=True)
    out = ops.whitened_linear(x, V, d, U, c)
    ref = reference.whitened_linear(x, V, d, U, c)
    torch.testing.assert_close(out, ref, **F64_TOL)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, V, d), g)
    ref_grads = torch.autograd.grad(ref, (x, V, d), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **F64_TOL)
    assert torch.autograd.gradcheck(lambda x, V, d: ops.whitened_linear(x, V, d, U, c), (x, V, d))


# C_out * k^2 against N * H * W picks the form: the fold, or whitening the activations ("act")
CONV_CASES = [
    dict(c_in=3, c_out=4, k=3, stride=1, padding=1, dilation=1),
    dict(c_in=3, c_out=8, k=3, stride=1, padding=1, dilation=1, n=1, hw=(4, 5)),  # act
    dict(c_in=2, c_out=9, k=3, stride=2, padding=2, dilation=2, n=1, hw=(5, 5)),  # act
    dict(c_in=1, c_out=2, k=1, stride=1, padding=0, dilation=1),
    dict(c_in=5, c_out=3, k=3, stride=2, padding=2, dilation=2),
    dict(c_in=4, c_out=2, k=2, stride=(2, 1), padding=(0, 1), dilation=1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whitened_conv2d_equals_reference(case, bias, backend):
    c_in, c_out, k = case["c_in"], case["c_out"], case["k"]
    V = torch.randn(c_out, c_in, k, k, dtype=torch.float64, requires_grad=True)
    d = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if bias else None
    U, c = _random_whitening(c_in)
    if not bias:
        c = torch.zeros(c_in, dtype=torch.float64)
    n, (h, w) = case.get("n", 2), case.get("hw", (6, 5))
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    out = ops.whitened_conv2d(x, V, d, U, c if bias else None, **conv, backend=backend)
    ref = reference.whitened_conv2d(x, V, d, U, c, **conv)
    torch.testing.assert_close(out, ref, **F64_TOL)
    inputs = (x, V) if d is None else (x, V, d)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, **F64_TOL)

    if backend == "torch":  # the Triton fold's gradcheck is in test_triton_kernels.py

        def f(x, V, *d):
            return ops.whitened_conv2d(x, V, d[0] if d else None, U, c if bias else None, **conv)

        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("batch", [1, 2])  # whitened activations, fold
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_equal_reference(mode, batch):
    V = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    d = torch.randn(3, dtype=torch.float64)
    U, c = _random_whitening(2)
    x = torch.randn(batch, 2, 5, 5, dtype=torch.float64)
    out = ops.whitened_conv2d(x, V, d, U, c, 1, 1, 1, mode)
    torch.testing.assert_close(out, reference.whitened_conv2d(x, V, d, U, c, 1, 1, 1, mode), **F64_TOL)


def test_layer_gradients_reach_V_and_d_through_fold():
    layer = WhitenedConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    U, c = _random_whitening(3)
    layer.U.copy_(U)
    layer.c.copy_(c)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    # docs/algorithm.md: g_V[o, j] = sum_i (g_W[o, i] - g_b[o] c[i]) U[j, i], g_d = g_b
    W, b = layer.canonical()
    W.requires_grad_(True)
    b.requires_grad_(True)
    F.conv2d(x, W, b, padding=1).square().sum().backward()
    g_v = torch.einsum("oihw,ji->ojhw", W.grad - b.grad[:, None, None, None] * c[None, :, None, None], U)
    torch.testing.assert_close(layer.V.grad, g_v, **F64_TOL)
    torch.testing.assert_close(layer.d.grad, b.grad, **F64_TOL)
    assert layer.U.grad is None


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"groups": 3}, ValueError),  # 4 channels do not split into 3 groups
        ({"groups": 0}, ValueError),
        ({"padding": "full"}, ValueError),
        ({"padding": "same", "stride": 2}, ValueError),
        ({"padding_mode": "mirror"}, ValueError),
        ({"stride": 0}, ValueError),
    ],
)
def test_conv_bad_arguments(kwargs, error):
    with pytest.raises(error):
        WhitenedConv2d(4, 4, 3, **kwargs)


def test_conv_groups_must_divide_the_channels_and_the_message_names_them():
    with pytest.raises(ValueError, match=r"in_channels=6 .*groups=4"):
        WhitenedConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match=r"out_channels=6 .*groups=4"):
        WhitenedConv2d(8, 6, 3, groups=4)


def test_wrong_input_width_names_the_sizes():
    with pytest.raises(ValueError, match="expects 5"):
        WhitenedLinear(5, 2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="expects 3"):
        WhitenedConv2d(3, 2, 1)(torch.randn(1, 4, 5, 5))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        ops.whitened_linear(torch.randn(2, 3), torch.randn(2, 3), None, torch.eye(3), None, backend="cuda")
    with pytest.raises(ValueError, match="no 'extension' backend"):
        ops.covariance(torch.randn(4, 3), backend="extension")


@pytest.mark.parametrize("kernel", [(1, 1), (3, 1), (3, 3)])
def test_fold_gives_standard_strides(kernel):
    # oneDNN's conv backward corrupted the heap (torch 2.13, CPU) on a 1x1 weight whose size-1
    # dims kept odd strides; the folded weight must have plain contiguous strides
    V = torch.randn(5, 3, *kernel)
    W, _ = ops.fold(V, None, torch.eye(3), None)
    assert W.stride() == torch.empty(W.shape).stride()
