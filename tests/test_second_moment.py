"""Prong's second_moment policy: what a re-whitening does to Adam's exp_avg_sq and AMSGrad's
max_exp_avg_sq of the whitened weights V (docs/algorithm.md section 8)."""

import pytest
import torch

from helpers import MODELS, assert_within, data, gamma, unit_roundoff
from prong_ext import Prong, _reparam, whiten

SECOND = ("exp_avg_sq", "max_exp_avg_sq")


def _adam_run(name, steps=3, seed=0, **prong_kwargs):
    """A whitened model, its AMSGrad Adam after `steps` updates and a Prong (not yet stepped)."""
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = whiten(build())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    prong = Prong(model, opt, interval=1000, num_samples=64, **prong_kwargs)
    prong.reparametrize(data(shape, n=64))  # U != I and c != 0 before the re-whitening under test
    for t in range(steps):
        _update(model, opt, data(shape, n=32, seed=10 + t))
    return model, opt, prong, shape


def _update(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _state(opt):
    return {
        p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


def test_the_policy_is_validated_naming_the_allowed_values():
    model = whiten(MODELS["mlp"][0]())
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"second_moment='full' must be one of 'keep', 'reset', 'diagonal'"):
        Prong(model, opt, second_moment="full")
    for state_policy in ("reset", "keep"):
        with pytest.raises(ValueError, match="applies only with optimizer_state='transform'"):
            Prong(model, opt, optimizer_state=state_policy, second_moment="diagonal")
    for policy in ("keep", "reset", "diagonal"):
        assert Prong(model, opt, second_moment=policy).second_moment == policy
    # the default: "reset" where the moments are transformed; "keep" (no error) where
    # optimizer_state decides the whole state
    assert Prong(model, opt).second_moment == "reset"
    for state_policy in ("reset", "keep"):
        assert Prong(model, opt, optimizer_state=state_policy).second_moment == "keep"


def test_state_dict_carries_the_policy_and_load_warns_when_it_differs():
    model = whiten(MODELS["mlp"][0]())
    opt = torch.optim.Adam(model.parameters())
    state = Prong(model, opt, second_moment="diagonal").state_dict()
    assert state["second_moment"] == "diagonal"
    other = Prong(model, opt)
    with pytest.warns(UserWarning, match=r"second_moment='diagonal' \(constructed with 'reset'\)"):
        other.load_state_dict(state)
    assert other.second_moment == "diagonal"
    # a checkpoint from before the option: the constructor's stays, without a warning
    older = {k: v for k, v in state.items() if k != "second_moment"}
    fresh = Prong(model, opt, second_moment="diagonal")
    fresh.load_state_dict(older)
    assert fresh.second_moment == "diagonal"
    # ... unless the checkpoint does not transform the moments: then "keep", the only policy there
    with pytest.warns(UserWarning, match="takes the checkpoint's optimizer_state='reset'"):
        fresh.load_state_dict(dict(older, optimizer_state="reset"))
    assert (fresh.second_moment, fresh.optimizer_state) == ("keep", "reset")
    bad = dict(state, optimizer_state="keep")
    with pytest.raises(ValueError, match="state_dict: second_moment='diagonal' applies only"):
        Prong(model, opt).load_state_dict(bad)


def test_reset_is_the_default_and_keep_leaves_the_second_moments_bitwise():
    runs = []
    for kwargs in ({}, {"second_moment": "reset"}):
        model, opt, prong, shape = _adam_run("cnn", **kwargs)
        prong.reparametrize(data(shape, n=64, seed=5))
        _update(model, opt, data(shape, n=32, seed=7))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    model, opt, prong, shape = _adam_run("cnn", second_moment="keep")
    before = _state(opt)
    prong.reparametrize(data(shape, n=64, seed=5))
    for layer in prong.layers.values():
        for k in SECOND + ("step",):
            assert torch.equal(opt.state[layer.V][k], before[layer.V][k]), k


@pytest.mark.parametrize("name", ["mlp", "cnn", "grouped_cnn", "mlp_nobias"])
def test_reset_restarts_adam_on_v_and_keeps_d(name):
    model, opt, prong, shape = _adam_run(name, second_moment="reset")
    before = _state(opt)
    prong.reparametrize(data(shape, n=64, seed=5))
    for layer in prong.layers.values():
        state = opt.state[layer.V]
        for k in ("exp_avg",) + SECOND + ("step",):
            assert not state[k].any(), k
        if layer.d is not None:  # d's coordinates do not change: its state stays
            for k, v in opt.state[layer.d].items():
                assert torch.equal(v, before[layer.d][k]), k
    # the next update of V is Adam's first: lr g / (|g| + eps), at most lr per coordinate
    old = {layer: layer.V.detach().clone() for layer in prong.layers.values()}
    _update(model, opt, data(shape, n=32, seed=7))
    lr = opt.param_groups[0]["lr"]
    for layer, v in old.items():
        step = (layer.V.detach() - v).abs()
        # V's rounding: one of |V| + lr
        assert (step <= lr + torch.finfo(torch.float32).eps * (v.abs() + lr)).all()
        assert step.max() > lr / 2  # it moved: the restarted state took part
        assert opt.state[layer.V]["step"].item() == 1


def test_reset_leaves_an_optimizer_without_second_moments_as_transform_does():
    runs = []
    for policy in ("keep", "reset"):
        build, shape = MODELS["mlp"]
        torch.manual_seed(0)
        model = whiten(build())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        prong = Prong(model, opt, interval=1000, num_samples=64, second_moment=policy)
        prong.reparametrize(data(shape, n=64))
        _update(model, opt, data(shape, n=32, seed=3))
        prong.reparametrize(data(shape, n=64, seed=5))
        runs.append([opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 'diagonal': v_V'[o, j] = sum_i A_ji^2 v_V[o, i] + a_j^2 v_d[o], A = U' U^-1, a = U' (c - c')


def _blocks(u: torch.Tensor) -> torch.Tensor:
    """U as (G, k, k) blocks."""
    return u if u.dim() == 3 else u.unsqueeze(0)


def _per_row(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A V-shaped tensor (O, k, *taps) as (G, O / G, k, taps)."""
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def _scaled_permutation(groups: int, k: int, permute: bool, seed: int) -> torch.Tensor:
    """Blocks diag(s) P (G, k, k) in float64, P a permutation (the identity unless permute)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(groups):
        order = torch.randperm(k, generator=g) if permute else torch.arange(k)
        scale = 0.5 + 2 * torch.rand(k, generator=g, dtype=torch.float64)
        out.append(scale[:, None] * torch.eye(k, dtype=torch.float64)[order])
    return torch.stack(out)


@pytest.mark.parametrize("permute", [True, False], ids=["permutation", "scaling"])
@pytest.mark.parametrize(
    ("name", "index"),
    [("mlp", 0), ("mlp_nobias", 2), ("cnn", 0), ("grouped_cnn", 0), ("grouped_cnn", 2)],
    ids=["linear", "linear_nobias", "conv", "grouped_conv", "depthwise_nobias"],
)
def test_diagonal_is_exact_for_a_scaled_permutation(name, index, permute):
    """Where every new coordinate is one old one, scaled (and c' = c), the carried second moments
    are those Adam would have accumulated from the transformed gradients."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = whiten(build())
    layer = model[index]
    if layer.d is not None:
        with torch.no_grad():
            layer.c.copy_(torch.randn(layer.c.shape))  # c' = c != 0: a = 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.9), amsgrad=True)
    steps, beta2 = 6, 0.9
    grads = []
    for t in range(steps):
        _update(model, opt, data(shape, n=16, seed=20 + t))
        grads.append(layer.V.grad.detach().clone())
    groups = layer.U.shape[0] if layer.U.dim() == 3 else 1
    k = layer.U.shape[-1]
    u_new = _scaled_permutation(groups, k, permute, seed=3)
    u_new = u_new if layer.U.dim() == 3 else u_new[0]
    u_new_inv = torch.linalg.inv(u_new)
    eye = torch.eye(k, dtype=torch.float64).expand_as(u_new).clone()  # the old U is I
    d_state = None if layer.d is None else _state(opt)[layer.d]
    new, old = _reparam.project(layer, layer.c.double(), u_new, u_new_inv)
    moments = _reparam.moved_moments(opt, "transform", layer, new, old, lambda u: eye, set(), "diagonal")
    with torch.no_grad():
        _reparam.write(layer, new, opt, moments)
    # Adam's accumulation, in float64, of the gradients mapped to the new coordinates:
    # g_V'[o] = A g_V[o] with A = U' (the old U is I)
    v = peak = torch.zeros_like(grads[0], dtype=torch.float64)
    for g in grads:
        moved = torch.einsum("gji,goit->gojt", _blocks(u_new), _per_row(g.double(), groups)).reshape(g.shape)
        v = beta2 * v + (1 - beta2) * moved.square()
        peak = torch.maximum(peak, v)
    # Adam's float32 EMA: <= 4 roundings per step (square, scale, product, sum) of non-negative
    # terms, and one rounding of the carry to float32
    bound = gamma(4 * steps + 2)
    for key, want in (("exp_avg_sq", v), ("max_exp_avg_sq", peak)):
        assert_within(opt.state[layer.V][key], want, bound * want, key)
    if d_state is not None:
        for key, value in d_state.items():
            assert torch.equal(opt.state[layer.d][key], value), key


def _dense_carry(v_v, v_d, change, shift, groups):
    """diag(M diag([v_V[o], v_d[o]]) M^T), M = [A | a], per output row and tap, in float64."""
    rows = _per_row(v_v.double(), groups)  # (G, O / G, k, taps)
    taps = rows.shape[-1]
    k = change.shape[-1]
    if v_d is None:
        m, v = change, rows.movedim(2, -1)  # (G, k, k); (G, O / G, taps, k)
    else:
        m = torch.cat([change, shift.view(groups, k, 1)], dim=2)  # (G, k, k + 1)
        by_row = v_d.double().view(groups, -1, 1, 1).expand(-1, -1, taps, 1)
        v = torch.cat([rows.movedim(2, -1), by_row], dim=-1)  # (G, O / G, taps, k + 1)
    m = m[:, None, None]  # broadcast over rows and taps
    full = (m * v.unsqueeze(-2)) @ m.mT  # M diag(v) M^T
    return full.diagonal(dim1=-2, dim2=-1).movedim(-1, 2).reshape(v_v.shape)


def _capture_projections(monkeypatch, runs: list):
    """Makes every Prong record, at each layer's projection, what the carry starts from: the new
    {V, d, U, c}, the old c, the old U^-1 the transform uses and V's and d's Adam state."""

    def capture(layer, mean, u, u_inv):
        new, old = _reparam.project(layer, mean, u, u_inv)
        prong, opt = runs[-1]["prong"], runs[-1]["opt"]
        side = next(s for s in prong._sides if s.module is layer)
        state_d = {} if layer.d is None else opt.state[layer.d]
        runs[-1]["captured"].append(
            {
                "layer": layer,
                "new": new,
                "c_old": old[1],
                "u_inv_old": side.inverse(old[0]),
                "v": {k: opt.state[layer.V][k].clone() for k in SECOND},
                "d": {k: v.clone() for k, v in state_d.items()},
            }
        )
        return new, old

    monkeypatch.setattr(Prong, "_project", staticmethod(capture))


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn", "grouped_cnn"])
def test_diagonal_is_the_diagonal_of_the_transformed_second_moment_matrix(name, rescale, monkeypatch):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = whiten(build())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    runs = [{"captured": [], "opt": opt}]
    _capture_projections(monkeypatch, runs)
    prong = Prong(model, opt, interval=3, num_samples=32, second_moment="diagonal", rescale=rescale)
    runs[-1]["prong"] = prong
    checked = 0
    for t in range(7):
        _update(model, opt, data(shape, n=32, seed=t))
        if not prong.step():
            continue
        for entry in runs[-1]["captured"]:
            layer, new = entry["layer"], entry["new"]
            u_new, u_inv_old = _blocks(new["U"]), _blocks(entry["u_inv_old"])
            groups, k = u_new.shape[0], u_new.shape[-1]
            change = u_new @ u_inv_old
            shift = None
            if entry["c_old"] is not None:
                shift = (u_new @ (entry["c_old"] - new["c"]).view(groups, k, 1)).flatten()
            v_d = entry["d"].get
            # A is computed from the same float64 factors on both sides, each entry within
            # delta = gamma_k (|U'| |U^-1|) of exact; the sums of non-negative terms within
            # gamma_(k+4) in float64; the carry rounded once to float32
            delta = gamma(k, torch.float64) * (u_new.abs() @ u_inv_old.abs())
            slack = (2 * change.abs() + delta) * delta
            for key in SECOND:
                v_v = entry["v"][key]
                want = _dense_carry(v_v, v_d(key), change, shift, groups)
                from_a = _dense_carry(v_v, None, slack.sqrt(), None, groups)
                bound = (unit_roundoff(torch.float32) + 2 * gamma(k + 4, torch.float64)) * want + 2 * from_a
                assert_within(opt.state[layer.V][key], want, bound, f"update {t}, {key}")
            state = opt.state[layer.V]
            assert (state["max_exp_avg_sq"] >= state["exp_avg_sq"]).all()
            for key, value in entry["d"].items():  # v_d' = v_d, and m_d' = m_d
                assert torch.equal(opt.state[layer.d][key], value), key
            checked += 1
        runs[-1]["captured"].clear()
    assert checked == 3 * len(prong.layers)


@pytest.mark.parametrize("policy", ["keep", "reset", "diagonal"])
def test_a_rescaling_scales_the_second_moments_by_the_squared_change_under_every_policy(policy, monkeypatch):
    build, shape = MODELS["cnn"]
    torch.manual_seed(0)
    model = whiten(build())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    prong = Prong(model, opt, interval=4, num_samples=32, second_moment=policy, rescale=True)
    real = _reparam.scale_moments
    scaled = []

    def spy(optimizer, layer, factor):
        state = optimizer.state[layer.V]
        before = {k: state[k].double() for k in SECOND}
        v_before = layer.V.detach().double() * factor  # V was just divided by factor
        real(optimizer, layer, factor)
        for key in SECOND:
            # the factor and its square in float64, the product in float32: 2 roundings
            want = before[key] * factor.square()
            assert_within(state[key], want, 2 * unit_roundoff(torch.float32) * want, key)
        scaled.append((layer, v_before))

    monkeypatch.setattr(_reparam, "scale_moments", spy)
    for t in range(7):
        _update(model, opt, data(shape, n=32, seed=t % 3))
        v_old = {layer: layer.V.detach().double().clone() for layer in prong.layers.values()}
        scaled.clear()
        done = prong.step()
        assert len(scaled) == (0 if done else len(prong.layers))
        for layer, v_before in scaled:  # the factor is V's change: V / factor, rounded once
            assert_within(v_before, v_old[layer], 2 * unit_roundoff(torch.float32) * v_old[layer].abs(), "V")
