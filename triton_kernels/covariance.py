"""Shifted (numerically centered) first and second moments of layer inputs, one Triton launch per 2^30 rows.

    s1 += sum_r (x_r - shift)                      (C,)
    s2 += sum_r (x_r - shift) (x_r - shift)^T      (C, C)

Rows r are the samples: the rows of an (M, C) input, or every spatial position of every image of an
(N, C, H, W) input. Kernel `cov_accum_kernel`; its launches `cov_accumulate_launches` (grids and
keyword arguments, for `wrap_triton`, one per MAX_ROWS rows) and the launcher that runs them,
`cov_accumulate`. The mean and the covariance of n rows follow from the sums: mean = shift + s1 / n,
cov = s2 / n - (s1 / n)(s1 / n)^T.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .precision import check_precision

__all__ = [
    "CovLaunch",
    "DEFAULT_BLOCK_C",
    "DEFAULT_BLOCK_R",
    "MAX_ROWS",
    "TF32X3_BLOCK_C",
    "TF32X3_BLOCK_R",
    "TF32X3_WIDE_WARPS",
    "block_sizes",
    "cov_accum_kernel",
    "cov_accumulate",
    "cov_accumulate_launches",
    "num_warps",
]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tiles for the default 4 warps: a float32 FMA dot of 32 x 32 x 32 stays near 170 registers with no
# spills on sm_80 and sm_90 (64-wide tiles spill), and 32 rows of float32 are one 128-byte line of a
# contiguous NCHW channel. No num_warps launch option for them: the default launch stays the plain
# one under torch.compile too.
DEFAULT_BLOCK_R = 32
DEFAULT_BLOCK_C = 32
# Tiles of precision="tf32x3" (tensor cores): 64 x 64 tiles of s2 read each row of x half as often
# as 32 x 32 ones; each dot reduces 16 rows from zero, added to the tile with round-to-nearest
# (precision.py). With 8 warps no spills on sm_80 or sm_90 under Triton 3.6, 3.8 and 3.9, i64 strides
# included (with 4 warps they reach 255 registers and spill); 32 rows per dot spill with 4
# warps, 128-wide tiles with 8. Under torch.compile, wrap_triton turns the num_warps launch option
# into a one-config autotune (torch 2.13); were it dropped, the kernel would run with 4 warps: the
# same sums, with spills.
TF32X3_BLOCK_R = 16
TF32X3_BLOCK_C = 64
TF32X3_WIDE_WARPS = 8


def block_sizes(C: int, precision: str = "ieee") -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the launcher for C features: the tiles of `precision`, the column
    tile no wider than C needs (down to 16, tl.dot's smallest)."""
    if precision == "tf32x3":
        block_r, block_c = TF32X3_BLOCK_R, TF32X3_BLOCK_C
    else:
        block_r, block_c = DEFAULT_BLOCK_R, DEFAULT_BLOCK_C
    while block_c > 16 and C <= block_c // 2:
        block_c //= 2
    return block_r, block_c


def num_warps(block_c: int, precision: str = "ieee") -> int | None:
    """The num_warps launch option of a tile BLOCK_C wide: 8 for precision="tf32x3" tiles of 64 or
    more, None (Triton's default, 4) otherwise."""
    return TF32X3_WIDE_WARPS if precision == "tf32x3" and block_c >= TF32X3_BLOCK_C else None


