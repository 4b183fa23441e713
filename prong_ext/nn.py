"""Whitened layers: drop-in replacements of nn.Linear and nn.Conv2d.

A whitened layer computes z = V U (h - c) + d. V and d are the trained parameters (the weight's
and the bias's shapes); U and c are buffers set by prong_ext.Prong from the statistics of the
layer's input, never by gradients. A fresh layer has U = I and c = 0, so it is exactly the plain
layer, with the plain layer's initialization.

A grouped WhitenedConv2d (groups G > 1) whitens block-diagonally: U is (G, k, k) with k = C_in / G,
one block per group of input channels, so the layer is exactly as grouped as nn.Conv2d.

`layer.weight` and `layer.bias` are the plain layer's W = V U and b = d - W c. They are not
parameters, but writing them works as on a plain layer: `nn.init.*_(layer.weight)`, in-place
writes to them or their views, and `layer.weight = w` set W (and b) through V and d.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from . import ops

__all__ = ["WhitenedConv2d", "WhitenedLayer", "WhitenedLinear"]


class WhitenedLayer(nn.Module):
    """What both whitened layers share: the buffers, the canonical parameters, the init."""

    V: nn.Parameter
    d: nn.Parameter | None
    U: torch.Tensor
    c: torch.Tensor
    #: G: input channels form G blocks of k = num_features / G, whitened separately (convs only)
    groups: int = 1
    #: the torch layer this one replaces (whiten / unwhiten convert between them)
    plain_class: type[nn.Module]

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
        """Canonical weight W = V U, detached. Writing to it in place (``nn.init.*_(layer.weight)``,
        ``copy_``, indexing) or assigning ``layer.weight = w`` sets W: V = W U^-1, with d moved so
        that the canonical bias b stays as it was (see set_canonical)."""
        return _CanonicalTensor(self.canonical()[0], self, "weight")

    @property
    def bias(self) -> torch.Tensor | None:
        """Canonical bias b = d - W c, detached, or None for bias=False. Writing to it in place or
        assigning ``layer.bias = b`` sets b: d = b + W c (see set_canonical)."""
        b = self.canonical()[1]
        return None if b is None else _CanonicalTensor(b, self, "bias")

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias"):
            if value is None and (name == "weight" or self.d is not None):
                raise ValueError(
                    f"{type(self).__name__}.{name} cannot be set to None: V and d are the layer's parameters"
                )
            self.set_canonical(**{name: value})
        else:
            super().__setattr__(name, value)

    def set_canonical(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Sets the plain layer's parameters W and/or b, keeping U and c: V = W U^-1 (U^-1 of
        every block) and d = b + W c, written in place into the existing V and d (an optimizer's
        references stay valid). What is not given keeps its canonical value.

        Args:
            weight: W, V's shape: (out, in) or (C_out, C_in / groups, kh, kw); or None.
            bias: b: (out,); or None. A layer built with bias=False takes no bias.

        Raises:
            ValueError: a shape that does not match, a bias for a layer without one, or a
                value that is not finite; nothing is changed then.
        """
        if weight is None and bias is None:
            return
        if bias is not None and self.d is None:
            raise ValueError(f"{type(self).__name__} was built with bias=False: it has no bias to set")
        for name, value, like in (("weight", weight, self.V), ("bias", bias, self.d)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.shape != like.shape:
                raise ValueError(f"{name} of shape {tuple(value.shape)} does not match {tuple(like.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or Inf; nothing was changed")
        f64 = torch.float64
        with torch.no_grad():
            W_old, b_old = ops.fold(self.V.to(f64), self._d64(), self.U.to(f64), self._centre64())
            W = W_old if weight is None else _plain(weight).to(device=self.V.device, dtype=f64)
            b = b_old if bias is None else _plain(bias).to(device=self.V.device, dtype=f64)
            new_v, new_d = ops.from_canonical(W, b, torch.linalg.inv(self.U.to(f64)), self.c.to(f64))
            if self.d is not None:
                self.d.copy_(new_d)
            self.V.copy_(new_v)

    def _d64(self) -> torch.Tensor | None:
        return None if self.d is None else self.d.to(torch.float64)

    def _centre64(self) -> torch.Tensor | None:
        c = self._centre()
        return None if c is None else c.to(torch.float64)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """t as a plain torch.Tensor (no _CanonicalTensor), detached."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach().as_subclass(torch.Tensor)


_INPLACE_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
_INPLACE_DUNDERS = frozenset(f"__i{op}__" for op in _INPLACE_OPERATORS) | {"__setitem__"}


def _written(func, args, kwargs) -> list:
    """The tensors an op writes to in place: its first argument for in-place methods
    (``uniform_``, ``copy_``, ``__setitem__``, ``__iadd__``, ...) and its ``out=`` tensors."""
    name = getattr(func, "__name__", "")
    out = []
    if (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS:
        out.append(args[0] if args else None)
    target = kwargs.get("out")
    out.extend(target if isinstance(target, (tuple, list)) else [target])
    return [t for t in out if isinstance(t, _CanonicalTensor)]


class _CanonicalTensor(torch.Tensor):
    """W or b of a whitened layer, as `layer.weight` / `layer.bias` return them.

    Reads like the plain tensor it holds (every op returns plain tensors, except views of it).
    An in-place write to it or to any view of it writes through to the layer: set_canonical()
    with the written tensor, so that `nn.init.orthogonal_(layer.weight)` and
    `layer.weight.data.zero_()` do what they do to a plain layer.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, layer: WhitenedLayer, role: str, base: torch.Tensor | None = None):
        t = torch.Tensor._make_subclass(cls, data)
        t._layer = weakref.ref(layer)
        t._role = role
        t._base_tensor = t if base is None else base  # the whole W or b the views come from
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        sources = [a for a in (*args, *kwargs.values()) if isinstance(a, _CanonicalTensor)]
        for written in _written(func, args, kwargs):
            layer = written._layer()
            if layer is not None:
                layer.set_canonical(**{written._role: _plain(written._base_tensor)})
        return _wrap_views(result, sources)

    # a copy, a pickle or a printout is of the plain tensor: copies do not write through
    def __reduce_ex__(self, protocol):
        return _plain(self).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return _plain(self).clone()

    def __repr__(self, **kwargs) -> str:
        return repr(_plain(self))


