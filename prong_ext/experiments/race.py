"""Race: the auto-encoder's methods, each at its best learning rate, over several seeds, stepped in
turn in one process.

1. Grid, on --seed: every method at its default learning rate times each --grid factor for
   --updates updates; its best rate is the one of lowest final training loss (the objective,
   measured on the first --eval-samples training images; a diverged run ranks last).
2. Targets, fixed from the grid before any seeded run: the lowest training loss of the baselines
   (the methods without Prong) at their best rates, at update --horizon and at update --updates.
3. Seeded runs: every method at its best rate for every seed of --seeds, all runs stepped
   round-robin (each advances one update in turn, so that the machine's load falls on all alike),
   training time measured around the updates only, not the evaluations.

Per method: the training loss at --horizon and --updates (mean and min..max over seeds), the
updates and training seconds to reach each target (mean over the seeds that reach it; 'never'
when none does), milliseconds per update, the share of the training time spent re-whitening.
Per PRONG method, against the baseline that set each target: the goal table (GOAL).
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, replace

from . import autoencoder, common, report
from .methods import REGISTRY
from .report import Table
from .training import RunResult, Task, progress_bar

DEFAULT_GRID = (0.3, 1.0, 3.0)
HORIZON = 500
KEY = "train_loss"
#: the project's goal for a PRONG method against the strongest baseline at a horizon h: a mean
#: loss at h at most 0.8 of the baseline's, and the baseline's loss at h (the target) reached in
#: at most 1/3 of its h updates and 1/2 of its training seconds over them, on every seed
GOAL = {"loss": 0.8, "updates": 1 / 3, "seconds": 1 / 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(
        p,
        updates=2000,
        methods=",".join(REGISTRY),
        default_lr=autoencoder.DEFAULT_LR,
        lr_note="the grid's centres; defaults as autoencoder's",
        momentum_help="SGD momentum for sgd, bn, prong, prong+",
    )
    autoencoder.add_model_arguments(p)
    common.add_eval_arguments(p, every=40)
    p.add_argument(
        "--grid",
        default=",".join(f"{f:g}" for f in DEFAULT_GRID),
        help="factors of each method's learning rate tried on --seed (default: %(default)s)",
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="seeds of the runs at the best rates (default: %(default)s)"
    )
    p.add_argument(
        "--horizon",
        type=int,
        default=HORIZON,
        help="the early horizon, updates (default: %(default)s; at most --updates)",
    )


def numbers(text: str, kind: type, option: str) -> list:
    """A comma-separated list of positive ``kind`` (int seeds may be 0), or UsageError."""
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise common.UsageError(f"{option} {text!r}: expected comma-separated numbers") from None
    if not vals or any(v < 0 or (kind is float and not v > 0) for v in vals):
        raise common.UsageError(f"{option} {text!r}: expected non-empty, non-negative values")
    return list(dict.fromkeys(vals))


def race(task: Task, plan: list[tuple[str, float, int]], desc: str) -> list[RunResult]:
    """Train every (method, lr, seed) of ``plan`` round-robin: each run advances one update in
    turn until all are done. Progress shows as one bar; the runs' results in plan order."""
    quiet = replace(task, quiet=True)
    steppers = [replace(quiet, seed=seed).start(m, lr) for m, lr, seed in plan]
    bar = progress_bar(task.updates * len(plan), desc, task.quiet)
    active = list(steppers)
    while active:
        n = len(active)
        active = [st for st in active if st.advance()]
        bar.update(n)
    bar.close()
    return [st.finish() for st in steppers]


def value_at(r: RunResult, update: int, key: str) -> float:
    """The record's ``key`` at ``update``; inf when the run diverged before it."""
    return next((rec[key] for rec in r.records if rec["update"] == update), math.inf)


def loss_at(r: RunResult, update: int) -> float:
    """The training loss recorded at ``update``; inf when the run diverged before it."""
    return value_at(r, update, KEY)


def grid(task: Task, lrs: dict[str, float], factors: list[float]) -> tuple[dict, dict, list[dict]]:
    """Each method at lr x factor on the task's seed, its factors round-robin: the best lr per
    method, its grid run per method, the rows of grid.csv."""
    best, runs, rows = {}, {}, []
    for m, lr in lrs.items():
        results = race(task, [(m, lr * f, task.seed) for f in factors], f"grid {m}")
        for r in results:
            rows.append(
                {"method": m, "lr": r.lr, "final_loss": loss_at(r, task.updates), "diverged": r.diverged}
            )
        runs[m] = min(results, key=lambda r: loss_at(r, task.updates))
        best[m] = runs[m].lr
    return best, runs, rows


