"""Prong's second_moment policy: what a re-whitening does to Adam's exp_avg_sq and AMSGrad's
max_exp_avg_sq of the whitened weights V (docs/algorithm.md section 8)."""

import pytest
import torch

from helpers import MODELS, data
from prong_ext import Prong, whiten

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
    assert Prong(model, opt).second_moment == "keep"


def test_state_dict_carries_the_policy_and_load_warns_when_it_differs():
    model = whiten(MODELS["mlp"][0]())
    opt = torch.optim.Adam(model.parameters())
    state = Prong(model, opt, second_moment="diagonal").state_dict()
    assert state["second_moment"] == "diagonal"
    other = Prong(model, opt)
    with pytest.warns(UserWarning, match=r"second_moment='diagonal' \(constructed with 'keep'\)"):
        other.load_state_dict(state)
    assert other.second_moment == "diagonal"
    # a checkpoint from before the option: the constructor's stays, without a warning
    older = {k: v for k, v in state.items() if k != "second_moment"}
    fresh = Prong(model, opt, second_moment="reset")
    fresh.load_state_dict(older)
    assert fresh.second_moment == "reset"
    bad = dict(state, optimizer_state="keep")
    with pytest.raises(ValueError, match="state_dict: second_moment='diagonal' applies only"):
        Prong(model, opt).load_state_dict(bad)


def test_keep_is_the_default_and_leaves_the_second_moments_bitwise():
    runs = []
    for kwargs in ({}, {"second_moment": "keep"}):
        model, opt, prong, shape = _adam_run("cnn", **kwargs)
        before = _state(opt)
        prong.reparametrize(data(shape, n=64, seed=5))
        for layer in prong.layers.values():
            for k in SECOND + ("step",):
                assert torch.equal(opt.state[layer.V][k], before[layer.V][k]), k
        _update(model, opt, data(shape, n=32, seed=7))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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
