"""The PRONG training-loop controller (docs/algorithm.md, Algorithm 1).

Prong schedules; the state of every whitened layer side is a WhiteningState
(prong_ext/_layer_state.py), the change of coordinates of a layer and of its optimizer state is
prong_ext/_reparam.py, the communication between ranks prong_ext/_dist.py.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import _dist, _reparam, ops
from ._common import all_finite
from ._dist import assign_by_cost
from ._layer_state import WhiteningState, Window, synchronize, whitening_pairs
from .convert import tied_parameters
from .nn import WhitenedLayer

__all__ = ["Prong", "assign_by_cost"]

#: hyperparameters a checkpoint carries (load_state_dict takes them from it)
_HYPERPARAMETERS = ("interval", "num_samples", "eps", "whitening", "optimizer_state", "second_moment")
_TIMINGS = ("statistics", "eigh", "projection")
#: state_dict sections keyed by layer name: the sides' entries, and those of the open window
_SIDE_KEYS = ("u_inv", "rescale_sums")
_WINDOW_KEYS = ("seen", "taken", "stats")


class Prong:
    """Re-whitens a model's whitened layers every `interval` updates, keeping its function.

    Sits beside the optimizer::

        prong = Prong(model, optimizer)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            prong.step()

    `step()` re-whitens when its update count is a multiple of `interval`, the first call
    included (the whitened initialization). The statistics come from the training forward passes
    just before: forward pre-hooks on the whitened layers, registered only for the last
    ceil(num_samples / batch) steps before a re-whitening (no extra forward pass, no cost
    outside that window), counting forward passes in training mode only. The first re-whitening
    sees only the first batch; for a larger sample call `reparametrize(data)` before training,
    which then is the whitened initialization (the first `step()` does not redo it).

    For every layer, with statistics mu and Sigma of its input h (docs/algorithm.md):
    W, b = V U, d - V U c (canonical); c = mu; U from Sigma's eigenpairs with eps; V = W U^-1;
    d = b + W c. Layers without bias keep c = 0 and take U from the uncentered E[h h^T].

    Args:
        model: a module holding WhitenedLinear / WhitenedConv2d layers (see prong_ext.whiten).
        optimizer: the optimizer of the model's parameters, whose state follows the new
            coordinates (see optimizer_state); None to leave optimizer state alone.
        interval: T, updates between re-whitenings (>= 1).
        num_samples: N_s, examples (along the batch dimension) per estimate; for convs every
            position of each example is a sample.
        eps: > 0, added to the eigenvalues; bounds the step multiplier by eps^-1/2.
        whitening: "pca" (the paper) or "zca".
        optimizer_state: "transform" maps the first moments (SGD momentum_buffer, Adam
            exp_avg) exactly to the new coordinates, keeping their direction in (W, b); Adam's
            exp_avg_sq and max_exp_avg_sq (no exact transform exists) go as second_moment says.
            "reset" clears the whitened parameters' optimizer state. "keep" leaves it untouched.
        second_moment: with optimizer_state="transform", what a re-whitening does to the second
            moments of V (docs/algorithm.md section 8): "reset" (the default, None, with
            optimizer_state="transform") restarts Adam on V: its exp_avg, second moments and
            step are zeroed, so the update after a re-whitening is Adam's first one, at most lr
            per coordinate (d, whose coordinates do not change, keeps its state); "keep" leaves
            the second moments as they are; "diagonal" carries them as the diagonal of
            E[g g^T] through the map of the gradients, v' = (A * A) v per output row,
            A = U' U^-1, plus d's share for a moved centre. Optimizers without second moments
            (SGD) are not affected. A rescaling (rescale=True) multiplies them by the squared
            change under every policy: for a diagonal change that is exact.
        max_features: layers with a wider input stay unwhitened (with a warning).
        rescale: the paper's per-minibatch diagonal rescaling W = V D U (docs/algorithm.md): at every
            step() that does not re-whiten, U becomes D U0 (U0: the U of the last re-whitening)
            with D_jj = (u0_j^T (Sigma + eps I) u0_j)^-1/2, Sigma the second moment about c of
            the training inputs since the previous step(): each row gets unit variance under
            Sigma + eps I, the same regularized sense in which U whitens, so the eps^-1/2 bound
            on the step multiplier holds. V's input columns are divided by the change of D, so
            the function is kept. The first moments follow exactly (times the change of D), and
            so does Adam's exp_avg_sq (times its square), unless optimizer_state is "keep".
            Costs rows * C^2 per layer and training pass.
        process_group: the torch.distributed group to work over; by default the default group
            when torch.distributed is initialized. Then, at every re-whitening, the statistics
            of all ranks are merged exactly, the eigendecompositions are spread over the ranks
            by cost (see assign_by_cost) and broadcast, so every rank holds bitwise the same U
            and c. num_samples counts the examples of each rank. `model` may be a
            DistributedDataParallel; every rank must call step() and reparametrize() alike.

    Failures keep what is there: non-finite statistics raise a ValueError naming the layers
    and change nothing; an eigendecomposition that fails (an error, or a non-finite result) is
    retried alone in float64 on the torch path, and if that fails too the layer keeps its
    previous whitening, with a warning naming it.
    """

    #: the projection of one layer (docs/algorithm.md section 4), looked up on the class at every
    #: re-whitening
    _project = staticmethod(_reparam.project)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        interval: int = 100,
        num_samples: int = 1024,
        eps: float = 1e-2,
        whitening: str = "pca",
        optimizer_state: str = "transform",
        second_moment: str | None = None,
        max_features: int = 4096,
        rescale: bool = False,
        process_group=None,
    ):
        _check_arguments(
            interval, num_samples, eps, whitening, optimizer_state, max_features, optimizer, rescale
        )
        second_moment = _default_second_moment(optimizer_state) if second_moment is None else second_moment
        _check_moment_policies(optimizer_state, second_moment)
        self.model = model
        # statistics passes of reparametrize(data) run the wrapped module: DDP's forward would
        # make collectives that ranks with different amounts of data do not match
        self._module = model.module if isinstance(model, DistributedDataParallel) else model
        self.process_group = process_group
        self.rescale = rescale
        self.optimizer = optimizer
        self.interval = interval
        self.num_samples = num_samples
        self.eps = float(eps)
        self.whitening = whitening
        self.optimizer_state = optimizer_state
        self.second_moment = second_moment
        self.max_features = max_features
        self.layers: dict[str, WhitenedLayer] = _select_layers(model, max_features)
        # one state per whitened side, in the order of self.layers
        self._sides = [WhiteningState(name, module) for name, module in self.layers.items()]

        self.timings = dict.fromkeys(_TIMINGS, 0.0)
        self.num_reparametrizations = 0
        self._step = 0
        self._initialized = False  # reparametrize() was called before the first update
        self._examples_per_step: float | None = None
        self._warned_state_keys: set[str] = set()  # optimizer state keys already warned about
        self._window_steps = 0
        self._handles: list = []
        self._open_window()
        self._rescale_handles = [self._rescale_hook(side) for side in self._sides if rescale]

    @property
    def updates(self) -> int:
        """Number of step() calls so far."""
        return self._step

    @property
    def eigh_owners(self) -> dict[str, int]:
        """Per layer, the rank that decomposed it at the last re-whitening (layers with
        statistics then only; 0 everywhere in a single process)."""
        return {side.name: side.owner for side in self._sides if side.owner is not None}

    @property
    def _window(self) -> dict[str, ops.CovarianceAccumulator] | None:
        """The open window's accumulators by layer name; None while no window is open."""
        if not self._window_open:
            return None
        return {side.name: side.window.accumulator for side in self._sides}

    # ------------------------------------------------------------------------------------------
    # The training loop

    def step(self, data: torch.Tensor | Iterable | None = None) -> bool:
        """Call after optimizer.step(); re-whitens when the update count is a multiple of
        `interval` (else rescales, with rescale=True). Returns True when it re-whitened.

        Args:
            data: optional inputs (as for reparametrize) to take the statistics from when this
                step re-whitens, instead of the training forward passes; ignored on the other
                steps. A model compiled with torch.compile needs it: its forward passes do not
                run the statistics hooks (nor the rescaling's).
        """
        done = False
        explicit_init = self._step == 0 and self._initialized
        if self._step % self.interval == 0 and not explicit_init:
            self._window_steps += 1
            stats = self._statistics(self._windows() if data is None else self._gather(data))
            if all(count == 0 for count, _, _ in stats):
                raise RuntimeError(
                    f"Prong.step() is due to re-whiten at update {self._step} but no statistics "
                    "were gathered: run the model's training forward pass (in training mode, not "
                    "compiled) before prong.step(), or pass the inputs: prong.step(data)"
                )
            if data is None:
                self._warn_few_examples()
            self._rewhiten(stats)
            self._close_window()
            done = True
        else:
            if self._window_open:
                self._window_steps += 1
                if explicit_init:  # the initial window is not needed
                    self._close_window()
            if self.rescale:
                self._apply_rescale()
        for side in self._sides:
            side.rescale_sums = None
        self._step += 1
        self._schedule_window()
        return done

    def _warn_few_examples(self) -> None:
        """Warns when the window's statistics hold fewer than num_samples examples."""
        taken = [side.window.taken for side in self._sides if side.window is not None and side.window.taken]
        if taken and min(taken) < self.num_samples:
            first = (
                " For the whitened initialization from num_samples examples, call "
                "prong.reparametrize(data) before training."
                if self._step == 0
                else ""
            )
            warnings.warn(
                f"Prong re-whitens at update {self._step} from {min(taken)} examples, fewer than "
                f"num_samples={self.num_samples}.{first}",
                stacklevel=3,
            )

    def reparametrize(self, data: torch.Tensor | Iterable | None = None) -> None:
        """Re-whitens every layer now.

        Called before the first update, it is the whitened initialization, and the first
        `step()` does not re-whiten again.

        Args:
            data: None to use the statistics the training forward passes gathered so far in the
                current window; or a tensor (one batch) or an iterable of batches (tensors, or
                tuples/lists whose first element is the input), run through the model once
                without gradients until `num_samples` examples have passed. That pass leaves
                every other piece of model state as it was (buffers such as batch-norm running
                statistics, training mode, the RNG).

        Raises:
            ValueError: no data, or no statistics gathered; non-finite statistics (naming the
                layers; nothing is changed then).
        """
        if data is None:
            stats = self._statistics(self._windows())
            if all(count == 0 for count, _, _ in stats):
                raise ValueError(
                    "reparametrize() without data needs statistics from training forward "
                    "passes, and none were gathered since the last re-whitening; pass data"
                )
            self._rewhiten(stats)
            self._close_window()
            self._schedule_window()
        else:
            stats = self._statistics(self._gather(data))
            if all(count == 0 for count, _, _ in stats):
                raise ValueError(
                    "reparametrize(data): the data reached none of the whitened layers (no "
                    f"forward pre-hook of {sorted(self.layers)} ran); nothing was changed"
                )
            self._rewhiten(stats)
        if self._step == 0:
            self._initialized = True

    # ------------------------------------------------------------------------------------------
    # Statistics: the window before a re-whitening, or a pass over data

    def _statistics_hook(self, side: WhiteningState, window: Window, training_only: bool):
        """A hook feeding the side's samples to `window`, capped at num_samples examples."""

        def hook(module, x):
            # not traced: statistics stay outside graphs; and a copy of the layer (deepcopy
            # of the model carries its hooks) feeds nothing
            if torch.compiler.is_compiling() or module is not side.module:
                return
            if training_only and not module.training:
                return
            start = time.perf_counter()
            if side.feed(window, x, self.num_samples):
                self.timings["statistics"] += time.perf_counter() - start

        return side.hook(hook)

    @property
    def _window_open(self) -> bool:
        return self._sides[0].window is not None  # the sides' windows open and close together

    def _windows(self) -> list[Window | None]:
        return [side.window for side in self._sides]

    def _open_window(self) -> None:
        for side in self._sides:
            side.window = side.new_window()
        self._window_steps = 0
        self._handles = [self._statistics_hook(side, side.window, True) for side in self._sides]

    def _close_window(self) -> None:
        if not self._window_open:
            return
        seen = max((side.window.seen or 0 for side in self._sides), default=0)
        if seen and self._window_steps:
            self._examples_per_step = seen / self._window_steps
        for h in self._handles:
            h.remove()
        self._handles = []
        for side in self._sides:
            side.window = None

    def _schedule_window(self) -> None:
        """Opens the window when the coming forward passes are among the last ones before the
        next re-whitening that are needed for num_samples examples."""
        if self._window_open:
            return
        due = -(-self._step // self.interval) * self.interval  # next multiple >= step
        per_step = self._examples_per_step or self.num_samples
        needed = max(1, math.ceil(self.num_samples / per_step))
        if due - self._step < needed:
            self._open_window()

    def _gather(self, data) -> list[Window]:
        """One forward pass over `data` (no grad) feeding fresh windows; restores buffers,
        training mode and RNG afterwards."""
        if isinstance(data, torch.Tensor):
            data = [data]
        windows = [side.new_window() for side in self._sides]
        with _model_state_kept(self.model, self.layers), self._window_paused():
            handles = [self._statistics_hook(side, w, False) for side, w in zip(self._sides, windows)]
            try:
                passed = self._run(data)
            finally:
                for h in handles:
                    h.remove()
        if passed == 0:
            raise ValueError("data gave no examples; reparametrize() needs at least one")
        if passed < self.num_samples:
            warnings.warn(
                f"data gave {passed} examples, fewer than num_samples={self.num_samples}; "
                "re-whitening from those",
                stacklevel=3,
            )
        return windows

    @contextlib.contextmanager
    def _window_paused(self):
        """Neither the training window nor the rescaling's sums see the passes made inside."""
        for h in self._handles:
            h.remove()
        self._handles = []
        rescale_sums = [side.rescale_sums for side in self._sides]
        for side in self._sides:
            side.rescale_sums = None
        try:
            yield
        finally:
            if self._window_open:
                self._handles = [self._statistics_hook(side, side.window, True) for side in self._sides]
            for side, sums in zip(self._sides, rescale_sums):
                side.rescale_sums = sums

    def _run(self, data: Iterable) -> int:
        """Runs the (unwrapped) model without gradients on data's batches until num_samples
        examples have passed; returns how many did."""
        device = next((p.device for p in self.model.parameters()), None)
        passed = 0
        with torch.no_grad():
            for batch in data:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"data must yield tensors or tuples whose first element is a tensor, got {type(x)}"
                    )
                x = x[: self.num_samples - passed]
                if device is not None and x.device != device:
                    x = x.to(device)
                self._module(x)
                passed += x.shape[0]
                if passed >= self.num_samples:
                    break
        return passed

    def _group(self):
        return _dist.default_group(self.process_group)

    def _device(self) -> torch.device:
        return self._sides[0].matrix.device

    def _statistics(self, windows: list[Window | None]) -> list[tuple]:
        """(count, float64 mean, float64 covariance) per side, of every rank's samples;
        (0, None, None) for a side without samples."""
        stats = [(0, None, None) if w is None else w.statistics() for w in windows]
        shapes = [side.shape for side in self._sides]  # (C, C) or blocks (G, k, k)
        return _dist.merge_statistics(stats, shapes, self._device(), self._group())

    # ------------------------------------------------------------------------------------------
    # Re-whitening

    def _rewhiten(self, stats: list[tuple]) -> None:
        start = time.perf_counter()
        sides, means, mats = self._targets(stats)
        synchronize(mats[0])
        self.timings["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        results = self._whitening(sides, mats, means)
        failed = [side.name for side, r in zip(sides, results) if r is None]
        if failed:
            warnings.warn(
                f"the eigendecomposition failed for layer(s) {failed}, also when retried in float64; "
                "they keep their previous whitening",
                stacklevel=3,
            )
        kept = [(side, r) for side, r in zip(sides, results) if r is not None]
        synchronize(mats[0])
        self.timings["eigh"] += time.perf_counter() - start

        start = time.perf_counter()
        self._reproject(kept)
        synchronize(mats[0])
        self.timings["projection"] += time.perf_counter() - start
        self.num_reparametrizations += 1

    def _targets(self, stats: list[tuple]) -> tuple[list[WhiteningState], list, list]:
        """The sides with statistics, their means and the matrices to decompose, checked finite
        (one check for all)."""
        sides, means, mats, missing = [], [], [], []
        for side, (count, mean, cov) in zip(self._sides, stats):
            if count == 0:
                missing.append(side.name)
                continue
            sides.append(side)
            means.append(mean)
            mats.append(side.target(mean, cov))
        if missing:
            warnings.warn(
                f"no statistics for layer(s) {missing} (no input reached them); they keep their whitening",
                stacklevel=4,
            )
        finite = all_finite(means + mats)
        bad = [side.name for i, side in enumerate(sides) if not (finite[i] and finite[len(sides) + i])]
        if bad:
            raise ValueError(
                f"non-finite input statistics (NaN or Inf in the inputs) of layer(s) {bad}; "
                "no layer was changed"
            )
        return sides, means, mats

    def _whitening(
        self, sides: list[WhiteningState], mats: list[torch.Tensor], means: list[torch.Tensor]
    ) -> list:
        """Per side, [U, U^-1, mean] (float64), or None where the eigendecomposition failed.

        In a process group each rank computes the sides assign_by_cost gives it and
        broadcasts them (the mean too, so c is the owner's bitwise).
        """
        group = self._group()
        size, rank = _dist.world(group)
        owners = assign_by_cost(
            [m.shape[-1] for m in mats], size, [m.shape[0] if m.dim() == 3 else 1 for m in mats]
        )
        for side in self._sides:
            side.owner = None
        for side, owner in zip(sides, owners):
            side.owner = owner
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        results: list = [None] * len(mats)
        for i, pair in zip(mine, whitening_pairs([mats[i] for i in mine], self.eps, self.whitening)):
            results[i] = None if pair is None else [*pair, means[i]]
        shapes = [[m.shape, m.shape, mean.shape] for m, mean in zip(mats, means)]
        return _dist.share_results(results, shapes, owners, self._device(), group)

    def _reproject(self, kept: list[tuple]) -> None:
        """Projects every kept side's layer to its new whitening and moves the optimizer state,
        after checking every new parameter finite (one check for all; nothing is written if one
        is not)."""
        # per side: the side, its layer's new {V, d, U, c}, the old (U, c), U^-1
        updates = [
            (side, *self._project(side.module, mean, u, u_inv), u_inv) for side, (u, u_inv, mean) in kept
        ]
        checked = [(side.name, t) for side, new, _, _ in updates for t in new.values() if t is not None]
        finite = all_finite([t for _, t in checked])
        bad = list(dict.fromkeys(n for (n, _), ok in zip(checked, finite) if not ok))
        if bad:
            raise ValueError(
                f"re-whitening gave non-finite parameters for layer(s) {bad}; no layer was changed"
            )
        moments = [
            _reparam.moved_moments(
                self.optimizer,
                self.optimizer_state,
                side.module,
                new,
                old,
                side.inverse,
                self._warned_state_keys,
                self.second_moment,
            )
            for side, new, old, _ in updates
        ]
        with torch.no_grad():
            for (side, new, _, u_inv), moment in zip(updates, moments):
                _reparam.write(side.module, new, self.optimizer, moment)
                # U^-1 for the next transform of the moments, valid while U stays as written
                side.remember(u_inv)

    # ------------------------------------------------------------------------------------------
    # Diagonal rescaling

    def _rescale_hook(self, side: WhiteningState):
        """A hook adding the side's training samples to its rescaling sums."""

        def hook(module, x):
            if not module.training or torch.compiler.is_compiling() or module is not side.module:
                return
            start = time.perf_counter()
            side.add_rescale_rows(x)
            self.timings["statistics"] += time.perf_counter() - start

        return side.hook(hook)

    def _apply_rescale(self) -> None:
        """Every row u_j of every layer's U divided by (E[(u_j (h - c))^2] + eps |u_j|^2)^1/2,
        V's input columns multiplied by the same factors.

        The factor depends on U's row only up to its scale, so the result is D U0 with
        D_jj = (u0_j^T (Sigma + eps I) u0_j)^-1/2 (Sigma: the second moment about c of this
        step's inputs, U0: the U of the last re-whitening), however many rescalings came before.
        For PCA that is u0_j = q_j^T (lam_j + eps)^-1/2 re-whitened with the batch's variance
        along q_j: D_jj = ((lam_j + eps) / (lam_batch_j + eps))^1/2, 1 where nothing moved; every
        row keeps |u_j| <= eps^-1/2, the trust region of the re-whitening."""
        device = self._device()
        counts, sums = [], []
        for side in self._sides:
            count, total = side.rescale_sums or (0, None)
            counts.append(float(count))
            if total is None:
                total = torch.zeros(side.num_features, dtype=torch.float64, device=device)
            sums.append(total)
        # every rank applies the same D
        counts, sums = _dist.sum_over_ranks(counts, sums, device, self._group())
        ratios = [
            (side, side.rescale_ratio(count, total, self.eps))
            for side, count, total in zip(self._sides, counts, sums)
            if count
        ]
        bad = [side.name for (side, _), ok in zip(ratios, all_finite([r for _, r in ratios])) if not ok]
        if bad:
            raise ValueError(
                f"non-finite input statistics (NaN or Inf in the inputs) of layer(s) {bad} while "
                "rescaling; no layer was changed"
            )
        transform = self.optimizer is not None and self.optimizer_state != "keep"
        with torch.no_grad():
            for side, ratio in ratios:
                factor = side.rescale(ratio)
                if transform:
                    _reparam.scale_moments(self.optimizer, side.module, factor)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Step counter, configuration, timings, any partial statistics and the eigenpairs kept
        for the next transform of the optimizer state, keyed by layer name: a run resumed from
        it (with the model's and the optimizer's state dicts) continues bitwise as the
        uninterrupted one on the CPU."""
        entries = [(side.name, side.state_dict()) for side in self._sides]

        def by_layer(key):
            return {name: entry[key] for name, entry in entries if key in entry}

        window = {"steps": self._window_steps, **{key: by_layer(key) for key in _WINDOW_KEYS}}
        return {
            "step": self._step,
            "initialized": self._initialized,
            "interval": self.interval,
            "num_samples": self.num_samples,
            "eps": self.eps,
            "whitening": self.whitening,
            "optimizer_state": self.optimizer_state,
            "second_moment": self.second_moment,
            "examples_per_step": self._examples_per_step,
            "num_reparametrizations": self.num_reparametrizations,
            "timings": dict(self.timings),
            "rescale": self.rescale,
            **{key: by_layer(key) for key in _SIDE_KEYS},
            "window": window if self._window_open else None,
        }

    def _checkpoint_second_moment(self, state: dict) -> str:
        """The checkpoint's second_moment; for a checkpoint from before the option, the
        constructor's where the checkpoint transforms the moments, else "keep"."""
        if "second_moment" in state:
            return state["second_moment"]
        return self.second_moment if state["optimizer_state"] == "transform" else "keep"

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() returned, its tensors moved to each layer's device; the
        layer names and the rescale option must match."""
        self._check_state(state)
        _check_moment_policies(state["optimizer_state"], self._checkpoint_second_moment(state), "state_dict")
        changed = [
            f"{key}={state[key]!r} (constructed with {getattr(self, key)!r})"
            for key in _HYPERPARAMETERS
            if key in state and state[key] != getattr(self, key)
        ]
        if changed:
            warnings.warn(
                "Prong.load_state_dict takes the checkpoint's " + ", ".join(changed),
                stacklevel=2,
            )
        self._close_window()
        self._step = int(state["step"])
        self._initialized = bool(state["initialized"])
        self.interval = int(state["interval"])
        self.num_samples = int(state["num_samples"])
        self.eps = float(state["eps"])
        self.whitening = state["whitening"]
        self.optimizer_state = state["optimizer_state"]
        self.second_moment = self._checkpoint_second_moment(state)
        self._examples_per_step = state["examples_per_step"]
        self.num_reparametrizations = int(state["num_reparametrizations"])
        self.timings = dict(state["timings"])
        window = state.get("window")
        if window is not None:
            self._open_window()
            self._window_steps = int(window["steps"])
        for side in self._sides:
            sections = [(key, state.get(key, {})) for key in _SIDE_KEYS]
            sections += [(key, window[key]) for key in _WINDOW_KEYS] if window is not None else []
            side.load_state_dict({key: part[side.name] for key, part in sections if side.name in part})
        if window is None:
            self._schedule_window()

    def _check_state(self, state: dict) -> None:
        """Raises a ValueError where a state_dict does not fit this Prong's layers or options."""
        window = state.get("window")
        if window is not None and set(window["stats"]) != set(self.layers):
            raise ValueError(
                f"state_dict's layers {sorted(window['stats'])} do not match this Prong's "
                f"{sorted(self.layers)}"
            )
        for key in _SIDE_KEYS:
            unknown = set(state.get(key, {})) - set(self.layers)
            if unknown:
                raise ValueError(f"state_dict {key!r}: layer(s) {sorted(unknown)} unknown to this Prong")
        if bool(state.get("rescale", False)) != self.rescale:
            raise ValueError(
                f"state_dict has rescale={state.get('rescale', False)} but this Prong has "
                f"rescale={self.rescale}; construct it with the same option"
            )


def _check_arguments(
    interval, num_samples, eps, whitening, optimizer_state, max_features, optimizer, rescale
) -> None:
    """Raises on a configuration Prong cannot run."""
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{interval=} must be an int >= 1")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{num_samples=} must be an int >= 1")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{eps=} must be a finite number > 0")
    if whitening not in ("pca", "zca"):
        raise ValueError(f"{whitening=} must be 'pca' or 'zca'")
    if optimizer_state not in ("transform", "reset", "keep"):
        raise ValueError(f"{optimizer_state=} must be 'transform', 'reset' or 'keep'")
    if not isinstance(max_features, int) or max_features < 1:
        raise ValueError(f"{max_features=} must be an int >= 1")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    if not isinstance(rescale, bool):
        raise TypeError(f"{rescale=} must be a bool")


