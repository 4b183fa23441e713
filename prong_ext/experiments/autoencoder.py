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

from . import common

DIGITS_ARCH = (64, 128, 64, 32, 8, 32, 64, 128, 64)
MNIST_ARCH = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

# Defaults from a small grid on the digits default (see docs/experiments.md, results/autoencoder).
DEFAULT_LR = {"sgd": 0.1, "rmsprop": 1e-2, "bn": 0.1, "prong": 0.01, "prong+": 0.01}
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
        methods="sgd,rmsprop,bn,prong,prong+",
        default_lr=DEFAULT_LR,
        lr_note="defaults, tuned on the digits and scaled by 64/pixels for other images except rmsprop's",
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="SGD momentum for sgd, bn, prong, prong+ (default: %(default)s)",
    )
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
    p.add_argument(
        "--eval-samples",
        type=int,
        default=2000,
        help="training images on which the error is measured (default: %(default)s)",
    )
    p.add_argument(
        "--eval-every", type=int, default=None, help="updates between evaluations (default: updates/40)"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="first run a short grid of learning rates (default x "
        + ", ".join(f"{f:g}" for f in TUNE_FACTORS)
        + ") per method and keep the best",
    )
    p.add_argument(
        "--tune-updates", type=int, default=None, help="updates of each tuning run (default: updates/3)"
    )


