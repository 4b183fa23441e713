"""Command line: ``python -m prong_ext SUBCOMMAND [options]`` (also the ``prong-ext`` script).

Subcommands reproduce the experiments of Desjardins et al. 2015 (see docs/experiments.md):

    autoencoder  deep auto-encoder, sgd / rmsprop / bn / prong / prong+ (Sec. 4.2, Fig. 3)
    fisher       exact Fisher block of a hidden layer, before/after whitening (Sec. 4.1, Fig. 2)
    sweep        sensitivity to eps and T, whitened vs fan-in initialization (Fig. 3a-b)
    cnn          small VGG-like convnet: prong / prong+ vs sgd / bn
    race         the auto-encoder's methods at their best rates over seeds, stepped in turn

Each writes CSV data, PNG plots, summary.md and run.json (command, versions, git commit) to
``--out`` (default ``out/<subcommand>``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUBCOMMANDS = ("autoencoder", "fisher", "sweep", "cnn", "race")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def _existing_path(s: str) -> str:
    if not Path(s).exists():
        raise argparse.ArgumentTypeError(f"--data path does not exist: {s}")
    return s


def _common(p: argparse.ArgumentParser, name: str, data_help: str) -> None:
    """The options of every subcommand: output and data, Prong's, the machine's."""
    g = p.add_argument_group("common options")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder for CSV, PNG and summary.md (default: out/{name})",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="random seed; runs are deterministic (default: %(default)s)"
    )
    g.add_argument("--data", type=_existing_path, default=None, help=data_help)
    _prong_options(g)
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: %(default)s; these models are small, and extra "
        "threads slow them down on a busy machine)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _prong_options(g) -> None:
    """--interval, --eps, --num-samples, --whitening, --rescale: prong_ext.Prong's arguments."""
    g.add_argument(
        "--interval",
        "-T",
        type=_positive_int,
        default=100,
        help="PRONG: updates between reparametrizations, T (default: %(default)s)",
    )
    g.add_argument(
        "--eps",
        type=_positive_float,
        default=1e-2,
        help="PRONG: eigenvalue regularizer epsilon, for the methods without their own "
        "(prong-adam and prong+-adam: 0.1) (default: %(default)s)",
    )
    g.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1024,
        help="PRONG: samples N_s for the statistics (default: %(default)s)",
    )
    g.add_argument(
        "--whitening",
        choices=("pca", "zca"),
        default="pca",
        help="PRONG: U = diag(lam + eps)^-1/2 Q^T (pca, the paper) or Q diag(lam + eps)^-1/2 Q^T "
        "(zca) (default: %(default)s)",
    )
    g.add_argument(
        "--rescale",
        action="store_true",
        help="PRONG: the paper's per-minibatch diagonal rescaling, W = V D U",
    )


IDX_HELP = (
    "MNIST or Fashion-MNIST IDX data: a directory holding train-images-idx3-ubyte[.gz] "
    "(and labels, t10k-* for test), or the images file itself (default: scikit-learn's digits)"
)


def _subcommands() -> dict:
    """name: (module, one-line summary, help of --data)."""
    from .experiments import autoencoder, cnn, fisher, gradients, race, sweep

    return {
        "autoencoder": (
            autoencoder,
            "deep auto-encoder: the paper's sgd, rmsprop, bn, prong, prong+ (Fig. 3), then adam, bn-adam, "
            "prong-adam-reset",
            IDX_HELP,
        ),
        "fisher": (
            fisher,
            "exact Fisher block and its condition number (Fig. 2)",
            IDX_HELP + "; images are downsampled to --size",
        ),
        "sweep": (sweep, "sensitivity to eps and T, whitened vs fan-in init (Fig. 3a-b)", IDX_HELP),
        "cnn": (
            cnn,
            "VGG-like convnet: prong, prong+ vs sgd, bn",
            "Fashion-MNIST/MNIST IDX data as for autoencoder (default: Debian's "
            "/usr/share/datasets/fashion-mnist when installed, else scikit-learn's digits)",
        ),
        "gradients": (
            gradients,
            "the output side: spectrum of the back-propagated gradients' second moment (two-sided whitening)",
            IDX_HELP,
        ),
        "race": (
            race,
            "the methods at their best rates over seeds, round-robin: loss, updates and seconds to targets",
            IDX_HELP,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prong_ext",
        description="Natural Neural Networks (PRONG): reproduce the paper's experiments on the CPU.",
        epilog="Run 'python -m prong_ext SUBCOMMAND -h' for the options of each experiment.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (module, summary, data_help) in _subcommands().items():
        p = sub.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        _common(p, name, data_help)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--methods as a list of known, distinct methods; the counts that must be positive."""
    from .experiments.methods import REGISTRY

    if hasattr(args, "methods"):
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods or any(m not in REGISTRY for m in methods):
            parser.error(
                f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(REGISTRY)}"
            )
        args.methods = list(dict.fromkeys(methods))
    for name in (
        "updates",
        "batch_size",
        "eval_every",
        "train_samples",
        "eval_samples",
        "tune_updates",
        "horizon",
    ):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {v}")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the experiment, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    _check(parser, args)
    import torch

    from . import data
    from .experiments import common, report

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # saturated sigmoids make denormals, 5-20x slower on x86
    try:
        report.pyplot()  # every subcommand plots: say now, not after the training, when it cannot
    except data.MissingExtraError as e:
        parser.exit(1, f"{parser.prog} {args.command}: error: {e}\n")
    args.env = common.environment()  # versions and git commit, taken before any output is written
    out = report.out_dir(args.out or Path("out") / args.command)
    start = time.perf_counter()
    try:
        _subcommands()[args.command][0].run(args, out)
    except common.UsageError as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    except data.MissingExtraError as e:
        parser.exit(1, f"{parser.prog} {args.command}: error: {e}\n")
    common.write_run_info(out, argv, {**args.env, "wall_s": round(time.perf_counter() - start, 1)})
    print(f"\n{args.command}: wrote {out}/ in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