def _default_second_moment(optimizer_state: str) -> str:
    """second_moment=None: "reset" where the moments are transformed (the race's choice for Adam,
    docs/experiments.md), else "keep" (optimizer_state already decides the whole state)."""
    return "reset" if optimizer_state == "transform" else "keep"


def _check_moment_policies(optimizer_state, second_moment, where: str = "Prong") -> None:
    """Raises a ValueError where second_moment is unknown, or set with an optimizer_state that
    does not transform."""
    allowed = _reparam.SECOND_MOMENT_POLICIES
    if second_moment not in allowed:
        raise ValueError(f"{where}: {second_moment=} must be one of {', '.join(map(repr, allowed))}")
    if second_moment != "keep" and optimizer_state != "transform":
        raise ValueError(
            f"{where}: {second_moment=} applies only with optimizer_state='transform', got "
            f"{optimizer_state=} (which already decides the whole state)"
        )


def _select_layers(model: nn.Module, max_features: int) -> dict[str, WhitenedLayer]:
    """The model's whitened layers Prong can re-whiten, by name; warns about those it leaves (wider
    than max_features, or with parameters other modules hold too)."""
    whitened = [(n, m) for n, m in model.named_modules() if isinstance(m, WhitenedLayer)]
    if not whitened:
        raise ValueError(
            "the model has no whitened layer (WhitenedLinear / WhitenedConv2d); "
            "convert it with prong_ext.whiten(model) first"
        )
    layers, too_wide, tied = {}, [], []
    tied_ids = tied_parameters(model)
    for name, module in whitened:
        if module.num_features > max_features:
            too_wide.append(f"{name or '<model>'} ({module.num_features})")
        elif any(id(p) in tied_ids for p in (module.V, module.d) if p is not None):
            tied.append(" = ".join(next(tied_ids[id(p)] for p in (module.V, module.d) if id(p) in tied_ids)))
        else:
            layers[name] = module
    if too_wide:
        warnings.warn(
            f"Prong leaves {len(too_wide)} layer(s) wider than {max_features=} unwhitened: "
            + ", ".join(too_wide),
            stacklevel=3,
        )
    if tied:
        warnings.warn(
            f"Prong leaves {len(tied)} whitened layer(s) whose parameters other modules hold too "
            "(tied weights) as they are, since re-whitening rewrites V and d: " + "; ".join(tied),
            stacklevel=3,
        )
    if not layers:
        raise ValueError(
            "none of the model's whitened layers can be re-whitened (all are wider than "
            "max_features or have tied parameters)"
        )
    return layers


@contextlib.contextmanager
def _model_state_kept(model: nn.Module, layers: dict):
    """Restores on exit the model's buffers (but the whitening buffers U and c of `layers`),
    every module's training mode and the RNG states."""
    saved_buffers = {n: b.clone() for n, b in model.named_buffers() if not _is_whitening_buffer(n, layers)}
    training = {m: m.training for m in model.modules()}
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            named = dict(model.named_buffers())
            for n, value in saved_buffers.items():
                named[n].copy_(value)
        for m, mode in training.items():
            m.training = mode
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _is_whitening_buffer(name: str, layers: dict) -> bool:
    module, _, attr = name.rpartition(".")
    return module in layers and attr in ("U", "c")
