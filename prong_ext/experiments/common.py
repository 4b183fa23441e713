"""Shared pieces of the experiments: methods, the training loop, CSV / PNG / markdown writers."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import platform
import random
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import prong_ext

METHODS = ("sgd", "rmsprop", "bn", "prong", "prong+")
PRONG_METHODS = ("prong", "prong+")
BN_METHODS = ("bn", "prong+")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UsageError(ValueError):
    """A bad argument or input file: the CLI prints the message, without a traceback."""


def load_data(path):
    """prong_ext.data.load_dataset, with unreadable files reported as UsageError."""
    from .. import data

    try:
        return data.load_dataset(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def train_rows(args):
    """The data set of --data (digits by default) and its training images as rows of pixels,
    the first --train-samples of them when that is set."""
    ds = load_data(args.data)
    x = ds.train_x.reshape(ds.train_x.shape[0], -1)
    return ds, (x[: args.train_samples] if args.train_samples else x)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU runs are then deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable=None, *, total=None, desc=None, disable=False, leave=False):
    """A tqdm progress bar (to stderr); a plain iterator when disabled or when tqdm is missing (then
    a warning says how to install it: the bars are the only thing tqdm is used for)."""
    if disable:
        return iterable if iterable is not None else range(total)
    from .. import data

    try:
        tqdm = data.import_extra("tqdm.auto", "the progress bars (--quiet turns them off)").tqdm
    except data.MissingExtraError as e:
        _warn_once(str(e))
        return iterable if iterable is not None else range(total)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=leave, dynamic_ncols=True)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


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


def make_optimizer(method: str, params: Iterable[nn.Parameter], lr: float, momentum: float):
    """RMSprop for ``rmsprop``; SGD (with ``momentum``) for sgd, bn, prong and prong+."""
    if method == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def add_training_arguments(
    p, *, updates: int, methods: str, default_lr: dict[str, float], lr_note: str = "defaults"
) -> None:
    """The options every training subcommand shares: --updates, --batch-size, --methods, --lr."""
    p.add_argument(
        "--updates", type=int, default=updates, help="optimizer updates per method (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: %(default)s)")
    p.add_argument(
        "--methods",
        default=methods,
        help=f"comma-separated subset of {','.join(METHODS)} (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help=f"learning rate of one method, repeatable ({lr_note}: "
        + ", ".join(f"{k}={v:g}" for k, v in default_lr.items())
        + ")",
    )


def parse_lrs(specs: list[str], methods: list[str], defaults: dict[str, float]) -> dict[str, float]:
    """Learning rate per method: ``defaults`` overridden by ``--lr METHOD=LR`` specs."""
    lrs = dict(defaults)
    for spec in specs:
        if "=" not in spec:
            raise UsageError(f"--lr {spec!r}: expected METHOD=LR, e.g. --lr prong=0.1")
        m, v = spec.split("=", 1)
        if m not in METHODS:
            raise UsageError(f"--lr {spec!r}: unknown method {m!r}; expected one of {', '.join(METHODS)}")
        try:
            lrs[m] = float(v)
        except ValueError:
            raise UsageError(f"--lr {spec!r}: {v!r} is not a number") from None
        if not lrs[m] > 0:
            raise UsageError(f"--lr {spec!r}: the learning rate must be > 0")
    return {m: lrs[m] for m in methods}


@dataclass
class ProngConfig:
    """Arguments passed to prong_ext.Prong."""

    interval: int = 100
    eps: float = 1e-2
    num_samples: int = 1024
    whitening: str = "pca"
    rescale: bool = False
    whitened_init: bool = True  # reparametrize at t = 0 (else the first one happens at t = T)

    @classmethod
    def from_args(cls, args, **overrides) -> ProngConfig:
        """The configuration the command line's PRONG options give (see prong_ext.cli)."""
        values = dict(
            interval=args.interval,
            eps=args.eps,
            num_samples=args.num_samples,
            whitening=args.whitening,
            rescale=args.rescale,
        )
        return cls(**{**values, **overrides})

    def kwargs(self) -> dict:
        return dict(
            interval=self.interval,
            eps=self.eps,
            num_samples=self.num_samples,
            whitening=self.whitening,
            rescale=self.rescale,
        )