def run(args: argparse.Namespace, out) -> dict:
    """Train every method, write curves.csv, summary.csv, two plots and summary.md; print a table."""
    ds, x = common.train_rows(args)
    n_pix = x.shape[1]
    if args.arch:
        try:
            sizes = tuple(int(s) for s in args.arch.replace("-", ",").split(","))
        except ValueError:
            raise common.UsageError(f"--arch {args.arch!r}: expected sizes like 64,32,8,32,64") from None
        if len(sizes) < 3 or min(sizes) <= 0:
            raise common.UsageError(f"--arch {args.arch!r}: expected at least 3 positive sizes")
    else:
        sizes = (
            DIGITS_ARCH
            if n_pix == 64
            else MNIST_ARCH
            if n_pix == 784
            else (n_pix, 256, 64, 16, 64, 256, n_pix)
        )
    if sizes[0] != n_pix or sizes[-1] != n_pix:
        raise common.UsageError(
            f"--arch {args.arch}: first and last sizes must be {n_pix} (pixels of {ds.name})"
        )
    x_eval = x[: args.eval_samples]
    methods = args.methods
    lrs = common.parse_lrs(args.lr, methods, DEFAULT_LR)
    # The defaults were tuned on the digits (64 pixels); the loss sums over pixels, so gradients
    # grow with the image: scale the SGD-type defaults (not RMSprop's, which is scale-free).
    given = {spec.split("=", 1)[0] for spec in args.lr}
    for m in methods:
        if m not in given and m != "rmsprop" and n_pix != 64:
            lrs[m] *= 64 / n_pix
    eval_every = args.eval_every or max(1, args.updates // 40)
    pcfg = common.ProngConfig.from_args(args)

    def build(bn):
        return build_autoencoder(sizes, args.activation, bn)

    def loss_fn(model, batch):
        return reconstruction_loss(model(batch[0]), batch[0], args.loss)

    def evaluate(model):
        return {"train_error": squared_error(model, x_eval)}

    def one_run(method, lr, updates, seed_offset=0, desc=None):
        common.set_seed(args.seed)
        setup = common.setup_method(build, method, lr, args.momentum, pcfg)
        gen = torch.Generator().manual_seed(args.seed + 1 + seed_offset)
        return common.train(
            setup,
            loss_fn,
            common.batches((x,), args.batch_size, gen),
            updates,
            evaluate,
            eval_every if updates == args.updates else max(1, updates // 10),
            method=method,
            lr=lr,
            desc=desc or method,
            quiet=args.quiet,
        )

    tune_rows = []
    if args.tune:
        tune_updates = args.tune_updates or max(1, args.updates // 3)
        for m in methods:
            best = None
            for f in TUNE_FACTORS:
                lr = lrs[m] * f
                r = one_run(m, lr, tune_updates, desc=f"tune {m} lr={lr:.3g}")
                err = r.final("train_error") if not r.diverged else float("inf")
                tune_rows.append(
                    {
                        "method": m,
                        "lr": lr,
                        "updates": r.updates,
                        "train_error": err,
                        "diverged": int(r.diverged),
                    }
                )
                if best is None or err < best[0]:
                    best = (err, lr)
            lrs[m] = best[1]
        common.write_csv(out / "tune.csv", tune_rows)

    results = [one_run(m, lrs[m], args.updates) for m in methods]

    common.write_csv(out / "curves.csv", common.curve_rows(results))
    title = f"auto-encoder {'-'.join(map(str, sizes))} on {ds.name}"
    common.plot_curves(
        results,
        "update",
        "train_error",
        out / "train_error_vs_updates.png",
        title=title,
        xlabel="updates",
        ylabel="training squared error",
    )
    common.plot_curves(
        results,
        "seconds",
        "train_error",
        out / "train_error_vs_seconds.png",
        title=title,
        xlabel="wall-clock seconds (training only)",
        ylabel="training squared error",
    )
    common.plot_curves(
        results,
        "cpu_seconds",
        "train_error",
        out / "train_error_vs_cpu_seconds.png",
        title=title,
        xlabel="CPU seconds of this process (training only)",
        ylabel="training squared error",
    )

    summary = summarize(results)
    env = common.run_env(args)
    common.write_csv(out / "summary.csv", common.with_commit(summary["rows"], env))
    header = summary["header"]
    table = [[row[k] for k in summary["keys"]] for row in summary["rows"]]
    md = [
        f"# Auto-encoder ({ds.name})",
        "",
        f"Command: `{common.command_line(args.argv)}`  ",
        f"Architecture {'-'.join(map(str, sizes))}, {args.activation} units, {args.loss} loss, "
        f"{x.shape[0]} training images, batch {args.batch_size}, {args.updates} updates, "
        f"T={args.interval}, eps={args.eps:g}, N_s={args.num_samples}, momentum={args.momentum:g}, "
        f"seed {args.seed}.  ",
        f"Environment: {common.environment_line(env)}.",
        "",
        f"Training error = squared reconstruction error (sum over pixels, mean over {x_eval.shape[0]} "
        "training images). 'updates to SGD best' = first evaluation (every "
        f"{eval_every} updates) at which the method's error is at or below SGD's best error. 'time/step "
        "vs SGD' compares CPU time per update (steadier than wall time on a shared machine; one thread).",
        "",
        common.md_table(header, table),
        "",
    ]
    for r in results:
        if r.prong_timings:
            share = {k: v / max(r.train_seconds, 1e-12) for k, v in r.prong_timings.items()}
            md.append(
                f"- {r.method}: {r.num_reparametrizations} reparametrizations; share of training time: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())
            )
    if tune_rows:
        md += [
            "",
            "Learning-rate grid (`--tune`):",
            "",
            common.md_table(list(tune_rows[0]), [list(r.values()) for r in tune_rows]),
        ]
    md += [
        "",
        "![](train_error_vs_updates.png) ![](train_error_vs_seconds.png) ![](train_error_vs_cpu_seconds.png)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(md))
    print(common.text_table(header, table))
    return {"results": results, "summary": summary, "lrs": lrs}


def summarize(results: list[common.RunResult]) -> dict:
    sgd = next((r for r in results if r.method == "sgd"), None)
    target = sgd.best("train_error") if sgd else float("nan")
    base = sgd.cpu_seconds_per_update if sgd else float("nan")
    keys = [
        "method",
        "lr",
        "final_error",
        "best_error",
        "updates_to_sgd_best",
        "step_time_vs_sgd",
        "cpu_ms_per_update",
        "ms_per_update",
        "diverged",
    ]
    header = [
        "method",
        "lr",
        "final train error",
        "best train error",
        "updates to SGD best",
        "time/step vs SGD",
        "CPU ms/update",
        "wall ms/update",
        "diverged",
    ]
    rows = []
    for r in results:
        reach = r.updates_to_reach("train_error", target) if math.isfinite(target) else None
        rows.append(
            {
                "method": r.method,
                "lr": r.lr,
                "final_error": r.final("train_error"),
                "best_error": r.best("train_error"),
                "updates_to_sgd_best": reach,
                "step_time_vs_sgd": r.cpu_seconds_per_update / base if base else float("nan"),
                "cpu_ms_per_update": 1e3 * r.cpu_seconds_per_update,
                "ms_per_update": 1e3 * r.seconds_per_update,
                "diverged": "yes" if r.diverged else "no",
            }
        )
    return {"keys": keys, "header": header, "rows": rows, "target": target}
