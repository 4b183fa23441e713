"""The race: round-robin stepping, its determinism, the grid's choice, targets fixed before the
seeded runs, and the summary's columns, on tiny auto-encoders."""

import csv
import math

import pytest

from prong_ext import cli
from prong_ext.experiments import autoencoder, common, race

FAST = ["--quiet", "--num-samples", "32", "--interval", "3"]
TINY = [
    "--updates",
    "6",
    "--horizon",
    "4",
    "--eval-every",
    "2",
    "--batch-size",
    "16",
    "--train-samples",
    "64",
]


def _task(loss=None):
    args = cli.build_parser().parse_args(["race", *TINY, *FAST, "--eval-samples", "32"])
    ds, x = common.train_rows(args)
    task = autoencoder.make_task(args, x, autoencoder.DIGITS_ARCH, 2, with_loss=True)
    if loss is not None:
        task.loss = loss
    return task


def _losses(r):
    return [rec["train_loss"] for rec in r.records]


def test_round_robin_interleaves_the_runs_one_update_each():
    order = []
    base = _task().loss
    task = _task(loss=lambda model, batch: order.append(id(model)) or base(model, batch))
    results = race.race(task, [("sgd", 0.1, 0), ("prong-adam", 3e-3, 0), ("sgd", 0.1, 1)], "test")
    ids = [id(r.model) for r in results]
    assert len(set(ids)) == 3
    assert order == ids * task.updates
    assert [r.updates for r in results] == [task.updates] * 3


def test_round_robin_is_deterministic_and_equals_each_run_alone():
    plan = [("sgd", 0.1, 0), ("prong-adam", 3e-3, 1)]
    a, b = race.race(_task(), plan, "a"), race.race(_task(), plan, "b")
    assert [_losses(r) for r in a] == [_losses(r) for r in b]
    task = _task()
    alone = [race.replace(task, seed=seed).run(m, lr) for m, lr, seed in plan]
    assert [_losses(r) for r in a] == [_losses(r) for r in alone]
    assert all(math.isfinite(v) for r in a for v in _losses(r))
    assert [rec["update"] for rec in a[0].records] == [0, 2, 4, 6]


def test_the_grid_picks_the_lowest_final_loss():
    task = _task()
    best, runs, rows = race.grid(task, {"sgd": 0.1, "adam": 3e-3}, [0.3, 1.0, 1e9])
    assert len(rows) == 6
    for m in ("sgd", "adam"):
        mine = [r for r in rows if r["method"] == m]
        assert best[m] == min(mine, key=lambda r: r["final_loss"])["lr"] == runs[m].lr
        assert best[m] != pytest.approx({"sgd": 0.1, "adam": 3e-3}[m] * 1e9)


def test_targets_are_the_best_baseline_at_each_horizon():
    task = _task()
    plan = [("sgd", 0.1, 0), ("adam", 3e-3, 0), ("prong-adam", 3e-3, 0)]
    runs = dict(zip(("sgd", "adam", "prong-adam"), race.race(task, plan, "t")))
    goals = race.targets(runs, [4, 6])
    for h in (4, 6):
        m, value = goals[h]
        assert m in ("sgd", "adam")
        assert value == min(race.loss_at(runs[b], h) for b in ("sgd", "adam"))


