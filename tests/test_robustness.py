"""Robustness of the Prong controller (docs/algorithm.md): what must hold when training is not tidy.

- Checkpoints: model / optimizer / Prong state dicts saved inside an open statistics window and
  loaded into fresh objects (in any order) continue the run bitwise as if never interrupted (SGD
  momentum and Adam; with rescale=True too); a CPU checkpoint continues on CUDA (marked cuda).
- Bad input loses nothing: NaN / Inf in a layer's inputs raises a ValueError naming the layer and
  leaves V, d, U, c and the optimizer state bitwise as they were; a failing eigendecomposition
  (prong_ext.ops.whitening raising or returning non-finite U / U^-1) is retried per matrix in
  float64 with backend="torch", and a matrix that still fails keeps its layer's previous whitening
  with a UserWarning naming it while the other layers are re-whitened.
- Degenerate statistics (a constant feature, duplicated features, fewer samples than features,
  a batch of one for linear and conv layers) give finite U, V, d and keep the function.
- ZCA whitening: U symmetric, function kept, first moments keep their theta-space direction.
- Diagonal rescaling (rescale=True): between re-whitenings U = D U0 with
  D_jj = (m_j + eps |u0_j|^2)^-1/2 from the last batch (m_j = E[(u0_j (h - c))^2]), V compensated
  exactly, d and c untouched, moments transformed; rescale=False changes nothing between
  re-whitenings.
- Long run: 1000 re-whitenings with training between keep the function, each time within
  the float32 rounding bound.
"""

import copy
import io
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import prong_ext
from helpers import MODELS, assert_within, cond, data, eval_out, eval_rounding_bound, rel, tol, unit_roundoff
from prong_ext import Prong, WhitenedConv2d, WhitenedLinear, ops, reference, whiten

OUT_FEATURES = {"mlp": 5, "cnn": 7}
F32_ROUNDING = unit_roundoff(torch.float32)
LAYER_ATTRS = ("V", "d", "U", "c")


# ----------------------------------------------------------------------------------------------
# Helpers


def _named_mlp() -> nn.Module:
    """An MLP whose whitened layers have names that cannot be confused with numbers in a message;
    U sizes 12 ('first'), 16 ('hidden'), 9 ('out')."""
    return whiten(
        nn.Sequential(
            OrderedDict(
                first=nn.Linear(12, 16),
                act1=nn.Tanh(),
                hidden=nn.Linear(16, 9),
                act2=nn.Tanh(),
                out=nn.Linear(9, 5),
            )
        )
    )


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _train_step(model, opt, prong, x, y) -> tuple[torch.Tensor, bool]:
    loss = (model(x) - y).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), prong.step()


