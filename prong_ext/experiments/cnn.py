"""A small VGG-like convnet (the paper's CIFAR-10 experiment, scaled down to the CPU).

conv3x3(w)-conv3x3(w)-maxpool-conv3x3(2w)-conv3x3(2w)-maxpool-fc(4w)-fc(classes), ReLU, on
Fashion-MNIST when its IDX files are present (Debian's dataset-fashion-mnist, or --data), else on
scikit-learn's digits. prong / prong+ whiten every conv (WhitenedConv2d) and linear layer; bn and
prong+ put batch norm after every layer but the last. We report test error and training loss.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as datasets
from . import common

ALLOWED_METHODS = common.METHODS
DEFAULT_LR = {"sgd": 0.03, "rmsprop": 1e-3, "bn": 0.1, "prong": 0.001, "prong+": 0.03}


def build_cnn(
    in_channels: int, size: int, n_classes: int, width: int = 16, batchnorm: bool = False
) -> nn.Sequential:
    """VGG-like: two blocks of two 3x3 convs (width, 2*width) each followed by 2x2 max-pooling."""

    def conv(ci, co):
        layers = [nn.Conv2d(ci, co, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(co))
        return layers + [nn.ReLU()]

    w = width
    feat = 2 * w * (size // 4) ** 2
    layers = conv(in_channels, w) + conv(w, w) + [nn.MaxPool2d(2)]
    layers += conv(w, 2 * w) + conv(2 * w, 2 * w) + [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(feat, 4 * w)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(4 * w))
    layers += [nn.ReLU(), nn.Linear(4 * w, n_classes)]
    return nn.Sequential(*layers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(p, updates=1000, methods="sgd,bn,prong,prong+", default_lr=DEFAULT_LR)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--width", type=int, default=16, help="channels of the first block (default: %(default)s)")
    p.add_argument(
        "--size",
        type=int,
        default=14,
        help="images larger than size x size are area-downsampled to it (default: %(default)s; "
        "28 keeps Fashion-MNIST's full resolution, about 4x slower)",
    )
    p.add_argument(
        "--train-samples", type=int, default=10000, help="training images used (default: %(default)s)"
    )
    p.add_argument("--test-samples", type=int, default=2000, help="test images used (default: %(default)s)")
    p.add_argument(
        "--eval-every", type=int, default=None, help="updates between evaluations (default: updates/20)"
    )


def run(args: argparse.Namespace, out) -> dict:
    path = args.data if args.data is not None else datasets.default_fashion_mnist()
    ds = common.load_data(path)
    if ds.train_y is None or ds.test_x is None or ds.test_y is None:
        raise common.UsageError(f"cnn: {path} needs labels and a t10k test split beside the training images")
    ds = ds.subset(args.train_samples, args.test_samples)
    if args.size < 4:
        raise common.UsageError(f"--size {args.size}: must be at least 4 (two 2x2 poolings)")
    if ds.train_x.shape[-1] > args.size:
        ds.train_x, ds.test_x = (
            datasets.downsample(ds.train_x, args.size),
            datasets.downsample(ds.test_x, args.size),
        )
    x, y = ds.train_x[:, None], ds.train_y
    xt, yt = ds.test_x[:, None], ds.test_y
    size = x.shape[-1]
    n_classes = int(max(y.max(), yt.max())) + 1
    lrs = common.parse_lrs(args.lr, args.methods, DEFAULT_LR)
    pcfg = common.ProngConfig.from_args(args)
    eval_every = args.eval_every or max(1, args.updates // 20)
    x_tr_eval, y_tr_eval = x[:2000], y[:2000]

    def build(bn):
        return build_cnn(x.shape[1], size, n_classes, args.width, bn)

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def evaluate(model):
        lt = model(x_tr_eval)
        lv = model(xt)
        return {
            "train_loss": F.cross_entropy(lt, y_tr_eval).item(),
            "train_error": (lt.argmax(1) != y_tr_eval).double().mean().item(),
            "test_error": (lv.argmax(1) != yt).double().mean().item(),
        }

    results = []
    for m in args.methods:
        common.set_seed(args.seed)
        setup = common.setup_method(build, m, lrs[m], args.momentum, pcfg)
        gen = torch.Generator().manual_seed(args.seed + 1)
        results.append(
            common.train(
                setup,
                loss_fn,
                common.batches((x, y), args.batch_size, gen),
                args.updates,
                evaluate,
                eval_every,
                method=m,
                lr=lrs[m],
                quiet=args.quiet,
            )
        )

    common.write_csv(out / "curves.csv", common.curve_rows(results))
    title = f"VGG-like convnet (width {args.width}) on {ds.name}"
    common.plot_curves(
        results,
        "update",
        "train_loss",
        out / "train_loss.png",
        title=title,
        xlabel="updates",
        ylabel="training cross-entropy",
    )
    common.plot_curves(
        results,
        "update",
        "test_error",
        out / "test_error.png",
        title=title,
        xlabel="updates",
        ylabel="test error",
        logy=False,
    )
    common.plot_curves(
        results,
        "seconds",
        "test_error",
        out / "test_error_vs_seconds.png",
        title=title,
        xlabel="wall-clock seconds (training only)",
        ylabel="test error",
        logy=False,
    )
    sgd = next((r for r in results if r.method == "sgd"), None)
    base = sgd.cpu_seconds_per_update if sgd else float("nan")
    header = [
        "method",
        "lr",
        "final test error",
        "best test error",
        "final train loss",
        "CPU time/step vs SGD",
        "CPU ms/update",
        "wall ms/update",
        "diverged",
    ]
    rows = [
        [
            r.method,
            r.lr,
            r.final("test_error"),
            r.best("test_error"),
            r.final("train_loss"),
            r.cpu_seconds_per_update / base,
            1e3 * r.cpu_seconds_per_update,
            1e3 * r.seconds_per_update,
            "yes" if r.diverged else "no",
        ]
        for r in results
    ]
    env = common.run_env(args)
    common.write_csv(out / "summary.csv", common.with_commit([dict(zip(header, r)) for r in rows], env))
    md = [
        f"# Convnet ({ds.name})",
        "",
        f"Command: `{common.command_line(args.argv)}`  ",
        f"{x.shape[0]} training and {xt.shape[0]} test images of {size}x{size}, batch {args.batch_size}, "
        f"{args.updates} updates, T={args.interval}, eps={args.eps:g}, N_s={args.num_samples}, "
        f"momentum {args.momentum:g}, seed {args.seed}.  ",
        f"Environment: {common.environment_line(env)}.",
        "",
        common.md_table(header, rows),
        "",
        "![](test_error.png) ![](train_loss.png) ![](test_error_vs_seconds.png)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(md))
    print(common.text_table(header, rows))
    return {"results": results}