def targets(runs: dict[str, RunResult], horizons: list[int]) -> dict[int, tuple[str, float]]:
    """Per horizon: (method, loss) of the baseline (no Prong) of lowest loss there; of every
    method when none is a baseline."""
    base = {m: r for m, r in runs.items() if not REGISTRY[m].prong} or runs
    return {h: min(((m, loss_at(r, h)) for m, r in base.items()), key=lambda p: p[1]) for h in horizons}


def reach(r: RunResult, target: float) -> tuple[int, float] | None:
    """(update, training seconds) of the first evaluation at or below ``target``; None if none."""
    rec = next((rec for rec in r.records if rec[KEY] <= target), None)
    return None if rec is None else (rec["update"], rec["seconds"])


@dataclass
class Standing:
    """One method's seeded runs at its best rate, summarized."""

    method: str
    lr: float
    runs: list[RunResult]

    def losses(self, update: int) -> list[float]:
        return [loss_at(r, update) for r in self.runs]

    def to_target(self, target: float) -> tuple[float, float, int]:
        """Mean updates and mean seconds to ``target`` over the seeds that reach it, and their count."""
        hits = [h for h in (reach(r, target) for r in self.runs) if h is not None]
        if not hits:
            return math.nan, math.nan, 0
        return statistics.fmean(h[0] for h in hits), statistics.fmean(h[1] for h in hits), len(hits)

    def ms_per_update(self) -> tuple[float, float]:
        """Wall and CPU milliseconds per update, mean over seeds."""
        wall = statistics.fmean(r.seconds_per_update for r in self.runs)
        return 1e3 * wall, 1e3 * statistics.fmean(r.cpu_seconds_per_update for r in self.runs)

    def seconds_at(self, update: int) -> float:
        """Training seconds over the first ``update`` updates, mean over seeds (inf when a seed
        diverged before)."""
        return statistics.fmean(value_at(r, update, "seconds") for r in self.runs)

    def rewhitening_share(self) -> float:
        """The share of the training seconds that Prong's re-whitenings took (statistics merge,
        eigendecompositions, projection), mean over seeds; 0 without Prong."""
        shares = [sum(r.prong_timings.values()) / max(r.train_seconds, 1e-12) for r in self.runs]
        return statistics.fmean(shares)


def spread(vals: list[float]) -> tuple[float, float, float]:
    """Mean, min and max (inf when a seed diverged)."""
    return statistics.fmean(vals), min(vals), max(vals)


def csv_row(st: Standing, horizons: list[int], goals: dict[int, tuple[str, float]]) -> dict:
    """The method's row of summary.csv."""
    row = {"method": st.method, "lr": st.lr, "seeds": len(st.runs)}
    for h in horizons:
        mean, lo, hi = spread(st.losses(h))
        row |= {f"loss_{h}_mean": mean, f"loss_{h}_min": lo, f"loss_{h}_max": hi}
    for h, (_, target) in goals.items():
        u, sec, n = st.to_target(target)
        row |= {f"updates_to_target_{h}": u, f"seconds_to_target_{h}": sec, f"seeds_reaching_{h}": n}
    wall, cpu = st.ms_per_update()
    return row | {
        "ms_per_update": wall,
        "cpu_ms_per_update": cpu,
        "rewhitening_share": st.rewhitening_share(),
        "diverged_seeds": sum(r.diverged for r in st.runs),
    }


def reach_cells(st: Standing, target: float) -> list[str]:
    """'updates' and 'seconds' cells: the means, '(k/n seeds)' when not all reach, 'never'."""
    u, sec, n = st.to_target(target)
    if n == 0:
        return ["never", "never"]
    note = "" if n == len(st.runs) else f" ({n}/{len(st.runs)} seeds)"
    return [f"{u:.0f}{note}", f"{sec:.3g}{note}"]


def md_table(standings: list[Standing], horizons: list[int], goals: dict) -> Table:
    """summary.md's table: losses as mean (min..max), updates and seconds to each target, ms/update."""
    header = ["method", "lr"] + [f"loss at {h} (min..max)" for h in horizons]
    header += [f"{w} to target {h}" for h in goals for w in ("updates", "seconds")]
    header += ["ms/update", "CPU ms/update", "re-whitening % of time"]
    rows = []
    for st in standings:
        cells = [f"{m:.4g} ({lo:.4g}..{hi:.4g})" for m, lo, hi in (spread(st.losses(h)) for h in horizons)]
        cells += [c for h in goals for c in reach_cells(st, goals[h][1])]
        rows.append([st.method, st.lr, *cells, *st.ms_per_update(), f"{100 * st.rewhitening_share():.1f}"])
    return Table(header, rows)


