"""Deep auto-encoder (paper Sec. 4.2, Fig. 3; architecture of Martens 2010).

Logistic hidden units, a linear code layer, logits out; trained with cross-entropy on pixels in
[0, 1] (or squared error). The reported training error is Martens' squared reconstruction error:
sum over pixels, mean over samples, on a fixed subset of the training set.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import common, report
from .methods import REGISTRY, default_lrs
from .report import DIVERGED, LR, METHOD, Column, Plot, Table
from .training import RunResult, Task

DIGITS_ARCH = (64, 128, 64, 32, 8, 32, 64, 128, 64)
MNIST_ARCH = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

DEFAULT_LR = default_lrs("autoencoder")
TUNE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def build_autoencoder(
    sizes: tuple[int, ...], activation: str = "sigmoid", batchnorm: bool = False
) -> nn.Sequential:
    """Linear layers ``sizes[i] -> sizes[i+1]``; the smallest layer is the linear code.

    Hidden layers: Linear [-> BatchNorm1d] -> activation; the code layer has no activation; the
    last layer outputs logits (no BN, no activation).
    """
    if len(sizes) < 3:
        raise ValueError(f"an auto-encoder needs at least 3 layer sizes, got {sizes}")
    code = min(range(1, len(sizes) - 1), key=lambda i: sizes[i])
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i == len(sizes) - 2:
            break
        if batchnorm:
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
        if i + 1 != code:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss summed over pixels, averaged over the batch."""
    if loss == "ce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    return 0.5 * (torch.sigmoid(logits) - x).pow(2).sum() / x.shape[0]


