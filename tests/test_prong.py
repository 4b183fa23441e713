import math

import pytest
import torch
from torch import nn

from helpers import F64_TOL, MODELS, assert_within, cond, data, eval_out, eval_rounding_bound, tol
from prong_ext import Prong, WhitenedConv2d, WhitenedLinear, reference, whiten


def _whitened(name):
    build, shape = MODELS[name]
    return whiten(build()), shape


def _assert_function_kept(model, x, before, before_bound, prong, what="function after re-whitening"):
    """The float32 model computes after a re-whitening the function it computed before: each
    within helpers.eval_rounding_bound (float32) of its own parameters, after's with 4 more roundings
    per whitened layer (the float64 V, d, U and c the re-whitening wrote, rounded to float32; the
    float64 projection's own error is far below one)."""
    extra = {m: 4 for m in prong.layers.values()}
    bound = before_bound + eval_rounding_bound(model, x, extra=extra)
    assert_within(eval_out(model, x), before, bound, what)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reparametrize_keeps_outputs(name):
    model, shape = _whitened(name)
    x = data(shape, n=128)
    prong = Prong(model, interval=1, num_samples=128)
    before, before_bound = eval_out(model, x), eval_rounding_bound(model, x)
    prong.reparametrize(x)
    assert prong.num_reparametrizations == 1
    assert not all(torch.equal(m.U, torch.eye(len(m.U))) for m in prong.layers.values())
    # before and after each within their float32 rounding bound, after's 4 roundings more per layer
    _assert_function_kept(model, x, before, before_bound, prong)


@pytest.mark.parametrize("name", ["mlp", "cnn_nobias", "bn_cnn"])
def test_hundred_reparametrizations_do_not_drift(name):
    model, shape = _whitened(name)
    x = data(shape, n=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prong = Prong(model, opt, interval=1, num_samples=32)
    for t in range(100):
        batch = x[(t % 2) * 32 : (t % 2 + 1) * 32]
        opt.zero_grad()
        model(batch).square().mean().backward()
        opt.step()
        before, before_bound = eval_out(model, x), eval_rounding_bound(model, x)
        assert prong.step()
        # the last step's function kept to the float32 rounding of both, not to a drift budget
        _assert_function_kept(model, x, before, before_bound, prong, what=f"reparametrization {t}")
    assert prong.num_reparametrizations == 100


def test_whitened_layer_inputs_have_the_expected_covariance():
    eps = 1e-2
    layer = WhitenedLinear(6, 3, dtype=torch.float64)
    x = data((6,), n=400).double()
    Prong(layer, interval=1, num_samples=400, eps=eps).reparametrize(x)
    white = (x - layer.c) @ layer.U.T
    cov = white.T @ white / len(x)
    sigma = reference.covariance(x)[1]
    lam = torch.linalg.eigvalsh(sigma)
    # float64 throughout: the bounds of the sums over the 400 rows, in units of their terms
    u_abs = layer.U.abs()
    scale = (u_abs @ sigma.abs() @ u_abs.T).max().item()
    torch.testing.assert_close(
        cov, torch.diag(lam / (lam + eps)), **tol(torch.float64, n=len(x) + 12, scale=scale)
    )
    mean_scale = ((x - layer.c).abs() @ u_abs.T).max().item()
    torch.testing.assert_close(
        white.mean(0),
        torch.zeros_like(white.mean(0)),
        **tol(torch.float64, n=len(x) + 12, scale=mean_scale),
    )


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_layer_inputs_are_whitened_per_group(bias):
    eps = 1e-2
    layer = WhitenedConv2d(6, 4, 3, padding=1, groups=2, bias=bias, dtype=torch.float64)
    x = data((6, 5, 5), n=80).double()
    before = layer(x)
    prong = Prong(layer, interval=1, num_samples=80, eps=eps)
    prong.reparametrize(x)
    assert layer.U.shape == (2, 3, 3)
    torch.testing.assert_close(layer(x), before, **F64_TOL)
    rows = x.movedim(1, -1).reshape(-1, 6)
    if bias:
        rows = rows - rows.mean(0)
        torch.testing.assert_close(layer.c, x.mean((0, 2, 3)), **F64_TOL)
    for g in range(2):  # each block whitens its group's channels alone
        h = rows[:, 3 * g : 3 * g + 3]
        white = h @ layer.U[g].T
        lam = torch.linalg.eigvalsh(h.T @ h / len(h))
        torch.testing.assert_close(white.T @ white / len(h), torch.diag(lam / (lam + eps)), **F64_TOL)


def test_no_bias_layer_whitens_the_second_moment_and_keeps_c_zero():
    eps = 1e-3
    layer = WhitenedConv2d(3, 2, 3, bias=False, dtype=torch.float64)
    x = data((3, 6, 6), n=50).double()
    before = layer(x)
    Prong(layer, interval=1, num_samples=50, eps=eps).reparametrize(x)
    assert torch.equal(layer.c, torch.zeros(3, dtype=torch.float64))
    rows = x.movedim(1, -1).reshape(-1, 3)
    white = rows @ layer.U.T
    second = white.T @ white / len(rows)
    lam = torch.linalg.eigvalsh(rows.T @ rows / len(rows))
    torch.testing.assert_close(second, torch.diag(lam / (lam + eps)), **F64_TOL)
    torch.testing.assert_close(layer(x), before, **F64_TOL)


def test_statistics_leave_other_model_state_alone():
    model, shape = _whitened("bn_cnn")
    model.add_module("drop", nn.Dropout(0.5))
    x = data(shape, n=32)
    buffers = {n: b.clone() for n, b in model.named_buffers() if not n.endswith((".U", ".c"))}
    model[1].eval()  # mixed training modes must survive
    modes = [m.training for m in model.modules()]
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    Prong(model, num_samples=32).reparametrize([x[:16], (x[16:], None)])
    assert torch.equal(torch.rand(3), expected_next)
    assert [m.training for m in model.modules()] == modes
    for n, b in model.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["cnn", "grouped_cnn"])