@dataclass
class Setup:
    """A model, its optimizer and (prong methods) a factory of its prong_ext.Prong controller."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    prong_factory: Callable[[], object] | None = None
    prong: object | None = None


def setup_method(
    build: Callable[[bool], nn.Module],
    method: str,
    lr: float,
    momentum: float,
    prong_config: ProngConfig | None = None,
) -> Setup:
    """Build the model for a method (``build(batchnorm)``), whiten it for prong/prong+, optimizer.

    The Prong controller is created by ``train`` (when its statistics window should start).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    model = build(method in BN_METHODS)
    if method in PRONG_METHODS:
        prong_ext.whiten(model)
    optimizer = make_optimizer(method, model.parameters(), lr, momentum)
    factory = None
    if method in PRONG_METHODS:
        kwargs = (prong_config or ProngConfig()).kwargs()

        def factory():
            return prong_ext.Prong(model, optimizer, **kwargs)

        factory.num_samples = kwargs["num_samples"]
    return Setup(model, optimizer, factory)


@dataclass
class RunResult:
    """One training run: evaluation records and timings."""

    method: str
    lr: float
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    updates: int = 0
    diverged: bool = False
    prong_timings: dict = field(default_factory=dict)
    num_reparametrizations: int = 0

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


def train(
    setup: Setup,
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
    data: Iterator[tuple],
    updates: int,
    evaluate: Callable[[nn.Module], dict],
    eval_every: int,
    *,
    method: str = "",
    lr: float = float("nan"),
    whitened_init: bool = True,
    interval: int = 1,
    batch_size: int = 1,
    desc: str | None = None,
    quiet: bool = False,
    callback: Callable[[int, Setup], dict] | None = None,
) -> RunResult:
    """Run ``updates`` optimizer updates; ``evaluate`` (no grad, eval mode) every ``eval_every``.

    The loop is ``loss.backward(); optimizer.step(); prong.step()``. With ``whitened_init`` (the
    paper's whitened initialization) Prong exists from the start and its first step() re-whitens
    from the first training batch. With ``whitened_init=False`` (fan-in initialization) Prong is
    created ceil(N_s / batch_size) updates before update ``interval`` (so that its statistics
    window sees the batches just before) and step() is first called at update ``interval``: the
    reparametrizations happen at t = T, 2T, ... Evaluation time is not counted in the training
    seconds. A non-finite loss stops the run (``diverged``).
    """
    model, opt = setup.model, setup.optimizer
    prong = None
    first_step, create_at = 1, 1
    if setup.prong_factory is not None:
        if whitened_init:
            prong = setup.prong = setup.prong_factory()
        else:
            first_step = interval
            num_samples = getattr(setup.prong_factory, "num_samples", None) or 1024
            create_at = max(1, interval - math.ceil(num_samples / max(batch_size, 1)) + 1)
    res = RunResult(method, lr)

    def record(t: int):
        was = model.training
        model.eval()
        with torch.no_grad():
            r = {"update": t, "seconds": res.train_seconds, "cpu_seconds": res.cpu_seconds, **evaluate(model)}
        if callback is not None:
            r.update(callback(t, setup))
        model.train(was)
        res.records.append(r)
        return r

    model.train()
    record(0)
    bar = progress(total=updates, desc=desc or method, disable=quiet)
    for t in range(1, updates + 1):
        batch = next(data)
        start, cpu_start = time.perf_counter(), time.process_time()
        if prong is None and setup.prong_factory is not None and t >= create_at:
            prong = setup.prong = setup.prong_factory()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            res.diverged = True
            res.train_seconds += time.perf_counter() - start
            res.cpu_seconds += time.process_time() - cpu_start
            break
        loss.backward()
        opt.step()
        if prong is not None and t >= first_step:
            prong.step()
        res.train_seconds += time.perf_counter() - start
        res.cpu_seconds += time.process_time() - cpu_start
        res.updates = t
        if hasattr(bar, "update"):
            bar.update(1)
        if t % eval_every == 0 or t == updates:
            r = record(t)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in r.items() if k not in ("update", "seconds", "cpu_seconds")}
                )
            if not all(math.isfinite(v) for v in r.values()):
                res.diverged = True
                res.records.pop()
                break
    if hasattr(bar, "close"):
        bar.close()
    if prong is not None:
        res.prong_timings = dict(getattr(prong, "timings", {}))
        res.num_reparametrizations = int(getattr(prong, "num_reparametrizations", 0))
    return res


