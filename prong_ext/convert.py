"""Conversion between plain and whitened models."""

from __future__ import annotations

import torch
from torch import nn

from .nn import WhitenedConv2d, WhitenedLinear

__all__ = ["unwhiten", "whiten"]


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


def _replace(model: nn.Module, make) -> nn.Module:
    twin = make(model)
    if twin is not None:
        return twin
    for name, child in model.named_children():
        new = _replace(child, make)
        if new is not child:
            setattr(model, name, new)
    return model


def whiten(model: nn.Module) -> nn.Module:
    """Replaces every nn.Linear and nn.Conv2d by its whitened twin, in place.

    The twins start with U = I and c = 0, so the model computes exactly what it did. They reuse
    the plain layers' parameter objects as V and d: an optimizer created before keeps working.
    Grouped convolutions get block-diagonal whitening (one k x k block per group); other layers
    are left as they are; hooks registered on a replaced layer do not carry over.

    Returns:
        the model (the twin itself when `model` is a single layer).
    """
    return _replace(model, _whitened_twin)


def unwhiten(model: nn.Module) -> nn.Module:
    """Folds every whitened layer back into a plain nn.Linear / nn.Conv2d, in place.

    The plain layers hold the canonical W = V U and b = d - W c (new parameters), for export
    and inference.

    Returns:
        the model (the plain layer itself when `model` is a single whitened layer).
    """
    return _replace(model, _plain_twin)
