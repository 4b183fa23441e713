"""The PRONG training-loop controller (docs/algorithm.md, Algorithm 1)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import _dist, ops
from ._dist import assign_by_cost
from .convert import tied_parameters
from .nn import WhitenedConv2d, WhitenedLinear, _Whitened

__all__ = ["Prong", "assign_by_cost"]

_FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
#: hyperparameters a checkpoint carries (load_state_dict takes them from it)
_HYPERPARAMETERS = ("interval", "num_samples", "eps", "whitening", "optimizer_state")
_TIMINGS = ("statistics", "eigh", "projection")


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
            exp_avg_sq (no exact transform exists) is kept as it is. "reset" clears the whitened
            parameters' optimizer state. "keep" leaves it untouched.
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
        max_features: int = 4096,
        rescale: bool = False,
        process_group=None,
    ):
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
        self.max_features = max_features

        whitened = [(n, m) for n, m in model.named_modules() if isinstance(m, _Whitened)]
        if not whitened:
            raise ValueError(
                "the model has no whitened layer (WhitenedLinear / WhitenedConv2d); "
                "convert it with prong_ext.whiten(model) first"
            )
        self.layers: dict[str, _Whitened] = {}
        too_wide, tied = [], []
        tied_ids = tied_parameters(model)
        for name, module in whitened:
            if module.num_features > max_features:
                too_wide.append(f"{name or '<model>'} ({module.num_features})")
            elif any(id(p) in tied_ids for p in (module.V, module.d) if p is not None):
                tied.append(
                    " = ".join(next(tied_ids[id(p)] for p in (module.V, module.d) if id(p) in tied_ids))
                )
            else:
                self.layers[name] = module
        if too_wide:
            warnings.warn(
                f"Prong leaves {len(too_wide)} layer(s) wider than {max_features=} unwhitened: "
                + ", ".join(too_wide),
                stacklevel=2,
            )
        if tied:
            warnings.warn(
                f"Prong leaves {len(tied)} whitened layer(s) whose parameters other modules hold too "
                "(tied weights) as they are, since re-whitening rewrites V and d: " + "; ".join(tied),
                stacklevel=2,
            )
        if not self.layers:
            raise ValueError(
                "none of the model's whitened layers can be re-whitened (all are wider than "
                "max_features or have tied parameters)"
            )

        self.timings = dict.fromkeys(_TIMINGS, 0.0)
        self.num_reparametrizations = 0
        self._step = 0
        self._initialized = False  # reparametrize() was called before the first update
        # per layer, (U, U^-1) from the last re-whitening, kept while the layer's U equals it
        self._u_inv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.eigh_owners: dict[str, int] = {}
        # rescaling: per layer, the number of rows and the sums of (U (h - c))^2 since step()
        self._rescale_sums: dict[str, tuple[int, torch.Tensor]] = {}
        self._examples_per_step: float | None = None
        self._warned_state_keys: set[str] = set()  # optimizer state keys already warned about
        self._window: dict[str, ops.CovarianceAccumulator] | None = None
        self._window_steps = 0
        self._window_seen = 0
        self._handles: list = []
        self._open_window()
        self._rescale_handles = [
            m.register_forward_pre_hook(self._rescale_hook(n)) for n, m in self.layers.items() if rescale
        ]

    # ------------------------------------------------------------------------------------------
    # The training loop

    @property
    def updates(self) -> int:
        """Number of step() calls so far."""
        return self._step

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
            stats = self._statistics(self._window if data is None else self._gather(data))
            if all(count == 0 for count, _, _ in stats.values()):
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
            if self._window is not None:
                self._window_steps += 1
                if explicit_init:  # the initial window is not needed
                    self._close_window()
            if self.rescale:
                self._apply_rescale()
        self._rescale_sums = {}
        self._step += 1
        self._schedule_window()
        return done

    def _warn_few_examples(self) -> None:
        """Warns when the window's statistics hold fewer than num_samples examples."""
        taken = [n for n in self._window_budget["taken"].values() if n > 0]
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
            stats = self._statistics(self._window)
            if all(count == 0 for count, _, _ in stats.values()):
                raise ValueError(
                    "reparametrize() without data needs statistics from training forward "
                    "passes, and none were gathered since the last re-whitening; pass data"
                )
            self._rewhiten(stats)
            self._close_window()
            self._schedule_window()
        else:
            stats = self._statistics(self._gather(data))
            if all(count == 0 for count, _, _ in stats.values()):
                raise ValueError(
                    "reparametrize(data): the data reached none of the whitened layers (no "
                    f"forward pre-hook of {sorted(self.layers)} ran); nothing was changed"
                )
            self._rewhiten(stats)
        if self._step == 0:
            self._initialized = True

    # ------------------------------------------------------------------------------------------
    # Statistics

    def _new_accumulators(self) -> dict[str, ops.CovarianceAccumulator]:
        return {n: ops.CovarianceAccumulator(m.num_features, groups=m.groups) for n, m in self.layers.items()}

    def _add_hooks(self, accumulators, budget: dict) -> list:
        """Forward pre-hooks feeding each layer's input to its accumulator, capped at
        num_samples examples per layer."""

        def make_hook(name, module):
            acc = accumulators[name]

            def hook(mod, args):
                # not traced: statistics stay outside graphs; and a copy of the layer (deepcopy
                # of the model carries its hooks) feeds nothing
                if torch.compiler.is_compiling() or mod is not module:
                    return
                if not mod.training and budget.get("training_only", False):
                    return
                x = args[0]
                start = time.perf_counter()
                if isinstance(mod, WhitenedConv2d) and x.dim() == 3:
                    x = x.unsqueeze(0)
                examples = x.shape[0] if x.dim() > 1 else 1
                budget["seen"][name] = budget["seen"].get(name, 0) + examples
                room = self.num_samples - budget["taken"].get(name, 0)
                if room <= 0:
                    return
                x = x.detach()
                if isinstance(mod, WhitenedLinear):
                    x = x.reshape(-1, x.shape[-1])  # (N, *, in) -> rows
                    per_example = x.shape[0] // max(examples, 1)
                    x = x[: room * per_example]
                else:
                    x = x[:room]
                budget["taken"][name] = budget["taken"].get(name, 0) + min(room, examples)
                acc.update(x)
                self._sync(x)
                self.timings["statistics"] += time.perf_counter() - start

            return hook

        return [m.register_forward_pre_hook(make_hook(n, m)) for n, m in self.layers.items()]

    def _open_window(self) -> None:
        self._window = self._new_accumulators()
        self._window_budget = {"seen": {}, "taken": {}, "training_only": True}
        self._window_steps = 0
        self._handles = self._add_hooks(self._window, self._window_budget)

    def _close_window(self) -> None:
        if self._window is None:
            return
        seen = max(self._window_budget["seen"].values(), default=0)
        if seen and self._window_steps:
            self._examples_per_step = seen / self._window_steps
        for h in self._handles:
            h.remove()
        self._handles = []
        self._window = None

    def _schedule_window(self) -> None:
        """Opens the window when the coming forward passes are among the last ones before the
        next re-whitening that are needed for num_samples examples."""
        if self._window is not None:
            return
        due = -(-self._step // self.interval) * self.interval  # next multiple >= step
        per_step = self._examples_per_step or self.num_samples
        needed = max(1, math.ceil(self.num_samples / per_step))
        if due - self._step < needed:
            self._open_window()

    def _gather(self, data) -> dict[str, ops.CovarianceAccumulator]:
        """One forward pass over `data` (no grad) feeding fresh accumulators; restores buffers,
        training mode and RNG afterwards."""
        if isinstance(data, torch.Tensor):
            data = [data]
        accumulators = self._new_accumulators()
        budget = {"seen": {}, "taken": {}}
        device = next((p.device for p in self.model.parameters()), None)
        saved_buffers = {
            n: b.clone() for n, b in self.model.named_buffers() if not _is_whitening_buffer(n, self.layers)
        }
        training = {m: m.training for m in self.model.modules()}
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        handles = self._add_hooks(accumulators, budget)
        window_handles, self._handles = self._handles, []
        for h in window_handles:  # the training window must not see this pass
            h.remove()
        rescale_sums, self._rescale_sums = self._rescale_sums, {}  # nor the rescaling's sums
        passed = 0
        try:
            with torch.no_grad():
                for batch in data:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if not isinstance(x, torch.Tensor):
                        raise TypeError(
                            "data must yield tensors or tuples whose first element is a "
                            f"tensor, got {type(x)}"
                        )
                    x = x[: self.num_samples - passed]
                    if device is not None and x.device != device:
                        x = x.to(device)
                    self._module(x)
                    passed += x.shape[0]
                    if passed >= self.num_samples:
                        break
        finally:
            for h in handles:
                h.remove()
            if self._window is not None:
                self._handles = self._add_hooks(self._window, self._window_budget)
            self._rescale_sums = rescale_sums
            with torch.no_grad():
                named = dict(self.model.named_buffers())
                for n, value in saved_buffers.items():
                    named[n].copy_(value)
            for m, mode in training.items():
                m.training = mode
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if passed == 0:
            raise ValueError("data gave no examples; reparametrize() needs at least one")
        if passed < self.num_samples:
            warnings.warn(
                f"data gave {passed} examples, fewer than num_samples={self.num_samples}; "
                "re-whitening from those",
                stacklevel=3,
            )
        return accumulators

    def _group(self):
        return _dist.default_group(self.process_group)

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).U.device

    def _statistics(self, accumulators) -> dict[str, tuple]:
        """(count, float64 mean, float64 covariance) per layer, of every rank's samples;
        (0, None, None) for a layer without samples."""
        stats = []
        for name in self.layers:
            acc = None if accumulators is None else accumulators.get(name)
            if acc is None or acc.count == 0:
                stats.append((0, None, None))
            else:
                mean, cov, count = acc.compute()
                stats.append((count, mean, cov))
        shapes = [layer.U.shape for layer in self.layers.values()]  # (C, C) or blocks (G, k, k)
        merged = _dist.merge_statistics(stats, shapes, self._device(), self._group())
        return dict(zip(self.layers, merged))

    # ------------------------------------------------------------------------------------------
    # Re-whitening

    def _rewhiten(self, stats: dict[str, tuple]) -> None:
        start = time.perf_counter()
        names, means, mats, missing = [], [], [], []
        for name, (count, mean, cov) in stats.items():
            if count == 0:
                missing.append(name)
                continue
            if self.layers[name].d is None:  # no bias to absorb a centre: whiten E[h h^T]
                cov = cov + ops._outer(mean, mean, self.layers[name].groups)
            names.append(name)
            means.append(mean)
            mats.append(cov)
        if missing:
            warnings.warn(
                f"no statistics for layer(s) {missing} (no input reached them); they keep their whitening",
                stacklevel=3,
            )
        finite = ops._all_finite(means + mats)  # one check of every layer's statistics
        bad = [n for i, n in enumerate(names) if not (finite[i] and finite[len(names) + i])]
        if bad:
            raise ValueError(
                f"non-finite input statistics (NaN or Inf in the inputs) of layer(s) {bad}; "
                "no layer was changed"
            )
        self._sync(mats[0])
        self.timings["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        results = self._whitening(names, mats, means)
        failed = [n for n, r in zip(names, results) if r is None]
        if failed:
            warnings.warn(
                f"the eigendecomposition failed for layer(s) {failed}, also when retried in float64; "
                "they keep their previous whitening",
                stacklevel=3,
            )
        kept = [(n, r) for n, r in zip(names, results) if r is not None]
        self._sync(mats[0])
        self.timings["eigh"] += time.perf_counter() - start

        start = time.perf_counter()
        # per layer: name, new {V, d, U, c}, old (U, c), U^-1
        updates = [(n, *self._project(self.layers[n], mean, u, u_inv), u_inv) for n, (u, u_inv, mean) in kept]
        checked = [(n, t) for n, new, _, _ in updates for t in new.values() if t is not None]
        finite = ops._all_finite([t for _, t in checked])  # one check of every new parameter
        bad = list(dict.fromkeys(n for (n, _), ok in zip(checked, finite) if not ok))
        if bad:
            raise ValueError(
                f"re-whitening gave non-finite parameters for layer(s) {bad}; no layer was changed"
            )
        moments = [self._transform_moments(n, new, old) for n, new, old, _ in updates]
        with torch.no_grad():
            for (name, new, _, u_inv), moment in zip(updates, moments):
                layer = self.layers[name]
                for attr, value in new.items():
                    if value is not None:
                        getattr(layer, attr).copy_(value)
                self._apply_moments(layer, moment)
                # U^-1 for the next transform of the moments, valid while U stays as written
                self._u_inv[name] = (layer.U.clone(), u_inv)
        self._sync(mats[0])
        self.timings["projection"] += time.perf_counter() - start
        self.num_reparametrizations += 1

    def _whitening(self, names: list[str], mats: list[torch.Tensor], means: list[torch.Tensor]) -> list:
        """Per layer, [U, U^-1, mean] (float64), or None where the eigendecomposition failed.

        In a process group each rank computes the layers assign_by_cost gives it and
        broadcasts them (the mean too, so c is the owner's bitwise).
        """
        group = self._group()
        size, rank = _dist.world(group)
        owners = assign_by_cost(
            [m.shape[-1] for m in mats], size, [m.shape[0] if m.dim() == 3 else 1 for m in mats]
        )
        self.eigh_owners = dict(zip(names, owners))
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        results: list = [None] * len(mats)
        for i, pair in zip(mine, self._eigh([mats[i] for i in mine])):
            results[i] = None if pair is None else [*pair, means[i]]
        shapes = [[m.shape, m.shape, mean.shape] for m, mean in zip(mats, means)]
        return _dist.share_results(results, shapes, owners, self._device(), group)

    def _eigh(self, mats: list[torch.Tensor]) -> list:
        """(U, U^-1) per matrix ((C, C) or (G, k, k) blocks), all blocks in one batched call;
        a block that fails is retried alone in float64 on the torch path; None where that
        fails too."""
        blocks, spans = [], []
        for m in mats:
            parts = list(m.unbind(0)) if m.dim() == 3 else [m]
            spans.append((len(blocks), len(parts)))
            blocks.extend(parts)
        if not blocks:
            return []
        try:
            pairs = list(zip(*ops.whitening(blocks, self.eps, self.whitening)))
        except RuntimeError:  # torch.linalg.LinAlgError and the extension's errors
            pairs = [None] * len(blocks)
        # one check of every block's U and U^-1
        finite = iter(ops._all_finite([t for pair in pairs if pair is not None for t in pair]))
        for i, pair in enumerate(pairs):
            if pair is None or not all([next(finite) for _ in pair]):
                pairs[i] = self._retry_eigh(blocks[i])
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

    def _retry_eigh(self, mat: torch.Tensor) -> tuple | None:
        try:
            (u,), (u_inv,) = ops.whitening([mat.double()], self.eps, self.whitening, backend="torch")
        except RuntimeError:
            return None
        if not all(ops._all_finite([u, u_inv])):
            return None
        return u, u_inv

    @staticmethod
    def _project(layer: _Whitened, mean, u, u_inv) -> tuple[dict, tuple]:
        """New {V, d, U, c} in float64 keeping W and b (docs/algorithm.md), and the old (U, c)."""
        f64 = torch.float64
        V, U_old = layer.V.detach().to(f64), layer.U.to(f64)
        d = None if layer.d is None else layer.d.detach().to(f64)
        c_old = None if d is None else layer.c.to(f64)
        W, b = ops.fold(V, d, U_old, c_old)
        c = mean if d is not None else torch.zeros_like(mean)
        new_d = None if d is None else b + ops.centre_term(W, c)
        return {"V": ops.mul_in(W, u_inv), "d": new_d, "U": u, "c": c}, (U_old, c_old)

    def _transform_moments(self, name: str, new: dict, old: tuple) -> dict:
        """New optimizer state for V and d (computed, not yet written)."""
        layer = self.layers[name]
        opt = self.optimizer
        if opt is None or self.optimizer_state == "keep":
            return {}
        if self.optimizer_state == "reset":
            return {"reset": True}
        out = {}
        f64 = torch.float64
        u_old, c_old = old
        u_inv_old = None
        state_v = opt.state.get(layer.V, {})
        state_d = opt.state.get(layer.d, {}) if layer.d is not None else {}
        self._warn_untransformed(state_v, state_d)
        for key in _FIRST_MOMENTS:
            g_v = state_v.get(key)
            if not isinstance(g_v, torch.Tensor):
                continue
            g_d = state_d.get(key)
            g_d = g_d.to(f64) if isinstance(g_d, torch.Tensor) else None
            if u_inv_old is None:
                u_inv_old = self._old_u_inv(name, u_old)
            # the covector in theta = (W, b): g_W = g_V U^-T + g_d c^T (at every tap), and back
            # to the new coordinates: g_V' = (g_W - g_d c'^T) U'^T; g_d' = g_d
            g_w = ops.mul_in(g_v.to(f64), u_inv_old.mT)
            if g_d is not None:
                g_w = g_w + ops.outer_taps(g_d, c_old, g_w) - ops.outer_taps(g_d, new["c"], g_w)
            out[key] = ops.mul_in(g_w, new["U"].mT)
        return out

    def _warn_untransformed(self, *states: dict) -> None:
        """Warns once per key about per-parameter optimizer state that no transform maps to the
        new coordinates (RMSprop's square_avg, Adamax's exp_inf, Adagrad's sum, ...)."""
        known = set(_FIRST_MOMENTS) | set(_SECOND_MOMENTS)
        keys = {
            key
            for state in states
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0 and key not in known
        }
        new = sorted(keys - self._warned_state_keys)
        if new:
            self._warned_state_keys.update(new)
            warnings.warn(
                f"Prong cannot transform the optimizer state {new} of {type(self.optimizer).__name__} to "
                "the new coordinates and keeps it as it is; its first moments "
                f"{list(_FIRST_MOMENTS)} are transformed. optimizer_state='reset' drops the "
                "whitened parameters' state at every re-whitening instead",
                stacklevel=2,
            )

    def _old_u_inv(self, name: str, u_old: torch.Tensor) -> torch.Tensor:
        """U^-1 of the layer's current U: the one from the eigenpairs of the last re-whitening
        (or rescaling) while U is still what was written then, else inverted."""
        cached = self._u_inv.get(name)
        if cached is not None and torch.equal(cached[0], self.layers[name].U):
            return cached[1]
        return torch.linalg.inv(u_old)

    def _apply_moments(self, layer: _Whitened, moment: dict) -> None:
        opt = self.optimizer
        if not moment:
            return
        if moment.get("reset"):
            opt.state.pop(layer.V, None)
            if layer.d is not None:
                opt.state.pop(layer.d, None)
            return
        for key, value in moment.items():
            opt.state[layer.V][key].copy_(value)

    # ------------------------------------------------------------------------------------------
    # Diagonal rescaling

    def _rescale_hook(self, name: str):
        """Forward pre-hook summing (U (h - c))_j^2 over the rows of training inputs."""

        def hook(mod, args):
            if not mod.training or torch.compiler.is_compiling() or mod is not self.layers[name]:
                return
            start = time.perf_counter()
            x = args[0].detach()
            if isinstance(mod, WhitenedConv2d):  # (N, C, H, W) or (C, H, W): channels last
                x = x.movedim(-3, -1)
            rows = x.reshape(-1, mod.num_features)
            with torch.no_grad(), ops._full_precision(rows.device):
                dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
                u = mod.U.to(dtype)
                blocks = u.shape[0] if u.dim() == 3 else 1
                u = u.view(blocks, -1, u.shape[-1])
                centred = (rows.to(dtype) - mod.c.to(dtype)).view(rows.shape[0], blocks, -1)
                z = torch.einsum("mgi,gji->mgj", centred, u)
                sums = z.square().sum(0, dtype=torch.float64).flatten()
            count, total = self._rescale_sums.get(name, (0, 0))
            self._rescale_sums[name] = (count + rows.shape[0], total + sums)
            self.timings["statistics"] += time.perf_counter() - start

        return hook

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
        for name, layer in self.layers.items():
            count, total = self._rescale_sums.get(name, (0, None))
            counts.append(float(count))
            if total is None:
                total = torch.zeros(layer.num_features, dtype=torch.float64, device=device)
            sums.append(total)
        group = self._group()
        if group is not None:  # every rank applies the same D
            packed = torch.cat([torch.tensor(counts, dtype=torch.float64, device=device), *sums])
            torch.distributed.all_reduce(packed, group=group)
            counts = packed[: len(counts)].tolist()
            sums = list(packed[len(counts) :].split([t.numel() for t in sums]))
        ratios = {}
        for name, count, total in zip(self.layers, counts, sums):
            if not count:
                continue
            row_norms = self.layers[name].U.double().square().sum(-1).flatten()
            ratios[name] = (total / count + self.eps * row_norms).rsqrt()
        bad = [n for n, ok in zip(ratios, ops._all_finite(list(ratios.values()))) if not ok]
        if bad:
            raise ValueError(
                f"non-finite input statistics (NaN or Inf in the inputs) of layer(s) {bad} while "
                "rescaling; no layer was changed"
            )
        transform = self.optimizer is not None and self.optimizer_state != "keep"
        with torch.no_grad():
            for name, ratio in ratios.items():
                layer = self.layers[name]
                cached = self._u_inv.get(name)
                cached = cached if cached is not None and torch.equal(cached[0], layer.U) else None
                by_row = ratio.view(*layer.U.shape[:-1], 1)  # U's rows: (C, 1) or (G, k, 1)
                layer.U.mul_(by_row.to(layer.U.dtype))
                columns = ops.outer_taps(ratio.new_ones(layer.V.shape[0]), ratio, layer.V)
                layer.V.div_(columns.to(layer.V.dtype))
                if transform:
                    state = self.optimizer.state.get(layer.V, {})
                    for key in _FIRST_MOMENTS + _SECOND_MOMENTS:
                        if isinstance(state.get(key), torch.Tensor):
                            power = 2 if key in _SECOND_MOMENTS else 1
                            state[key].mul_(columns.pow(power).to(state[key].dtype))
                if cached is None:
                    self._u_inv.pop(name, None)
                else:  # (D U)^-1 = U^-1 D^-1: U^-1's columns
                    self._u_inv[name] = (layer.U.clone(), cached[1] / by_row.mT)

    @staticmethod
    def _sync(t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Step counter, configuration, timings, any partial statistics and the eigenpairs kept
        for the next transform of the optimizer state, keyed by layer name: a run resumed from
        it (with the model's and the optimizer's state dicts) continues bitwise as the
        uninterrupted one on the CPU."""
        return {
            "step": self._step,
            "initialized": self._initialized,
            "interval": self.interval,
            "num_samples": self.num_samples,
            "eps": self.eps,
            "whitening": self.whitening,
            "optimizer_state": self.optimizer_state,
            "examples_per_step": self._examples_per_step,
            "num_reparametrizations": self.num_reparametrizations,
            "timings": dict(self.timings),
            "rescale": self.rescale,
            "u_inv": {n: (u, u_inv) for n, (u, u_inv) in self._u_inv.items()},
            "rescale_sums": dict(self._rescale_sums),
            "window": None
            if self._window is None
            else {
                "steps": self._window_steps,
                "seen": dict(self._window_budget["seen"]),
                "taken": dict(self._window_budget["taken"]),
                "stats": {n: a.state_dict() for n, a in self._window.items()},
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() returned, its tensors moved to each layer's device; the
        layer names and the rescale option must match."""
        window = state.get("window")
        if window is not None and set(window["stats"]) != set(self.layers):
            raise ValueError(
                f"state_dict's layers {sorted(window['stats'])} do not match this Prong's "
                f"{sorted(self.layers)}"
            )
        for key in ("u_inv", "rescale_sums"):
            unknown = set(state.get(key, {})) - set(self.layers)
            if unknown:
                raise ValueError(f"state_dict {key!r}: layer(s) {sorted(unknown)} unknown to this Prong")
        if bool(state.get("rescale", False)) != self.rescale:
            raise ValueError(
                f"state_dict has rescale={state.get('rescale', False)} but this Prong has "
                f"rescale={self.rescale}; construct it with the same option"
            )

        def here(name, value):  # to the layer's device
            return _to_device(value, self.layers[name].U.device)

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
        self._examples_per_step = state["examples_per_step"]
        self.num_reparametrizations = int(state["num_reparametrizations"])
        self.timings = dict(state["timings"])
        self._u_inv = {n: here(n, pair) for n, pair in state.get("u_inv", {}).items()}
        self._rescale_sums = {n: here(n, sums) for n, sums in state.get("rescale_sums", {}).items()}
        if window is not None:
            self._open_window()
            self._window_steps = int(window["steps"])
            self._window_budget["seen"].update(window["seen"])
            self._window_budget["taken"].update(window["taken"])
            for name, acc_state in window["stats"].items():
                self._window[name].load_state_dict(here(name, acc_state))
        else:
            self._schedule_window()


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _is_whitening_buffer(name: str, layers: dict) -> bool:
    module, _, attr = name.rpartition(".")
    return module in layers and attr in ("U", "c")
