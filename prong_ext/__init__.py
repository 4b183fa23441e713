"""prong_ext: Natural Neural Networks (PRONG, Desjardins et al. 2015) for PyTorch.

Whitened layers compute z = V U (h - c) + d; Prong re-estimates U and c from the statistics of
each layer's input every T updates and re-projects V and d so that the network function does not
change. See README.md and docs/algorithm.md for the conventions.
"""

from . import ops, reference
from .convert import named_parameters, tied_parameters, unwhiten, whiten
from .nn import WhitenedConv2d, WhitenedLinear
from .prong import Prong

__all__ = [
    "Prong",
    "WhitenedConv2d",
    "WhitenedLinear",
    "named_parameters",
    "ops",
    "reference",
    "tied_parameters",
    "unwhiten",
    "whiten",
]

from ._version import __version__ as __version__  # noqa: E402  (the one definition: _version.py)