def squared_error(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        total += (torch.sigmoid(model(xb)) - xb).pow(2).sum().item()
    return total / x.shape[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(
        p,
        updates=2000,
        methods=",".join(common.METHODS),
        default_lr=DEFAULT_LR,
        lr_note="defaults, tuned on the digits and scaled by 64/pixels for other images except the "
        "adaptive optimizers' (rmsprop, adam)",
        momentum_help="SGD momentum for sgd, bn, prong, prong+",
    )
    add_model_arguments(p)
    common.add_eval_arguments(p, every=40)
    factors = ", ".join(f"{f:g}" for f in TUNE_FACTORS)
    p.add_argument(
        "--tune",
        action="store_true",
        help=f"first run a short grid of learning rates (default x {factors}) per method and keep the best",
    )
    p.add_argument(
        "--tune-updates", type=int, default=None, help="updates of each tuning run (default: updates/3)"
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--activation, --loss, --arch, --train-samples: the auto-encoder and its data."""
    p.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        default="sigmoid",
        help="hidden units (default: %(default)s, as Martens 2010)",
    )
    p.add_argument(
        "--loss",
        choices=("ce", "mse"),
        default="ce",
        help="training loss on pixels: cross-entropy or squared error (default: %(default)s)",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="comma-separated layer sizes, first and last = pixels (default: "
        "64-128-64-32-8-32-64-128-64 on digits, 784-1000-500-250-30-250-500-1000-784 on 28x28)",
    )
    p.add_argument(
        "--train-samples", type=int, default=None, help="use only the first N training images (default: all)"
    )


def architecture(arch: str | None, n_pix: int, data_name: str) -> tuple[int, ...]:
    """The layer sizes of --arch, else the default for ``n_pix``-pixel images."""
    if not arch:
        return {64: DIGITS_ARCH, 784: MNIST_ARCH}.get(n_pix, (n_pix, 256, 64, 16, 64, 256, n_pix))
    try:
        sizes = tuple(int(s) for s in arch.replace("-", ",").split(","))
    except ValueError:
        raise common.UsageError(f"--arch {arch!r}: expected sizes like 64,32,8,32,64") from None
    if len(sizes) < 3 or min(sizes) <= 0:
        raise common.UsageError(f"--arch {arch!r}: expected at least 3 positive sizes")
    if sizes[0] != n_pix or sizes[-1] != n_pix:
        raise common.UsageError(
            f"--arch {arch}: first and last sizes must be {n_pix} (pixels of {data_name})"
        )
    return sizes


def learning_rates(args: argparse.Namespace, n_pix: int) -> dict[str, float]:
    """--lr over the defaults. Those were tuned on the digits (64 pixels); the loss sums over pixels,
    so gradients grow with the image: the SGD-type defaults (not those of the adaptive optimizers,
    RMSprop and Adam, which are scale-free) are scaled by 64 / pixels."""
    lrs = common.parse_lrs(args.lr, args.methods, DEFAULT_LR)
    given = {spec.split("=", 1)[0] for spec in args.lr}
    for m in args.methods:
        if m not in given and not REGISTRY[m].adaptive and n_pix != 64:
            lrs[m] *= 64 / n_pix
    return lrs


def make_task(
    args: argparse.Namespace,
    x: torch.Tensor,
    sizes: tuple[int, ...],
    eval_every: int,
    with_loss: bool = False,
) -> Task:
    """The auto-encoder of ``sizes`` on the rows ``x``, with the command line's shared settings;
    evaluated on the first --eval-samples rows: the squared error ``train_error`` and, with
    ``with_loss``, the training objective ``train_loss``."""
    x_eval = x[: args.eval_samples]

    def evaluate(model: nn.Module) -> dict:
        r = {"train_error": squared_error(model, x_eval)}
        if with_loss:
            r["train_loss"] = reconstruction_loss(model(x_eval), x_eval, args.loss).item()
        return r

    return Task.from_args(
        args,
        build=lambda bn: build_autoencoder(sizes, args.activation, bn),
        data=(x,),
        loss=lambda model, batch: reconstruction_loss(model(batch[0]), batch[0], args.loss),
        evaluate=evaluate,
        eval_every=eval_every,
    )


def tune(task: Task, lrs: dict[str, float], tune_updates: int) -> list[dict]:
    """--tune: short runs at every factor of TUNE_FACTORS times each method's learning rate; sets
    ``lrs`` to the one of lowest final error; the rows of tune.csv."""
    every = task.eval_every if tune_updates == task.updates else max(1, tune_updates // 10)
    rows = []
    for m in lrs:
        best = None
        for f in TUNE_FACTORS:
            lr = lrs[m] * f
            r = task.run(m, lr, updates=tune_updates, eval_every=every, desc=f"tune {m} lr={lr:.3g}")
            err = r.final("train_error") if not r.diverged else float("inf")
            row = {
                "method": m,
                "lr": lr,
                "updates": r.updates,
                "train_error": err,
                "diverged": int(r.diverged),
            }
            rows.append(row)
            if best is None or err < best[0]:
                best = (err, lr)
        lrs[m] = best[1]
    return rows


def run(args: argparse.Namespace, out) -> dict:
    """Train every method, write curves.csv, summary.csv, three plots and summary.md; print a table."""
    ds, x = common.train_rows(args)
    sizes = architecture(args.arch, x.shape[1], ds.name)
    lrs = learning_rates(args, x.shape[1])
    task = make_task(args, x, sizes, common.eval_every(args, 40))
    tune_rows = []
    if args.tune:
        tune_rows = tune(task, lrs, args.tune_updates or max(1, args.updates // 3))
        report.write_csv(out / "tune.csv", tune_rows)
    results = task.run_all(lrs)
    arch = "-".join(map(str, sizes))
    report.write_curves(out, results, PLOTS, f"auto-encoder {arch} on {ds.name}")
    table = summary_table(results)
    settings = (
        f"Architecture {arch}, {args.activation} units, {args.loss} loss, {x.shape[0]} training images, "
        f"batch {args.batch_size}, {args.updates} updates, T={args.interval}, eps={args.eps:g}, "
        f"N_s={args.num_samples}, momentum={args.momentum:g}, seed {args.seed}."
    )
    n_eval = min(args.eval_samples, x.shape[0])
    body = summary_body(results, table, tune_rows, n_eval, task.eval_every)
    report.write_summary(out, args, f"Auto-encoder ({ds.name})", settings, body, table)
    return {"results": results, "summary": table, "lrs": lrs}


PLOTS = [
    Plot(f"train_error_vs_{name}.png", x, "train_error", "training squared error")
    for name, x in (("updates", "update"), ("seconds", "seconds"), ("cpu_seconds", "cpu_seconds"))
]


def summary_table(results: list[RunResult]) -> Table:
    """Final and best training error, when each method reached SGD's best, its time per update."""
    sgd = next((r for r in results if r.method == "sgd"), None)
    target = sgd.best("train_error") if sgd else float("nan")

    def reach(r):
        return r.updates_to_reach("train_error", target) if math.isfinite(target) else None

    return report.method_table(
        results,
        [
            METHOD,
            LR,
            Column("final train error", lambda r: r.final("train_error"), "final_error"),
            Column("best train error", lambda r: r.best("train_error"), "best_error"),
            Column("updates to SGD best", reach, "updates_to_sgd_best"),
            *report.speed_columns(
                results, "time/step vs SGD", ("step_time_vs_sgd", "cpu_ms_per_update", "ms_per_update")
            ),
            DIVERGED,
        ],
    )


def summary_body(results, table: Table, tune_rows: list[dict], n_eval: int, eval_every: int) -> list:
    """summary.md below the settings: what the columns mean, the table, Prong's share of the
    time, the --tune grid, the plots."""
    body = [
        f"Training error = squared reconstruction error (sum over pixels, mean over {n_eval} training "
        f"images). 'updates to SGD best' = first evaluation (every {eval_every} updates) at which the "
        "method's error is at or below SGD's best error. 'time/step vs SGD' compares CPU time per "
        "update (steadier than wall time on a shared machine; one thread).",
        "",
        table,
        "",
    ]
    for r in results:
        if r.prong_timings:
            share = {k: v / max(r.train_seconds, 1e-12) for k, v in r.prong_timings.items()}
            body.append(
                f"- {r.method}: {r.num_reparametrizations} reparametrizations; share of training time: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
            )
    if tune_rows:
        grid = Table(list(tune_rows[0]), [list(r.values()) for r in tune_rows], printed=False)
        body += ["", "Learning-rate grid (`--tune`):", "", grid]
    return body + ["", report.images(*(p.file for p in PLOTS)), ""]
