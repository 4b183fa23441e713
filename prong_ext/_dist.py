"""torch.distributed pieces of Prong: the exact merge of statistics across ranks, the sums of the
diagonal rescaling, the eigendecompositions spread over the ranks by cost, and the broadcast of
their results.

Every function takes `group`: a torch.distributed process group, or None for a single process
(then nothing is communicated).
"""

from __future__ import annotations

import heapq

import torch
import torch.distributed as dist

from ._common import outer

__all__ = ["assign_by_cost", "default_group", "merge_statistics", "share_results", "sum_over_ranks", "world"]


def default_group(group):
    """The group Prong communicates over: `group` itself, else the default group when
    torch.distributed is initialized with more than one process, else None."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world(group) -> tuple[int, int]:
    """(world size, rank) within `group`; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def assign_by_cost(sizes: list[int], world_size: int, blocks: list[int] | None = None) -> list[int]:
    """Owner rank of each eigendecomposition, greedily by cost as KAISA assigns its layers: the
    dearest first, each to the least-loaded rank, ties to the lowest rank.

    Args:
        sizes: n per (n, n) matrix.
        world_size: number of ranks, >= 1.
        blocks: per matrix, how many (n, n) blocks it has (grouped layers); default 1 each.
            The cost of an item is blocks * n^3.

    Returns:
        the owner rank per matrix.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{world_size=} must be an int >= 1")
    if any(not isinstance(n, int) or n < 0 for n in sizes):
        raise ValueError(f"sizes must be non-negative ints, got {sizes}")
    blocks = [1] * len(sizes) if blocks is None else blocks
    if len(blocks) != len(sizes):
        raise ValueError(f"blocks has {len(blocks)} entries for {len(sizes)} sizes")
    costs = [b * n**3 for b, n in zip(blocks, sizes)]
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: -costs[i]):  # stable: equal costs keep order
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def merge_statistics(stats: list[tuple], shapes: list[torch.Size], device, group) -> list[tuple]:
    """Statistics of the union of every rank's samples, per layer.

    The counts and the sums are all-reduced first; then every rank centres its moments at the
    global means, M2_r + n_r (mu_r - mu)(mu_r - mu)^T (Chan et al.), and those are all-reduced.

    Args:
        stats: per layer, (count, mean (C,), covariance) in float64, mean and covariance None
            where count is 0; the same layers in the same order on every rank.
        shapes: per layer, the covariance's shape ((C, C) or (G, k, k)).
        device: where the collectives run (the layers' device).

    Returns:
        (count, mean, covariance) per layer for the union; (0, None, None) where no rank saw the
        layer.
    """
    size, _ = world(group)
    if size == 1:
        return stats
    widths = [shape[0] * shape[-1] if len(shape) == 3 else shape[0] for shape in shapes]
    f64 = {"dtype": torch.float64, "device": device}
    counts = torch.tensor([float(count) for count, _, _ in stats], **f64)
    sums = [mean * count if count else torch.zeros(w, **f64) for (count, mean, _), w in zip(stats, widths)]
    first = torch.cat([counts, *sums])
    dist.all_reduce(first, group=group)
    totals = first[: len(stats)].tolist()
    means = [s / t if t else None for s, t in zip(first[len(stats) :].split(widths), totals)]
    moments = []
    for (count, mean, cov), mu, shape in zip(stats, means, shapes):
        if count:
            moments.append(
                (
                    cov * count + count * outer(mean - mu, mean - mu, shape[0] if len(shape) == 3 else 1)
                ).flatten()
            )
        else:
            moments.append(torch.zeros(shape, **f64).flatten())
    second = torch.cat(moments)
    dist.all_reduce(second, group=group)
    out = []
    for total, mu, m2, shape in zip(totals, means, second.split([m.numel() for m in moments]), shapes):
        out.append((int(total), mu, m2.view(shape) / total) if total else (0, None, None))
    return out


def sum_over_ranks(
    counts: list[float], sums: list[torch.Tensor], device, group
) -> tuple[list[float], list[torch.Tensor]]:
    """Per layer, the count and the float64 vector of sums over all ranks, in one all_reduce.

    Args:
        counts: per layer, this rank's count.
        sums: per layer, this rank's float64 sums (1-D; zeros where it has none).
        device: where the collective runs (the layers' device).

    Returns:
        (counts, sums) of all ranks; the arguments themselves for group None.
    """
    if group is None:
        return counts, sums
    packed = torch.cat([torch.tensor(counts, dtype=torch.float64, device=device), *sums])
    dist.all_reduce(packed, group=group)
    totals = packed[: len(counts)].tolist()
    return totals, list(packed[len(counts) :].split([t.numel() for t in sums]))


def share_results(results: list, shapes: list[list[torch.Size]], owners: list[int], device, group) -> list:
    """Broadcasts every owner's results to all ranks, one broadcast per rank that owns any.

    Args:
        results: per item, a list of float64 tensors on its owner (None where the owner's
            computation failed); anything on the other ranks.
        shapes: per item, the shapes of its tensors (the same on every rank).
        owners: owner rank (within `group`) per item.

    Returns:
        per item, the owner's tensors (bitwise the same on every rank), or None where the owner
        failed (sent as NaN).
    """
    size, rank = world(group)
    if size == 1:
        return results
    out = list(results)
    for src in range(size):
        items = [i for i, owner in enumerate(owners) if owner == src]
        if not items:
            continue
        numels = [sum(s.numel() for s in shapes[i]) for i in items]
        if src == rank:
            flat = torch.cat(
                [
                    torch.cat([t.flatten() for t in results[i]])
                    if results[i] is not None
                    else torch.full((n,), float("nan"), dtype=torch.float64, device=device)
                    for i, n in zip(items, numels)
                ]
            )
        else:
            flat = torch.empty(sum(numels), dtype=torch.float64, device=device)
        global_src = src if group is dist.group.WORLD else dist.get_global_rank(group, src)
        dist.broadcast(flat, src=global_src, group=group)
        for i, chunk in zip(items, flat.split(numels)):
            if src == rank:
                continue
            if not bool(chunk.isfinite().all()):
                out[i] = None
                continue
            parts = chunk.split([s.numel() for s in shapes[i]])
            out[i] = [p.view(s) for p, s in zip(parts, shapes[i])]
    return out
