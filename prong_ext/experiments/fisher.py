"""Conditioning of the Fisher (paper Sec. 4.1, Fig. 2).

A small tanh MLP classifies digits (8x8), or MNIST downsampled to 10x10 with --data. For one
hidden layer we compute the exact Fisher block of its weights,

    F = 1/N sum_n sum_y p(y | x_n) g_ny g_ny^T,    g_ny = d log p(y | x_n) / d vec(weights),

by summing over every class (no sampling), in the coordinates the optimizer sees: the canonical W
of a plain layer, V of a whitened one (g_V = delta (U (h - c))^T). We plot the block before and
after whitening the trained SGD network (Fig. 2a-b) and its condition number over training for
sgd, rmsprop, bn and prong (Fig. 2c).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import prong_ext

from .. import data as datasets
from . import common, report
from .methods import REGISTRY, default_lrs
from .report import LR, METHOD, Column, Plot, Table
from .training import RunResult, Task, set_seed

DEFAULT_LR = default_lrs("fisher")


def build_mlp(n_in: int, hidden: int, depth: int, n_out: int, batchnorm: bool = False) -> nn.Sequential:
    """``depth`` tanh hidden layers of ``hidden`` units (Linear [-> BN] -> Tanh), then a linear
    softmax classifier (logits)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(n_in if i == 0 else hidden, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
    layers.append(nn.Linear(hidden if depth else n_in, n_out))
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The model's nn.Linear / WhitenedLinear layers, in order."""
    kinds = (nn.Linear, prong_ext.WhitenedLinear)
    return [m for m in model.modules() if isinstance(m, kinds)]


def is_whitened(layer: nn.Module) -> bool:
    return isinstance(layer, prong_ext.WhitenedLinear)


def per_class_gradients(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, coords: str = "native", include_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-class gradients of log p(y | x) w.r.t. ``layer``'s weights.

    Args:
        model: a classifier giving logits (N, C); call it in eval mode so that samples are
            independent (batch norm then uses its running statistics).
        layer: one linear layer of ``model`` (nn.Linear or WhitenedLinear).
        x: inputs (N, ...).
        coords: ``"native"``: the parameter the optimizer updates (weight of nn.Linear, V of a
            whitened layer); ``"canonical"``: W (= V U for a whitened layer).
        include_bias: append the bias gradient (b, or d in native coordinates of a whitened layer).

    Returns:
        g: (N, C, P) float64 with P = out * in (+ out), row-major like ``weight.flatten()``;
        p: (N, C) float64 class probabilities.
    """
    if coords not in ("native", "canonical"):
        raise ValueError(f"{coords=} must be 'native' or 'canonical'")
    cap = {}

    def hook(module, inputs, output):
        cap["h"], cap["z"] = inputs[0], output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logp = F.log_softmax(model(x).double(), dim=-1)
            z = cap["z"]
            deltas = [
                torch.autograd.grad(logp[:, y].sum(), z, retain_graph=y < logp.shape[1] - 1)[0]
                for y in range(logp.shape[1])
            ]
    finally:
        handle.remove()
    delta = torch.stack(deltas, dim=1).double()  # (N, C, out)
    a = cap["h"].detach().double()  # (N, in)
    if coords == "native" and is_whitened(layer):
        a = (a - layer.c.double()) @ layer.U.double().T
    g = (delta[:, :, :, None] * a[:, None, None, :]).flatten(2)  # (N, C, out*in)
    if include_bias:
        g = torch.cat([g, delta], dim=2)
    return g, logp.detach().exp()


def exact_fisher(
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    coords: str = "native",
    include_bias: bool = False,
    chunk: int = 256,
) -> torch.Tensor:
    """The exact Fisher block (P, P) float64 of ``layer``'s weights (see per_class_gradients).

    ``model`` should be in eval mode; x: (N, ...) inputs; the sum over classes is exact.
    """
    fisher = None
    for i in range(0, x.shape[0], chunk):
        g, p = per_class_gradients(model, layer, x[i : i + chunk], coords, include_bias)
        rows = (g * p.sqrt()[:, :, None]).reshape(-1, g.shape[-1])
        part = rows.T @ rows
        fisher = part if fisher is None else fisher + part
    return fisher / x.shape[0]


def condition_number(fisher: torch.Tensor) -> tuple[float, torch.Tensor]:
    """lambda_max / lambda_min of a symmetric PSD matrix (inf when lambda_min <= 0); eigenvalues."""
    lam = torch.linalg.eigvalsh(fisher.double())
    lo, hi = lam[0].item(), lam[-1].item()
    return (hi / lo if lo > 0 else float("inf")), lam


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(p, updates=2000, methods="sgd,rmsprop,bn,prong", default_lr=DEFAULT_LR)
    p.add_argument("--hidden", type=int, default=32, help="units per hidden layer (default: %(default)s)")
    p.add_argument("--depth", type=int, default=3, help="tanh hidden layers (default: %(default)s)")
    p.add_argument(
        "--layer",
        type=int,
        default=2,
        help="which linear layer's Fisher block, 1 = first (default: %(default)s, hidden to hidden)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=10,
        help="--data images are downsampled to size x size (default: %(default)s); digits stay 8x8",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=5000,
        help="training images used (default: %(default)s, digits has 1438)",
    )
    p.add_argument(
        "--fisher-samples",
        type=int,
        default=500,
        help="images over which the Fisher is averaged (default: %(default)s)",
    )
    p.add_argument(
        "--show-units",
        type=int,
        default=4,
        help="the zoomed heat-map shows the weights of this many output units (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoints", type=int, default=10, help="Fisher evaluations along training (default: %(default)s)"
    )


def load(args: argparse.Namespace) -> tuple:
    """The data set, its first --train-samples images as rows (--data: downsampled to --size) and
    their labels."""
    ds = common.load_data(args.data)
    x = ds.train_x
    if args.data is not None:
        x = datasets.downsample(x, args.size)
    x = x.reshape(x.shape[0], -1)[: args.train_samples]
    return ds, x, ds.train_y[: args.train_samples]


def make_task(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, x_f: torch.Tensor) -> Task:
    """Cross-entropy training of build_mlp; every evaluation adds the condition number of the
    Fisher block of linear layer --layer over the images ``x_f``."""
    n_classes = int(y.max()) + 1

    def evaluate(model):
        logits = model(x)
        return {
            "train_loss": F.cross_entropy(logits, y).item(),
            "train_error": (logits.argmax(1) != y).double().mean().item(),
        }

    def fisher_cond(t, setup):
        layer = linear_layers(setup.model)[args.layer - 1]
        cond, lam = condition_number(exact_fisher(setup.model, layer, x_f))
        return {"condition_number": cond, "lambda_max": lam[-1].item(), "lambda_min": lam[0].item()}

    return Task.from_args(
        args,
        build=lambda bn: build_mlp(x.shape[1], args.hidden, args.depth, n_classes, bn),
        data=(x, y),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        evaluate=evaluate,
        eval_every=max(1, args.updates // args.checkpoints),
        callback=fisher_cond,
    )


def run(args: argparse.Namespace, out) -> dict:
    """Train every method (Fig. 2c), whiten the first plain one's network at initialization and
    trained (Fig. 2a-b); write the CSVs, plots and summary.md; print the tables."""
    ds, x, y = load(args)
    x_f = x[: args.fisher_samples]
    if not 1 <= args.layer <= args.depth + 1:
        raise common.UsageError(f"--layer {args.layer}: the MLP has {args.depth + 1} linear layers")
    lrs = common.parse_lrs(args.lr, args.methods, DEFAULT_LR)
    task = make_task(args, x, y, x_f)
    results = task.run_all(lrs)
    plain = plain_run(results)
    blocks = []
    if plain is not None:
        blocks = whitening_blocks(task, plain, x, x_f, args.layer)
        write_blocks(out, blocks, plain, args)
    report.write_curves(out, results, plots(args.layer))
    table = summary_table(results)
    btable = Table(
        ["network", "trained with", "cond before whitening", "cond after whitening", "reduction %"],
        [[b["stage"], b["model"], b["cond_before"], b["cond_after"], b["reduction_pct"]] for b in blocks],
    )
    report.write_csv(out / "whitening.csv", btable.records())
    sizes = [x.shape[1]] + [args.hidden] * args.depth + [int(y.max()) + 1]
    settings = (
        f"MLP {'-'.join(map(str, sizes))} (tanh), {x.shape[0]} training images, Fisher block of linear "
        f"layer {args.layer} ({sizes[args.layer]}x{sizes[args.layer - 1]} weights) "
        f"averaged exactly over {x_f.shape[0]} images and all classes; batch {args.batch_size}, "
        f"{args.updates} updates, T={args.interval}, eps={args.eps:g}, momentum={args.momentum:g}, "
        f"seed {args.seed}."
    )
    title = f"Fisher conditioning ({ds.name})"
    report.write_summary(out, args, title, settings, summary_body(btable, table), table)
    return {"results": results, "blocks": blocks}


def plain_run(results: list[RunResult]) -> RunResult | None:
    """The run of the first method, in registry order, that Prong does not manage (sgd, rmsprop, bn)."""
    by_method = {r.method: r for r in results}
    return next((by_method[m.name] for m in REGISTRY.values() if not m.prong and m.name in by_method), None)


def whitening_blocks(task: Task, plain: RunResult, x: torch.Tensor, x_f: torch.Tensor, layer: int) -> list:
    """Fig. 2a-b: the Fisher block of ``layer`` of ``plain``'s network, at initialization and
    trained, before and after whitening it from the first N_s images of ``x``."""
    blocks = []
    for stage in ("init", "trained"):
        if stage == "init":
            set_seed(task.seed)
            model = task.build(REGISTRY[plain.method].batchnorm)
        else:
            model = plain.model
        model.eval()
        before = exact_fisher(model, linear_layers(model)[layer - 1], x_f)
        white = copy.deepcopy(model)
        prong_ext.whiten(white)
        prong = prong_ext.Prong(white, None, **task.prong.kwargs())
        prong.reparametrize(x[: task.prong.num_samples])
        white.eval()
        after = exact_fisher(white, linear_layers(white)[layer - 1], x_f)
        (cb, lb), (ca, la) = condition_number(before), condition_number(after)
        blocks.append(
            {
                "stage": stage,
                "model": plain.method,
                "cond_before": cb,
                "cond_after": ca,
                "reduction_pct": 100 * (1 - ca / cb),
                "lam": (lb, la),
                "F": (before, after),
            }
        )
    return blocks


def write_blocks(out, blocks: list[dict], plain: RunResult, args: argparse.Namespace) -> None:
    """spectrum.csv (the eigenvalues of every block) and the plots of Fig. 2a-b."""
    spectrum = [
        {
            "stage": b["stage"],
            "index": i,
            "eig_before": b["lam"][0][i].item(),
            "eig_after": b["lam"][1][i].item(),
        }
        for b in blocks
        for i in range(b["lam"][0].numel())
    ]
    report.write_csv(out / "spectrum.csv", spectrum)
    n_in = linear_layers(plain.model)[args.layer - 1].weight.shape[1]
    title = f"Fisher block of layer {args.layer} ({plain.method}, trained)"
    plot_blocks(blocks[-1]["F"], out / "fisher_blocks.png", title, n_in, args.show_units)
    plot_spectra(blocks, out / "fisher_spectrum.png")


def plots(layer: int) -> list[Plot]:
    return [
        Plot(
            "condition_number.png",
            "update",
            "condition_number",
            "lambda_max / lambda_min",
            title=f"condition number of the Fisher block of layer {layer}",
        ),
        Plot("train_loss.png", "update", "train_loss", "cross-entropy", title="training loss"),
    ]


def summary_table(results: list[RunResult]) -> Table:
    """The condition number at the start and the end of training, the final loss and error."""
    return report.method_table(
        results,
        [
            METHOD,
            LR,
            Column("cond at t=0", lambda r: r.records[0]["condition_number"]),
            Column("cond at end", lambda r: r.final("condition_number")),
            Column("final train loss", lambda r: r.final("train_loss")),
            Column("final train error", lambda r: r.final("train_error")),
        ],
    )


def summary_body(btable: Table, table: Table) -> list:
    return [
        "## Whitening the layer (Fig. 2a-b)",
        "",
        btable,
        "",
        report.images("fisher_blocks.png", "fisher_spectrum.png"),
        "",
        "## Condition number during training (Fig. 2c)",
        "",
        "Measured in each method's own coordinates (V for prong, W otherwise; bn in eval mode).",
        "",
        table,
        "",
        report.images("condition_number.png", "train_loss.png"),
        "",
    ]


def plot_blocks(
    blocks: tuple[torch.Tensor, torch.Tensor], path, title: str, n_in: int, units: int = 4
) -> None:
    """|F| of the whole block (log scale, top) and of the weights of the first ``units`` output
    units (linear scale, bottom: the paper's Fig. 2a-b shows such a zoom)."""
    plt = report.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 9.5))
    k = min(units * n_in, blocks[0].shape[0])
    for col, (f, name) in enumerate(zip(blocks, ("before whitening (W)", "after whitening (V)"))):
        a = f.abs() / f.abs().max()
        im = axes[0, col].imshow(a.numpy(), cmap="viridis", norm=_lognorm(a), interpolation="nearest")
        axes[0, col].set_title(f"{name}: all weights, log scale")
        fig.colorbar(im, ax=axes[0, col], fraction=0.046)
        z = f[:k, :k].abs()
        z = z / z.max()
        im = axes[1, col].imshow(z.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        axes[1, col].set_title(f"{name}: first {k // n_in} units, linear scale")
        fig.colorbar(im, ax=axes[1, col], fraction=0.046)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title + "  (|F| / max |F|)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lognorm(a):
    from matplotlib.colors import LogNorm

    pos = a[a > 0]
    vmin = max(pos.min().item(), 1e-6) if pos.numel() else 1e-6
    return LogNorm(vmin=vmin, vmax=1.0)


def plot_spectra(blocks: list[dict], path) -> None:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, ls in zip(blocks, ("--", "-")):
        lb, la = b["lam"]
        ax.plot(lb.flip(0).clamp_min(1e-30).numpy(), ls, color="C0", label=f"{b['stage']}: before")
        ax.plot(la.flip(0).clamp_min(1e-30).numpy(), ls, color="C3", label=f"{b['stage']}: after")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue of the Fisher block")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
