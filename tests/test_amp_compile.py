"""Whitened layers under torch.autocast and torch.compile.

Autocast: the fold (W, b) runs in float32 (autocast off), the layer's own linear/conv runs under
autocast exactly as the plain layer's, so the output is bitwise F.linear / F.conv2d of the float32
fold under the same autocast. torch.compile: fullgraph, equal to eager, and in-place updates of
U, c, V, d (a re-whitening) are followed without recompiling.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import RoundingBound, assert_within
from prong_ext import WhitenedConv2d, WhitenedLinear, ops, reference


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


AMP_DTYPES = [torch.bfloat16, torch.float16]


def _set_whitening(layer, scale=0.05):
    """Non-trivial U (identity blocks plus entries that bf16 and fp16 round) and c."""
    with torch.no_grad():
        layer.U.add_(scale * torch.randn_like(layer.U))
        if layer.d is not None:
            layer.c.copy_(torch.randn_like(layer.c))


# name: (whitened layer, plain layer, input shape); the batches are large enough for the fold
LAYERS = {
    "linear": (lambda: WhitenedLinear(7, 5), lambda: nn.Linear(7, 5), (16, 7)),
    "conv": (
        lambda: WhitenedConv2d(3, 4, 3, padding=1),
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        (2, 3, 6, 6),
    ),
    "grouped_conv": (
        lambda: WhitenedConv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        (2, 4, 7, 7),
    ),
}


def _plain_op(layer, x, W, b):
    if isinstance(layer, WhitenedLinear):
        return F.linear(x, W, b)
    return F.conv2d(x, W, b, layer.stride, layer.padding, layer.dilation, layer.groups)


# --- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_autocast_output_is_the_plain_op_of_the_float32_fold(name, amp_dtype, device):
    make, make_plain, shape = LAYERS[name]
    torch.manual_seed(1)
    layer = make().to(device)
    torch.manual_seed(1)
    plain = make_plain().to(device)
    _set_whitening(layer)
    x = torch.randn(shape, device=device)
    assert ops.fold_is_cheaper(x, layer.V, layer.groups)  # the fold form

    # outside autocast: float32, by the path the layer takes (the Triton fold on CUDA)
    W32, b32 = ops.fold(layer.V, layer.d, layer.U, layer.c, backend="auto")
    assert W32.dtype == torch.float32
    with torch.autocast(device, dtype=amp_dtype):
        out = layer(x)
        expected = _plain_op(layer, x, W32, b32)
        # what a fold under autocast would give: W rounded from low-precision products
        W_low, b_low = reference.fold(layer.V, layer.d, layer.U, layer.c)
        low = _plain_op(layer, x, W_low, b_low)
        assert out.dtype == plain(x).dtype == amp_dtype
    assert W_low.dtype == amp_dtype
    assert torch.equal(out, expected)
    assert not torch.equal(low, expected)  # so the check above can tell the two folds apart

    # backward: float32 gradients equal to those of the float32 fold under the same autocast
    out.float().square().sum().backward()
    V_ref = layer.V.detach().clone().requires_grad_(True)
    d_ref = layer.d.detach().clone().requires_grad_(True)
    W_ref, b_ref = ops.fold(V_ref, d_ref, layer.U, layer.c, backend="auto")
    with torch.autocast(device, dtype=amp_dtype):
        ref_out = _plain_op(layer, x, W_ref, b_ref)
    ref_out.float().square().sum().backward()
    for p, ref in ((layer.V, V_ref), (layer.d, d_ref)):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert torch.equal(p.grad, ref.grad)


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("conv", [False, True])
def test_autocast_activation_form(conv, amp_dtype, device):
    # a small batch through a wide layer whitens the activations: both products under autocast,
    # the bias in float32
    if conv:
        layer, plain = WhitenedConv2d(4, 32, 3, padding=1, groups=2), nn.Conv2d(4, 32, 3, padding=1, groups=2)
        x = torch.randn(1, 4, 2, 2, device=device)
    else:
        layer, plain = WhitenedLinear(6, 32), nn.Linear(6, 32)
        x = torch.randn(2, 6, device=device)
    layer, plain = layer.to(device), plain.to(device)
    _set_whitening(layer, 0.3)
    assert not ops.fold_is_cheaper(x, layer.V, layer.groups)
    with torch.autocast(device, dtype=amp_dtype):
        out = layer(x)
        assert out.dtype == plain(x).dtype == amp_dtype
    f64 = [t.detach().double() for t in (x, layer.V, layer.d, layer.U, layer.c)]
    if conv:
        ref = reference.whitened_conv2d(*f64, padding=1, groups=2)
    else:
        ref = reference.whitened_linear(*f64)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2
    out.float().sum().backward()
    assert layer.V.grad.dtype == torch.float32 and torch.isfinite(layer.V.grad).all()


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_autocast_triton_fold(amp_dtype):
    tops = pytest.importorskip("prong_ext._triton_ops")
    if not tops.INTERPRETED:
        pytest.skip("the Triton fold on CPU tensors needs TRITON_INTERPRET=1")
    layer = WhitenedLinear(7, 5)
    _set_whitening(layer)
    x = torch.randn(16, 7)
    W32, b32 = tops.fold(layer.V, layer.d, layer.U, layer.c)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = ops.whitened_linear(x, layer.V, layer.d, layer.U, layer.c, backend="triton")
        W_in, _ = tops.fold(layer.V, layer.d, layer.U, layer.c)
        expected = F.linear(x, W32, b32)
    assert W_in.dtype == torch.float32 and out.dtype == amp_dtype
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert layer.V.grad.dtype == torch.float32 and torch.isfinite(layer.V.grad).all()
    assert layer.d.grad.dtype == torch.float32


def _activations(layout, c, device):
    if layout == "rows":
        x = torch.randn(300, c, device=device) * 2 + 5
    else:
        hw = (9, 8) if layout == "large_images" else (3, 5)
        x = torch.randn(3, c, *hw, device=device) * 2 + 5
    return x.bfloat16()


@pytest.mark.parametrize("layout", ["rows", "large_images", "small_images"])
@pytest.mark.parametrize("groups,backend", [(1, "torch"), (2, "torch"), (1, "triton")])
def test_statistics_of_bf16_activations_under_autocast(layout, groups, backend, device):
    if backend == "triton":
        tops = pytest.importorskip("prong_ext._triton_ops")
        if device == "cpu" and not tops.INTERPRETED:
            pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    x = _activations(layout, 6, device)
    under = ops.CovarianceAccumulator(6, groups=groups, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):  # the layer inputs as a Prong hook sees them
        under.update(x)
        under.update(x[:1] + 1)
    upcast = ops.CovarianceAccumulator(6, groups=groups, backend=backend)
    upcast.update(x.float())
    upcast.update((x[:1] + 1).float())
    (mean, cov, count), (ref_mean, ref_cov, ref_count) = under.compute(), upcast.compute()
    assert cov.dtype == mean.dtype == torch.float64 and count == ref_count
    assert torch.equal(mean, ref_mean) and torch.equal(cov, ref_cov)


# --- torch.compile ------------------------------------------------------------------------------


def _model(device):
    """Fold and activation forms, a grouped conv with a padding mode, a bias-free grouped conv."""
    model = nn.Sequential(
        WhitenedConv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        WhitenedConv2d(6, 6, 3, padding=1, groups=3, padding_mode="reflect"),
        nn.ReLU(),
        WhitenedConv2d(6, 4, 1, groups=2, bias=False),
        nn.Flatten(),
        WhitenedLinear(4 * 5 * 5, 40),  # batch 2 < 40 outputs: whitened activations
        nn.Tanh(),
        WhitenedLinear(40, 3),
    ).to(device)
    for layer in _whitened(model):
        _set_whitening(layer, 0.1)
    return model


def _whitened(model):
    return [m for m in model.modules() if isinstance(m, (WhitenedLinear, WhitenedConv2d))]


def _forward_backward(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(got, want):
    """Bitwise (the CPU, aot_eager): the graph runs eager's own ATen kernels on the same tensors,
    nothing fused or reordered, and the CPU kernels are deterministic, so both round alike."""
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def _assert_within_rounding(model, x, got, want):
    """Two float64 computations of the output and of out.square().sum()'s parameter gradients
    (inductor fuses and reorders sums; CUDA kernels, e.g. the reflect padding's backward, add
    with atomics in any order): each within the running bound of its rounding
    (helpers.RoundingBound), so they differ by at most twice it. In float64 that bound is a few
    parts in 1e6 of the gradients or less; in float32 the same bound, through five layers and
    back, exceeds the first layers' gradients and could not fail."""
    assert x.dtype == torch.float64
    bound = RoundingBound(model, x, dtype=torch.float64)
    # d/d out of out.square().sum() is 2 out, off by twice the output's error
    grad_bounds = bound.backward(2 * bound.out, 2 * bound.err)
    (out, grads), (ref_out, ref_grads) = got, want
    assert_within(out, ref_out, 2 * bound.err, "output")
    for (name, p), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_within(g, r, 2 * grad_bounds[p][1], f"gradient of {name}")


