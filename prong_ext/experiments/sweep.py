"""Sensitivity of PRONG to its hyper-parameters (paper Fig. 3a-b), on the auto-encoder.

(a) eps x learning rate: final training error of PRONG for every pair (plus SGD at the same
    learning rates as the reference).
(b) the reparametrization interval T, with the whitened initialization (reparametrize at t = 0)
    and with the plain fan-in initialization (first reparametrization at t = T).
"""

from __future__ import annotations

import argparse
import math

import torch

from . import common
from .autoencoder import DIGITS_ARCH, MNIST_ARCH, build_autoencoder, reconstruction_loss, squared_error


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
    p.add_argument("--updates", type=int, default=1000, help="updates per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
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
    p.add_argument(
        "--eval-samples",
        type=int,
        default=2000,
        help="training images on which the error is measured (default: %(default)s)",
    )
    p.add_argument(
        "--eval-every", type=int, default=None, help="updates between evaluations (default: updates/30)"
    )


def run(args: argparse.Namespace, out) -> dict:
    ds, x = common.train_rows(args)
    sizes = DIGITS_ARCH if x.shape[1] == 64 else MNIST_ARCH if x.shape[1] == 784 else None
    if sizes is None:
        raise common.UsageError(f"sweep: no auto-encoder architecture for {x.shape[1]}-pixel images")
    x_eval = x[: args.eval_samples]
    eval_every = args.eval_every or max(1, args.updates // 30)

    def loss_fn(model, batch):
        return reconstruction_loss(model(batch[0]), batch[0], "ce")

    def evaluate(model):
        return {"train_error": squared_error(model, x_eval)}

    def one(method, lr, eps, interval, whitened_init, desc):
        common.set_seed(args.seed)
        cfg = common.ProngConfig.from_args(args, interval=interval, eps=eps)
        setup = common.setup_method(
            lambda bn: build_autoencoder(sizes, "sigmoid", bn), method, lr, args.momentum, cfg
        )
        gen = torch.Generator().manual_seed(args.seed + 1)
        return common.train(
            setup,
            loss_fn,
            common.batches((x,), args.batch_size, gen),
            args.updates,
            evaluate,
            eval_every,
            method=method,
            lr=lr,
            whitened_init=whitened_init,
            interval=interval,
            batch_size=args.batch_size,
            desc=desc,
            quiet=args.quiet,
        )

    # (a) eps x learning rate
    grid_rows = []
    for lr in args.lrs:
        r = one("sgd", lr, args.eps, args.interval, True, f"sgd lr={lr:g}")
        grid_rows.append(_grid_row("sgd", float("nan"), lr, r))
    for eps in args.eps_values:
        for lr in args.lrs:
            r = one("prong", lr, eps, args.interval, True, f"prong eps={eps:g} lr={lr:g}")
            grid_rows.append(_grid_row("prong", eps, lr, r))
    common.write_csv(out / "eps_lr.csv", grid_rows)
    plot_grid(grid_rows, out / "eps_lr.png", args)

    # (b) T, whitened vs fan-in initialization
    t_results = []
    for interval in args.intervals:
        for init in (True, False):
            name = "whitened" if init else "fan-in"
            r = one("prong", args.lr, args.eps, interval, init, f"T={interval} {name} init")
            r.label = f"T={interval}, {name} init"
            r.interval, r.init = interval, name
            t_results.append(r)
    sgd = one("sgd", args.lr, args.eps, args.interval, True, "sgd")
    sgd.label, sgd.interval, sgd.init = "sgd", 0, "fan-in"
    rows = [
        {"T": r.interval, "init": r.init, "lr": r.lr, **rec} for r in t_results + [sgd] for rec in r.records
    ]
    common.write_csv(out / "interval.csv", rows)
    plot_intervals(t_results, sgd, out / "interval.png", args)

    trows = [
        [
            r.interval or "sgd",
            r.init,
            r.final("train_error"),
            r.num_reparametrizations,
            1e3 * r.seconds_per_update,
            "yes" if r.diverged else "no",
        ]
        for r in t_results + [sgd]
    ]
    theader = ["T", "init", "final train error", "reparametrizations", "ms/update", "diverged"]
    lrs = args.lrs
    gheader = ["eps \\ lr"] + [f"{lr:g}" for lr in lrs]
    gtab = []
    for key in [("sgd", None)] + [("prong", e) for e in args.eps_values]:
        cells = [r for r in grid_rows if r["method"] == key[0] and (key[1] is None or r["eps"] == key[1])]
        gtab.append(
            [("sgd" if key[1] is None else f"prong eps={key[1]:g}")]
            + [(c["final_error"] if not c["diverged"] else "diverged") for c in cells]
        )
    env = common.run_env(args)
    md = [
        f"# Hyper-parameter sensitivity ({ds.name})",
        "",
        f"Command: `{common.command_line(args.argv)}`  ",
        f"Auto-encoder {'-'.join(map(str, sizes))} (sigmoid, cross-entropy), {x.shape[0]} images, "
        f"batch {args.batch_size}, {args.updates} updates per run, momentum {args.momentum:g}, "
        f"N_s={args.num_samples}, seed {args.seed}.  ",
        f"Environment: {common.environment_line(env)}.",
        "",
        f"## (a) final training error, eps x learning rate (T={args.interval})",
        "",
        common.md_table(gheader, gtab),
        "",
        "![](eps_lr.png)",
        "",
        f"## (b) interval T, whitened vs fan-in initialization (lr={args.lr:g}, eps={args.eps:g})",
        "",
        common.md_table(theader, trows),
        "",
        "![](interval.png)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(md))
    print(common.text_table(gheader, gtab))
    print()
    print(common.text_table(theader, trows))
    return {"grid": grid_rows, "intervals": t_results, "sgd": sgd}


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
    plt = common.pyplot()
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


def plot_intervals(results, sgd, path, args):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(results):
        xs = [rec["update"] for rec in r.records]
        ys = [rec["train_error"] for rec in r.records]
        ax.plot(xs, ys, "-" if r.init == "whitened" else "--", color=f"C{(i // 2) % 10}", label=r.label)
    ax.plot(
        [rec["update"] for rec in sgd.records], [rec["train_error"] for rec in sgd.records], ":k", label="sgd"
    )
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("training squared error")
    ax.set_title(f"PRONG: interval T (solid: whitened init, dashed: fan-in), lr={args.lr:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
