"""The one training loop of the experiments.

A Task is what an experiment trains: the model builder, the training tensors, the loss, the
evaluation and the settings every run shares. ``Task.run(method, lr)`` seeds, builds the
method's variant (methods.setup), draws minibatches and calls ``train``, the loop
``loss.backward(); optimizer.step(); prong.step()``, which returns a RunResult: the evaluation
records and the timings. ``Task.start`` gives the same run as a Stepper, advanced one update at a
time, so that runs can be interleaved.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .common import ProngConfig
from .methods import Setup, setup


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU runs are then deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(
    tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless minibatches: a fresh random permutation every epoch, the last partial batch dropped."""
    n = tensors[0].shape[0]
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield tuple(t[idx] for t in tensors)


class _NoBar:
    """What progress_bar gives when the bars are off."""

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str | None, quiet: bool):
    """A tqdm progress bar (to stderr); a silent one when ``quiet`` or when tqdm is missing (then a
    warning says how to install it: the bars are the only thing tqdm is used for)."""
    if quiet:
        return _NoBar()
    from .. import data

    try:
        tqdm = data.import_extra("tqdm.auto", "the progress bars (--quiet turns them off)").tqdm
    except data.MissingExtraError as e:
        _warn_once(str(e))
        return _NoBar()
    return tqdm(None, total=total, desc=desc, disable=False, leave=False, dynamic_ncols=True)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


@dataclass
class RunResult:
    """One training run: evaluation records, timings and the trained model."""

    method: str
    lr: float
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    updates: int = 0
    diverged: bool = False
    prong_timings: dict = field(default_factory=dict)
    num_reparametrizations: int = 0
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def seconds_per_update(self) -> float:
        """Wall-clock seconds per update (training only)."""
        return self.train_seconds / max(self.updates, 1)

    @property
    def cpu_seconds_per_update(self) -> float:
        """CPU seconds of this process per update: steadier than wall time on a shared machine."""
        return self.cpu_seconds / max(self.updates, 1)

    def final(self, key: str) -> float:
        vals = [r[key] for r in self.records if key in r]
        return vals[-1] if vals else float("nan")

    def best(self, key: str) -> float:
        vals = [r[key] for r in self.records if key in r and math.isfinite(r[key])]
        return min(vals) if vals else float("nan")

    def updates_to_reach(self, key: str, target: float) -> int | None:
        for r in self.records:
            if r[key] <= target:
                return r["update"]
        return None


@dataclass
class Task:
    """An experiment's training problem and the settings all its runs share.

    Attributes:
        build: ``build(batchnorm) -> model``.
        data: the training tensors, drawn in minibatches together.
        loss: ``loss(model, batch) -> scalar tensor``.
        evaluate: ``evaluate(model) -> {name: float}``, called in eval mode without grad.
        eval_every: updates between evaluations (and after the last update).
        callback: ``callback(update, setup) -> {name: float}``, more entries of each evaluation.
    """

    build: Callable[[bool], nn.Module]
    data: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]
    eval_every: int
    updates: int
    seed: int = 0
    batch_size: int = 64
    momentum: float = 0.9
    prong: ProngConfig = field(default_factory=ProngConfig)
    quiet: bool = False
    callback: Callable[[int, Setup], dict] | None = None

    @classmethod
    def from_args(cls, args, **fields) -> Task:
        """The Task whose shared settings are the command line's (--updates, --seed, ...)."""
        shared = dict(updates=args.updates, seed=args.seed, batch_size=args.batch_size, quiet=args.quiet)
        return cls(**shared, momentum=args.momentum, prong=ProngConfig.from_args(args), **fields)

    def run(self, method: str, lr: float, **options) -> RunResult:
        """Train ``method`` from the seed, return its RunResult; ``options`` are ``start``'s
        (``updates``, ``eval_every`` and the Prong configuration ``prong`` default to the task's)."""
        stepper = self.start(method, lr, **options)
        while stepper.advance():
            pass
        return stepper.finish()

    def start(
        self,
        method: str,
        lr: float,
        *,
        updates: int | None = None,
        eval_every: int | None = None,
        prong: ProngConfig | None = None,
        desc: str | None = None,
    ) -> Stepper:
        """``run``'s start: seed, build ``method``'s variant and return its Stepper, the initial
        evaluation recorded and no update made."""
        set_seed(self.seed)
        s = setup(self.build, method, lr, self.momentum, prong or self.prong)
        data = batches(self.data, self.batch_size, torch.Generator().manual_seed(self.seed + 1))
        res = RunResult(method, lr, model=s.model)
        return Stepper(s, self, data, res, updates or self.updates, eval_every or self.eval_every, desc)

    def run_all(self, lrs: dict[str, float]) -> list[RunResult]:
        """One run per method of ``lrs`` (method -> learning rate), in its order."""
        return [self.run(m, lr) for m, lr in lrs.items()]

    def with_prong(self, **changes) -> ProngConfig:
        """The task's Prong configuration with ``changes`` (interval, eps, whitened_init, ...)."""
        return replace(self.prong, **changes)


