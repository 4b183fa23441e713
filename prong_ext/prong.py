"""The PRONG training-loop controller (PRONG.md, Algorithm 1)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import ops
from .nn import WhitenedConv2d, WhitenedLinear, _Whitened

__all__ = ["Prong"]

_FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
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

    For every layer, with statistics mu and Sigma of its input h (PRONG.md):
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
        self.model = model
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
        too_wide = []
        for name, module in whitened:
            if module.num_features > max_features:
                too_wide.append(f"{name or '<model>'} ({module.num_features})")
            else:
                self.layers[name] = module
        if too_wide:
            warnings.warn(
                f"Prong leaves {len(too_wide)} layer(s) wider than {max_features=} unwhitened: "
                + ", ".join(too_wide),
                stacklevel=2,
            )

        self.timings = dict.fromkeys(_TIMINGS, 0.0)
        self.num_reparametrizations = 0
        self._step = 0
        self._initialized = False  # reparametrize() was called before the first update
        self._u_inv: dict[str, tuple[int, torch.Tensor]] = {}
        self._examples_per_step: float | None = None
        self._window: dict[str, ops.CovarianceAccumulator] | None = None
        self._window_steps = 0
        self._window_seen = 0
        self._handles: list = []
        self._open_window()

    # ------------------------------------------------------------------------------------------
    # The training loop

    @property
    def updates(self) -> int:
        """Number of step() calls so far."""
        return self._step

    def step(self) -> bool:
        """Call after optimizer.step(); re-whitens when the update count is a multiple of
        `interval`. Returns True when it re-whitened."""
        done = False
        explicit_init = self._step == 0 and self._initialized
        if self._step % self.interval == 0 and not explicit_init:
            if self._window is None or all(a.count == 0 for a in self._window.values()):
                raise RuntimeError(
                    f"Prong.step() is due to re-whiten at update {self._step} but no statistics "
                    "were gathered: run the model's training forward pass (in training mode) "
                    "before prong.step(), or call prong.reparametrize(data)"
                )
            self._window_steps += 1
            self._reparametrize(self._window)
            self._close_window()
            done = True
        elif self._window is not None:
            self._window_steps += 1
            if explicit_init:  # the initial window is not needed
                self._close_window()
        self._step += 1
        self._schedule_window()
        return done

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
            if self._window is None or all(a.count == 0 for a in self._window.values()):
                raise ValueError(
                    "reparametrize() without data needs statistics from training forward "
                    "passes, and none were gathered since the last re-whitening; pass data"
                )
            self._reparametrize(self._window)
            self._close_window()
            self._schedule_window()
        else:
            self._reparametrize(self._gather(data))
        if self._step == 0:
            self._initialized = True

    # ------------------------------------------------------------------------------------------
    # Statistics

    def _new_accumulators(self) -> dict[str, ops.CovarianceAccumulator]:
        return {name: ops.CovarianceAccumulator(m.num_features) for name, m in self.layers.items()}

    def _add_hooks(self, accumulators, budget: dict) -> list:
        """Forward pre-hooks feeding each layer's input to its accumulator, capped at
        num_samples examples per layer."""

        def make_hook(name, module):
            acc = accumulators[name]

            def hook(mod, args):
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
                    self.model(x)
                    passed += x.shape[0]
                    if passed >= self.num_samples:
                        break
        finally:
            for h in handles:
                h.remove()
            if self._window is not None:
                self._handles = self._add_hooks(self._window, self._window_budget)
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

    # ------------------------------------------------------------------------------------------
    # Re-whitening

    def _reparametrize(self, accumulators: dict[str, ops.CovarianceAccumulator]) -> None:
        start = time.perf_counter()
        names, means, mats = [], [], []
        missing = []
        for name, acc in accumulators.items():
            if acc.count == 0:
                missing.append(name)
                continue
            mean, cov, _ = acc.compute()
            layer = self.layers[name]
            if layer.d is None:  # no bias to absorb a centre: whiten E[h h^T]
                cov = cov + torch.outer(mean, mean)
            names.append(name)
            means.append(mean)
            mats.append(cov)
        if missing:
            warnings.warn(
                f"no statistics for layer(s) {missing} (no input reached them); they keep their whitening",
                stacklevel=3,
            )
        bad = [n for n, m, s in zip(names, means, mats) if not (m.isfinite().all() and s.isfinite().all())]
        if bad:
            raise ValueError(
                f"non-finite input statistics (NaN or Inf in the inputs) of layer(s) {bad}; "
                "no layer was changed"
            )
        self._sync(mats[0])
        self.timings["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        us, u_invs = ops.whitening(mats, self.eps, self.whitening)
        self._sync(us[0])
        self.timings["eigh"] += time.perf_counter() - start

        start = time.perf_counter()
        updates = [
            self._project(self.layers[n], mean, u, u_inv)
            for n, mean, u, u_inv in zip(names, means, us, u_invs)
        ]
        bad = [
            n
            for n, (new, _) in zip(names, updates)
            if not all(t.isfinite().all() for t in new.values() if t is not None)
        ]
        if bad:
            raise ValueError(
                f"re-whitening gave non-finite parameters for layer(s) {bad}; no layer was changed"
            )
        moments = [self._transform_moments(n, new, old) for n, (new, old) in zip(names, updates)]
        with torch.no_grad():
            for name, (new, _), moment, u_inv in zip(names, updates, moments, u_invs):
                layer = self.layers[name]
                for attr, value in new.items():
                    if value is not None:
                        getattr(layer, attr).copy_(value)
                self._apply_moments(layer, moment)
                # U^-1 for the next transform of the moments, valid while U is not written again
                self._u_inv[name] = (layer.U._version, u_inv)
        self._sync(mats[0])
        self.timings["projection"] += time.perf_counter() - start
        self.num_reparametrizations += 1

    @staticmethod
    def _project(layer: _Whitened, mean, u, u_inv) -> tuple[dict, tuple]:
        """New {V, d, U, c} in float64 keeping W and b (PRONG.md), and the old (U, c)."""
        f64 = torch.float64
        V, U_old = layer.V.detach().to(f64), layer.U.to(f64)
        d = None if layer.d is None else layer.d.detach().to(f64)
        c_old = None if d is None else layer.c.to(f64)
        W, b = ops.fold(V, d, U_old, c_old)
        c = mean if d is not None else torch.zeros_like(mean)
        new_d = None if d is None else b + ops.taps_sum(W) @ c
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
        for key in _FIRST_MOMENTS:
            g_v = state_v.get(key)
            if not isinstance(g_v, torch.Tensor):
                continue
            g_d = state_d.get(key)
            g_d = g_d.to(f64) if isinstance(g_d, torch.Tensor) else None
            if u_inv_old is None:
                u_inv_old = self._old_u_inv(name, u_old)
            # the covector in theta = (W, b): g_W = g_V U^-T + g_d c^T (at every tap)
            g_w = ops.mul_in(g_v.to(f64), u_inv_old.T)
            if g_d is not None:
                g_w = g_w + _outer_taps(g_d, c_old, g_w)
                # back to the new coordinates: g_V' = (g_W - g_d c'^T) U'^T; g_d' = g_d
                g_w = g_w - _outer_taps(g_d, new["c"], g_w)
            out[key] = ops.mul_in(g_w, new["U"].T)
        return out

    def _old_u_inv(self, name: str, u_old: torch.Tensor) -> torch.Tensor:
        """U^-1 of the layer's current U: kept from the eigenpairs of the last re-whitening while
        U has not been written since, else inverted."""
        cached = self._u_inv.get(name)
        if cached is not None and cached[0] == self.layers[name].U._version:
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

    @staticmethod
    def _sync(t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Step counter, configuration, timings and any partial statistics, keyed by layer name."""
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
        """Restores what state_dict() returned; the layer names must match."""
        window = state.get("window")
        if window is not None and set(window["stats"]) != set(self.layers):
            raise ValueError(
                f"state_dict's layers {sorted(window['stats'])} do not match this Prong's "
                f"{sorted(self.layers)}"
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
        if window is not None:
            self._open_window()
            self._window_steps = int(window["steps"])
            self._window_budget["seen"].update(window["seen"])
            self._window_budget["taken"].update(window["taken"])
            for name, acc_state in window["stats"].items():
                self._window[name].load_state_dict(acc_state)
        else:
            self._schedule_window()


def _outer_taps(g_d: torch.Tensor, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """g_d c^T broadcast to every tap of a weight shaped like `like`."""
    outer = torch.outer(g_d, c)
    return outer.view(*outer.shape, *([1] * (like.dim() - 2)))


def _is_whitening_buffer(name: str, layers: dict) -> bool:
    module, _, attr = name.rpartition(".")
    return module in layers and attr in ("U", "c")
