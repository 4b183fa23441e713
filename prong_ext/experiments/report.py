"""The experiments' outputs: CSV files, PNG plots, tables, and the one summary writer.

An experiment hands its RunResults to ``write_curves`` (curves.csv and the Plot specs it lists),
builds its tables with ``method_table`` (one Column per table column) or ``Table`` directly, and
ends with ``write_summary``: summary.md (title, command, settings, environment, then its lines
and tables), summary.csv (one table's rows with the git commit) and the tables printed as text.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import common
from .methods import METHODS
from .training import RunResult

COLORS = {name: f"C{i}" for i, name in enumerate(METHODS)}  # a method's colour in every plot
XLABELS = {
    "update": "updates",
    "seconds": "wall-clock seconds (training only)",
    "cpu_seconds": "CPU seconds of this process (training only)",
}


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


@dataclass(frozen=True)
class Plot:
    """One figure of the training curves: ``y`` against ``x`` (update, seconds or cpu_seconds)."""

    file: str
    x: str
    y: str
    ylabel: str
    logy: bool = True
    title: str | None = None  # default: the experiment's title


def write_curves(out: Path, results: list[RunResult], plots: list[Plot], title: str = "") -> None:
    """curves.csv (every evaluation record of every run) and the plots."""
    write_csv(out / "curves.csv", curve_rows(results))
    for p in plots:
        plot_curves(results, p, out / p.file, p.title or title)


def plot_curves(results: list[RunResult], plot: Plot, path: str | os.PathLike, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        xs = [rec[plot.x] for rec in r.records if plot.y in rec]
        ys = [rec[plot.y] for rec in r.records if plot.y in rec]
        label = f"{r.method} (lr={r.lr:g})" + (" diverged" if r.diverged else "")
        ax.plot(xs, ys, label=label, color=COLORS.get(r.method))
    if plot.logy:
        ax.set_yscale("log")
    return save_plot(fig, ax, path, x=plot.x, ylabel=plot.ylabel, title=title, legend_size=8)


def save_plot(fig, ax, path: str | os.PathLike, *, x: str, ylabel: str, title: str, legend_size: int) -> Path:
    """Label ``ax`` (x axis from XLABELS[x]), add the grid and legend, write ``fig`` to ``path``
    and close it."""
    ax.set_xlabel(XLABELS[x])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return Path(path)


def images(*files: str) -> str:
    """A markdown line showing the PNG ``files`` side by side."""
    return " ".join(f"![]({f})" for f in files)


def _cell(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return "n/a" if v is None else str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(out)


@dataclass
class Table:
    """A table of summary.md; ``keys`` name its columns in CSV files (default: the header)."""

    header: list[str]
    rows: list[list]
    keys: list[str] | None = None
    printed: bool = True  # write_summary also prints it

    def records(self) -> list[dict]:
        return [dict(zip(self.keys or self.header, row)) for row in self.rows]


@dataclass(frozen=True)
class Column:
    """A column of a method table: its header, its value for a run, its CSV name (default: header)."""

    header: str
    value: Callable[[RunResult], object]
    key: str | None = None


METHOD = Column("method", lambda r: r.method)
LR = Column("lr", lambda r: r.lr)
DIVERGED = Column("diverged", lambda r: "yes" if r.diverged else "no")


def speed_columns(results: list[RunResult], vs_sgd: str, keys=(None, None, None)) -> list[Column]:
    """CPU time per update relative to SGD's (header ``vs_sgd``), CPU and wall ms per update."""
    sgd = next((r for r in results if r.method == "sgd"), None)
    base = sgd.cpu_seconds_per_update if sgd else float("nan")
    return [
        Column(vs_sgd, lambda r: r.cpu_seconds_per_update / base if base else float("nan"), keys[0]),
        Column("CPU ms/update", lambda r: 1e3 * r.cpu_seconds_per_update, keys[1]),
        Column("wall ms/update", lambda r: 1e3 * r.seconds_per_update, keys[2]),
    ]


def method_table(results: list[RunResult], columns: list[Column]) -> Table:
    """One row per run."""
    rows = [[c.value(r) for c in columns] for r in results]
    return Table([c.header for c in columns], rows, [c.key or c.header for c in columns])


def write_summary(
    out: Path, args, title: str, settings: str, body: list[str | Table], csv_table: Table | None = None
) -> None:
    """summary.md: ``# title``, the command, ``settings``, the environment, then ``body`` (lines, and
    tables as markdown); summary.csv: the records of ``csv_table`` with the commit; prints the
    printed tables of ``body`` as text."""
    env = common.run_env(args)
    if csv_table is not None:
        write_csv(out / "summary.csv", common.with_commit(csv_table.records(), env))
    md = [
        f"# {title}",
        "",
        f"Command: `{common.command_line(args.argv)}`  ",
        f"{settings}  ",
        f"Environment: {common.environment_line(env)}.",
        "",
    ]
    md += [md_table(p.header, p.rows) if isinstance(p, Table) else p for p in body]
    (out / "summary.md").write_text("\n".join(md))
    print("\n\n".join(text_table(p.header, p.rows) for p in body if isinstance(p, Table) and p.printed))
