"""Sensitivity of PRONG to its hyper-parameters (paper Fig. 3a-b), on the auto-encoder.

(a) eps x learning rate: final training error of PRONG for every pair (plus SGD at the same
    learning rates as the reference).
(b) the reparametrization interval T, with the whitened initialization (reparametrize at t = 0)
    and with the plain fan-in initialization (first reparametrization at t = T).
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

from . import common, report
from .autoencoder import DIGITS_ARCH, MNIST_ARCH, build_autoencoder, reconstruction_loss, squared_error
from .report import Table
from .training import RunResult, Task


def _floats(s: str) -> list[float]:
    try:
        v = [float(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers") from None
    if not v or any(not x > 0 for x in v):
        raise argparse.ArgumentTypeError(f"{s!r}: expected positive numbers")
    return v


def _ints(s: str) -> list[int]:
    v = _floats(s)
    if any(x != int(x) for x in v):
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated positive integers")
    return [int(x) for x in v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(p, updates=1000, updates_help="updates per run")
    p.add_argument(
        "--eps-values",
        type=_floats,
        default=[1e-3, 1e-2, 1e-1, 1.0],
        help="eps values of (a) (default: 1e-3,1e-2,1e-1,1)",
    )
    p.add_argument(
        "--lrs",
        type=_floats,
        default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
        help="learning rates of (a) (default: 0.001,0.003,0.01,0.03,0.1,0.3)",
    )
    p.add_argument(
        "--intervals",
        type=_ints,
        default=[1, 10, 100, 1000, 100000],
        help="values of T in (b) (default: 1,10,100,1000,100000)",
    )
    p.add_argument(
        "--lr", type=float, default=0.01, help="learning rate of the runs of (b) (default: %(default)s)"
    )
    p.add_argument("--train-samples", type=int, default=None, help="use only the first N training images")
    common.add_eval_arguments(p, every=30)


class IntervalRun(NamedTuple):
    """A run of (b): PRONG at interval ``T`` from the ``init`` initialization; T = 0: SGD."""

    T: int
    init: str  # "whitened" or "fan-in"
    result: RunResult

    @property
    def label(self) -> str:
        return f"T={self.T}, {self.init} init" if self.T else "sgd"


def run(args: argparse.Namespace, out) -> dict:
    """Run (a) and (b); write their CSVs, plots and summary.md; print the tables."""
    ds, x = common.train_rows(args)
    sizes = {64: DIGITS_ARCH, 784: MNIST_ARCH}.get(x.shape[1])
    if sizes is None:
        raise common.UsageError(f"sweep: no auto-encoder architecture for {x.shape[1]}-pixel images")
    x_eval = x[: args.eval_samples]
    task = Task.from_args(
        args,
        build=lambda bn: build_autoencoder(sizes, "sigmoid", bn),
        data=(x,),
        loss=lambda model, batch: reconstruction_loss(model(batch[0]), batch[0], "ce"),
        evaluate=lambda model: {"train_error": squared_error(model, x_eval)},
        eval_every=common.eval_every(args, 30),
    )
    grid_rows = eps_lr_grid(task, args)
    report.write_csv(out / "eps_lr.csv", grid_rows)
    plot_grid(grid_rows, out / "eps_lr.png", args)
    runs = interval_runs(task, args)
    rows = [{"T": r.T, "init": r.init, "lr": r.result.lr, **rec} for r in runs for rec in r.result.records]
    report.write_csv(out / "interval.csv", rows)
    plot_intervals(runs, out / "interval.png", args)
    settings = (
        f"Auto-encoder {'-'.join(map(str, sizes))} (sigmoid, cross-entropy), {x.shape[0]} images, "
        f"batch {args.batch_size}, {args.updates} updates per run, momentum {args.momentum:g}, "
        f"N_s={args.num_samples}, seed {args.seed}."
    )
    body = summary_body(grid_rows, runs, args)
    report.write_summary(out, args, f"Hyper-parameter sensitivity ({ds.name})", settings, body)
    return {"grid": grid_rows, "intervals": runs[:-1], "sgd": runs[-1]}


def eps_lr_grid(task: Task, args: argparse.Namespace) -> list[dict]:
    """(a): SGD at every learning rate, then PRONG at every (eps, learning rate); rows of eps_lr.csv."""
    rows = []
    for lr in args.lrs:
        r = task.run("sgd", lr, desc=f"sgd lr={lr:g}")
        rows.append(_grid_row("sgd", float("nan"), lr, r))
    for eps in args.eps_values:
        for lr in args.lrs:
            r = task.run("prong", lr, prong=task.with_prong(eps=eps), desc=f"prong eps={eps:g} lr={lr:g}")
            rows.append(_grid_row("prong", eps, lr, r))
    return rows


def interval_runs(task: Task, args: argparse.Namespace) -> list[IntervalRun]:
    """(b): PRONG at every interval T from the whitened and the fan-in initialization, then SGD."""
    runs = []
    for interval in args.intervals:
        for init in ("whitened", "fan-in"):
            prong = task.with_prong(interval=interval, whitened_init=init == "whitened")
            r = task.run("prong", args.lr, prong=prong, desc=f"T={interval} {init} init")
            runs.append(IntervalRun(interval, init, r))
    return runs + [IntervalRun(0, "fan-in", task.run("sgd", args.lr, desc="sgd"))]


def summary_body(grid_rows: list[dict], runs: list[IntervalRun], args: argparse.Namespace) -> list:
    """summary.md below the settings: the tables of (a) and (b), their plots."""
    gtab = []
    for method, eps in [("sgd", None)] + [("prong", e) for e in args.eps_values]:
        cells = [r for r in grid_rows if r["method"] == method and (eps is None or r["eps"] == eps)]
        gtab.append(
            [("sgd" if eps is None else f"prong eps={eps:g}")]
            + [(c["final_error"] if not c["diverged"] else "diverged") for c in cells]
        )
    trows = [
        [
            r.T or "sgd",
            r.init,
            r.result.final("train_error"),
            r.result.num_reparametrizations,
            1e3 * r.result.seconds_per_update,
            "yes" if r.result.diverged else "no",
        ]
        for r in runs
    ]
    return [
        f"## (a) final training error, eps x learning rate (T={args.interval})",
        "",
        Table(["eps \\ lr"] + [f"{lr:g}" for lr in args.lrs], gtab),
        "",
        report.images("eps_lr.png"),
        "",
        f"## (b) interval T, whitened vs fan-in initialization (lr={args.lr:g}, eps={args.eps:g})",
        "",
        Table(["T", "init", "final train error", "reparametrizations", "ms/update", "diverged"], trows),
        "",
        report.images("interval.png"),
        "",
    ]


def _curve(r: RunResult) -> tuple[list, list]:
    return [rec["update"] for rec in r.records], [rec["train_error"] for rec in r.records]


def _grid_row(method, eps, lr, r):
    err = r.final("train_error")
    return {
        "method": method,
        "eps": eps,
        "lr": lr,
        "final_error": err,
        "updates": r.updates,
        "diverged": int(r.diverged or not math.isfinite(err)),
    }


def plot_grid(rows, path, args):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("sgd", None)] + [("prong", e) for e in args.eps_values]
    for m, e in series:
        pts = [r for r in rows if r["method"] == m and (e is None or r["eps"] == e)]
        xs = [r["lr"] for r in pts if not r["diverged"]]
        ys = [r["final_error"] for r in pts if not r["diverged"]]
        lab = "sgd" if e is None else f"prong eps={e:g}"
        ax.plot(xs, ys, "o-" if e is not None else "s--k", label=lab)
        bad = [r["lr"] for r in pts if r["diverged"]]
        if bad:
            ax.plot(bad, [max(ys or [1.0])] * len(bad), "x", color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"training error after {args.updates} updates")
    ax.set_title("PRONG: eps x learning rate (x = diverged)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_intervals(runs: list[IntervalRun], path, args):
    """The training curves of (b): one colour per T, solid from the whitened initialization, dashed
    from the fan-in one; SGD (the last run) dotted black."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    *prong_runs, sgd = runs
    for i, r in enumerate(prong_runs):
        xs, ys = _curve(r.result)
        ax.plot(xs, ys, "-" if r.init == "whitened" else "--", color=f"C{(i // 2) % 10}", label=r.label)
    ax.plot(*_curve(sgd.result), ":k", label="sgd")
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("training squared error")
    ax.set_title(f"PRONG: interval T (solid: whitened init, dashed: fan-in), lr={args.lr:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
