"""What the subcommands share around a run: their inputs (data sets, the command line's training
options, Prong's options) and the provenance written beside every result (versions, git commit,
the command)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import prong_ext

from .methods import DEMO_METHODS, REGISTRY

#: autoencoder's default --methods (the paper's comparison and Adam with and without PRONG);
#: --methods and --lr take every entry of the registry
METHODS = DEMO_METHODS


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


def add_training_arguments(
    p,
    *,
    updates: int,
    methods: str | None = None,
    default_lr: dict[str, float] | None = None,
    lr_note: str = "defaults",
    updates_help: str = "optimizer updates per method",
    momentum_help: str = "SGD momentum",
) -> None:
    """The training options of the subcommands: --updates, --batch-size, --methods and --lr (with
    ``methods``, the default of --methods), --momentum."""
    p.add_argument("--updates", type=int, default=updates, help=f"{updates_help} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default: %(default)s)")
    if methods is not None:
        p.add_argument(
            "--methods",
            default=methods,
            help=f"comma-separated subset of {','.join(REGISTRY)} (default: %(default)s)",
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
    p.add_argument("--momentum", type=float, default=0.9, help=f"{momentum_help} (default: %(default)s)")


def add_eval_arguments(p, *, every: int, samples: bool = True) -> None:
    """--eval-samples (with ``samples``) and --eval-every, whose default is updates/``every``."""
    if samples:
        p.add_argument(
            "--eval-samples",
            type=int,
            default=2000,
            help="training images on which the error is measured (default: %(default)s)",
        )
    p.add_argument(
        "--eval-every", type=int, default=None, help=f"updates between evaluations (default: updates/{every})"
    )


def eval_every(args, every: int) -> int:
    """--eval-every, else updates/``every`` (at least 1)."""
    return args.eval_every or max(1, args.updates // every)


def parse_lrs(specs: list[str], methods: list[str], defaults: dict[str, float]) -> dict[str, float]:
    """Learning rate per method: ``defaults`` overridden by ``--lr METHOD=LR`` specs."""
    lrs = dict(defaults)
    for spec in specs:
        if "=" not in spec:
            raise UsageError(f"--lr {spec!r}: expected METHOD=LR, e.g. --lr prong=0.1")
        m, v = spec.split("=", 1)
        if m not in REGISTRY:
            raise UsageError(f"--lr {spec!r}: unknown method {m!r}; expected one of {', '.join(REGISTRY)}")
        try:
            lrs[m] = float(v)
        except ValueError:
            raise UsageError(f"--lr {spec!r}: {v!r} is not a number") from None
        if not lrs[m] > 0:
            raise UsageError(f"--lr {spec!r}: the learning rate must be > 0")
    return {m: lrs[m] for m in methods}


#: the fields of ProngConfig that are prong_ext.Prong's keyword arguments (and command-line options)
PRONG_OPTIONS = ("interval", "eps", "num_samples", "whitening", "rescale")


@dataclass
class ProngConfig:
    """Arguments passed to prong_ext.Prong, and when the first reparametrization happens."""

    interval: int = 100
    eps: float = 1e-2
    num_samples: int = 1024
    whitening: str = "pca"
    rescale: bool = False
    # what a re-whitening does to Adam's state (set per method): "keep" here, so that the
    # registry's prong-adam means the same in every committed run; prong_ext.Prong's own default
    # is "reset" (the registry's prong-adam-reset)
    second_moment: str = "keep"
    whitened_init: bool = True  # reparametrize at t = 0 (else the first one happens at t = T)

    @classmethod
    def from_args(cls, args, **overrides) -> ProngConfig:
        """The configuration the command line's PRONG options give (see prong_ext.cli)."""
        return cls(**{**{k: getattr(args, k) for k in PRONG_OPTIONS}, **overrides})

    def kwargs(self) -> dict:
        """The keyword arguments of prong_ext.Prong."""
        return {k: v for k, v in asdict(self).items() if k in (*PRONG_OPTIONS, "second_moment")}


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
        "extension": _extension.unavailable_reason() is None,
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