def _layer_state(prong: Prong) -> dict:
    return {
        (name, attr): getattr(layer, attr).detach().clone()
        for name, layer in prong.layers.items()
        for attr in LAYER_ATTRS
        if getattr(layer, attr) is not None
    }


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    return {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


def _assert_same_opt_state(opt, saved, params=None):
    params = list(opt.state) if params is None else params
    for p in params:
        now = opt.state.get(p, {})
        before = saved.get(id(p), {})
        assert set(now) == set(before)
        for k, v in before.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(now[k], v), k
            else:
                assert now[k] == v, k


def _assert_same_layers(prong, saved, names=None):
    for (name, attr), value in saved.items():
        if names is None or name in names:
            assert torch.equal(getattr(prong.layers[name], attr), value), f"{name}.{attr}"


def _canonical_moments(prong, opt, key) -> dict:
    """First moments as covectors in theta = (W, b): g_W = g_V U^-T + g_d c^T (at every tap)."""
    out = {}
    for name, layer in prong.layers.items():
        g_v = opt.state[layer.V][key].double()
        g_d = opt.state[layer.d][key].double()
        u, c = layer.U.double(), layer.c.double()
        out[name] = reference.canonical_gradient(g_v, g_d, torch.linalg.inv(u), c)
    return out


def _moment_tol(g_w: torch.Tensor, *us: torch.Tensor) -> dict:
    """Canonical first moments from float32 state before and after a re-whitening: a few
    float32 roundings (the moments', U's) grown by the condition of the U's they went through."""
    return tol(torch.float32, n=8 * cond(*us), scale=g_w.abs().max().item())


def _rows(h: torch.Tensor) -> torch.Tensor:
    """Layer input as samples x features: every spatial position of a conv input is a sample."""
    return h.movedim(1, -1).reshape(-1, h.shape[1]) if h.dim() > 2 else h


def _finite(prong) -> bool:
    return all(
        torch.isfinite(getattr(layer, attr)).all()
        for layer in prong.layers.values()
        for attr in LAYER_ATTRS
        if getattr(layer, attr) is not None
    )


def _assert_function_kept(model, probe, before, before_bound, roundings, what=""):
    """The float32 model computes after a re-whitening (or rescaling) the function it computed
    before: each within helpers.eval_rounding_bound (float32) of its own parameters, after's with
    roundings[layer] more for the parameters the step wrote rounded to float32 (4 per re-whitened
    layer: its float64 V, d, U and c; the float64 projection's own error is far below one)."""
    bound = before_bound + eval_rounding_bound(model, probe, extra=roundings)
    assert_within(eval_out(model, probe), before, bound, what)


# ----------------------------------------------------------------------------------------------
# 1. Checkpoints

CKPT_STEPS = 200
CKPT_SAVE = 97  # 97 % 7 == 6: the window before update 98 is open and holds one batch
CKPT_KW = {"interval": 7, "num_samples": 30}  # 30 samples at 12 per batch: a 3-batch window


def _ckpt_batches(name):
    _, shape = MODELS[name]
    g = torch.Generator().manual_seed(11)
    # 12 per batch: counts that are not powers of two, so that no rounding of the saved
    # statistics goes unnoticed
    return [(data(shape, n=12, seed=s), torch.randn(12, OUT_FEATURES[name], generator=g)) for s in range(5)]


def _ckpt_build(name, opt_name, seed, device="cpu", **kw):
    torch.manual_seed(seed)
    model = whiten(MODELS[name][0]()).to(device)
    opt = _optimizer(opt_name, model)
    return model, opt, Prong(model, opt, **CKPT_KW, **kw)


def _run(model, opt, prong, batches, steps, start=0, device="cpu"):
    losses = []
    for t in range(start, start + steps):
        x, y = batches[t % len(batches)]
        losses.append(_train_step(model, opt, prong, x.to(device), y.to(device))[0])
    return losses


def _checkpoint_resumes_bitwise(name, opt_name, order, **kw):
    batches = _ckpt_batches(name)
    ref_model, ref_opt, ref_prong = _ckpt_build(name, opt_name, 0, **kw)
    ref_losses = _run(ref_model, ref_opt, ref_prong, batches, CKPT_STEPS)

    model, opt, prong = _ckpt_build(name, opt_name, 0, **kw)
    losses = _run(model, opt, prong, batches, CKPT_SAVE)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), "the runs are not deterministic"
    window = prong.state_dict()["window"]
    assert window is not None, "the save point must fall inside an open statistics window"
    assert any(s["count"] > 0 for s in window["stats"].values()), "the window should hold statistics"
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "prong": prong.state_dict()}, buf)
    del model, opt, prong

    model, opt, prong = _ckpt_build(name, opt_name, 1234, **kw)  # fresh, differently initialized
    buf.seek(0)
    ckpt = torch.load(buf)
    loaders = {"model": model.load_state_dict, "optimizer": opt.load_state_dict}
    loaders["prong"] = prong.load_state_dict
    for key in order:
        loaders[key](ckpt[key])
    losses = _run(model, opt, prong, batches, CKPT_STEPS - CKPT_SAVE, start=CKPT_SAVE)

    for t, (a, b) in enumerate(zip(losses, ref_losses[CKPT_SAVE:]), CKPT_SAVE):
        assert torch.equal(a, b), f"loss of update {t}: {a.item()!r} vs {b.item()!r} uninterrupted"
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    ref_buffers = dict(ref_model.named_buffers())
    for n, b in model.named_buffers():
        assert torch.equal(b, ref_buffers[n]), n
    assert prong.updates == ref_prong.updates == CKPT_STEPS
    assert prong.num_reparametrizations == ref_prong.num_reparametrizations


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_checkpoint_inside_a_window_resumes_bitwise(name, opt_name):
    _checkpoint_resumes_bitwise(name, opt_name, ("model", "optimizer", "prong"))


