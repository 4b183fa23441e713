"""Per-side state of the layers Prong re-whitens (docs/algorithm.md, sections 2, 3 and 10).

A whitened layer has one whitened side, its input: z = V U (h - c) + d. Everything Prong keeps
about a side between two calls lives in one `WhiteningState`: the statistics window of its
inputs, the eigenpairs of its last re-whitening (U as written and U^-1), the sums of the diagonal
rescaling, the rank that decomposes it. Where the side's buffers are and which hook hands over its
tensor is a `Side`; `INPUT` is the input's. The paper's output side (R whitening the
back-propagated gradients, docs/algorithm.md section 11) would be a second `Side` whose states
sit beside the input's, with no new class.

Operations over many sides at once (one batched eigendecomposition, one finiteness check) are
module functions (`whitening_pairs`); Prong schedules when each runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import ops
from ._common import all_finite, full_precision, outer, outer_taps
from .nn import WhitenedConv2d, WhitenedLinear

__all__ = ["INPUT", "Side", "Window", "WhiteningState", "synchronize", "to_device", "whitening_pairs"]


def _forward_input(module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], None]) -> RemovableHandle:
    """A forward pre-hook calling fn(module, input) with the layer's input."""

    def hook(mod, args):
        fn(mod, args[0])

    return module.register_forward_pre_hook(hook)


