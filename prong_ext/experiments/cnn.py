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
from . import common, report
from .methods import default_lrs
from .report import DIVERGED, LR, METHOD, Column, Plot
from .training import Task

DEFAULT_LR = default_lrs("cnn")


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
    common.add_eval_arguments(p, every=20, samples=False)


def load(args: argparse.Namespace):
    """The labelled data set (Fashion-MNIST by default), subset and downsampled to --size."""
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
    return ds


def classifier_error(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of samples whose largest logit is not their label."""
    return (logits.argmax(1) != y).double().mean().item()


def make_task(args: argparse.Namespace, ds) -> Task:
    """Cross-entropy training of build_cnn on the training images; the evaluation measures the
    training loss and error on the first 2000 training images and the test error."""
    x, y = ds.train_x[:, None], ds.train_y
    xt, yt = ds.test_x[:, None], ds.test_y
    n_classes = int(max(y.max(), yt.max())) + 1
    x_tr_eval, y_tr_eval = x[:2000], y[:2000]

    def evaluate(model):
        lt = model(x_tr_eval)
        lv = model(xt)
        return {
            "train_loss": F.cross_entropy(lt, y_tr_eval).item(),
            "train_error": classifier_error(lt, y_tr_eval),
            "test_error": classifier_error(lv, yt),
        }

    return Task.from_args(
        args,
        build=lambda bn: build_cnn(x.shape[1], x.shape[-1], n_classes, args.width, bn),
        data=(x, y),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        evaluate=evaluate,
        eval_every=common.eval_every(args, 20),
    )


def run(args: argparse.Namespace, out) -> dict:
    """Train every method, write curves.csv, summary.csv, three plots and summary.md; print a table."""
    ds = load(args)
    task = make_task(args, ds)
    results = task.run_all(common.parse_lrs(args.lr, args.methods, DEFAULT_LR))
    report.write_curves(out, results, PLOTS, f"VGG-like convnet (width {args.width}) on {ds.name}")
    table = report.method_table(
        results,
        [
            METHOD,
            LR,
            Column("final test error", lambda r: r.final("test_error")),
            Column("best test error", lambda r: r.best("test_error")),
            Column("final train loss", lambda r: r.final("train_loss")),
            *report.speed_columns(results, "CPU time/step vs SGD"),
            DIVERGED,
        ],
    )
    size = ds.train_x.shape[-1]
    settings = (
        f"{ds.train_x.shape[0]} training and {ds.test_x.shape[0]} test images of {size}x{size}, "
        f"batch {args.batch_size}, {args.updates} updates, T={args.interval}, eps={args.eps:g}, "
        f"N_s={args.num_samples}, momentum {args.momentum:g}, seed {args.seed}."
    )
    body = [table, "", report.images("test_error.png", "train_loss.png", "test_error_vs_seconds.png"), ""]
    report.write_summary(out, args, f"Convnet ({ds.name})", settings, body, table)
    return {"results": results}


PLOTS = [
    Plot("train_loss.png", "update", "train_loss", "training cross-entropy"),
    Plot("test_error.png", "update", "test_error", "test error", logy=False),
    Plot("test_error_vs_seconds.png", "seconds", "test_error", "test error", logy=False),
]
