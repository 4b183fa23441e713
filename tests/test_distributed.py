"""Prong under torch.distributed (gloo, two CPU processes launched from here).

- assign_by_cost: the greedy split of the eigendecompositions by cost n^3 (largest first, each to
  the least-loaded rank, ties to the lowest rank), checked by hand and against a reference.
- reparametrize: each rank re-whitens from its own shard; U, c, V, d are bitwise equal across
  ranks and equal (float64 rounding) to one process re-whitening from the union of the shards;
  eigh_owners is the same on both ranks, uses both, and follows assign_by_cost.
- ddp_train: DistributedDataParallel + SGD momentum + Prong(interval=3); U, c, V, d are bitwise
  equal across ranks after every update, and each re-whitening keeps the network function.
- ddp_rescale: the same with rescale=True; the per-minibatch D is the same on both ranks (its
  statistics are all-reduced), and every rescaling keeps the function.

The workers are tests/ddp_worker.py; each run has a deadline, after which both are killed.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from prong_ext import Prong
from prong_ext.prong import assign_by_cost

WORKER = Path(__file__).with_name("ddp_worker.py")
WORLD_SIZE = 2
DEADLINE_S = 120

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


# ------------------------------------------------------------------------------------------------
# assign_by_cost


def _greedy(sizes, world_size):
    """Reference: largest cost first, each to the least-loaded rank (lowest rank on ties)."""
    loads, owners = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += sizes[i] ** 3
    return owners


def test_assign_by_cost_by_hand():
    # 512^3 outweighs all others together: rank 0 takes it, rank 1 the rest.
    assert assign_by_cost([512, 256, 256, 128, 64], 2) == [0, 1, 1, 1, 1]
    # costs 64, 125, 216, 343: 7 -> 0; 6 -> 1 (216); 5 -> 1 (341 < 343); 4 -> 1 (341 < 343)
    assert assign_by_cost([4, 5, 6, 7], 2) == [1, 1, 1, 0]
    # costs 1000, 729, 512, 343 on 2 ranks: 10 -> 0; 9 -> 1; 8 -> 1 (729 < 1000); 7 -> 0
    assert assign_by_cost([7, 8, 9, 10], 2) == [0, 1, 1, 0]
    # ties go to the lowest rank; more ranks than matrices leaves the high ranks idle
    assert assign_by_cost([5], 3) == [0]
    assert assign_by_cost([3, 9], 4) == [1, 0]
    assert sorted(assign_by_cost([10, 10, 10, 10], 2)) == [0, 0, 1, 1]
    assert assign_by_cost([], 2) == []


def test_assign_by_cost_matches_the_greedy_reference():
    g = torch.Generator().manual_seed(0)
    for world_size in (2, 3, 5):
        sizes = (torch.randperm(300, generator=g)[:17] + 1).tolist()  # distinct: no order ties
        assert assign_by_cost(sizes, world_size) == _greedy(sizes, world_size), (sizes, world_size)


def test_assign_by_cost_single_rank_and_bad_input():
    assert assign_by_cost([512, 3, 64, 64], 1) == [0, 0, 0, 0]
    for bad in (0, -1):
        with pytest.raises(ValueError):
            assign_by_cost([4, 8], bad)


# ------------------------------------------------------------------------------------------------
# Two-process runs


def _run_workers(tmp_path: Path, scenario: str) -> list[dict]:
    """Runs both ranks of `scenario`; returns their saved results, or fails with their stderr."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        log = open(tmp_path / f"rank{rank}.log", "w+")  # closed below
        args = ["--rank", str(rank), "--world-size", str(WORLD_SIZE), "--store", str(tmp_path / "store")]
        args += ["--out", str(tmp_path), "--scenario", scenario]
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=log, stderr=log))
        logs.append(log)
    deadline = time.monotonic() + DEADLINE_S
    timed_out = False
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):  # one failed: the other would wait in a collective
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    report = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        report.append(f"--- rank {rank} (exit code {p.returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if timed_out or any(p.returncode for p in procs):
        why = f"timed out after {DEADLINE_S} s" if timed_out else "a worker failed"
        pytest.fail(f"{scenario}: {why}\n" + "\n".join(report))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _assert_bitwise_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{where}: ranks differ in {differ}"


@needs_gloo
def test_reparametrize_merges_the_ranks_statistics_exactly(tmp_path):
    import ddp_worker as w

    rank0, rank1 = _run_workers(tmp_path, "reparametrize")
    _assert_bitwise_equal(rank0["state"], rank1["state"], "reparametrize")

    # one process whitening from the union of the shards
    model = w.build_model(torch.float64)
    prong = Prong(model, num_samples=sum(w.SHARD_SIZES))
    prong.reparametrize(w.dataset())
    reference = w.whitened_state(model)
    assert rank0["state"].keys() == reference.keys()
    errors = {k: _rel(rank0["state"][k], reference[k]) for k in reference}
    assert max(errors.values()) < 1e-9, errors

    # the data are such that whitening from one shard only would be far off
    alone = w.build_model(torch.float64)
    Prong(alone, num_samples=w.SHARD_SIZES[0]).reparametrize(w.shard(w.dataset(), 0))
    assert _rel(w.whitened_state(alone)["0.U"], reference["0.U"]) > 1e-2

    assert rank0["owners"] == rank1["owners"]
    assert set(rank0["owners"].values()) == {0, 1}
    names = list(prong.layers)
    sizes = [prong.layers[n].num_features for n in names]
    assert rank0["owners"] == dict(zip(names, assign_by_cost(sizes, WORLD_SIZE)))


@needs_gloo
def test_ddp_training_keeps_ranks_identical_and_preserves_the_function(tmp_path):
    import ddp_worker as w

    rank0, rank1 = _run_workers(tmp_path, "ddp_train")
    expected = [t % w.DDP_INTERVAL == 0 for t in range(w.DDP_STEPS)]  # updates 0, 3, 6, 9
    for result in (rank0, rank1):
        assert result["rewhitened"] == expected
        assert result["num_reparametrizations"] == sum(expected)
        assert len(result["errors"]) == sum(expected)
        assert max(result["errors"]) < 1e-5, result["errors"]
        assert all(name.startswith("module.") for name in result["owners"]), result["owners"]
    assert rank0["owners"] == rank1["owners"]
    assert set(rank0["owners"].values()) == {0, 1}
    assert len(rank0["states"]) == w.DDP_STEPS
    for t, (a, b) in enumerate(zip(rank0["states"], rank1["states"])):
        _assert_bitwise_equal(a, b, f"after update {t}")
    # the whitening did change: U is no longer the identity after the first re-whitening
    assert not torch.equal(rank0["states"][0]["0.U"], torch.eye(4))


@needs_gloo
def test_ddp_rescaling_applies_the_same_d_on_every_rank(tmp_path):
    import ddp_worker as w

    rank0, rank1 = _run_workers(tmp_path, "ddp_rescale")
    for result in (rank0, rank1):
        assert len(result["errors"]) == w.DDP_STEPS  # a re-whitening or a rescaling every update
        assert max(result["errors"]) < 1e-5, result["errors"]
    for t, (a, b) in enumerate(zip(rank0["states"], rank1["states"])):
        _assert_bitwise_equal(a, b, f"after update {t}")
    # between re-whitenings (updates 1 and 2) the rescaling changed U and V
    assert not torch.equal(rank0["states"][1]["0.U"], rank0["states"][0]["0.U"])
    assert not torch.equal(rank0["states"][2]["4.V"], rank0["states"][1]["4.V"])