def _input_columns(ratio: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """ratio on V's input columns, at every tap: V-shaped."""
    return outer_taps(ratio.new_ones(V.shape[0]), ratio, V)


@dataclass(frozen=True)
class Side:
    """Where one side of a whitened layer lives and how its statistics reach it.

    Attributes:
        name: what the side whitens.
        matrix: the layer's buffer holding the whitening matrix, (C, C) or blocks (G, k, k).
        centre: the layer's buffer holding the centre (C,), or None for a side kept uncentred.
        register: (module, fn) -> handle: a hook on the layer calling fn(module, x) with the
            tensor x whose rows are the side's samples.
        weight_factor: (ratio (C,), V) -> V-shaped factor: what V is divided by when the
            matrix's rows are multiplied by ratio, so that the layer's function is kept.
    """

    name: str
    matrix: str
    centre: str | None
    register: Callable[[nn.Module, Callable], RemovableHandle]
    weight_factor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


INPUT = Side("input", matrix="U", centre="c", register=_forward_input, weight_factor=_input_columns)


def synchronize(t: torch.Tensor) -> None:
    """Waits for t's device (CUDA), so that wall-clock timings cover the work."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def to_device(value, device):
    """value with every tensor in it (through dicts, tuples and lists) moved to device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


class Window:
    """Statistics of one side gathered over a window of training steps or one pass over data.

    Attributes:
        accumulator: the running mean and covariance (ops.CovarianceAccumulator).
        seen: examples that reached the side; None before the first did.
        taken: of them, those accumulated (capped by the caller); None before the first.
    """

    def __init__(self, num_features: int, groups: int):
        self.accumulator = ops.CovarianceAccumulator(num_features, groups=groups)
        self.seen: int | None = None
        self.taken: int | None = None

    def statistics(self) -> tuple:
        """(count, float64 mean (C,), float64 covariance), or (0, None, None) without samples."""
        if self.accumulator.count == 0:
            return 0, None, None
        mean, cov, count = self.accumulator.compute()
        return count, mean, cov


class WhiteningState:
    """What Prong keeps about one whitened side of one layer.

    Attributes:
        name: the layer's name in the model (its key in Prong.state_dict()).
        module: the whitened layer.
        side: which of its sides (INPUT).
        window: the open statistics window, None while none is open.
        pair: (the matrix as written by the last re-whitening or rescaling, its inverse in
            float64), kept while the matrix stays as written; None when there is none.
        rescale_sums: (rows, float64 sums of (U (h - c))_j^2) of the training inputs since the
            last step(), None when none came.
        owner: the rank that decomposed the side at the last re-whitening, None when it took no
            part.
    """

    def __init__(self, name: str, module: nn.Module, side: Side = INPUT):
        self.name = name
        self.module = module
        self.side = side
        self.window: Window | None = None
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rescale_sums: tuple[int, torch.Tensor] | None = None
        self.owner: int | None = None

    # ------------------------------------------------------------------------------------------
    # The side's buffers

    @property
    def matrix(self) -> torch.Tensor:
        """The whitening matrix: (C, C), or (G, k, k) diagonal blocks."""
        return getattr(self.module, self.side.matrix)

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    @property
    def groups(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def num_features(self) -> int:
        """C, the width of the side's samples."""
        return self.groups * self.shape[-1]

    @property
    def centred(self) -> bool:
        """Whether the side has a centre to take the mean: an input side needs a bias to absorb
        it; without one it stays at c = 0 and is whitened by the uncentred E[h h^T]."""
        return self.side.centre is not None and self.module.d is not None

    def target(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The matrix to decompose: the covariance, or the second moment about 0 when not centred."""
        if self.centred:
            return cov
        return cov + outer(mean, mean, self.groups)

    def hook(self, fn: Callable[[nn.Module, torch.Tensor], None]) -> RemovableHandle:
        """Registers fn(module, x) on the layer, x the tensor holding the side's samples."""
        return self.side.register(self.module, fn)

    # ------------------------------------------------------------------------------------------
    # Statistics

    def new_window(self) -> Window:
        return Window(self.num_features, self.groups)

    def feed(self, window: Window, x: torch.Tensor, cap: int) -> bool:
        """Adds the examples of x (the hooked tensor) to window until it holds cap examples;
        True when it took any. Every example counts in window.seen."""
        if isinstance(self.module, WhitenedConv2d) and x.dim() == 3:
            x = x.unsqueeze(0)
        examples = x.shape[0] if x.dim() > 1 else 1
        window.seen = (window.seen or 0) + examples
        room = cap - (window.taken or 0)
        if room <= 0:
            return False
        x = x.detach()
        if isinstance(self.module, WhitenedLinear):
            x = x.reshape(-1, x.shape[-1])  # (N, *, C) -> rows
            per_example = x.shape[0] // max(examples, 1)
            x = x[: room * per_example]
        else:
            x = x[:room]
        window.taken = (window.taken or 0) + min(room, examples)
        window.accumulator.update(x)
        synchronize(x)
        return True

    # ------------------------------------------------------------------------------------------
    # Eigenpairs

    def remember(self, inverse: torch.Tensor) -> None:
        """Keeps the matrix just written with its inverse (from the same eigenpairs)."""
        self.pair = (self.matrix.clone(), inverse)

    def inverse(self, current: torch.Tensor) -> torch.Tensor:
        """The inverse of the matrix, `current` (in float64): the kept one while the matrix is
        still what was written with it, else inverted."""
        if self.pair is not None and torch.equal(self.pair[0], self.matrix):
            return self.pair[1]
        return torch.linalg.inv(current)

    # ------------------------------------------------------------------------------------------
    # Diagonal rescaling

    def add_rescale_rows(self, x: torch.Tensor) -> None:
        """Adds the rows of x (the hooked tensor) to rescale_sums: sum (U (h - c))_j^2."""
        x = x.detach()
        if isinstance(self.module, WhitenedConv2d):  # (N, C, H, W) or (C, H, W): channels last
            x = x.movedim(-3, -1)
        rows = x.reshape(-1, self.num_features)
        with torch.no_grad(), full_precision(rows.device):
            dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
            u = self.matrix.to(dtype)
            blocks = u.shape[0] if u.dim() == 3 else 1
            u = u.view(blocks, -1, u.shape[-1])
            centred = rows.to(dtype)
            if self.side.centre is not None:
                centred = centred - getattr(self.module, self.side.centre).to(dtype)
            z = torch.einsum("mgi,gji->mgj", centred.view(rows.shape[0], blocks, -1), u)
            sums = z.square().sum(0, dtype=torch.float64).flatten()
        count, total = self.rescale_sums or (0, 0)
        self.rescale_sums = (count + rows.shape[0], total + sums)

    def rescale_ratio(self, count: float, total: torch.Tensor, eps: float) -> torch.Tensor:
        """Per row u_j of the matrix, (total_j / count + eps |u_j|^2)^-1/2, flattened over blocks."""
        row_norms = self.matrix.double().square().sum(-1).flatten()
        return (total / count + eps * row_norms).rsqrt()

    def rescale(self, ratio: torch.Tensor) -> torch.Tensor:
        """Multiplies the matrix's rows by ratio and divides V by the matching factor, keeping the
        layer's function; the kept inverse follows ((D U)^-1 = U^-1 D^-1). Call without grad.

        Returns:
            the V-shaped factor V was divided by.
        """
        U, V = self.matrix, self.module.V
        kept = self.pair if self.pair is not None and torch.equal(self.pair[0], U) else None
        by_row = ratio.view(*U.shape[:-1], 1)  # U's rows: (C, 1) or (G, k, 1)
        U.mul_(by_row.to(U.dtype))
        factor = self.side.weight_factor(ratio, V)
        V.div_(factor.to(V.dtype))
        self.pair = None if kept is None else (U.clone(), kept[1] / by_row.mT)
        return factor

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """The side's entries of Prong.state_dict(), each key absent where there is nothing:
        'u_inv' (pair), 'rescale_sums', and of an open window 'stats' (the accumulator's
        state_dict), 'seen' and 'taken'."""
        out = {}
        if self.pair is not None:
            out["u_inv"] = self.pair
        if self.rescale_sums is not None:
            out["rescale_sums"] = self.rescale_sums
        if self.window is not None:
            out["stats"] = self.window.accumulator.state_dict()
            for key in ("seen", "taken"):
                if getattr(self.window, key) is not None:
                    out[key] = getattr(self.window, key)
        return out

    def load_state_dict(self, entries: dict) -> None:
        """Restores what state_dict() returned, its tensors moved to the matrix's device; the
        window's entries go into the open window (open it first)."""
        entries = to_device(entries, self.matrix.device)
        self.pair = entries.get("u_inv")
        self.rescale_sums = entries.get("rescale_sums")
        if self.window is not None and "stats" in entries:
            self.window.seen = entries.get("seen")
            self.window.taken = entries.get("taken")
            self.window.accumulator.load_state_dict(entries["stats"])


def whitening_pairs(mats: list[torch.Tensor], eps: float, kind: str) -> list:
    """(U, U^-1) per matrix ((C, C) or (G, k, k) blocks), all blocks in one batched call; a block
    that fails (an error, or a non-finite result) is retried alone in float64 on the torch path;
    None for a matrix with a block that fails that too."""
    blocks, spans = [], []
    for m in mats:
        parts = list(m.unbind(0)) if m.dim() == 3 else [m]
        spans.append((len(blocks), len(parts)))
        blocks.extend(parts)
    if not blocks:
        return []
    try:
        pairs = list(zip(*ops.whitening(blocks, eps, kind)))
    except RuntimeError:  # torch.linalg.LinAlgError and the extension's errors
        pairs = [None] * len(blocks)
    # one check of every block's U and U^-1
    finite = iter(all_finite([t for pair in pairs if pair is not None for t in pair]))
    for i, pair in enumerate(pairs):
        if pair is None or not all([next(finite) for _ in pair]):
            pairs[i] = _retry(blocks[i], eps, kind)
    out = []
    for (first, count), m in zip(spans, mats):
        part = pairs[first : first + count]
        if any(p is None for p in part):
            out.append(None)
        elif m.dim() == 3:
            out.append(tuple(torch.stack(t) for t in zip(*part)))
        else:
            out.append(part[0])
    return out


def _retry(mat: torch.Tensor, eps: float, kind: str) -> tuple | None:
    try:
        (u,), (u_inv,) = ops.whitening([mat.double()], eps, kind, backend="torch")
    except RuntimeError:
        return None
    if not all(all_finite([u, u_inv])):
        return None
    return u, u_inv
