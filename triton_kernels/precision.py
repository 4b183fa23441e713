"""The precision modes of the kernels' products (their tl.dot), one list for covariance.py and
whiten_conv.py, and the accuracy each mode promises.

    "ieee"    float32 products and sums on the FMA units, no tensor cores: the default, the
              rounding of a plain float32 loop.
    "tf32x3"  the tensor cores at about float32 accuracy. float32 operands (and 16-bit inputs the
              kernel turns into float32 values, such as x - shift) go through Triton's tf32x3
              dot: each operand is split into a TF32 part and a TF32 remainder, and the three
              TF32 products big * big + big * small + small * big are summed in float32 (the
              small * small term, below 2^-22 of the product, is dropped). Where the fold's V and
              U are both float16, or both bfloat16, they are multiplied as they are: the products
              of two 16-bit values are exact in float32, the sums float32.

Contract of "tf32x3": for reductions of at least 64 terms (rows for the covariance, input
features for the fold), the error against a float64 reference, ||got - exact|| / ||exact|| over
the whole result, is at most twice that of the same computation in plain torch at the inputs'
precision: a float32 matmul with TF32 off for float32 inputs, the 16-bit computation (16-bit
operands and result) for 16-bit ones. For shorter reductions both errors are a few float32
roundings and their ratio is chance. Tensor cores do not round their float32 partial sums to
nearest (they truncate: Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor
cores", PeerJ Computer Science, 2021), so a tf32x3 dot reduces a short block, 16 rows or 16 input
features, from zero, and the blocks are added with round-to-nearest float32 adds. The 16-bit
products of the fold accumulate on the tensor cores over all input features, an error far below
the rounding of the 16-bit result at the widths tested. tests/test_precision_modes.py checks the
contract on a GPU.

Under Triton's interpreter (TRITON_INTERPRET=1) every dot is a float32 numpy matmul whatever the
mode, so there the modes differ only in their tiles; its dot takes bfloat16 operands for their raw
bits (Triton 3.6 and 3.8), so there the fold multiplies bfloat16 V and U through float32. float64
inputs (the fold's gradcheck path) take float64 products in both modes.

Nothing here imports Triton.
"""

from __future__ import annotations

__all__ = ["PRECISIONS", "check_precision"]

#: the values of every `precision` option, the default first
PRECISIONS = ("ieee", "tf32x3")


def check_precision(precision: str) -> str:
    """precision itself, after checking that it is one of PRECISIONS.

    Raises:
        ValueError: naming the option and the allowed values.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    return precision