def goal_rows(standings: list[Standing], goals: dict[int, tuple[str, float]]) -> list[dict]:
    """Per horizon h and PRONG method, against the baseline that set target h: the ratio of mean
    losses at h, the updates and seconds to the target over the baseline's h updates and its
    training seconds over them, the seeds reaching the target, and whether GOAL is met."""
    by_name = {st.method: st for st in standings}
    rows = []
    for h, (base_name, target) in goals.items():
        base = by_name.get(base_name)
        if base is None or REGISTRY[base_name].prong:
            continue
        base_loss, base_seconds = statistics.fmean(base.losses(h)), base.seconds_at(h)
        for st in standings:
            if not REGISTRY[st.method].prong:
                continue
            updates, seconds, n = st.to_target(target)
            ratios = {
                "loss": statistics.fmean(st.losses(h)) / base_loss,
                "updates": updates / h,
                "seconds": seconds / base_seconds,
            }
            met = n == len(st.runs) and all(ratios[k] <= limit for k, limit in GOAL.items())
            rows.append(
                {"horizon": h, "method": st.method, "baseline": base_name}
                | {f"{k}_ratio": v for k, v in ratios.items()}
                | {"seeds_reaching": n, "seeds": len(st.runs), "goal_met": met}
            )
    return rows


def goal_table(rows: list[dict]) -> Table:
    """summary.md's goal table from goal_rows."""
    header = ["horizon", "method", "vs", *(f"{k} ratio" for k in GOAL), "seeds reaching", "goal met"]
    cells = [
        [
            r["horizon"],
            r["method"],
            r["baseline"],
            *(f"{r[f'{k}_ratio']:.3g}" for k in GOAL),
            f"{r['seeds_reaching']}/{r['seeds']}",
            "yes" if r["goal_met"] else "no",
        ]
        for r in rows
    ]
    return Table(header, cells)