# ---------------------------------------------------------------------------------------------
# Output


def out_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write dict rows; the header is the union of the keys in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return Path(path)


def curve_rows(results: list[RunResult], **extra) -> list[dict]:
    return [{"method": r.method, "lr": r.lr, **extra, **rec} for r in results for rec in r.records]


def pyplot():
    """matplotlib.pyplot on the Agg backend; MissingExtraError (with the pip command) without it."""
    from .. import data

    data.import_extra("matplotlib", "the experiments' plots").use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"sgd": "C0", "rmsprop": "C1", "bn": "C2", "prong": "C3", "prong+": "C4"}


def plot_curves(
    results: list[RunResult],
    x: str,
    y: str,
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    logy: bool = True,
    label: Callable[[RunResult], str] | None = None,
) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = [rec[x] for rec in r.records if y in rec]
        ys = [rec[y] for rec in r.records if y in rec]
        lab = label(r) if label else f"{r.method} (lr={r.lr:g})" + (" diverged" if r.diverged else "")
        ax.plot(xs, ys, label=lab, color=COLORS.get(r.method) if label is None else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.4g}"
        return "n/a" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.4g}"
        return "n/a" if v is None else str(v)

    cells = [header] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(out)


OUTPUT_DIRS = ("results", "benchmarks/results")  # committed outputs, rewritten by the runs


def git_state(root: str | os.PathLike | None = None) -> dict:
    """The git commit of the checkout at ``root`` (default: the one holding this prong_ext) and
    whether its tracked files differ from that commit.

    Returns ``{"commit": 40-hex SHA or None, "dirty": bool or None, "changed": [paths]}``. Changes
    under the committed output folders (results/, benchmarks/results/), which the runs themselves
    rewrite, are not counted. ``commit`` is None when ``root`` is not the top of a git checkout
    (an installed package) or git is missing.
    """
    root = Path(root) if root is not None else Path(prong_ext.__file__).resolve().parent.parent

    def git(*a):
        return subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        if Path(top).resolve() != root.resolve():
            raise ValueError(f"{root} is not the top of its checkout")
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": []}
    changed = [line[3:] for line in status.splitlines() if line[3:]]
    changed = [c for c in changed if not any(c.startswith(d + "/") for d in OUTPUT_DIRS)]
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def commit_text(state: dict) -> str:
    """'commit SHA (clean)', 'commit SHA + uncommitted changes to N tracked files' or 'commit
    unknown (...)'."""
    if state["commit"] is None:
        return "commit unknown (not a git checkout)"
    if state["dirty"]:
        n = len(state["changed"])
        return f"commit {state['commit']} + uncommitted changes to {n} tracked file{'s' * (n != 1)}"
    return f"commit {state['commit']} (clean)"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions, machine, threads, the compiled extension and the git state of this run."""
    from .. import _extension

    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "extension": _extension._C is not None,
        **git_state(),
    }


def run_env(args) -> dict:
    """The environment the CLI recorded when the run started (``args.env``), else the current one."""
    if getattr(args, "env", None) is None:
        args.env = environment()
    return args.env


def environment_line(env: dict | None = None) -> str:
    """One line for summary.md: versions, machine, threads, extension, git commit."""
    env = env or environment()
    return (
        f"torch {env['torch']}, triton {env['triton'] or 'not installed'}, numpy {env['numpy']}, "
        f"{env['machine']}, {env['threads']} threads, python {env['python']}, "
        f"prong_ext._C {'compiled' if env['extension'] else 'absent (torch path)'}; {commit_text(env)}"
    )


def write_run_info(out: str | os.PathLike, argv: list[str] | None, env: dict | None = None) -> dict:
    """Write run.json beside summary.md: the command, the environment and the git state."""
    info = {"command": command_line(argv), **(env or environment())}
    (Path(out) / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def with_commit(rows: list[dict], env: dict) -> list[dict]:
    """The summary rows with the commit and the dirty flag as last columns (for summary.csv)."""
    return [{**r, "commit": env["commit"] or "", "dirty": env["dirty"]} for r in rows]


def command_line(argv: list[str] | None) -> str:
    return "python -m prong_ext " + " ".join(argv or [])