@pytest.mark.parametrize("order", [("prong", "model", "optimizer"), ("optimizer", "prong", "model")])
def test_checkpoint_load_order_does_not_matter(order):
    _checkpoint_resumes_bitwise("mlp", "sgd", order)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_checkpoint_with_rescale_resumes_bitwise(opt_name):
    _checkpoint_resumes_bitwise("cnn", opt_name, ("prong", "optimizer", "model"), rescale=True)


@pytest.mark.cuda
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_cpu_checkpoint_continues_on_cuda(opt_name):
    _cpu_checkpoint_continues_on("cuda", opt_name)


def _cpu_checkpoint_continues_on(device, opt_name):
    name = "cnn"
    batches = _ckpt_batches(name)
    ref_model, ref_opt, ref_prong = _ckpt_build(name, opt_name, 0)
    ref_losses = _run(ref_model, ref_opt, ref_prong, batches, CKPT_STEPS)

    model, opt, prong = _ckpt_build(name, opt_name, 0)
    _run(model, opt, prong, batches, CKPT_SAVE)
    assert prong.state_dict()["window"] is not None
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "prong": prong.state_dict()}, buf)

    model, opt, prong = _ckpt_build(name, opt_name, 1234, device=device)
    buf.seek(0)
    ckpt = torch.load(buf)  # CPU tensors, as saved
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    prong.load_state_dict(ckpt["prong"])
    losses = _run(model, opt, prong, batches, CKPT_STEPS - CKPT_SAVE, start=CKPT_SAVE, device=device)
    assert prong.updates == CKPT_STEPS
    assert prong.num_reparametrizations == ref_prong.num_reparametrizations
    assert all(math.isfinite(v.item()) for v in losses)
    for a, b in zip(losses, ref_losses[CKPT_SAVE:]):
        assert abs(a.item() - b.item()) <= 1e-3 * abs(b.item()) + 1e-6
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert p.device.type == device
        assert rel(p.detach().cpu(), ref_params[n].detach()) <= 1e-3, n


# ----------------------------------------------------------------------------------------------
# 2a. NaN / Inf inputs


def _trained_named_mlp(interval=1000, num_samples=32):
    model = _named_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prong = Prong(model, opt, interval=interval, num_samples=num_samples)
    x = data((12,), n=32)
    return model, opt, prong, x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_to_reparametrize_raise_and_change_nothing(value):
    model, opt, prong, x = _trained_named_mlp()
    prong.reparametrize(x)  # U != I, c != 0
    for _ in range(3):
        _train_step(model, opt, prong, x, torch.zeros(32, 5))
    layers, state = _layer_state(prong), _opt_state(opt)
    bad = x.clone()
    bad[3, 2] = value
    with pytest.raises(ValueError) as info:
        prong.reparametrize(bad)
    assert "first" in str(info.value)
    _assert_same_layers(prong, layers)
    _assert_same_opt_state(opt, state)
    assert set(opt.state) == set(model.parameters())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_training_input_fails_the_rewhitening_step_and_changes_nothing(value):
    model, opt, prong, x = _trained_named_mlp(interval=3, num_samples=32)
    y = torch.zeros(32, 5)
    for t in range(3):
        assert _train_step(model, opt, prong, x, y)[1] == (t == 0)
    bad = x.clone()
    bad[5, 0] = value
    model(bad)  # the training forward pass of update 3 (a re-whitening); no update follows
    layers, state = _layer_state(prong), _opt_state(opt)
    with pytest.raises(ValueError) as info:
        prong.step()
    assert "first" in str(info.value)
    _assert_same_layers(prong, layers)
    _assert_same_opt_state(opt, state)