@triton.jit
def cov_accum_kernel(
    x_ptr,
    shift_ptr,
    s1_ptr,
    s2_ptr,
    M,
    C,
    R1,
    R2,
    stride_r0,
    stride_r1,
    stride_r2,
    stride_xc,
    stride_shift,
    stride_s1,
    stride_s2_0,
    stride_s2_1,
    stride_s1_split,
    stride_s2_split,
    rows_per_split,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_ATOMICS: tl.constexpr,
):
    """Adds one row split's shifted moments to one upper tile of s2 (and its mirror) and to s1.

        y_r = x_r - shift                       (float32, in registers)
        s1[i]    += sum_r y_r[i]                 (diagonal tiles only)
        s2[i, j] += sum_r y_r[i] y_r[j]          (i in tile ti, j in tile tj, ti <= tj)
        s2[j, i] += the same partial sums        (ti < tj: the mirror)

    Row r = (r0, r1, r2) with r = (r0 * R1 + r1) * R2 + r2 sits at r0 * stride_r0 + r1 * stride_r1 +
    r2 * stride_r2: an (N, C, H, W) input has rows (n, h, w), an (M, C) input rows (m, 0, 0), and
    the launcher merges the dims whose strides allow it (contiguous NCHW: (n, 0, h * W + w);
    channels_last: (n * H * W + h * W + w, 0, 0)).

    Grid: (T * (T + 1) / 2, splits) with T = cdiv(C, BLOCK_C); axis 0 enumerates the upper tiles
    (ti, tj), axis 1 the contiguous row ranges [split * rows_per_split, ...). Split k updates
    s1 + k * stride_s1_split and s2 + k * stride_s2_split. With one split, or with nonzero split
    strides (each split its own slice, summed by the launcher afterwards), the update is a plain
    read-modify-write (deterministic, s2 exactly symmetric); with several splits into one (s1, s2)
    (USE_ATOMICS) the partial sums are added with relaxed atomics.

    INPUT_PRECISION is tl.dot's: "ieee" (FMA products), "tf32x3" or "tf32" (tensor cores;
    precision.py). The products are of the float32 values y, whatever x's dtype.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Upper tile (ti, tj), ti <= tj, from k = tj * (tj + 1) / 2 + ti; the float estimate of tj is
    # corrected by one step either way.
    tj = ((tl.sqrt_rn((8 * pid_t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid_t, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > pid_t, tj - 1, tj)
    ti = pid_t - tj * (tj + 1) // 2

    offs_i = (ti * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_j = (tj * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_i = offs_i < C
    mask_j = offs_j < C
    shift_i = tl.load(shift_ptr + offs_i * stride_shift, mask=mask_i, other=0.0).to(tl.float32)
    shift_j = tl.load(shift_ptr + offs_j * stride_shift, mask=mask_j, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    acc_s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # Row indices and their split into (r0, r1, r2) in int32 (the launcher keeps M <= MAX_ROWS);
    # the element offsets in int64. R1 = 1 or R2 = 1 specialize the divisions away.
    row_lo = pid_s * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, M)
    for r_start in range(row_lo, row_hi, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        mask_r = rows < row_hi
        r2 = rows % R2
        r01 = rows // R2
        r1 = r01 % R1
        r0 = r01 // R1
        row_off = r0.to(tl.int64) * stride_r0 + r1.to(tl.int64) * stride_r1 + r2.to(tl.int64) * stride_r2
        # y_i^T as (BLOCK_C, BLOCK_R) and y_j as (BLOCK_R, BLOCK_C), read straight from x's layout
        m_it = mask_i[:, None] & mask_r[None, :]
        y_it = tl.load(x_ptr + offs_i[:, None] * stride_xc + row_off[None, :], mask=m_it, other=0.0)
        y_it = tl.where(m_it, y_it.to(tl.float32) - shift_i[:, None], 0.0)
        m_j = mask_r[:, None] & mask_j[None, :]
        y_j = tl.load(x_ptr + row_off[:, None] + offs_j[None, :] * stride_xc, mask=m_j, other=0.0)
        y_j = tl.where(m_j, y_j.to(tl.float32) - shift_j[None, :], 0.0)
        # "tf32x3" sums its three TF32 products from zero and adds them to acc in float32
        acc = tl.dot(y_it, y_j, acc, input_precision=INPUT_PRECISION)
        acc_s1 += tl.sum(y_it, axis=1)

    diag = ti == tj
    # A diagonal tile is symmetric in exact arithmetic; make it so bit for bit.
    acc = tl.where(diag, (acc + tl.trans(acc)) * 0.5, acc)
    m_tile = mask_i[:, None] & mask_j[None, :]
    # Split pid_s adds into its own slice of (s1, s2) when the split strides are not zero
    s1_ptr += pid_s.to(tl.int64) * stride_s1_split
    s2_ptr += pid_s.to(tl.int64) * stride_s2_split
    p_up = s2_ptr + offs_i[:, None] * stride_s2_0 + offs_j[None, :] * stride_s2_1
    p_lo = s2_ptr + offs_j[None, :] * stride_s2_0 + offs_i[:, None] * stride_s2_1
    p_s1 = s1_ptr + offs_i * stride_s1
    # The scalar conditions enter the masks through tl.where: Triton 3.9's interpreter gives a
    # block mask & a scalar condition an integer dtype, which its loads and stores reject.
    m_s1 = tl.where(diag, mask_i, False)
    m_lo = tl.where(diag, False, m_tile)
    if USE_ATOMICS:
        tl.atomic_add(p_up, acc, mask=m_tile, sem="relaxed")
        tl.atomic_add(p_lo, acc, mask=m_lo, sem="relaxed")
        tl.atomic_add(p_s1, acc_s1, mask=m_s1, sem="relaxed")
    else:
        new = tl.load(p_up, mask=m_tile, other=0.0) + acc
        tl.store(p_up, new, mask=m_tile)
        tl.store(p_lo, new, mask=m_lo)
        tl.store(p_s1, tl.load(p_s1, mask=m_s1, other=0.0) + acc_s1, mask=m_s1)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int | None:
    """Programs one launch aims at for x's device: 4 per SM on CUDA; None elsewhere (the
    interpreter, where fewer, longer programs are faster: one row split)."""
    if not x.is_cuda:
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return 4 * _num_sms(index)


def _row_layout(x: torch.Tensor) -> tuple[int, tuple[int, int, int], tuple[int, int, int], int]:
    """Rows of x as up to three (size, stride) dims, merged where the strides allow.

    Returns (M, (R0, R1, R2), (stride_r0, stride_r1, stride_r2), stride_c).
    """
    if x.dim() == 2:
        dims = [(x.shape[0], x.stride(0))]
        stride_c = x.stride(1)
    else:
        dims = [(x.shape[0], x.stride(0)), (x.shape[2], x.stride(2)), (x.shape[3], x.stride(3))]
        stride_c = x.stride(1)
    dims = [d for d in dims if d[0] != 1] or [(1, 0)]
    merged = [dims[0]]
    for size, stride in dims[1:]:
        outer_size, outer_stride = merged[-1]
        if outer_stride == size * stride:
            merged[-1] = (outer_size * size, stride)
        else:
            merged.append((size, stride))
    # (R0, R1, R2): unused dims as size 1 after R0 (the outermost), so R1 = 1 or R2 = 1
    if len(merged) == 1:
        merged += [(1, 0), (1, 0)]
    elif len(merged) == 2:
        merged.insert(1, (1, 0))
    sizes = tuple(s for s, _ in merged)
    strides = tuple(st for _, st in merged)
    return sizes[0] * sizes[1] * sizes[2], sizes, strides, stride_c


def _check(x: torch.Tensor, shift: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> int:
    if x.dim() not in (2, 4):
        raise ValueError(f"x must be (M, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    C = x.shape[1]
    for name, t, shape in (("shift", shift, (C,)), ("s1", s1, (C,)), ("s2", s2, (C, C))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return C


#: The most rows one launch takes, so that its row indices and their (r0, r1, r2) split stay in
#: int32 (a 64-bit division is a subroutine call, and its frame spills the tiles). Larger inputs
#: are cut into several launches (`cov_accumulate_launches`).
MAX_ROWS = 2**30


def _row_chunks(x: torch.Tensor, max_rows: int) -> list[torch.Tensor]:
    """Views of x, in row order, of at most max_rows rows each: slices of the batch dim (M of an
    (M, C) input, N of an (N, C, H, W) one), or of one image's h when an image has more than
    max_rows positions."""
    if x.dim() == 2:
        return [x[m : m + max_rows] for m in range(0, x.shape[0], max_rows)]
    N, _, H, W = x.shape
    if H * W <= max_rows:
        images = max_rows // (H * W)
        return [x[n : n + images] for n in range(0, N, images)]
    if W > max_rows:
        raise ValueError(
            f"x is {tuple(x.shape)}: one launch takes at most {max_rows} rows, and a row of W = {W} "
            "positions cannot be cut"
        )
    heights = max_rows // W
    return [x[n : n + 1, :, h : h + heights] for n in range(N) for h in range(0, H, heights)]


@dataclasses.dataclass(frozen=True)
class CovLaunch:
    """One launch of `cov_accum_kernel`: its grid and keyword arguments, and for a two-stage
    (deterministic) reduction the per-split partial sums ((splits, C), (splits, C, C)) it writes
    and the (s1, s2) that `finish` adds them to."""

    grid: tuple[int, int]
    kwargs: dict
    partials: tuple[torch.Tensor, torch.Tensor] | None = None
    out: tuple[torch.Tensor, torch.Tensor] | None = None

    def finish(self) -> None:
        """Adds the partial sums to (s1, s2), after the launch (on its stream); nothing when the
        launch added to them itself. torch's sum over the splits is deterministic; s2 gets the
        upper triangle of that sum and its mirror, so it stays exactly symmetric."""
        if self.partials is None:
            return
        (p1, p2), (s1, s2) = self.partials, self.out
        s1.add_(p1.sum(0))
        t2 = p2.sum(0)
        s2.add_(t2.triu() + t2.triu(1).mT)


def _launch_rows(
    x: torch.Tensor,
    shift: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    *,
    input_precision: str,
    tiles: tuple[int, int],
    num_splits: int | None,
    deterministic: bool,
) -> CovLaunch:
    """The launch for an x of at most MAX_ROWS rows (and at least one)."""
    C = x.shape[1]
    M, (_, R1, R2), (sr0, sr1, sr2), stride_c = _row_layout(x)
    block_r, block_c = tiles
    n_col = triton.cdiv(C, block_c)
    n_tiles = n_col * (n_col + 1) // 2
    row_blocks = triton.cdiv(M, block_r)
    if num_splits is None:
        target = _target_programs(x)
        # at least 16 row blocks per split, so the partial sums stay a small part of the work
        splits = 1 if target is None else min(triton.cdiv(target, n_tiles), triton.cdiv(row_blocks, 16))
    else:
        splits = num_splits
    splits = max(1, min(splits, row_blocks))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    splits = triton.cdiv(M, rows_per_split)
    if deterministic and splits > 1:  # each split its own slice, summed by CovLaunch.finish
        partials = (s1.new_zeros(splits, C), s2.new_zeros(splits, C, C))
        (o1, o2), split_strides = partials, (partials[0].stride(0), partials[1].stride(0))
        strides = (o1.stride(1), o2.stride(1), o2.stride(2))
    else:  # s1 and s2 themselves, so that a traced launch (wrap_triton) mutates the op's arguments
        partials, o1, o2, split_strides = None, s1, s2, (0, 0)
        strides = (s1.stride(0), s2.stride(0), s2.stride(1))
    kwargs = dict(
        x_ptr=x,
        shift_ptr=shift,
        s1_ptr=o1,
        s2_ptr=o2,
        M=M,
        C=C,
        R1=R1,
        R2=R2,
        stride_r0=sr0,
        stride_r1=sr1,
        stride_r2=sr2,
        stride_xc=stride_c,
        stride_shift=shift.stride(0),
        stride_s1=strides[0],
        stride_s2_0=strides[1],
        stride_s2_1=strides[2],
        stride_s1_split=split_strides[0],
        stride_s2_split=split_strides[1],
        rows_per_split=rows_per_split,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        INPUT_PRECISION=input_precision,
        USE_ATOMICS=splits > 1 and partials is None,
    )
    warps = num_warps(block_c, "tf32x3" if input_precision == "tf32x3" else "ieee")
    if warps is not None:
        kwargs["num_warps"] = warps
    return CovLaunch((n_tiles, splits), kwargs, partials, (s1, s2) if partials else None)


def cov_accumulate_launches(
    x: torch.Tensor,
    shift: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    *,
    allow_tf32: bool = False,
    precision: str = "ieee",
    block_r: int | None = None,
    block_c: int | None = None,
    num_splits: int | None = None,
    deterministic: bool | None = None,
    max_rows: int = MAX_ROWS,
) -> list[CovLaunch]:
    """The launches of `cov_accumulate`, in order: none when x has no rows, one per MAX_ROWS rows.

    Run each as `cov_accum_kernel[launch.grid](**launch.kwargs)` (`torch.library.triton_op`
    callers: `wrap_triton(cov_accum_kernel)[launch.grid](**launch.kwargs)`), then
    `launch.finish()`.

    Row splits: on CUDA enough to give every SM about four programs, each of at least 16 row
    blocks. Their partial sums are added with atomics (in no fixed order), or, when deterministic
    (by default under `torch.use_deterministic_algorithms(True)`), written each to its own slice
    and summed afterwards (`CovLaunch.finish`), so that the sums are bitwise reproducible with as
    many programs.

    precision ("ieee" or "tf32x3", precision.py) picks the products, the default tiles
    (`block_sizes`) and the warps (`num_warps`, in kwargs when not Triton's default). allow_tf32
    (single TF32 products, about 3 significant digits, no accuracy contract) keeps the tiles of
    precision="ieee" and cannot be combined with "tf32x3".

    block_r, block_c, num_splits and max_rows (at most MAX_ROWS) override the heuristics; tests
    use them to reach every path with small inputs.

    Raises:
        ValueError: a bad precision or max_rows, or an image row (W positions) longer than max_rows.
    """
    check_precision(precision)
    if allow_tf32 and precision != "ieee":
        raise ValueError(f"allow_tf32=True asks for single TF32 products; it cannot go with {precision=}")
    if not 0 < max_rows <= MAX_ROWS:
        raise ValueError(f"max_rows must be in [1, {MAX_ROWS}], got {max_rows}")
    C = _check(x, shift, s1, s2)
    if x.numel() == 0:
        return []
    default_r, default_c = block_sizes(C, precision)
    tiles = (default_r if block_r is None else block_r, default_c if block_c is None else block_c)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    input_precision = "tf32" if allow_tf32 else precision
    return [
        _launch_rows(
            chunk,
            shift,
            s1,
            s2,
            input_precision=input_precision,
            tiles=tiles,
            num_splits=num_splits,
            deterministic=deterministic,
        )
        for chunk in _row_chunks(x, max_rows)
    ]


def cov_accumulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    *,
    allow_tf32: bool = False,
    precision: str = "ieee",
) -> None:
    """Adds the shifted moments of x's rows to s1 and s2, in place: one kernel launch per MAX_ROWS
    rows (and under deterministic algorithms, a sum of the row splits' slices after it).

        s1 += sum_r (x_r - shift)          s2 += sum_r (x_r - shift) (x_r - shift)^T

    Only the upper tiles of s2 are computed; each is added to its mirror too, so s2 stays
    symmetric (bit for bit with one row split or under deterministic algorithms; with several
    splits added with atomics in any order, to float32 rounding of s2's entries). Under
    `torch.use_deterministic_algorithms(True)` the sums are bitwise reproducible.

    Args:
        x: (M, C) or (N, C, H, W), any strides (read in place), float32, float16 or bfloat16. Every
            spatial position of every image is one row of C features.
        shift: (C,) float32, e.g. the first row of the first batch; keeps the sums centered.
        s1: (C,) float32, updated in place.
        s2: (C, C) float32, symmetric, updated in place.
        allow_tf32: single TF32 products on the tensor cores (float32 accumulation either way),
            about 3 significant digits: no accuracy contract. Only with precision="ieee".
        precision: "ieee" (default: float32 FMA products) or "tf32x3": the products of the
            float32 y = x - shift on the tensor cores, their error against float64 at most twice
            that of torch's float32 matmul with TF32 off (precision.py).

    Raises:
        ValueError: precision is not one of precision.PRECISIONS, or comes with allow_tf32.
    """
    for launch in cov_accumulate_launches(x, shift, s1, s2, allow_tf32=allow_tf32, precision=precision):
        cov_accum_kernel[launch.grid](**launch.kwargs)
        launch.finish()
