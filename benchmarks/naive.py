"""Naive PRONG: the baseline of the end-to-end benchmark, written straight from docs/algorithm.md with the
naive ops of prong_ext.reference and no fusion anywhere.

- Layers compute the two-step form: reference.whitened_linear (two matmuls) and
  reference.whitened_conv2d (pad, center, 1x1 conv by U, then the k x k conv by V unpadded).
- Statistics: a separate forward pass (no grad) over `num_samples` examples, each layer's input
  going through reference.covariance (float64) in a forward pre-hook.
- Eigendecompositions: reference.whitening, a Python loop of torch.linalg.eigh.
- Projection (float64): W, b = reference.fold(V, d, U_old, c_old); c = mu;
  V, d = reference.from_canonical(W, b, U^-1, c); SGD momentum / Adam exp_avg mapped to the new
  coordinates by reference.canonical_gradient (through U_old^-1, from torch.linalg.inv) and
  reference.fold_backward.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from prong_ext import reference

__all__ = ["NaiveProng", "NaiveWhitened", "NaiveWhitenedConv2d", "NaiveWhitenedLinear", "whiten_naive"]


class NaiveWhitened(nn.Module):
    """The buffers U, c and the parameters V, d (the plain layer's) of both naive layers."""

    def _take(self, layer: nn.Module) -> None:
        # the plain layer's parameter objects become V and d (an optimizer built before keeps them)
        self.V = layer.weight
        self.d = layer.bias
        n_in = layer.weight.shape[1]
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.register_buffer("U", torch.eye(n_in, **factory))
        self.register_buffer("c", torch.zeros(n_in, **factory))


class NaiveWhitenedLinear(NaiveWhitened):
    """z = V U (x - c) + d as two matmuls (reference.whitened_linear)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self._take(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.whitened_linear(x, self.V, self.d, self.U, self.c)


class NaiveWhitenedConv2d(NaiveWhitened):
    """conv(U (pad(h) - c), V) + d as two convolutions (reference.whitened_conv2d)."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        self._take(layer)
        self.stride, self.dilation = layer.stride, layer.dilation
        self.padding = layer.padding if isinstance(layer.padding, str) else _pair(layer.padding)
        self.padding_mode = layer.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.whitened_conv2d(
            x, self.V, self.d, self.U, self.c, self.stride, self.padding, self.dilation, self.padding_mode
        )


def whiten_naive(model: nn.Module) -> nn.Module:
    """Replaces every nn.Linear and nn.Conv2d (groups=1) by its naive whitened twin, in place."""
    if type(model) is nn.Linear:
        return NaiveWhitenedLinear(model)
    if type(model) is nn.Conv2d and model.groups == 1:
        return NaiveWhitenedConv2d(model)
    for name, child in model.named_children():
        new = whiten_naive(child)
        if new is not child:
            setattr(model, name, new)
    return model


class NaiveProng:
    """Algorithm 1 of docs/algorithm.md with the naive ops: `step(data)` after every optimizer step
    re-whitens every `interval` updates (the first call included) from one separate forward pass
    over `num_samples` examples of `data`.

    timings: cumulative seconds in "statistics", "eigh" and "projection".
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        interval: int = 100,
        num_samples: int = 1024,
        eps: float = 1e-2,
    ):
        self.model = model
        self.optimizer = optimizer
        self.interval = interval
        self.num_samples = num_samples
        self.eps = eps
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, NaiveWhitened)}
        self.timings = {"statistics": 0.0, "eigh": 0.0, "projection": 0.0}
        self.updates = 0

    def step(self, data: torch.Tensor) -> bool:
        done = self.updates % self.interval == 0
        if done:
            self.reparametrize(data)
        self.updates += 1
        return done

    def _sync(self) -> None:
        p = next(self.model.parameters())
        if p.is_cuda:
            torch.cuda.synchronize(p.device)

    @torch.no_grad()
    def reparametrize(self, data: torch.Tensor) -> None:
        # statistics: one extra forward pass, model state restored afterwards
        start = time.perf_counter()
        stats = {}

        def make_hook(name):
            def hook(module, args):
                stats[name] = reference.covariance(args[0], dtype=torch.float64)[:2]

            return hook

        saved = {n: b.clone() for n, b in self.model.named_buffers() if not n.endswith((".U", ".c"))}
        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in self.layers.items()]
        try:
            self.model(data[: self.num_samples])
        finally:
            for h in handles:
                h.remove()
            named = dict(self.model.named_buffers())
            for n, b in saved.items():
                named[n].copy_(b)
        names = list(stats)
        means, covs = [], []
        for n in names:
            mean, cov = stats[n]
            if self.layers[n].d is None:  # no bias to absorb a centre: whiten E[h h^T], c = 0
                cov = cov + torch.outer(mean, mean)
                mean = torch.zeros_like(mean)
            means.append(mean)
            covs.append(cov)
        self._sync()
        self.timings["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        us, u_invs = reference.whitening(covs, self.eps)
        self._sync()
        self.timings["eigh"] += time.perf_counter() - start

        start = time.perf_counter()
        for n, mean, u, u_inv in zip(names, means, us, u_invs):
            self._project(self.layers[n], mean, u, u_inv)
        self._sync()
        self.timings["projection"] += time.perf_counter() - start

    def _project(self, layer: NaiveWhitened, c, u, u_inv) -> None:
        f64 = torch.float64
        V, U_old, c_old = layer.V.to(f64), layer.U.to(f64), layer.c.to(f64)
        W, b = reference.fold(V, None if layer.d is None else layer.d.to(f64), U_old, c_old)
        new_v, new_d = reference.from_canonical(W, b, u_inv, c)
        state_v = self.optimizer.state.get(layer.V, {}) if self.optimizer is not None else {}
        state_d = self.optimizer.state.get(layer.d, {}) if layer.d is not None and self.optimizer else {}
        for key in ("momentum_buffer", "exp_avg"):
            g_v = state_v.get(key)
            if not isinstance(g_v, torch.Tensor):
                continue
            g_d = state_d.get(key)
            g_d = g_d.to(f64) if isinstance(g_d, torch.Tensor) else None
            g_w, _ = reference.canonical_gradient(g_v.to(f64), g_d, torch.linalg.inv(U_old), c_old)
            g_v.copy_(reference.fold_backward(g_w, g_d, u, c)[0])
        if layer.d is not None:
            layer.d.copy_(new_d)
        layer.V.copy_(new_v)
        layer.U.copy_(u)
        layer.c.copy_(c)