# ----------------------------------------------------------------------------------------------
# 2b. Eigendecomposition failures

TARGET = "hidden"  # its U is the only 16 x 16 one


def _failing_whitening(real, failure, retry_fails, calls):
    """ops.whitening failing for the 16 x 16 matrix on the batched call (no backend, or
    backend='auto') and, when retry_fails, on the per-matrix retry (backend='torch') too."""

    def fake(mats, eps, kind="pca", *, backend="auto"):
        mats = list(mats)
        calls.append((backend, [tuple(m.shape) for m in mats], [m.dtype for m in mats]))
        hit = [i for i, m in enumerate(mats) if m.shape[0] == 16]
        if hit and (backend != "torch" or retry_fails):
            if failure == "linalg":
                raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
            if failure == "runtime":
                raise RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED")
            us, u_invs = real(mats, eps, kind, backend=backend)
            us, u_invs = list(us), list(u_invs)
            for i in hit:
                if failure == "nan_u":
                    us[i] = us[i].clone()
                    us[i][0, 0] = float("nan")
                else:  # "inf_u_inv"
                    u_invs[i] = u_invs[i].clone()
                    u_invs[i][-1, 1] = float("inf")
            return us, u_invs
        return real(mats, eps, kind, backend=backend)

    return fake


@pytest.mark.parametrize("retry_fails", [False, True], ids=["retry_ok", "retry_fails"])
@pytest.mark.parametrize("failure", ["linalg", "runtime", "nan_u", "inf_u_inv"])
def test_eigendecomposition_failure_is_retried_then_keeps_the_layer(monkeypatch, failure, retry_fails):
    model, opt, prong, x = _trained_named_mlp()
    prong.reparametrize(x)
    for _ in range(3):
        _train_step(model, opt, prong, x, torch.randn(32, 5))
    reference = copy.deepcopy(model)  # re-whitened with the real ops.whitening
    Prong(reference, num_samples=32).reparametrize(data((12,), n=32, seed=3))

    layers, state = _layer_state(prong), _opt_state(opt)
    moments = _canonical_moments(prong, opt, "momentum_buffer")
    probe = data((12,), n=64, seed=8)
    before, before_bound = eval_out(model, probe), eval_rounding_bound(model, probe)
    calls = []
    fake = _failing_whitening(ops.whitening, failure, retry_fails, calls)
    monkeypatch.setattr(prong_ext.ops, "whitening", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prong.reparametrize(data((12,), n=32, seed=3))
    named = [w for w in caught if issubclass(w.category, UserWarning) and TARGET in str(w.message)]

    retries = [c for c in calls if c[0] == "torch"]
    assert any(shapes == [(16, 16)] and dtypes == [torch.float64] for _, shapes, dtypes in retries), calls
    # the layer that kept its whitening was not written: no roundings more
    kept = TARGET if retry_fails else None
    rewritten = {m: 4 for n, m in prong.layers.items() if n != kept}
    _assert_function_kept(model, probe, before, before_bound, rewritten, "function after re-whitening")
    assert _finite(prong)
    others = [n for n in prong.layers if n != TARGET]
    after = _canonical_moments(prong, opt, "momentum_buffer")
    for name in others:  # re-whitened normally, moments transformed
        assert not torch.equal(prong.layers[name].U, layers[name, "U"]), name
        torch.testing.assert_close(prong.layers[name].c, reference.get_submodule(name).c)
        mtol = _moment_tol(moments[name][0], prong.layers[name].U, layers[name, "U"])
        torch.testing.assert_close(after[name][0], moments[name][0], **mtol)
    if retry_fails:
        assert named, [str(w.message) for w in caught]
        _assert_same_layers(prong, layers, names=[TARGET])
        layer = prong.layers[TARGET]
        _assert_same_opt_state(opt, state, params=[layer.V, layer.d])
    else:
        assert not named, [str(w.message) for w in caught]
        u, u_ref = prong.layers[TARGET].U.double(), reference.get_submodule(TARGET).U.double()
        # sign-free; both float32 roundings of a float64 whitening: 16-term sums of them
        utol = tol(torch.float32, n=16 + 2, scale=(u_ref.abs().T @ u_ref.abs()).max().item())
        torch.testing.assert_close(u.T @ u, u_ref.T @ u_ref, **utol)
        mtol = _moment_tol(moments[TARGET][0], prong.layers[TARGET].U, layers[TARGET, "U"])
        torch.testing.assert_close(after[TARGET][0], moments[TARGET][0], **mtol)


# ----------------------------------------------------------------------------------------------
# 2c. Degenerate statistics


def _check_degenerate(model, x, num_samples, probe):
    prong = Prong(model, num_samples=num_samples)
    before = {k: (eval_out(model, v), eval_rounding_bound(model, v)) for k, v in (("x", x), ("probe", probe))}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "data gave", UserWarning)
        prong.reparametrize(x)
    assert _finite(prong)
    assert not all(torch.equal(m.U, torch.eye(len(m.U))) for m in prong.layers.values())
    rewritten = {m: 4 for m in prong.layers.values()}  # V, d, U, c written, rounded to float32
    for k, v in (("x", x), ("probe", probe)):
        _assert_function_kept(model, v, *before[k], rewritten, k)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_constant_feature(name):
    build, shape = MODELS[name]
    model = whiten(build())
    x = data(shape, n=64)
    x[:, 1] = 3.0
    _check_degenerate(model, x, 64, data(shape, n=32, seed=4))
    # the shifted sums of a constant feature are exact zeros: its mean is the constant itself
    assert model[0].c[1].item() == 3.0


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_duplicated_features(name):
    build, shape = MODELS[name]
    model = whiten(build())
    x = data(shape, n=64)
    x[:, 2] = x[:, 0]
    _check_degenerate(model, x, 64, data(shape, n=32, seed=4))


