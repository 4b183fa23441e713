"""Whitened models in ordinary training scripts: torch's layer signatures, writes to weight and
bias, parameter selection, tied weights, copies of the model, and the warnings and errors that
replace silent no-ops."""

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prong_ext
from helpers import RoundingBound, assert_within, data, gamma
from prong_ext import Prong, WhitenedConv2d, WhitenedLinear, reference


def _randomize_whitening(layer, seed=3):
    """A well-conditioned U (blocks) and a non-zero c, as after a re-whitening."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        k = layer.U.shape[-1]
        layer.U.copy_(torch.randn(layer.U.shape, generator=g) / k**0.5 + 2 * torch.eye(k))
        layer.c.copy_(torch.randn(layer.c.shape, generator=g))
    return layer


LAYERS = {
    "linear": (lambda: WhitenedLinear(6, 4), (5, 6), F.linear, {}),
    "conv": (lambda: WhitenedConv2d(4, 6, 3, padding=1), (2, 4, 5, 5), F.conv2d, {"padding": 1}),
    "grouped_conv": (lambda: WhitenedConv2d(4, 6, 3, groups=2), (2, 4, 5, 5), F.conv2d, {"groups": 2}),
}


def _plain_out(layer, fn, kwargs, x):
    return fn(x, layer.weight, layer.bias, **kwargs)


def _fold_bounds(layer, roundings=0):
    """Bounds on the float32 rounding of the canonical W = V U and b = d - W c read from a layer
    whose V and d were written from a W and b in float64 (V = W U^-1, d = b + W c, each rounded
    once to float32; U^-1's float64 error is far below one rounding): W's k_U-term sums, V's
    rounding and one for U^-1 in units of |V| |U|; b's tap k-term sum, its subtraction, d's
    rounding and W's, in units of |d| + sum over the taps of |V| |U| |c|. `roundings` adds more
    (one per further write that rounded V and d again)."""
    V, U = layer.V.detach().double().abs(), layer.U.double().abs()
    k_u, taps_k = U.shape[-1], V[0].numel()
    w, b = reference.fold(V, layer.d.detach().double().abs(), U, -layer.c.double().abs())
    return gamma(k_u + 2 + roundings) * w, gamma(k_u + taps_k + 3 + roundings) * b


def _assert_function_kept(modules, x, before, rewhitened):
    """The float32 model, re-whitened once, computes the function it computed before up to
    float32 rounding: before and after, each within the running bound of its rounding (before,
    at U = I and c = 0, has terms no larger than after), and the re-whitening's float64 V, d, U
    and c rounded to float32 (4 roundings of the re-whitened layers' terms; the float64
    projection's error is far below one)."""
    bound = 2 * RoundingBound(modules, x, extra={m: 4 for m in rewhitened}).err
    assert_within(nn.Sequential(*modules)(x).detach(), before, bound, "function after re-whitening")


# ------------------------------------------------------------------------------------------------
# Signatures


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_takes_input_by_keyword_as_torch_layers_do(kind):
    make, shape, _, _ = LAYERS[kind]
    layer = make()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(input=x), layer(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Writes to weight and bias


@pytest.mark.parametrize("kind", LAYERS)
def test_nn_init_on_weight_writes_through_and_keeps_the_bias(kind):
    make, shape, fn, kwargs = LAYERS[kind]
    layer = _randomize_whitening(make())
    bias_before = layer.bias.clone()
    _, b_bound_before = _fold_bounds(layer)  # bias_before: the float32 fold of the random layer
    v_before = layer.V.detach().clone()
    rng = torch.get_rng_state()
    nn.init.orthogonal_(layer.weight)  # writes through a view: tensor.view_as(q).copy_(q)
    torch.set_rng_state(rng)
    q = nn.init.orthogonal_(torch.empty(layer.V.shape))  # what it wrote: the same draws
    assert not torch.equal(layer.V.detach(), v_before)
    w_bound, b_bound = _fold_bounds(layer)
    # the canonical weight is the orthogonal matrix orthogonal_ wrote (was: W W^T = I), to the
    # float32 rounding of the write and the fold
    assert_within(layer.weight, q, w_bound, "weight")
    assert_within(layer.bias, bias_before, b_bound + b_bound_before, "bias")  # b kept: two folds
    x = torch.randn(shape)
    # two float32 computations of the layer (the canonical W, b through F; the layer's own form)
    assert_within(layer(x), _plain_out(layer, fn, kwargs, x), 2 * RoundingBound([layer], x).err, "output")


@pytest.mark.parametrize("kind", LAYERS)
def test_assignment_and_in_place_writes_set_the_canonical_parameters(kind):
    make, shape, fn, kwargs = LAYERS[kind]
    layer = _randomize_whitening(make())
    W = torch.randn(layer.V.shape)
    b = torch.randn(layer.V.shape[0])
    layer.weight = nn.Parameter(W)  # was a KeyError
    layer.bias = b
    w_bound, b_bound = _fold_bounds(layer, roundings=1)  # setting b rewrote V from its fold
    assert_within(layer.weight, W, w_bound, "weight")
    assert_within(layer.bias, b, b_bound, "bias")
    with torch.no_grad():
        layer.weight.data.zero_()
        layer.bias[0] = 5.0
    assert layer.weight.abs().max().item() == 0.0
    assert layer.bias[0].item() == 5.0  # exactly: with W = 0, d = b + W c = b and b = d - W c = d
    # W = 0 wrote d = b, the float64 fold of the float32 V and d (b_bound), rounded once more
    assert_within(layer.bias[1:], b[1:], b_bound[1:] + gamma(1) * b[1:].abs(), "bias")
    nn.init.zeros_(layer.bias)
    x = torch.randn(shape)
    # W = 0 and b = 0: the layer's output is exactly zero, whatever U and c are
    assert layer(x).abs().max().item() == 0.0


def test_writes_keep_parameter_objects_and_copies_do_not_write_through():
    layer = _randomize_whitening(WhitenedLinear(5, 3))
    v, d = layer.V, layer.d
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    nn.init.kaiming_uniform_(layer.weight)
    assert layer.V is v and layer.d is d and optimizer.param_groups[0]["params"][0] is v
    before = layer.weight.clone()
    assert type(before) is torch.Tensor  # a clone is a tensor of its own
    before.clone().zero_()
    copied = copy.deepcopy(layer.weight)
    assert type(copied) is torch.Tensor
    copied.zero_()
    assert torch.equal(layer.weight, before) and before.abs().max().item() > 0


def test_bad_writes_raise_and_change_nothing():
    layer = _randomize_whitening(WhitenedLinear(5, 3))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight of shape \(2, 2\) does not match \(3, 5\)"):
        layer.weight = torch.randn(2, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.bias = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="cannot be set to None"):
        layer.bias = None
    with pytest.raises(ValueError, match="bias=False"):
        WhitenedLinear(5, 3, bias=False).bias = torch.zeros(3)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


# ------------------------------------------------------------------------------------------------
# Selecting parameters by name or by layer type


def test_named_parameters_gives_the_plain_names_and_plain_class_the_torch_type():
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Conv2d(3, 2, 1, bias=False))
    expected = [n for n, _ in plain.named_parameters()]
    model = prong_ext.whiten(plain)
    named = list(prong_ext.named_parameters(model))
    assert [n for n, _ in named] == expected == ["0.weight", "0.bias", "2.weight"]
    assert [p for _, p in named] == [model[0].V, model[0].d, model[2].V]
    assert [n for n, _ in prong_ext.named_parameters(model, prefix="net")][0] == "net.0.weight"
    no_decay = [p for n, p in prong_ext.named_parameters(model) if "bias" in n]
    assert len(no_decay) == 1 and no_decay[0] is model[0].d
    assert [type(m).plain_class for m in (model[0], model[2])] == [nn.Linear, nn.Conv2d]
    assert [n for n, _ in prong_ext.named_parameters(WhitenedLinear(2, 2))] == ["weight", "bias"]


# ------------------------------------------------------------------------------------------------
# Tied weights


class _TinyLM(nn.Module):
    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_whiten_leaves_tied_layers_plain_with_a_warning_and_reparametrize_keeps_the_function():
    model = _TinyLM()
    with pytest.warns(UserWarning, match=r"tied parameters plain: embed\.weight = head\.weight"):
        prong_ext.whiten(model)
    assert type(model.head) is nn.Linear and isinstance(model.mix, WhitenedLinear)
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, 11, (64, 5))
    before = model(tokens).detach()
    prong = Prong(model, num_samples=64)
    prong.reparametrize(tokens)
    assert not torch.equal(model.mix.U, torch.eye(8))  # the untied layer was re-whitened
    _assert_function_kept([model.embed, model.mix, nn.Tanh(), model.head], tokens, before, [model.mix])


def test_prong_leaves_whitened_layers_with_tied_parameters_alone():
    model = nn.Sequential(
        WhitenedLinear(6, 6), nn.Tanh(), WhitenedLinear(6, 6), nn.Tanh(), WhitenedLinear(6, 3)
    )
    model[2].V = model[0].V  # one weight, two layers with their own U and c: cannot both re-whiten
    x = data((6,), n=128)
    before = model(x).detach()
    with pytest.warns(UserWarning, match=r"tied weights.*0\.V = 2\.V"):
        prong = Prong(model, num_samples=128)
    assert list(prong.layers) == ["4"]
    prong.reparametrize(x)
    _assert_function_kept(list(model), x, before, [model[4]])


def test_a_layer_shared_at_two_places_is_whitened_once():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    prong_ext.whiten(model)
    assert model[0] is model[2] and isinstance(model[0], WhitenedLinear)
    x = data((5,), n=64)
    before = model(x).detach()
    Prong(model, num_samples=64).reparametrize(x)
    _assert_function_kept(list(model), x, before, [model[0]])


# ------------------------------------------------------------------------------------------------
# Copies of a managed model


@pytest.mark.parametrize("rescale", [False, True])
def test_a_deepcopy_of_the_model_does_not_feed_prongs_statistics(rescale):
    def run(with_copy):
        torch.manual_seed(0)
        model = prong_ext.whiten(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        prong = Prong(model, optimizer, interval=2, num_samples=32, rescale=rescale)
        prong.reparametrize(data((6,), n=32, seed=5))
        ema = None
        for step in range(5):
            if ema is not None:  # a teacher pass on other inputs, in training mode, first
                ema(data((6,), n=32, seed=100 + step) * 7.0)
            loss = model(data((6,), n=32, seed=10 + step)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            prong.step()
            if with_copy and step == 1:  # the window for update 2 is open: the copy has its hooks
                assert prong._window is not None
                ema = copy.deepcopy(model)
        assert prong.num_reparametrizations == 3
        return [t.detach().clone() for t in model.state_dict().values()]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# Warnings and errors instead of silent no-ops


def _mlp_prong(**kwargs):
    model = prong_ext.whiten(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    optimizer = kwargs.pop("optimizer", None)
    return model, Prong(model, optimizer(model.parameters()) if optimizer else None, **kwargs)


def test_rewhitening_from_fewer_examples_than_num_samples_warns_with_the_counts():
    model, prong = _mlp_prong(interval=3, num_samples=100)
    model(data((6,), n=8))
    with pytest.warns(
        UserWarning, match=r"update 0 from 8 examples, fewer than num_samples=100.*reparametrize"
    ):
        prong.step()
    # with the whitened initialization from enough data, and a window that fills, no warning
    model, prong = _mlp_prong(interval=3, num_samples=16)
    prong.reparametrize(data((6,), n=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(7):
            model(data((6,), n=8, seed=step))
            prong.step()
    assert prong.num_reparametrizations == 3


def test_reparametrize_with_data_that_reaches_no_whitened_layer_is_a_value_error():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = WhitenedLinear(4, 4)

        def forward(self, x):
            return torch.tanh(x)

    model = Skips()
    prong = Prong(model, num_samples=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"reached none of the whitened layers.*'unused'"):
        prong.reparametrize(torch.randn(8, 4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_optimizer_state_prong_cannot_transform_warns_once_naming_the_keys():
    def train(optimizer, steps=5):
        model, prong = _mlp_prong(interval=2, num_samples=16, optimizer=optimizer)
        opt = prong.optimizer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(steps):
                loss = model(data((6,), n=16, seed=step)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                prong.step()
        return [str(w.message) for w in caught if "cannot transform" in str(w.message)]

    rmsprop = train(lambda p: torch.optim.RMSprop(p, lr=1e-3))
    assert len(rmsprop) == 1 and "['square_avg']" in rmsprop[0] and "RMSprop" in rmsprop[0]
    adamax = train(lambda p: torch.optim.Adamax(p, lr=1e-3))
    assert len(adamax) == 1 and "['exp_inf']" in adamax[0]
    assert train(lambda p: torch.optim.Adam(p, lr=1e-3)) == []
    assert train(lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)) == []


def test_load_state_dict_names_the_hyperparameters_it_replaces():
    _, saved = _mlp_prong(interval=7, num_samples=16, eps=0.1)
    _, same = _mlp_prong(interval=7, num_samples=16, eps=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved.state_dict())
    _, other = _mlp_prong(interval=3, num_samples=16, eps=0.01)
    with pytest.warns(
        UserWarning, match=r"interval=7 \(constructed with 3\), eps=0\.1 \(constructed with 0\.01\)"
    ):
        other.load_state_dict(saved.state_dict())
    assert other.interval == 7 and other.eps == 0.1


def test_backend_triton_on_cpu_tensors_without_the_interpreter_raises():
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from prong_ext import ops
        V, U = torch.randn(3, 4), torch.eye(4)
        for call in (
            lambda: ops.whitened_linear(torch.randn(2, 4), V, None, U, None, backend="triton"),
            lambda: ops.covariance(torch.randn(8, 4), backend="triton"),
        ):
            try:
                call()
            except RuntimeError as exc:
                assert "runs on CUDA tensors" in str(exc) and "TRITON_INTERPRET=1" in str(exc), exc
                print("raised")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["raised", "raised"], out.stdout + out.stderr