class Stepper:
    """A run of ``train`` advanced one update per ``advance()`` call, so that several runs can be
    interleaved (the race steps them in turn). Created with the initial evaluation recorded;
    ``finish()`` closes it and returns its RunResult."""

    def __init__(
        self,
        s: Setup,
        task: Task,
        data: Iterator[tuple],
        res: RunResult,
        updates: int,
        eval_every: int,
        desc: str | None = None,
    ):
        self.s, self.task, self.data, self.res = s, task, data, res
        self.updates, self.eval_every = updates, eval_every
        self.create_at, self.first_step = _prong_schedule(s.prong_config, task.batch_size)
        self.prong = s.start_prong() if self.create_at == 0 else None
        self.t, self.done = 0, updates <= 0
        s.model.train()
        _record(s, task, res, 0)
        self.bar = progress_bar(updates, desc or res.method, task.quiet)

    def advance(self) -> bool:
        """One update, and its evaluation when due; False when the run is over (all updates done,
        or diverged), then nothing happens."""
        if self.done:
            return False
        s, res, t = self.s, self.res, self.t + 1
        batch = next(self.data)
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.prong is None and self.create_at is not None and t >= self.create_at:
            self.prong = s.start_prong()
        stepping = self.prong is not None and t >= self.first_step
        finite = _step(s, self.task.loss, batch, self.prong if stepping else None)
        res.train_seconds += time.perf_counter() - start
        res.cpu_seconds += time.process_time() - cpu_start
        self.t = t
        if not finite:
            res.diverged, self.done = True, True
            return False
        res.updates = t
        self.bar.update(1)
        due = t % self.eval_every == 0 or t == self.updates
        if due and not _evaluate(s, self.task, res, t, self.bar):
            self.done = True
        self.done = self.done or t == self.updates
        return not self.done

    def finish(self) -> RunResult:
        """Close the progress bar; Prong's timings and reparametrization count into the result."""
        self.bar.close()
        if self.prong is not None:
            self.res.prong_timings = dict(getattr(self.prong, "timings", {}))
            self.res.num_reparametrizations = int(getattr(self.prong, "num_reparametrizations", 0))
        return self.res


def train(
    s: Setup,
    task: Task,
    data: Iterator[tuple],
    res: RunResult,
    updates: int,
    eval_every: int,
    desc: str | None = None,
) -> RunResult:
    """Run ``updates`` optimizer updates of ``s`` on the minibatches ``data`` with ``task``'s loss;
    evaluate (no grad, eval mode) every ``eval_every``; the records and timings go into ``res``.

    The loop is ``loss.backward(); optimizer.step(); prong.step()`` (one Stepper advanced to the
    end). The Prong configuration of ``s`` (PRONG methods) says when Prong starts. With
    ``whitened_init`` (the paper's whitened initialization) Prong exists from the start and its
    first step() re-whitens from the first training batch. With ``whitened_init=False`` (fan-in
    initialization) Prong is created ceil(N_s / batch_size) updates before update ``interval`` (so
    that its statistics window sees the batches just before) and step() is first called at update
    ``interval``: the reparametrizations happen at t = T, 2T, ... Evaluation time is not counted in
    the training seconds. A non-finite loss or evaluation stops the run (``diverged``).
    """
    stepper = Stepper(s, task, data, res, updates, eval_every, desc)
    while stepper.advance():
        pass
    return stepper.finish()


def _prong_schedule(config: ProngConfig | None, batch_size: int) -> tuple[int | None, int | None]:
    """(the update before which Prong is created, 0: before training; the first update that calls
    its step()); (None, None) without Prong."""
    if config is None:
        return None, None
    if config.whitened_init:
        return 0, 1
    create_at = config.interval - math.ceil(config.num_samples / max(batch_size, 1)) + 1
    return max(1, create_at), config.interval


def _step(s: Setup, loss_fn, batch: tuple, prong) -> bool:
    """One update (and ``prong.step()`` unless ``prong`` is None); False, before any change to the
    model, when the loss is not finite."""
    s.optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(s.model, batch)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    s.optimizer.step()
    if prong is not None:
        prong.step()
    return True


def _record(s: Setup, task: Task, res: RunResult, t: int) -> dict:
    """Evaluate the model after ``t`` updates (eval mode, no grad) and append the record."""
    was = s.model.training
    s.model.eval()
    with torch.no_grad():
        r = {"update": t, "seconds": res.train_seconds, "cpu_seconds": res.cpu_seconds}
        r.update(task.evaluate(s.model))
    if task.callback is not None:
        r.update(task.callback(t, s))
    s.model.train(was)
    res.records.append(r)
    return r


def _evaluate(s: Setup, task: Task, res: RunResult, t: int, bar) -> bool:
    """Record an evaluation and show it on the bar; False (record dropped, run diverged) when a
    value is not finite."""
    r = _record(s, task, res, t)
    bar.set_postfix({k: f"{v:.4g}" for k, v in r.items() if k not in ("update", "seconds", "cpu_seconds")})
    if all(math.isfinite(v) for v in r.values()):
        return True
    res.diverged = True
    res.records.pop()
    return False
