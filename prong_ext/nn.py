"""Whitened layers: drop-in replacements of nn.Linear and nn.Conv2d.

A whitened layer computes z = V U (h - c) + d. V and d are the trained parameters (the weight's
and the bias's shapes); U and c are buffers set by prong_ext.Prong from the statistics of the
layer's input, never by gradients. A fresh layer has U = I and c = 0, so it is exactly the plain
layer, with the plain layer's initialization.

A grouped WhitenedConv2d (groups G > 1) whitens block-diagonally: U is (G, k, k) with k = C_in / G,
one block per group of input channels, so the layer is exactly as grouped as nn.Conv2d.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from . import ops

__all__ = ["WhitenedConv2d", "WhitenedLinear"]


class _Whitened(nn.Module):
    """What both whitened layers share: the buffers, the canonical parameters, the init."""

    V: nn.Parameter
    d: nn.Parameter | None
    U: torch.Tensor
    c: torch.Tensor
    #: G: input channels form G blocks of k = num_features / G, whitened separately (convs only)
    groups: int = 1

    def _make(self, weight_shape, n_in, bias, device, dtype):
        factory = {"device": device, "dtype": dtype}
        self.V = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.d = nn.Parameter(torch.empty(weight_shape[0], **factory))
        else:
            self.register_parameter("d", None)
        k = n_in // self.groups
        u_shape = (n_in, n_in) if self.groups == 1 else (self.groups, k, k)
        self.register_buffer("U", torch.empty(u_shape, **factory))
        self.register_buffer("c", torch.empty(n_in, **factory))
        self.reset_parameters()

    @property
    def num_features(self) -> int:
        """Width of the whitened input: in_features or in_channels."""
        return self.V.shape[1] * self.groups

    def reset_parameters(self) -> None:
        """The plain layer's initialization of (V, d), with U = I (identity blocks) and c = 0."""
        with torch.no_grad():
            eye = torch.eye(self.U.shape[-1], dtype=self.U.dtype, device=self.U.device)
            self.U.copy_(eye.expand_as(self.U))
            self.c.zero_()
        init.kaiming_uniform_(self.V, a=math.sqrt(5))
        if self.d is not None:
            fan_in = self.V[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.d, -bound, bound)

    def _centre(self) -> torch.Tensor | None:
        # bias=False layers keep c = 0 (they are whitened by the uncentered second moment).
        return self.c if self.d is not None else None

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The plain layer's parameters: W = V U (at every tap) and b = d - W c, detached."""
        with torch.no_grad():
            return ops.fold(self.V, self.d, self.U, self._centre())

    @property
    def weight(self) -> torch.Tensor:
        """Canonical weight W = V U (read-only)."""
        return self.canonical()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        """Canonical bias b = d - W c, or None for bias=False (read-only)."""
        return self.canonical()[1]


class WhitenedLinear(_Whitened):
    """z = V U (x - c) + d, a drop-in replacement of nn.Linear.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.

    Shape:
        x: (*, in_features) -> (*, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int")
        self.in_features = in_features
        self.out_features = out_features
        self._make((out_features, in_features), in_features, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.whitened_linear(x, self.V, self.d, self.U, self._centre())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.d is not None}"


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class WhitenedConv2d(_Whitened):
    """conv(U (pad(h) - c), V) + d, a drop-in replacement of nn.Conv2d.

    The whitening is across feature maps: U is (C_in, C_in) and c has C_in entries. Padding,
    stride and dilation act on the layer input exactly as in nn.Conv2d. With groups G > 1, V has
    nn.Conv2d's grouped weight shape (C_out, C_in / G, kh, kw) and U is block-diagonal, stored as
    (G, k, k) with k = C_in / G: block g whitens input channels g*k..(g+1)*k-1, the only ones
    output channels g*C_out/G..(g+1)*C_out/G-1 see.

    Args:
        as nn.Conv2d; in_channels and out_channels must be divisible by groups.

    Shape:
        x: (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, H_out, W_out) or (C_out, H_out, W_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ValueError(f"{name}={value} must be divisible by {groups=}")
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if any(v <= 0 for v in value):
                raise ValueError(f"{name}={value} must be positive")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{padding=} must be 'same', 'valid' or non-negative ints")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        else:
            padding = _pair(padding)
            if any(p < 0 for p in padding):
                raise ValueError(f"{padding=} must be non-negative")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{padding_mode=} must be one of {_PADDING_MODES}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self._make((out_channels, in_channels // groups, *kernel_size), in_channels, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.whitened_conv2d(
            x,
            self.V,
            self.d,
            self.U,
            self._centre(),
            self.stride,
            self.padding,
            self.dilation,
            self.padding_mode,
            self.groups,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.d is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s