def test_targets_are_fixed_before_the_seeded_runs_and_the_summary_has_its_columns(tmp_path, monkeypatch):
    calls = []
    real_race, real_targets = race.race, race.targets
    out = tmp_path / "race"

    def spy(task, plan, desc):
        calls.append(desc if desc != "race" else f"race, grid.csv written: {(out / 'grid.csv').exists()}")
        return real_race(task, plan, desc)

    monkeypatch.setattr(race, "race", spy)
    monkeypatch.setattr(race, "targets", lambda *a: calls.append("targets") or real_targets(*a))
    argv = ["race", "--out", str(out), "--methods", "sgd,prong-adam", "--seeds", "0,1", "--grid", "1,3"]
    assert cli.main(argv + TINY + FAST + ["--eval-samples", "32"]) == 0
    assert calls == ["grid sgd", "grid prong-adam", "targets", "race, grid.csv written: True"]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sgd", "prong-adam"]
    for col in (
        "lr",
        "loss_4_mean",
        "loss_4_min",
        "loss_6_max",
        "updates_to_target_6",
        "seconds_to_target_4",
    ):
        assert all(r[col] != "" for r in rows), col
    assert {"ms_per_update", "cpu_ms_per_update", "seeds_reaching_6", "commit"} <= set(rows[0])
    shares = {r["method"]: float(r["rewhitening_share"]) for r in rows}
    assert shares["sgd"] == 0 and 0 < shares["prong-adam"] < 1
    assert all(r["seeds"] == "2" for r in rows)
    md = (out / "summary.md").read_text()
    assert "target 6:" in md and "seconds to target 4" in md and "Learning-rate grid" in md
    assert "re-whitening % of time" in md and "| seconds ratio | seeds reaching | goal met |" in md
    with open(out / "goal.csv", newline="") as f:
        goal = list(csv.DictReader(f))
    assert [(r["horizon"], r["method"], r["baseline"]) for r in goal] == [
        ("4", "prong-adam", "sgd"),
        ("6", "prong-adam", "sgd"),
    ]
    for png in ("loss_vs_updates.png", "loss_vs_seconds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    with open(out / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert {(r["method"], r["seed"]) for r in curves} == {(m, s) for m in ("sgd", "prong-adam") for s in "01"}


@pytest.mark.parametrize("argv,message", [(["--seeds", "a"], "--seeds"), (["--grid", "0,1"], "--grid")])
def test_bad_seeds_and_grids_are_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["race", "--out", str(tmp_path), "--quiet", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_reach_and_standing():
    r = race.RunResult(
        "sgd", 0.1, records=[{"update": u, "seconds": u / 10, "train_loss": 10 - u} for u in range(5)]
    )
    assert race.reach(r, 7.5) == (3, 0.3) and race.reach(r, 0) is None
    st = race.Standing("sgd", 0.1, [r, r])
    assert st.to_target(7.5) == (3, 0.3, 2)
    assert math.isnan(st.to_target(0)[0]) and race.reach_cells(st, 0) == ["never", "never"]
    diverged = race.RunResult("sgd", 1.0, records=r.records[:2], diverged=True)
    assert race.loss_at(diverged, 4) == math.inf  # ranks last in the grid, never reaches a target


def test_a_best_rate_at_the_grid_edge_is_named():
    rows = [{"method": m, "lr": lr} for m in ("sgd", "adam", "bn") for lr in (0.1, 0.3, 1.0)]
    edge = race.at_edge(
        rows + [{"method": "one", "lr": 1.0}], {"sgd": 1.0, "adam": 0.3, "bn": 0.1, "one": 1.0}
    )
    assert edge == {"sgd": "largest", "bn": "smallest"}


def _run(method, losses, seconds_per_update, timings=None):
    """A RunResult with records at updates 0, 2, 4, 6 (the given losses) and linear seconds."""
    records = [
        {"update": u, "seconds": u * seconds_per_update, "train_loss": loss}
        for u, loss in zip((0, 2, 4, 6), losses)
    ]
    train = 6 * seconds_per_update
    return race.RunResult(method, 0.1, records, train, updates=6, prong_timings=timings or {})


def test_the_goal_table_divides_by_the_baseline_that_set_the_target():
    base = race.Standing(
        "bn-adam", 3e-3, [_run("bn-adam", [9, 8, 7, 6], 1.0), _run("bn-adam", [9, 8, 7, 4], 1.0)]
    )
    fast = race.Standing(
        "prong-adam",
        3e-3,
        [
            _run("prong-adam", [9, 6, 4, 4], 2.0, {"eigh": 1.5, "projection": 1.5}),
            _run("prong-adam", [9, 5, 3, 2], 2.0, {"eigh": 3.0}),
        ],
    )
    slow = race.Standing("prong", 1e-3, [_run("prong", [9, 9, 8, 7], 1.0), _run("prong", [9, 8, 6, 6], 1.0)])
    rows = race.goal_rows([base, fast, slow], {6: ("bn-adam", 6.0), 4: ("bn-adam", 7.0)})
    assert [(r["horizon"], r["method"], r["baseline"]) for r in rows] == [
        (6, "prong-adam", "bn-adam"),
        (6, "prong", "bn-adam"),
        (4, "prong-adam", "bn-adam"),
        (4, "prong", "bn-adam"),
    ]
    # horizon 6: mean losses 3 vs 5; prong-adam reaches 6 at update 2 on both seeds, 4 s, against
    # the baseline's 6 s over its 6 updates
    assert rows[0]["loss_ratio"] == 3 / 5
    assert rows[0]["updates_ratio"] == 2 / 6 and rows[0]["seconds_ratio"] == 4 / 6
    assert rows[0]["seeds_reaching"] == 2 and rows[0]["goal_met"] is False  # 4 s > 1/2 of 6 s
    assert rows[1]["seeds_reaching"] == 1 and rows[1]["goal_met"] is False
    # horizon 4: mean losses 3.5 vs 7; target 7 at update 2 (4 s) against 4 updates (4 s)
    assert rows[2]["loss_ratio"] == 3.5 / 7 and rows[2]["updates_ratio"] == 2 / 4
    assert rows[2]["seconds_ratio"] == 1.0 and rows[2]["goal_met"] is False
    assert fast.rewhitening_share() == 0.25 and base.rewhitening_share() == 0
    table = race.goal_table(rows)
    assert table.header[3:6] == ["loss ratio", "updates ratio", "seconds ratio"]
    assert table.rows[0][-2:] == ["2/2", "no"]


def test_the_goal_is_met_within_every_limit():
    base = race.Standing("adam", 3e-3, [_run("adam", [9, 8, 7, 6], 1.0)])
    fast = race.Standing("prong-adam", 3e-3, [_run("prong-adam", [9, 4, 4, 4], 1.0)])
    (row,) = race.goal_rows([base, fast], {6: ("adam", 6.0)})
    assert row["loss_ratio"] == 4 / 6 and row["updates_ratio"] == 2 / 6 and row["seconds_ratio"] == 2 / 6
    assert row["goal_met"] is True
    # no goal rows without a baseline among the standings
    assert race.goal_rows([fast], {6: ("prong-adam", 4.0)}) == []