def _wrap_views(result, sources: list):
    """Outputs that share storage with a _CanonicalTensor input stay _CanonicalTensors (so a
    write through them writes through to the layer); everything else is a plain tensor."""
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap_views(r, sources) for r in result)
    if not isinstance(result, torch.Tensor) or not sources or any(result is s for s in sources):
        return result  # not a tensor, or an in-place op's own result
    if type(result) is _CanonicalTensor:
        result = _plain(result)
    ptr = result.untyped_storage().data_ptr()
    for src in sources:
        if ptr and ptr == src.untyped_storage().data_ptr():
            layer = src._layer()
            if layer is not None:
                return _CanonicalTensor(result, layer, src._role, src._base_tensor)
    return result


class WhitenedLinear(WhitenedLayer):
    """z = V U (x - c) + d, a drop-in replacement of nn.Linear.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.

    Shape:
        input: (*, in_features) -> (*, out_features).
    """

    plain_class = nn.Linear

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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.whitened_linear(input, self.V, self.d, self.U, self._centre())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.d is not None}"


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class WhitenedConv2d(WhitenedLayer):
    """conv(U (pad(h) - c), V) + d, a drop-in replacement of nn.Conv2d.

    The whitening is across feature maps: U is (C_in, C_in) and c has C_in entries. Padding,
    stride and dilation act on the layer input exactly as in nn.Conv2d. With groups G > 1, V has
    nn.Conv2d's grouped weight shape (C_out, C_in / G, kh, kw) and U is block-diagonal, stored as
    (G, k, k) with k = C_in / G: block g whitens input channels g*k..(g+1)*k-1, the only ones
    output channels g*C_out/G..(g+1)*C_out/G-1 see.

    Args:
        as nn.Conv2d; in_channels and out_channels must be divisible by groups.

    Shape:
        input: (N, C_in, H, W) or (C_in, H, W) -> (N, C_out, H_out, W_out) or (C_out, H_out, W_out).
    """

    plain_class = nn.Conv2d

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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.whitened_conv2d(
            input,
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