def test_fewer_samples_than_features():
    build, shape = MODELS["mlp"]
    model = whiten(build())  # layer '2' is 16 wide, layer '0' 12
    _check_degenerate(model, data(shape, n=64), 4, data(shape, n=32, seed=4))


def test_batch_of_one_linear():
    layer = WhitenedLinear(16, 8)
    _check_degenerate(layer, data((16,), n=1), 1, data((16,), n=32, seed=4))


def test_batch_of_one_conv():
    layer = WhitenedConv2d(4, 3, 1)  # a 1 x 1 input: one sample
    _check_degenerate(layer, data((4, 1, 1), n=1), 1, data((4, 1, 1), n=32, seed=4))
    build, shape = MODELS["cnn"]  # the final linear layer sees one sample
    _check_degenerate(whiten(build()), data(shape, n=1), 1, data(shape, n=32, seed=4))


# ----------------------------------------------------------------------------------------------
# 3. ZCA


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_zca_is_symmetric_and_keeps_the_function(name):
    build, shape = MODELS[name]
    model = whiten(build())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prong = Prong(model, opt, interval=3, num_samples=32, whitening="zca")
    probe = data(shape, n=64, seed=7)
    for t in range(10):
        x = data(shape, n=32, seed=t % 4)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        before, before_bound = eval_out(model, probe), eval_rounding_bound(model, probe)
        done = prong.step()
        assert done == (t % 3 == 0)
        # a re-whitening writes 4 roundings per layer; the steps between write nothing
        rewritten = {m: 4 if done else 0 for m in prong.layers.values()}
        _assert_function_kept(model, probe, before, before_bound, rewritten, f"update {t}")
        for lname, layer in prong.layers.items():
            u = layer.U
            # U = Q D Q^T in float64 is symmetric to float64 rounding; rounded to float32, U[i, j]
            # and U[j, i] are the same value or neighbours: at most one float32 ulp apart
            ulp = 2 * F32_ROUNDING * torch.maximum(u.abs(), u.T.abs())
            assert_within(u, u.T, ulp, lname)
        assert _finite(prong)
    assert prong.num_reparametrizations == 4


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_zca_transform_keeps_momentum_direction(opt_name):
    build, shape = MODELS["cnn"]
    model = whiten(build())
    x = data(shape, n=64)
    opt = _optimizer(opt_name, model)
    key = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    prong = Prong(model, opt, interval=1000, num_samples=64, whitening="zca", second_moment="keep")
    prong.reparametrize(x)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    before = _canonical_moments(prong, opt, key)
    before_u = {name: layer.U.clone() for name, layer in prong.layers.items()}
    prong.reparametrize(data(shape, n=64, seed=5))
    after = _canonical_moments(prong, opt, key)
    for name in before:
        mtol = _moment_tol(before[name][0], prong.layers[name].U, before_u[name])
        torch.testing.assert_close(after[name][0], before[name][0], **mtol)
        assert torch.equal(after[name][1], before[name][1])  # g_d' = g_d, untouched


