"""The experiments' method registry and training loop: each entry builds its model variant and
optimizer, a new method is one entry, Task.run is deterministic and evaluates on schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prong_ext
from prong_ext import cli
from prong_ext.experiments import common, methods, training
from prong_ext.experiments.fisher import build_mlp

EXPERIMENTS = ("autoencoder", "cnn", "fisher")  # the subcommands with --methods and --lr


def _build(batchnorm):
    return build_mlp(6, 5, 2, 3, batchnorm)


def _task(**changes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    fields = dict(
        build=_build,
        data=(x, y),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        evaluate=lambda model: {"train_loss": F.cross_entropy(model(x), y).item()},
        eval_every=3,
        updates=7,
        batch_size=8,
        prong=common.ProngConfig(interval=2, num_samples=16),
        quiet=True,
    )
    return training.Task(**{**fields, **changes})


def test_every_method_has_a_positive_default_lr_in_every_experiment():
    assert methods.METHODS[:5] == methods.PAPER_METHODS == ("sgd", "rmsprop", "bn", "prong", "prong+")
    assert {"adam", "bn-adam", "prong-adam", "prong+-adam"} <= set(methods.METHODS)
    for experiment in EXPERIMENTS:
        lrs = methods.default_lrs(experiment)
        assert list(lrs) == list(methods.METHODS)
        assert all(lr > 0 for lr in lrs.values()), (experiment, lrs)


def test_the_command_line_accepts_every_registered_method():
    for name in ("autoencoder", "cnn", "fisher"):
        args = cli.build_parser().parse_args([name, "--methods", ",".join(methods.METHODS)])
        cli._check(cli.build_parser(), args)
        assert args.methods == list(methods.METHODS)
        lrs = common.parse_lrs([f"{m}=0.5" for m in methods.METHODS], args.methods, methods.default_lrs(name))
        assert lrs == dict.fromkeys(methods.METHODS, 0.5)


@pytest.mark.parametrize("name", methods.METHODS)
def test_setup_builds_the_variant_of_the_entry(name):
    entry = methods.REGISTRY[name]
    config = common.ProngConfig()
    s = methods.setup(_build, name, 0.1, 0.9, config)
    kinds = {type(m) for m in s.model.modules()}
    assert (nn.BatchNorm1d in kinds) == entry.batchnorm
    assert (prong_ext.WhitenedLinear in kinds) == entry.prong
    assert (nn.Linear in kinds) == (not entry.prong)
    assert (s.prong_config is None) == (not entry.prong)
    if entry.prong:
        assert s.prong_config.eps == (entry.prong_eps or config.eps)
        assert s.prong_config.interval == (entry.prong_interval or config.interval)
    expected = entry.optimizer(nn.Linear(1, 1).parameters(), 0.1, 0.9)
    assert type(s.optimizer) is type(expected)
    assert s.optimizer.defaults["lr"] == 0.1
    assert s.prong is None  # created by the training loop


def test_setup_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'adagrad'"):
        methods.setup(_build, "adagrad", 0.1, 0.9, common.ProngConfig())


def test_a_new_method_is_one_entry(monkeypatch):
    def adamw(params, lr, momentum):
        return torch.optim.AdamW(params, lr=lr)

    entry = methods.Method("prong-adamw", adamw, dict.fromkeys(EXPERIMENTS, 1e-3), prong=True)
    monkeypatch.setitem(methods.REGISTRY, entry.name, entry)
    res = _task().run("prong-adamw", 1e-3)
    assert isinstance(res.model[0], prong_ext.WhitenedLinear)
    assert res.updates == 7 and not res.diverged
    assert res.num_reparametrizations > 0


@pytest.mark.parametrize("name", ["sgd", "prong+", "prong-adam"])
def test_task_run_is_deterministic_and_evaluates_on_schedule(name):
    calls = []
    task = _task(callback=lambda t, s: calls.append(t) or {"calls": len(calls)})
    a, b = task.run(name, 0.05), task.run(name, 0.05)
    assert [r["update"] for r in a.records] == [0, 3, 6, 7]
    assert calls == [0, 3, 6, 7] * 2
    assert [r["train_loss"] for r in a.records] == [r["train_loss"] for r in b.records]
    assert all(math.isfinite(r["train_loss"]) for r in a.records)
    assert (a.num_reparametrizations > 0) == methods.REGISTRY[name].prong


def test_a_non_finite_loss_stops_the_run():
    res = _task(loss=lambda model, batch: model(batch[0]).sum() * float("inf")).run("sgd", 0.1)
    assert res.diverged and res.updates == 0 and [r["update"] for r in res.records] == [0]


def test_prong_schedule_whitened_and_fan_in_initialization():
    config = common.ProngConfig(interval=100, num_samples=1024)
    assert training._prong_schedule(None, 64) == (None, None)
    assert training._prong_schedule(config, 64) == (0, 1)
    fan_in = common.ProngConfig(interval=100, num_samples=1024, whitened_init=False)
    assert training._prong_schedule(fan_in, 64) == (100 - 16 + 1, 100)
    short = common.ProngConfig(interval=5, num_samples=1024, whitened_init=False)
    assert training._prong_schedule(short, 64) == (1, 5)


def test_the_prong_adam_methods_take_their_own_eps_and_adam():
    for name in ("prong-adam", "prong+-adam"):
        s = methods.setup(_build, name, 1e-3, 0.9, common.ProngConfig(eps=1e-2))
        assert isinstance(s.optimizer, torch.optim.Adam) and s.prong_config.eps == 0.1
    assert methods.setup(_build, "prong", 1e-3, 0.9, common.ProngConfig(eps=1e-2)).prong_config.eps == 1e-2


def test_the_auto_encoder_keeps_the_adaptive_optimizers_rates_on_larger_images():
    from prong_ext.experiments import autoencoder

    args = cli.build_parser().parse_args(["autoencoder", "--methods", "sgd,rmsprop,adam,prong-adam"])
    cli._check(cli.build_parser(), args)
    lrs = autoencoder.learning_rates(args, 784)
    defaults = methods.default_lrs("autoencoder")
    assert lrs["sgd"] == pytest.approx(defaults["sgd"] * 64 / 784)
    assert [lrs[m] for m in ("rmsprop", "adam", "prong-adam")] == [
        defaults[m] for m in ("rmsprop", "adam", "prong-adam")
    ]


@pytest.mark.parametrize(
    "name,policy", [("prong-adam", "keep"), ("prong-adam-reset", "reset"), ("prong-adam-diag", "diagonal")]
)
def test_the_second_moment_variants_reach_prong(name, policy):
    stepper = _task().start(name, 1e-3)
    assert stepper.s.prong_config.second_moment == policy and stepper.s.prong_config.eps == 0.1
    while stepper.advance():
        pass
    res = stepper.finish()
    assert stepper.prong.second_moment == policy
    assert res.updates == 7 and not res.diverged and res.num_reparametrizations > 0


@pytest.mark.parametrize(
    "name,interval", [("prong-adam", 2), ("prong-adam-reset-t200", 200), ("prong-adam-reset-t400", 400)]
)
def test_the_interval_variants_reach_prong(name, interval):
    stepper = _task().start(name, 1e-3)
    assert stepper.s.prong_config.interval == interval and stepper.s.prong_config.eps == 0.1
    while stepper.advance():
        pass
    assert stepper.prong.interval == interval and stepper.finish().updates == 7