def test_transform_keeps_momentum_direction_in_canonical_coordinates(name, opt_name):
    model, shape = _whitened(name)
    x = data(shape, n=64)
    params = model.parameters()
    opt = (
        torch.optim.SGD(params, lr=0.01, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.Adam(params, lr=1e-3)
    )
    key = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    # "keep": the first moments are transformed, not restarted (the default "reset" zeroes them)
    prong = Prong(model, opt, interval=1000, num_samples=64, second_moment="keep")
    prong.reparametrize(x)  # U != I and c != 0 before the reparametrization under test
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    def canonical_moments():
        out = {}
        for name, layer in prong.layers.items():
            g_v = opt.state[layer.V][key].double()
            u, c = layer.U.double(), layer.c.double()
            g_d = None if layer.d is None else opt.state[layer.d][key].double()
            # g_W = g_V U^-T + g_d c^T, per block for grouped convs
            out[name] = reference.canonical_gradient(g_v, g_d, torch.linalg.inv(u), c)
        return out

    before = canonical_moments()
    before_u = {id(layer): layer.U.clone() for layer in prong.layers.values()}
    sq_before = {n: opt.state[l.V].get("exp_avg_sq") for n, l in prong.layers.items()}
    prong.reparametrize(data(shape, n=64, seed=5))
    after = canonical_moments()
    # float32 moments and U, mapped through U^-1: a few roundings grown by U's condition
    u_all = [m for layer in prong.layers.values() for m in (layer.U, before_u[id(layer)])]
    for name in before:
        scale = before[name][0].abs().max().item()
        torch.testing.assert_close(
            after[name][0], before[name][0], **tol(torch.float32, n=8 * cond(*u_all), scale=scale)
        )
        if before[name][1] is not None:  # g_d' = g_d, untouched
            assert torch.equal(after[name][1], before[name][1])
        if opt_name == "adam":  # no exact transform: kept as it was
            assert torch.equal(opt.state[prong.layers[name].V]["exp_avg_sq"], sq_before[name])


def test_reset_and_keep_policies():
    for policy in ("reset", "keep"):
        model, shape = _whitened("mlp")
        x = data(shape)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model(x).sum().backward()
        opt.step()
        layer = model[0]
        buf = opt.state[layer.V]["momentum_buffer"].clone()
        Prong(model, opt, optimizer_state=policy, num_samples=64).reparametrize(x)
        if policy == "reset":
            assert layer.V not in opt.state and layer.d not in opt.state
        else:
            assert torch.equal(opt.state[layer.V]["momentum_buffer"], buf)


def test_window_statistics_equal_reparametrize_on_the_same_batches():
    build, shape = MODELS["mlp"]
    torch.manual_seed(0)
    a = whiten(build())
    b = whiten(build())
    b.load_state_dict(a.state_dict())
    batches = [data(shape, n=32, seed=s) for s in range(6)]
    opt = torch.optim.SGD(a.parameters(), lr=0.0)  # the layers' inputs depend only on the data
    prong = Prong(a, opt, interval=3, num_samples=64)
    used = []
    for t, x in enumerate(batches):
        opt.zero_grad()
        a(x).sum().backward()
        opt.step()
        if prong.step():
            used.append(t)
    assert used == [0, 3]
    # the window before update 3 held the forward passes of updates 2 and 3
    ref = Prong(b, interval=3, num_samples=64)
    with pytest.warns(UserWarning, match="fewer than num_samples"):
        ref.reparametrize(batches[0])
    ref.reparametrize([batches[2], batches[3]])
    for name in prong.layers:
        torch.testing.assert_close(prong.layers[name].U, ref.layers[name].U)
        torch.testing.assert_close(prong.layers[name].c, ref.layers[name].c)


def test_reparametrize_before_training_is_the_whitened_initialization():
    model, shape = _whitened("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    prong = Prong(model, opt, interval=4, num_samples=32)
    prong.reparametrize(data(shape, n=32, seed=9))
    initial = model[0].U.clone()
    done = []
    for t in range(6):
        opt.zero_grad()
        model(data(shape, n=16, seed=t)).sum().backward()
        opt.step()
        done.append(prong.step())
        if t == 0:
            assert torch.equal(model[0].U, initial)
            assert not model[0]._forward_pre_hooks  # the initial window was closed
    assert done == [False, False, False, False, True, False]
    assert prong.num_reparametrizations == 2


def test_window_hooks_exist_only_inside_the_window():
    model, shape = _whitened("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    prong = Prong(model, opt, interval=10, num_samples=32)
    hooked = []
    for t in range(11):
        x = data(shape, n=16, seed=t)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        prong.step()
        hooked.append(bool(model[0]._forward_pre_hooks))
    # 32 samples at 16 per step: open for the 2 steps before update 10, closed after it
    assert hooked == [False] * 8 + [True, True, False]


def test_eval_forward_passes_do_not_count():
    model, shape = _whitened("mlp")
    prong = Prong(model, num_samples=64)
    model.eval()
    model(data(shape))
    with pytest.raises(RuntimeError, match="no statistics"):
        prong.step()


def test_timings_are_recorded():
    model, shape = _whitened("cnn")
    prong = Prong(model, num_samples=64)
    prong.reparametrize(data(shape))
    assert set(prong.timings) == {"statistics", "eigh", "projection"}
    assert all(v > 0 for v in prong.timings.values())


def test_state_dict_round_trip_keeps_partial_statistics():
    model, shape = _whitened("mlp")
    prong = Prong(model, interval=5, num_samples=64)
    model(data(shape, n=16))
    state = prong.state_dict()
    other = Prong(model, interval=5, num_samples=64)
    other.load_state_dict(state)
    assert other.updates == prong.updates
    for name in prong.layers:
        assert torch.equal(other._window[name].compute()[1], prong._window[name].compute()[1])
    bad = Prong(whiten(nn.Sequential(nn.Linear(12, 3))), num_samples=4)
    with pytest.raises(ValueError, match="do not match"):
        bad.load_state_dict(state)


def test_bad_configuration_and_inputs():
    model, shape = _whitened("mlp")
    for kwargs in (
        {"interval": 0},
        {"num_samples": 0},
        {"eps": 0.0},
        {"whitening": "svd"},
        {"optimizer_state": "drop"},
        {"max_features": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Prong(model, **kwargs)
    with pytest.raises(ValueError, match="no whitened layer"):
        Prong(nn.Sequential(nn.Linear(2, 2)))
    prong = Prong(model, num_samples=64)
    with pytest.raises(ValueError, match="no examples"):
        prong.reparametrize([])
    with pytest.warns(UserWarning, match="fewer than num_samples"):
        prong.reparametrize(data(shape, n=10))


def test_non_finite_statistics_change_nothing():
    model, shape = _whitened("mlp")
    prong = Prong(model, num_samples=64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = data(shape)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite input statistics .*'0'"):
        prong.reparametrize(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wide_layers_stay_unwhitened_with_a_warning():
    model = whiten(nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2)))
    with pytest.warns(UserWarning, match=r"wider than max_features=8 unwhitened: 0 \(10\)"):
        prong = Prong(model, max_features=8, num_samples=8)
    assert list(prong.layers) == ["1"]


def test_rank_deficient_statistics_give_finite_whitening():
    model, shape = _whitened("cnn")
    x = data(shape, n=4)
    x[:, 1] = 3.0  # a constant feature
    x[:, 2] = x[:, 0]  # a duplicated feature
    prong = Prong(model, num_samples=1)  # fewer samples than features in the linear layer
    before, before_bound = eval_out(model, x), eval_rounding_bound(model, x)
    prong.reparametrize(x)
    for layer in prong.layers.values():
        assert torch.isfinite(layer.U).all() and torch.isfinite(layer.V).all()
    _assert_function_kept(model, x, before, before_bound, prong)


def _digits():
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return x


def _train_autoencoder(x, use_prong, lr, updates=400, seed=0):
    """A deep sigmoid auto-encoder 64-32-16-4-16-32-64 (Sec. 4.2 scaled down to digits)."""
    torch.manual_seed(seed)
    sizes = [64, 32, 16, 4, 16, 32, 64]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    layers.pop()  # logits out
    del layers[2 * sizes.index(4) - 1]  # a linear code layer
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    prong = None
    if use_prong:
        whiten(model)
        prong = Prong(model, opt, interval=25, num_samples=256, eps=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        batch = x[torch.randint(len(x), (64,), generator=g)]
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if prong is not None:
            prong.step()
    with torch.no_grad():
        return nn.functional.mse_loss(torch.sigmoid(model(x)), x).item()


def test_prong_trains_a_deep_autoencoder_on_digits_better_than_sgd():
    # The same learning-rate grid and number of updates for both; SGD sits on the plateau of
    # the mean image (about 0.073) while PRONG's whitened layers get past it.
    x = _digits()
    lrs = (0.3, 1.0, 3.0)
    sgd = min(_train_autoencoder(x, False, lr) for lr in lrs)
    prong = min(_train_autoencoder(x, True, lr) for lr in lrs)
    assert math.isfinite(prong)
    assert prong < 0.8 * sgd, f"PRONG {prong:.4f} vs SGD {sgd:.4f}"


def _train_compiled_or_not(name, compiled, steps=10):
    """Trains a whitened model with Prong (statistics from prong.step(x)), the forward
    optionally through torch.compile(fullgraph=True); returns the model, the losses, Prong and
    the number of frames Dynamo compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model, shape = _whitened(name)
    x = data(shape, n=steps * 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    prong = Prong(model, opt, interval=3, num_samples=16)  # hooks exist before compiling
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, fullgraph=True, backend=counter) if compiled else model
    losses = []
    for t in range(steps):
        batch = x[t * 16 : (t + 1) * 16]
        loss = forward(batch).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        prong.step(batch)
        losses.append(loss.detach())
    return model, torch.stack(losses), prong, counter.frame_count


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_compiled_model_trains_like_eager_and_compiles_once(name):
    eager, eager_losses, eager_prong, _ = _train_compiled_or_not(name, compiled=False)
    model, losses, prong, frames = _train_compiled_or_not(name, compiled=True)
    # Re-whitenings at updates 0, 3, 6, 9 rewrote U, c, V and d in place, and did not recompile:
    # Dynamo compiled one graph with the statistics window's hooks and one without (it guards
    # on their number; the hooks do nothing inside a graph) and reused both since.
    assert prong.num_reparametrizations == eager_prong.num_reparametrizations == 4
    assert frames == 2
    # Bitwise: aot_eager runs eager's own ATen kernels on the same tensors, and Prong's
    # statistics and re-whitenings run eagerly in both, so the two runs round alike throughout.
    torch.testing.assert_close(losses, eager_losses, rtol=0, atol=0)
    for (n, got), want in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=n)


def test_compiled_forward_passes_do_not_feed_the_statistics():
    model, shape = _whitened("mlp")
    prong = Prong(model, interval=1, num_samples=16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(data(shape, n=16))
    with pytest.raises(RuntimeError, match=r"prong.step\(data\)"):
        prong.step()
    assert prong.step(data(shape, n=16))


def test_statistics_under_autocast_stay_in_float32():
    """Training passes under bf16 autocast: the statistics of the first layer (whose input is
    the float32 batch) are those of a float32 run, bitwise, and the whitening stays float32."""
    x = data((12,), n=64)
    models = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model, _ = _whitened("mlp")
        prong = Prong(model, interval=1, num_samples=64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert prong.step()
        models.append(model)
    plain, mixed = models
    assert torch.equal(mixed[0].U, plain[0].U) and torch.equal(mixed[0].c, plain[0].c)
    for layer in (mixed[2], mixed[4]):  # inputs were bf16 activations
        assert layer.U.dtype == torch.float32 and layer.U.isfinite().all()
        assert not torch.equal(layer.U, torch.eye(len(layer.U)))
