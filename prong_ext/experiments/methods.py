"""The method registry: every training method the experiments compare, one entry each.

An entry says which model variant the method trains (batch norm after the hidden layers or not;
whitened layers re-whitened by a prong_ext.Prong controller or not), which optimizer updates it
and its default learning rate in each experiment. ``setup`` turns an entry into a model, its
optimizer and, for the PRONG methods, the configuration of the controller that the training loop
(training.train) creates. A new method is a new entry in REGISTRY; the command line's --methods
and --lr accept it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

import prong_ext

if TYPE_CHECKING:
    from .common import ProngConfig

Params = Iterable[nn.Parameter]


def sgd(params: Params, lr: float, momentum: float) -> torch.optim.Optimizer:
    """SGD with the command line's --momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def rmsprop(params: Params, lr: float, momentum: float) -> torch.optim.Optimizer:
    """RMSprop (decay 0.99, eps 1e-8); --momentum is not used."""
    return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8)


def adam(params: Params, lr: float, momentum: float) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999; eps 1e-8); --momentum is not used."""
    return torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: what --methods and --lr call it.
        optimizer: ``optimizer(params, lr, momentum)``.
        default_lr: the learning rate per experiment (autoencoder, cnn, fisher) without --lr.
        batchnorm: the model variant with batch norm after every hidden layer.
        prong: the model's layers are whitened and a prong_ext.Prong controller re-whitens them.
        prong_eps: Prong's eps for this method, over the command line's --eps (None: --eps).
        second_moment: Prong's ``second_moment``, what a re-whitening does to Adam's exp_avg_sq
            ('keep', 'reset' or 'diagonal'; None: the configuration's, 'keep').
        prong_interval: Prong's interval T for this method, over the command line's --interval
            (None: --interval).
        adaptive: the optimizer divides by a running RMS of the gradient, so its learning rate
            does not grow or shrink with the scale of the loss (the auto-encoder does not rescale
            it with the image size).
    """

    name: str
    optimizer: Callable[[Params, float, float], torch.optim.Optimizer]
    default_lr: dict[str, float]
    batchnorm: bool = False
    prong: bool = False
    prong_eps: float | None = None
    second_moment: str | None = None
    prong_interval: int | None = None
    adaptive: bool = False


# The auto-encoder's learning rates come from a small grid on the digits default (see
# docs/experiments.md, results/autoencoder); Adam's are the usual 1e-3 to 3e-3, and PRONG inside
# Adam takes eps 0.1, the setting reported on MNIST (the race's grid checks the rates, see
# results/race_digits). The order is the order of the tables and plots.
_ADAM_LR = {"autoencoder": 3e-3, "cnn": 1e-3, "fisher": 1e-3}
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sgd", sgd, {"autoencoder": 0.1, "cnn": 0.03, "fisher": 0.1}),
        Method("rmsprop", rmsprop, {"autoencoder": 1e-2, "cnn": 1e-3, "fisher": 1e-3}, adaptive=True),
        Method("bn", sgd, {"autoencoder": 0.1, "cnn": 0.1, "fisher": 0.1}, batchnorm=True),
        Method("prong", sgd, {"autoencoder": 0.01, "cnn": 0.001, "fisher": 0.01}, prong=True),
        Method("prong+", sgd, {"autoencoder": 0.01, "cnn": 0.03, "fisher": 0.03}, batchnorm=True, prong=True),
        Method("adam", adam, _ADAM_LR, adaptive=True),
        Method("bn-adam", adam, _ADAM_LR, batchnorm=True, adaptive=True),
        Method("prong-adam", adam, _ADAM_LR, prong=True, prong_eps=0.1, adaptive=True),
        Method("prong+-adam", adam, _ADAM_LR, batchnorm=True, prong=True, prong_eps=0.1, adaptive=True),
        Method(
            "prong-adam-reset",
            adam,
            _ADAM_LR,
            prong=True,
            prong_eps=0.1,
            second_moment="reset",
            adaptive=True,
        ),
        Method(
            "prong-adam-diag",
            adam,
            _ADAM_LR,
            prong=True,
            prong_eps=0.1,
            second_moment="diagonal",
            adaptive=True,
        ),
        # fewer re-whitenings of the recommended form: what a larger T saves and what it costs
        # (results/race_mnist_interval)
        *(
            Method(
                f"prong-adam-reset-t{t}",
                adam,
                _ADAM_LR,
                prong=True,
                prong_eps=0.1,
                second_moment="reset",
                prong_interval=t,
                adaptive=True,
            )
            for t in (200, 400)
        ),
    )
}
METHODS = tuple(REGISTRY)
#: the comparison of the paper's experiments
PAPER_METHODS = ("sgd", "rmsprop", "bn", "prong", "prong+")
#: the default --methods of ``autoencoder`` (``make demo``): the paper's comparison, then Adam
#: alone, with batch norm, and with PRONG inside in the recommended form (Prong's defaults but
#: eps 0.1: second_moment "reset")
DEMO_METHODS = (*PAPER_METHODS, "adam", "bn-adam", "prong-adam-reset")


def default_lrs(experiment: str) -> dict[str, float]:
    """Every method's default learning rate in ``experiment``, in registry order."""
    return {name: m.default_lr[experiment] for name, m in REGISTRY.items()}


@dataclass
class Setup:
    """A model, its optimizer and (PRONG methods) the configuration of its Prong controller."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    prong_config: ProngConfig | None = None
    prong: prong_ext.Prong | None = None

    def start_prong(self) -> prong_ext.Prong:
        """Create the Prong controller; its statistics window starts now."""
        self.prong = prong_ext.Prong(self.model, self.optimizer, **self.prong_config.kwargs())
        return self.prong


def setup(
    build: Callable[[bool], nn.Module], method: str, lr: float, momentum: float, prong_config: ProngConfig
) -> Setup:
    """Build ``method``'s model variant (``build(batchnorm)``, whitened for the PRONG methods) and
    its optimizer. The Prong controller is created by the training loop (when its statistics
    window should start)."""
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    m = REGISTRY[method]
    model = build(m.batchnorm)
    if m.prong:
        prong_ext.whiten(model)
    optimizer = m.optimizer(model.parameters(), lr, momentum)
    if not m.prong:
        return Setup(model, optimizer)
    changes = {"eps": m.prong_eps, "second_moment": m.second_moment, "interval": m.prong_interval}
    return Setup(
        model, optimizer, replace(prong_config, **{k: v for k, v in changes.items() if v is not None})
    )