def _assert_equal_to_eager(model, x, got, want):
    if x.is_cuda:
        _assert_within_rounding(model, x, got, want)
    else:
        _assert_same(got, want)


def _rewhiten_in_place(model):
    """New values of U, c, V and d in place, as a re-whitening writes them."""
    with torch.no_grad():
        for layer in _whitened(model):
            k = layer.U.shape[-1]
            eye = torch.eye(k, device=layer.U.device).expand_as(layer.U)
            layer.U.copy_(eye + 0.2 * torch.randn_like(layer.U))
            if layer.d is not None:
                layer.c.copy_(torch.randn_like(layer.c))
                layer.d.add_(0.1 * torch.randn_like(layer.d))
            layer.V.mul_(1.1)


def test_compiled_model_equals_eager_and_follows_in_place_updates(device):
    torch._dynamo.reset()
    torch.manual_seed(2)
    # float32 and bitwise on the CPU; CUDA's kernels are not all deterministic: float64 there,
    # within the bound of its rounding (_assert_within_rounding)
    dtype = torch.float32 if device == "cpu" else torch.float64
    model = _model(device).to(dtype)
    x = torch.randn(2, 3, 5, 5, device=device, dtype=dtype)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    previous = None
    for _ in range(4):
        got = _forward_backward(compiled, x)
        _assert_equal_to_eager(model, x, got, _forward_backward(model, x))
        if previous is not None:  # the new values took effect
            assert not torch.allclose(got[0], previous)
        previous = got[0]
        _rewhiten_in_place(model)
    assert counter.frame_count == 1


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16])
def test_compiled_model_under_autocast_equals_eager(amp_dtype, device):
    torch._dynamo.reset()
    model = _model(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.autocast(device, dtype=amp_dtype):
        out = compiled(x)
        ref = model(x)
    assert out.dtype == ref.dtype == amp_dtype
    # bitwise: the same kernels on the same tensors, forward only (deterministic on CUDA too)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compiled_with_inductor_equals_eager(device):
    torch._dynamo.reset()
    model = _model(device).double()  # fused sums round otherwise: see _assert_within_rounding
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    _assert_within_rounding(model, x, _forward_backward(compiled, x), _forward_backward(model, x))
    _rewhiten_in_place(model)
    _assert_within_rounding(model, x, _forward_backward(compiled, x), _forward_backward(model, x))