# ----------------------------------------------------------------------------------------------
# 4. Diagonal rescaling

RESCALE_EPS = 0.05


def _capture_inputs(prong) -> dict:
    """The latest training-mode input of every whitened layer (the test's own hooks)."""
    latest = {}

    def make(name):
        def hook(mod, args):
            if mod.training:
                latest[name] = args[0].detach().clone()

        return hook

    for name, layer in prong.layers.items():
        layer.register_forward_pre_hook(make(name))
    return latest


def _row_scale(u, u0):
    """s with u = diag(s) u0 (least squares per row)."""
    return (u * u0).sum(1) / (u0 * u0).sum(1)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_rescale_scales_the_rows_of_u_to_unit_second_moment(name, opt_name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = whiten(build())
    opt = _optimizer(opt_name, model)
    interval = 5
    prong = Prong(model, opt, interval=interval, num_samples=32, eps=RESCALE_EPS, rescale=True)
    latest = _capture_inputs(prong)
    probe = data(shape, n=64, seed=7)
    keys = ("momentum_buffer",) if opt_name == "sgd" else ("exp_avg", "exp_avg_sq")
    u0 = {}
    rescaled = 0
    for t in range(13):
        x = data(shape, n=32, seed=t % 4)
        y = torch.randn(32, OUT_FEATURES[name], generator=torch.Generator().manual_seed(t % 4))
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        layers = _layer_state(prong)
        moments = {
            n: {k: (opt.state[l.V][k].clone(), opt.state[l.d][k].clone()) for k in keys}
            for n, l in prong.layers.items()
        }
        before, before_bound = eval_out(model, probe), eval_rounding_bound(model, probe)
        done = prong.step()
        assert done == (t % interval == 0)
        # a rescaling rounds U's rows times r and V's columns over r, r float32 the same in both
        # (V U exact but for those 2 roundings); a re-whitening writes 4
        rewritten = {m: 4 if done else 2 for m in prong.layers.values()}
        _assert_function_kept(model, probe, before, before_bound, rewritten, f"update {t}")
        assert _finite(prong)
        if done:
            u0 = {n: l.U.detach().double().clone() for n, l in prong.layers.items()}
            continue
        rescaled += 1
        for lname, layer in prong.layers.items():
            assert torch.equal(layer.d, layers[lname, "d"]), f"{t} {lname}.d"
            assert torch.equal(layer.c, layers[lname, "c"]), f"{t} {lname}.c"
            h = _rows(latest[lname]).double() - layer.c.double()
            m = (h @ u0[lname].T).square().mean(0)
            reg = RESCALE_EPS * u0[lname].square().sum(1)  # eps |u0_j|^2
            expected = (m + reg).rsqrt()[:, None] * u0[lname]
            u = layer.U.double()
            # U is float32 and its hook sums z = U (h - c) in float32: the checks hold up to the
            # rounding bound of that dot product (n features, one rounding more for h - c and one
            # for z^2: 2 (n + 2) u relative to |u_j|^T |h - c| squared, var_abs) and of the
            # scaling of U's rows (factor and product rounded to float32: 4 u for a quadratic
            # form), plus, for U against D U0, 4 u per rescaling since the re-whitening
            reg_u = RESCALE_EPS * u.square().sum(1)
            var_abs = (h.abs() @ u.abs().T).square().mean(0) + reg_u
            var_tol = (2 * (h.shape[1] + 2) + 4) * F32_ROUNDING * var_abs
            row_tol = var_tol + 4 * interval * F32_ROUNDING * var_abs
            row_err = (u - expected).norm(dim=1) / expected.norm(dim=1)
            assert (row_err <= row_tol).all(), f"update {t}, layer {lname}: U is not D U0 ({row_err})"
            second = (h @ u.T).square().mean(0)
            assert ((second - m / (m + reg)).abs() <= 2 * row_tol * var_abs).all(), f"{t} {lname}"
            # every row has unit variance under Sigma + eps I, so |u_j| <= eps^-1/2
            var = second + reg_u
            assert ((var - 1).abs() <= var_tol).all(), f"update {t}, layer {lname}: {var - 1} vs {var_tol}"
            # V compensates exactly: V U (the canonical W) unchanged up to rounding (V's columns
            # and U's rows each rounded twice, relative to |V| |U|)
            v_old, u_old = layers[lname, "V"].double(), layers[lname, "U"].double()
            w_before, _ = reference.fold(v_old, None, u_old, None)
            w_after, _ = reference.fold(layer.V.detach().double(), None, u, None)
            w_abs, _ = reference.fold(v_old.abs(), None, u_old.abs(), None)
            w_tol = 2 * 4 * F32_ROUNDING * (w_abs.norm() / w_before.norm()).item()
            assert rel(w_after, w_before) <= w_tol, f"{t} {lname}"
            # the optimizer state follows: columns times the change of D (squared for exp_avg_sq),
            # elementwise, so up to a few roundings: the factor's and the product's, and those of
            # U's rows that the change is estimated from (twice for the square)
            change = _row_scale(u, u0[lname]) / _row_scale(layers[lname, "U"].double(), u0[lname])
            col = change.view(1, -1, *([1] * (layer.V.dim() - 2)))
            for k in keys:
                old_v, old_d = moments[lname][k]
                factor = col.square() if k == "exp_avg_sq" else col
                torch.testing.assert_close(
                    opt.state[layer.V][k].double(), old_v.double() * factor, rtol=16 * F32_ROUNDING, atol=0
                )
                assert torch.equal(opt.state[layer.d][k], old_d), f"{t} {lname} {k} of d"
    assert rescaled == 13 - 3


@pytest.mark.parametrize("kwargs", [{}, {"rescale": False}], ids=["default", "rescale_false"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_no_rescale_changes_nothing_between_rewhitenings(kwargs, opt_name):
    build, shape = MODELS["cnn"]
    model = whiten(build())
    opt = _optimizer(opt_name, model)
    prong = Prong(model, opt, interval=4, num_samples=32, **kwargs)
    for t in range(9):
        x = data(shape, n=32, seed=t % 3)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        layers, state = _layer_state(prong), _opt_state(opt)
        if not prong.step():
            _assert_same_layers(prong, layers)
            _assert_same_opt_state(opt, state)
        else:
            assert t % 4 == 0


# ----------------------------------------------------------------------------------------------
# 5. Long run


def test_thousand_rewhitenings_keep_the_function():
    build, shape = MODELS["mlp"]
    model = whiten(build())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    prong = Prong(model, opt, interval=1, num_samples=32)
    g = torch.Generator().manual_seed(3)
    batches = [(data(shape, n=32, seed=s), torch.randn(32, 5, generator=g)) for s in range(4)]
    probe = data(shape, n=64, seed=100)
    rewritten = {m: 4 for m in prong.layers.values()}  # each re-whitening writes V, d, U, c
    for t in range(1000):
        x, y = batches[t % len(batches)]
        loss = (model(x) - y).square().mean()
        assert torch.isfinite(loss), t
        opt.zero_grad()
        loss.backward()
        opt.step()
        before, before_bound = eval_out(model, probe), eval_rounding_bound(model, probe)
        assert prong.step()
        assert _finite(prong), t
        _assert_function_kept(model, probe, before, before_bound, rewritten, f"re-whitening {t}")
    assert prong.num_reparametrizations == 1000
