"""One rank of the two-process gloo jobs that tests/test_distributed.py launches.

    python tests/ddp_worker.py --rank R --world-size 2 --store DIR/store --out DIR --scenario NAME

Scenarios:
    reparametrize: a float64 whitened model; the rank calls Prong.reparametrize on its own shard of
        a fixed data set (num_samples = shard size). Saves the whitened tensors and eigh_owners.
    ddp_train: a float32 whitened model in DistributedDataParallel, SGD with momentum, Prong with
        interval 3, ten updates on rank-specific data. Saves the whitened tensors after every
        prong.step(), the relative output change on a fixed probe at every re-whitening, and the
        counters.

The result goes to DIR/rank{R}.pt. The model and data builders are imported by the test too.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch import nn

from prong_ext import Prong, WhitenedConv2d, WhitenedLinear, whiten

SHARD_SIZES = (40, 24)  # unequal, so a merge that ignores the counts is wrong
INPUT_SHAPE = (4, 7, 7)
DDP_STEPS = 10
DDP_INTERVAL = 3
DDP_BATCH = 8


def build_model(dtype: torch.dtype) -> nn.Module:
    """Whitened conv/linear net with distinct input widths 4, 6, 45, 20, 7 (one owner per
    matrix is then unambiguous: 45 on rank 0, the rest on rank 1). Same weights on every call."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 5, 3, stride=2),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 20),
        nn.Tanh(),
        nn.Linear(20, 7),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    return whiten(model.to(dtype))


def dataset(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Correlated channels with a non-zero mean; the second shard has a different mean, so the
    union's covariance is not the average of the shards' covariances."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SHARD_SIZES), *INPUT_SHAPE, generator=g, dtype=torch.float64)
    mix = torch.eye(4, dtype=torch.float64) + 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    x = torch.einsum("ij,nj...->ni...", mix, x) + 0.5
    x[SHARD_SIZES[0] :] += torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64).view(4, 1, 1)
    return x.to(dtype)


def shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARD_SIZES[:rank])
    return x[start : start + SHARD_SIZES[rank]]


def whitened_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of U, c, V, d of every whitened layer, keyed 'layer.attr' (no 'module.' prefix)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (WhitenedLinear, WhitenedConv2d)):
            for attr in ("U", "c", "V", "d"):
                t = getattr(m, attr)
                if t is not None:
                    out[f"{name.removeprefix('module.')}.{attr}"] = t.detach().clone()
    return out


def _probe_output(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """Eval-mode output (not seen by Prong's training-mode hooks), training mode restored."""
    model.eval()
    with torch.no_grad():
        out = model(probe)
    model.train()
    return out


def run_reparametrize(rank: int) -> dict:
    model = build_model(torch.float64)
    prong = Prong(model, num_samples=SHARD_SIZES[rank])
    prong.reparametrize(shard(dataset(), rank))
    return {"state": whitened_state(model), "owners": dict(prong.eigh_owners)}


def run_ddp_train(rank: int, rescale: bool = False) -> dict:
    model = build_model(torch.float32)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    prong = Prong(ddp, opt, interval=DDP_INTERVAL, num_samples=2 * DDP_BATCH, rescale=rescale)
    probe = dataset(torch.float32)[:16]
    g = torch.Generator().manual_seed(100 + rank)
    states, rewhitened, errors = [], [], []
    for _ in range(DDP_STEPS):
        x = torch.randn(DDP_BATCH, *INPUT_SHAPE, generator=g) * (1 + rank) + rank
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = _probe_output(model, probe)
        done = prong.step()
        if done or rescale:
            after = _probe_output(model, probe)
            errors.append(((after - before).norm() / before.norm()).item())
        rewhitened.append(done)
        states.append(whitened_state(model))
    return {
        "states": states,
        "rewhitened": rewhitened,
        "errors": errors,
        "num_reparametrizations": prong.num_reparametrizations,
        "owners": dict(prong.eigh_owners),
    }


SCENARIOS = {
    "reparametrize": run_reparametrize,
    "ddp_train": run_ddp_train,
    "ddp_rescale": functools.partial(run_ddp_train, rescale=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(args.store)}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = SCENARIOS[args.scenario](args.rank)
        torch.save(result, os.path.join(args.out, f"rank{args.rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
