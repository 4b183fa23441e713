"""Conversion between plain and whitened models."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .nn import WhitenedConv2d, WhitenedLayer, WhitenedLinear

__all__ = ["named_parameters", "tied_parameters", "unwhiten", "whiten"]


def _conv_args(layer: nn.Module, bias: bool) -> tuple:
    """The positional constructor arguments shared by nn.Conv2d and WhitenedConv2d."""
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        bias,
        layer.padding_mode,
    )


def _whitened_twin(layer: nn.Module) -> nn.Module | None:
    if type(layer) is nn.Linear:
        twin = WhitenedLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    elif type(layer) is nn.Conv2d:
        twin = WhitenedConv2d(*_conv_args(layer, layer.bias is not None), device="meta")
    else:
        return None
    # The plain layer's parameter objects become V and d, so an optimizer built on the plain
    # model keeps its references (and its state) valid.
    weight = layer.weight
    twin.V = weight
    twin.d = layer.bias
    groups = getattr(layer, "groups", 1)
    k = weight.shape[1]
    eye = torch.eye(k, device=weight.device, dtype=weight.dtype)
    twin.U = eye if groups == 1 else eye.expand(groups, k, k).clone()  # identity blocks
    twin.c = torch.zeros(k * groups, device=weight.device, dtype=weight.dtype)
    twin.train(layer.training)
    return twin


def _plain_twin(layer: nn.Module) -> nn.Module | None:
    if isinstance(layer, WhitenedLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, layer.d is not None, device="meta")
    elif isinstance(layer, WhitenedConv2d):
        plain = nn.Conv2d(*_conv_args(layer, layer.d is not None), device="meta")
    else:
        return None
    weight, bias = layer.canonical()
    plain.weight = nn.Parameter(weight.clone(), requires_grad=layer.V.requires_grad)
    plain.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=layer.d.requires_grad)
    plain.train(layer.training)
    return plain


def _replace(model: nn.Module, make, done: dict | None = None) -> nn.Module:
    """`model` with every module that `make` turns into a twin replaced; a module that appears
    at several places of the tree (a shared layer) gets one twin, shared the same way."""
    done = {} if done is None else done
    if id(model) in done:
        return done[id(model)]
    twin = make(model)
    if twin is None:
        twin = model
        for name, child in list(model._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            new = _replace(child, make, done)
            if new is not child:
                setattr(model, name, new)
    done[id(model)] = twin
    return twin


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameters that more than one module holds (tied weights, e.g. a language model's output
    layer sharing the embedding's weight), as {id(parameter): [qualified names]}.

    A module that appears at several places of the tree counts once: sharing a whole layer is
    not tying.
    """
    holders: dict[int, list[str]] = {}
    for prefix, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{prefix}.{name}" if prefix else name)
    return {key: names for key, names in holders.items() if len(names) > 1}


def whiten(model: nn.Module) -> nn.Module:
    """Replaces every nn.Linear and nn.Conv2d by its whitened twin, in place.

    The twins start with U = I and c = 0, so the model computes exactly what it did. They reuse
    the plain layers' parameter objects as V and d: an optimizer created before keeps working.
    Grouped convolutions get block-diagonal whitening (one k x k block per group); other layers
    are left as they are; hooks registered on a replaced layer do not carry over.

    A layer whose weight or bias another module holds too (tied weights) stays a plain layer,
    with a warning naming it: re-whitening rewrites V, which would change the other module.

    Returns:
        the model (the twin itself when `model` is a single layer).
    """
    tied = tied_parameters(model)
    kept = []

    def make(layer: nn.Module) -> nn.Module | None:
        params = [p for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if p is not None]
        if type(layer) in (nn.Linear, nn.Conv2d) and any(id(p) in tied for p in params):
            kept.append(next(tied[id(p)] for p in params if id(p) in tied))
            return None
        return _whitened_twin(layer)

    model = _replace(model, make)
    if kept:
        warnings.warn(
            f"whiten leaves {len(kept)} layer(s) with tied parameters plain: "
            + "; ".join(" = ".join(names) for names in kept),
            stacklevel=2,
        )
    return model


def named_parameters(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """model.named_parameters() with every whitened layer's V and d named as the plain layer's
    `weight` and `bias`: the names a training script that selects parameters by name expects
    (e.g. no weight decay where `"bias" in name`). The parameters are V and d themselves; an
    optimizer trains them in the whitened coordinates.

    Yields:
        (name, parameter), each parameter once, as model.named_parameters() does.
    """
    whitened = {name for name, m in model.named_modules() if isinstance(m, WhitenedLayer)}
    renames = {"V": "weight", "d": "bias"}
    for name, param in model.named_parameters():
        module, _, attr = name.rpartition(".")
        if module in whitened and attr in renames:
            name = f"{module}.{renames[attr]}" if module else renames[attr]
        yield (f"{prefix}.{name}" if prefix else name), param


def unwhiten(model: nn.Module) -> nn.Module:
    """Folds every whitened layer back into a plain nn.Linear / nn.Conv2d, in place.

    The plain layers hold the canonical W = V U and b = d - W c (new parameters), for export
    and inference.

    Returns:
        the model (the plain layer itself when `model` is a single whitened layer).
    """
    return _replace(model, _plain_twin)