def mean_curve(st: Standing, x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (mean over seeds), and the loss's mean, min and max over seeds, at the evaluations every
    seed reached."""
    n = min(len(r.records) for r in st.runs)
    cols = [[r.records[i] for r in st.runs] for i in range(n)]
    xs = [statistics.fmean(rec[x] for rec in c) for c in cols]
    ys = [[rec[KEY] for rec in c] for c in cols]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot(standings: list[Standing], goals: dict, x: str, path, title: str) -> None:
    """The training loss against ``x`` (update or seconds): mean over seeds, min..max shaded, the
    targets dashed."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for st in standings:
        xs, mean, lo, hi = mean_curve(st, x)
        color = report.COLORS.get(st.method)
        ax.plot(xs, mean, label=f"{st.method} (lr={st.lr:.3g})", color=color)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    for h, (m, target) in goals.items():
        ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(f"target {h}: {m}", (0, target), fontsize=7, color="gray", va="bottom")
    ax.set_yscale("log")
    report.save_plot(fig, ax, path, x=x, ylabel="training loss (mean over seeds)", title=title, legend_size=7)


PLOTS = (("loss_vs_updates.png", "update"), ("loss_vs_seconds.png", "seconds"))


def settings(args, task: Task, sizes, n: int, factors, seeds, horizons) -> str:
    def own(field: str) -> str:
        """' (method value, ...)' for the methods with their own Prong ``field``, else ''."""
        vals = [f"{m} {getattr(REGISTRY[m], field):g}" for m in args.methods if getattr(REGISTRY[m], field)]
        return f" ({', '.join(vals)})" if vals else ""

    grid_text = ", ".join(f"{f:g}" for f in factors)
    return (
        f"Architecture {'-'.join(map(str, sizes))}, {args.activation} units, {args.loss} loss, {n} training "
        f"images, batch {task.batch_size}, {task.updates} updates, evaluations every {task.eval_every}, "
        f"T={task.prong.interval}{own('prong_interval')}, eps={task.prong.eps:g}{own('prong_eps')}, "
        f"N_s={task.prong.num_samples}, momentum={task.momentum:g}; grid x {grid_text} on seed {task.seed}; "
        f"seeds {', '.join(map(str, seeds))}; horizons {', '.join(map(str, horizons))}."
    )


def at_edge(grid_rows: list[dict], best: dict[str, float]) -> dict[str, str]:
    """The methods whose best rate is the largest or the smallest of their grid (of more than one
    rate): their optimum may lie beyond it. Method -> 'largest' or 'smallest'."""
    edge = {}
    for m, lr in best.items():
        lrs = [r["lr"] for r in grid_rows if r["method"] == m]
        if len(lrs) > 1 and lr in (min(lrs), max(lrs)):
            edge[m] = "largest" if lr == max(lrs) else "smallest"
    return edge


def body(standings, goals: dict, grid_rows: list[dict], table: Table, n_eval: int, goal: list[dict]) -> list:
    """summary.md below the settings."""
    lines = [
        f"Training loss = the objective ({n_eval} training images, eval mode). Target h = the lowest "
        "loss of the baselines (no Prong) at update h in the grid (seed of the grid, best rates), "
        "fixed before the seeded runs. Updates and seconds to a target: mean over the seeds that reach "
        "it, at the evaluations; seconds and ms/update count the updates only, all runs stepped in turn.",
        "",
    ]
    lines += [f"- target {h}: {target:.4g} ({m} at update {h})" for h, (m, target) in goals.items()]
    edge = at_edge(grid_rows, {st.method: st.lr for st in standings})
    if edge:
        named = ", ".join(f"{m} ({side})" for m, side in edge.items())
        lines.append(f"- best rate at the grid's edge, the optimum may lie beyond it: {named}")
    lines += ["", table, ""]
    if goal:
        limits = ", ".join(f"{k} ratio <= {v:.3g}" for k, v in GOAL.items())
        lines += [
            f"Goal, each PRONG method against the baseline that set the target ({limits}, every seed "
            "reaching the target; the baseline's updates and seconds are those of its h updates):",
            "",
            goal_table(goal),
            "",
        ]
    grid_table = Table(*_records_table(grid_rows), printed=False)
    lines += ["Learning-rate grid:", "", grid_table, "", report.images(*(f for f, _ in PLOTS)), ""]
    return lines


def run(args: argparse.Namespace, out) -> dict:
    """The grid, the targets, the seeded race; curves.csv, grid.csv, summary.csv, goal.csv (with
    a baseline and a PRONG method), two plots and summary.md; prints the tables."""
    factors, seeds = numbers(args.grid, float, "--grid"), numbers(args.seeds, int, "--seeds")
    horizons = sorted({min(args.horizon, args.updates), args.updates})
    ds, x = common.train_rows(args)
    sizes = autoencoder.architecture(args.arch, x.shape[1], ds.name)
    every = math.gcd(common.eval_every(args, 40), *horizons)
    task = autoencoder.make_task(args, x, sizes, every, with_loss=True)
    best, grid_runs, grid_rows = grid(task, autoencoder.learning_rates(args, x.shape[1]), factors)
    goals = targets(grid_runs, horizons)  # fixed here, before any seeded run
    report.write_csv(out / "grid.csv", grid_rows)  # written now: the seeded race may run long
    results = race(task, [(m, best[m], seed) for m in best for seed in seeds], "race")
    standings = [
        Standing(m, best[m], results[i * len(seeds) : (i + 1) * len(seeds)]) for i, m in enumerate(best)
    ]
    report.write_csv(
        out / "curves.csv",
        [row for st in standings for k, r in zip(seeds, st.runs) for row in report.curve_rows([r], seed=k)],
    )
    title = f"race, auto-encoder {'-'.join(map(str, sizes))} on {ds.name}"
    for file, x_key in PLOTS:
        plot(standings, goals, x_key, out / file, title)
    csv_table = Table(*_records_table([csv_row(st, horizons, goals) for st in standings]), printed=False)
    table = md_table(standings, horizons, goals)
    text = settings(args, task, sizes, x.shape[0], factors, seeds, horizons)
    goal = goal_rows(standings, goals)
    if goal:
        report.write_csv(out / "goal.csv", goal)
    lines = body(standings, goals, grid_rows, table, min(args.eval_samples, x.shape[0]), goal)
    report.write_summary(out, args, f"Race ({ds.name})", text, lines, csv_table)
    return {"standings": standings, "targets": goals, "best": best, "grid": grid_rows}


def _records_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of dict rows that share their keys."""
    return list(rows[0]), [list(r.values()) for r in rows]
