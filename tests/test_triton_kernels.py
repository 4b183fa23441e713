"""The Triton kernels (covariance accumulation, weight fold) and their ops, against float64 torch.

On the CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest);
with `TRITON_INTERPRET=0` on a GPU machine the `cuda` cases run the compiled kernels.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from helpers import unit_roundoff
from prong_ext import _triton_ops as ops
from prong_ext import ops as prong_ops
from prong_ext import reference
from prong_ext._common import finalize
from prong_ext.triton_kernels import covariance as cov_module
from prong_ext.triton_kernels.covariance import (
    MAX_ROWS,
    cov_accum_kernel,
    cov_accumulate,
    cov_accumulate_launches,
)
from prong_ext.triton_kernels.whiten_conv import (
    fold_bwd_kernel,
    fold_kernel,
    fold_weights,
    fold_weights_backward,
    fold_weights_backward_launch,
    fold_weights_launch,
)

# --- float64 references ------------------------------------------------------------------------


def rows64(x):
    """(M, C) float64 rows of an (M, C) or (N, C, H, W) input."""
    x = x.double()
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


def shifted_sums64(x, shift):
    y = rows64(x) - shift.double()
    return y.sum(0), y.T @ y


def f64(*ts):
    """The tensors in float64 (None stays None): the oracle's inputs."""
    return [None if t is None else t.double() for t in ts]


def covariance32(x):
    """Mean, covariance and row count of x from one launch's float32 sums about its first row."""
    rows = rows64(x)
    shift = rows[0].float()
    s1, s2 = torch.zeros(x.shape[1], device=x.device), torch.zeros(x.shape[1], x.shape[1], device=x.device)
    cov_accumulate(x, shift, s1, s2)
    return *finalize(rows.shape[0], shift, s1, s2), rows.shape[0]


F32_U = unit_roundoff(torch.float32)


def shifted_sums_bound(x, shift, s1, s2):
    """Elementwise bounds of the float32 errors of s1 += sum (x - shift), s2 += sum (x - shift)
    (x - shift)^T over the rows against float64: gamma_(rows + 2) times the sums of the sizes of
    the terms (one rounding more for x - shift and one for the add onto s1, s2), in whatever order
    the kernel adds them (Higham 3.1), x 2 for the rounding of the reference's inputs."""
    y = (rows64(x) - shift.double()).abs()
    g = 2 * (y.shape[0] + 2) * F32_U
    return g * (y.sum(0) + s1.double().abs()), g * (y.T @ y + s2.double().abs())


def assert_within(got, want, bound):
    """|got - want| <= bound elementwise."""
    err = (got.double() - want.double()).abs()
    assert (err <= bound).all(), f"error/bound up to {(err / bound).max().item():.3g}"


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def make_x(layout, C, rows, dtype=torch.float32, device="cpu", mean=0.5):
    """Input with `rows` rows (not a multiple of the blocks) in the given layout."""
    if layout == "2d":
        x = torch.randn(rows, C, dtype=torch.float64) + mean
    elif layout == "2d_sliced":  # every other row and a column offset: strides (2 * (C + 3), 1)
        x = (torch.randn(2 * rows, C + 3, dtype=torch.float64) + mean)[::2, 3:]
    else:
        n, h, w = rows_to_nhw(rows)
        x = torch.randn(n, C, h, w, dtype=torch.float64) + mean
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "nchw_sliced":  # spatial and batch slicing: no dims merge
            x = (torch.randn(2 * n, C, h + 2, 2 * w, dtype=torch.float64) + mean)[::2, :, 1:-1, ::2]
    return x.to(dtype=dtype, device=device)


def rows_to_nhw(rows):
    """(N, H, W) with about `rows` positions: 37 -> 36 (3 x 3 x 4), 21, 45; others (1, 1, rows)."""
    return {37: (3, 3, 4), 21: (3, 7, 1), 45: (5, 3, 3)}.get(rows, (1, 1, rows))


def sym(C, device="cpu"):
    a = torch.randn(C, C, device=device)
    return a + a.T


# --- covariance --------------------------------------------------------------------------------

LAYOUTS = ["2d", "2d_sliced", "nchw", "channels_last", "nchw_sliced"]


def launch_cov(x, shift, s1, s2, **kw):
    """Runs the launches of cov_accumulate_launches(**kw); returns them."""
    launches = cov_accumulate_launches(x, shift, s1, s2, **kw)
    for launch in launches:
        cov_accum_kernel[launch.grid](**launch.kwargs)
        launch.finish()
    return launches


@pytest.mark.parametrize("C", [1, 3, 17, 123, 257])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cov_accumulate_matches_float64(device, C, layout):
    rows = 21 if C == 257 else 45 if C == 123 else 37
    x = make_x(layout, C, rows, device=device)
    shift = torch.randn(C, device=device) * 0.1 + 0.5
    s1, s2 = torch.randn(C, device=device), sym(C, device)  # accumulates onto what is there
    e1, e2 = shifted_sums64(x, shift)
    e1, e2 = e1 + s1.double(), e2 + s2.double()
    b1, b2 = shifted_sums_bound(x, shift, s1, s2)
    cov_accumulate(x, shift, s1, s2)
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)
    if device == "cpu":  # one row split: bit-for-bit symmetric
        assert torch.equal(s2, s2.T)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "two_stage"])
@pytest.mark.parametrize(
    ("C", "layout", "block_c", "splits"),
    [(3, "2d", 16, 3), (17, "nchw", 16, 2), (40, "channels_last", 16, 3), (123, "2d_sliced", 32, 3)],
)
def test_cov_accumulate_tiles_and_row_splits(device, C, layout, block_c, splits, deterministic):
    """Several upper tiles, their mirrors and several row splits, added with atomics or (as under
    deterministic algorithms) each into its own slice, summed after the launch."""
    x = make_x(layout, C, 37 if layout != "2d_sliced" else 45, device=device)
    shift = rows64(x)[0].float()
    s1, s2 = torch.randn(C, device=device), sym(C, device)
    e1, e2 = shifted_sums64(x, shift)
    e1, e2 = e1 + s1.double(), e2 + s2.double()
    b1, b2 = shifted_sums_bound(x, shift, s1, s2)
    (launch,) = launch_cov(
        x, shift, s1, s2, block_r=16, block_c=block_c, num_splits=splits, deterministic=deterministic
    )
    n_col = -(-C // block_c)
    assert launch.grid == (n_col * (n_col + 1) // 2, splits)
    assert launch.kwargs["USE_ATOMICS"] is not deterministic
    assert (launch.partials is not None) is deterministic
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)
    if deterministic:
        assert torch.equal(s2, s2.T)
    else:
        torch.testing.assert_close(s2, s2.T, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("layout", "shape", "max_rows", "chunks"),
    [
        ("2d", (45, 5), 16, [16, 16, 13]),  # slices of M
        ("nchw", (5, 5, 3, 3), 20, [18, 18, 9]),  # two images a launch
        ("channels_last", (2, 5, 5, 4), 9, [8, 8, 4] * 2),  # an image in rows h, two at a time
        ("nchw_sliced", (3, 5, 4, 3), 5, [3] * 12),  # one row h at a time
    ],
)
def test_cov_accumulate_cuts_inputs_past_max_rows(device, layout, shape, max_rows, chunks):
    """Inputs of more than max_rows rows (MAX_ROWS = 2^30 by default) take one launch per slice of
    the batch, or of an image's rows h, each with int32 row indices; the sums are those of the
    whole input. With several row splits per launch, and two-stage."""
    N, C = shape[0], shape[1]
    x = torch.randn(shape, dtype=torch.float64) + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "nchw_sliced":
        x = (torch.randn(2 * N, C, shape[2] + 2, 2 * shape[3], dtype=torch.float64) + 0.5)[::2, :, 1:-1, ::2]
    x = x.float().to(device)
    shift = rows64(x)[0].float()
    for deterministic in (False, True):
        s1, s2 = torch.randn(C, device=device), sym(C, device)
        e1, e2 = shifted_sums64(x, shift)
        e1, e2 = e1 + s1.double(), e2 + s2.double()
        b1, b2 = shifted_sums_bound(x, shift, s1, s2)
        launches = launch_cov(
            x, shift, s1, s2, block_r=2, max_rows=max_rows, num_splits=2, deterministic=deterministic
        )
        assert [launch.kwargs["M"] for launch in launches] == chunks
        assert_within(s1, e1, b1)
        assert_within(s2, e2, b2)


def test_cov_accumulate_max_rows_errors():
    s1, s2 = torch.zeros(3), torch.zeros(3, 3)
    x = torch.randn(2, 3, 2, 5)
    with pytest.raises(ValueError, match=r"a row of W = 5 positions cannot be cut"):
        cov_accumulate_launches(x, torch.zeros(3), s1, s2, max_rows=4)
    for bad in (0, MAX_ROWS + 1):
        with pytest.raises(ValueError, match=r"max_rows must be in \[1, 1073741824\]"):
            cov_accumulate_launches(x, torch.zeros(3), s1, s2, max_rows=bad)
    assert len(cov_accumulate_launches(x, torch.zeros(3), s1, s2, max_rows=5)) == 4


@pytest.fixture
def programs(monkeypatch):
    """The programs a launch aims at: the device's on CUDA; in the interpreter (one split by
    default) those of a 132-SM GPU, so that the CUDA heuristic and its row splits run here too."""

    def use(device):
        if device == "cpu":
            monkeypatch.setattr(cov_module, "_target_programs", lambda x: 4 * 132)

    return use


@pytest.fixture
def deterministic():
    """A context in which torch.are_deterministic_algorithms_enabled() is True."""

    @contextlib.contextmanager
    def enabled():
        before = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)

    return enabled


def test_cov_accumulate_conv_batch_default_launch(device, programs):
    """A conv layer's batch with the launcher's own choices: several row splits added with atomics
    (on CUDA a real batch: 64 images of 64 channels, 32 x 32)."""
    programs(device)
    shape = (64, 64, 32, 32) if device == "cuda" else (6, 24, 9, 10)
    x = (torch.randn(shape, dtype=torch.float64) + 0.5).float().to(device)
    C = shape[1]
    shift = x[0, :, 0, 0].contiguous()
    s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    (launch,) = cov_accumulate_launches(x, shift, s1, s2)
    assert launch.grid[1] > 1 and launch.kwargs["USE_ATOMICS"]
    e1, e2 = shifted_sums64(x, shift)
    b1, b2 = shifted_sums_bound(x, shift, s1, s2)
    cov_accumulate(x, shift, s1, s2)
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)


def test_cov_accumulate_deterministic_is_two_stage_and_bitwise_reproducible(device, programs, deterministic):
    """Under deterministic algorithms as many row splits as with atomics, each written to its own
    slice and summed after the launch: the same sums bit for bit on every run, s2 exactly
    symmetric."""
    programs(device)
    C = 8
    x = make_x("channels_last", C, 4096, device=device)
    shift = rows64(x)[0].float()
    s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    (free,) = cov_accumulate_launches(x, shift, s1, s2)
    assert free.grid[1] > 1 and free.kwargs["USE_ATOMICS"] and free.partials is None
    runs = []
    with deterministic():
        (launch,) = cov_accumulate_launches(x, shift, s1, s2)
        assert launch.grid == free.grid and not launch.kwargs["USE_ATOMICS"]
        assert [tuple(p.shape) for p in launch.partials] == [(launch.grid[1], C), (launch.grid[1], C, C)]
        for _ in range(2):
            s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
            ops.cov_accumulate(x, shift, s1, s2)
            runs.append((s1, s2))
    (s1, s2), (t1, t2) = runs
    assert torch.equal(s1, t1) and torch.equal(s2, t2)
    assert torch.equal(s2, s2.T)
    e1, e2 = shifted_sums64(x, shift)
    b1, b2 = shifted_sums_bound(x, shift, torch.zeros_like(s1), torch.zeros_like(s2))
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)


@pytest.mark.cuda
def test_cov_accumulate_past_2_31_rows(deterministic):
    """2^31 + 2^20 rows: 2049 copies of one 1024 x 1024 image (a stride-0 batch dim, 8 MB), in
    three launches of at most 2^30 rows, each with several row splits (atomics, and two-stage
    under deterministic algorithms). The image's rows are the shift but for a few that differ by
    +-1, so every partial sum is an integer below 2^24, exact in float32 in any order: the sums
    must be exactly 2049 times the image's."""
    if ops.INTERPRETED:
        pytest.skip("run with TRITON_INTERPRET=0 to test the compiled kernels")
    C, H, W = 2, 1024, 1024
    n = 2**31 // (H * W) + 1
    g = torch.Generator().manual_seed(0)
    image = torch.ones(C, H * W)
    picked = torch.cat([torch.randint(0, H * W, (62,), generator=g), torch.tensor([0, H * W - 1])])
    image[torch.arange(len(picked)) % C, picked] += torch.randint(0, 2, (len(picked),), generator=g) * 2.0 - 1
    shift = torch.ones(C)
    y = (image - 1.0).double()
    e1, e2 = n * y.sum(1), n * (y @ y.T)
    x = image.view(1, C, H, W).cuda().expand(n, C, H, W)
    shift = shift.cuda()
    for context in (contextlib.nullcontext, deterministic):
        s1, s2 = torch.zeros(C, device="cuda"), torch.zeros(C, C, device="cuda")
        with context():
            launches = cov_accumulate_launches(x, shift, s1, s2)
            assert [launch.kwargs["M"] for launch in launches] == [2**30, 2**30, H * W]
            assert all(launch.grid[1] > 1 for launch in launches)
            ops.cov_accumulate(x, shift, s1, s2)
        assert torch.equal(s1.cpu().double(), e1) and torch.equal(s2.cpu().double(), e2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["2d", "channels_last", "nchw_sliced"])
def test_cov_accumulate_half_precision(device, dtype, layout):
    """Error against float64 at most 2x that of the same computation in plain torch at `dtype`."""
    C = 17
    x = make_x(layout, C, 37, dtype=dtype, device=device, mean=2.0)
    shift = rows64(x)[0].float()
    s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    cov_accumulate(x, shift, s1, s2)
    e1, e2 = shifted_sums64(x, shift)
    y = rows64(x).to(dtype) - shift.to(dtype)  # plain torch at dtype
    t1, t2 = y.sum(0), y.T @ y
    assert rel_err(s1, e1) <= 2 * rel_err(t1, e1) + 1e-6
    assert rel_err(s2, e2) <= 2 * rel_err(t2, e2) + 1e-6
    assert rel_err(s2, e2) < 1e-5  # the kernel accumulates in float32


def test_cov_accumulate_tf32_flag(device):
    C = 33
    x = make_x("channels_last", C, 37, device=device)
    shift = rows64(x)[0].float()
    s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    cov_accumulate(x, shift, s1, s2, allow_tf32=True)
    _, e2 = shifted_sums64(x, shift)
    assert rel_err(s2, e2) < 3e-3
    assert torch.isfinite(s2).all()


def test_covariance_large_mean_keeps_relative_accuracy(device):
    """Mean 1e3, std 1e-2: the shift keeps cov accurate where E[xx^T] - mu mu^T in float32 fails."""
    x = (1e3 + 1e-2 * torch.randn(300, 5, dtype=torch.float64)).float().to(device)
    mean, cov, count = covariance32(x)
    assert count == 300
    x64 = x.double()
    want = torch.cov(x64.T, correction=0)
    assert rel_err(cov, want) < 1e-4
    # the shifted sums are exact to far below one rounding of the mean, so: within that rounding
    torch.testing.assert_close(mean.double(), x64.mean(0), rtol=2 * F32_U, atol=0)
    naive = x.T @ x / 300 - torch.outer(x.mean(0), x.mean(0))
    assert rel_err(naive, want) > 1e-2  # the test can tell a centered update from a naive one


@pytest.mark.parametrize("layout", ["2d", "channels_last"])
def test_cov_accumulate_streaming_equals_one_pass(device, layout):
    C = 19
    chunks = [make_x(layout, C, rows, device=device, mean=3.0) for rows in (37, 21, 45)]
    shift = rows64(chunks[0])[0].float()  # the first row of the first batch
    s1, s2 = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    for x in chunks:
        cov_accumulate(x, shift, s1, s2)
    count = sum(rows64(x).shape[0] for x in chunks)
    mean, cov = finalize(count, shift, s1, s2)
    whole = torch.cat([rows64(x) for x in chunks]).float()
    mean1, cov1, count1 = covariance32(whole)
    assert count1 == count
    # float32 sums of the same rows (less the same shift, the first row) in other orders: each
    # within the bound of its sums, two of them apart by at most twice that; cov = s2 / count
    # - (s1 / count)(s1 / count)^T: a few roundings more
    y = (whole.double() - shift.double()).abs()
    g = 2 * (count + 4) * F32_U
    mean_bound, cov_bound = g * y.sum(0) / count, g * (y.T @ y / count + torch.outer(y.mean(0), y.mean(0)))
    want = torch.cov(whole.double().T, correction=0)
    assert_within(cov, cov1, 2 * cov_bound)
    assert_within(mean, mean1, 2 * mean_bound)
    assert_within(cov, want, cov_bound)
    assert_within(mean, whole.double().mean(0), mean_bound + F32_U * whole.double().mean(0).abs())


def window_batches(num_batches, rows, first_off):
    """A long window: `num_batches` float32 batches of `rows` rows, 3 features with means of 1e3
    to 2e3 and unit spread; the window's first sample `first_off` standard deviations off the
    mean (as a first sample may be)."""
    g = torch.Generator().manual_seed(5)
    mu = torch.tensor([1e3, -5e2, 2e3], dtype=torch.float64)
    batches = [
        (mu + torch.randn(rows, 3, dtype=torch.float64, generator=g)).float() for _ in range(num_batches)
    ]
    batches[0][0] = (mu + first_off).float()
    return batches


def window_bounds(batches, shifts, mean):
    """Elementwise bounds of the mean's and the covariance's errors when every batch's shifted sums
    are taken in float32 from zero (about its shift S_b) and merged in float64.

    With the sums about the true mean mu, a batch's errors e1 (in s1) and E2 (in s2) move the
    centred sums by E2 + e1 d^T + d e1^T, d = S_b - mu, and the mean by e1 / n; by
    shifted_sums_bound |e1| <= g sum |y|, |E2| <= g sum |y| |y|^T with y = x - S_b and
    g = gamma_(rows_b + 2) x 2: one batch's rounding, not the window's. With a = |y| + |d|:
    cov error <= sum_b g_b sum a a^T / n + e e^T / n^2, mean error <= e / n, e = sum_b g_b sum |y|.
    The float64 steps (merge, moves of the shift, finalize) add a few roundings per batch of terms
    no larger than (|x - mu| + 3 max |d|)^2: the last term, far below the others.
    """
    cov_bound, e = 0.0, 0.0
    far = max((sh.double() - mean).abs().max().item() for sh in shifts)
    f64 = 0.0
    for b, sh in zip(batches, shifts):
        y = (b.double() - sh.double()).abs()
        a = y + (sh.double() - mean).abs()
        g = 2 * (b.shape[0] + 2) * F32_U
        cov_bound, e = cov_bound + g * (a.T @ a), e + g * y.sum(0)
        z = (b.double() - mean).abs() + 3 * far
        f64 = f64 + z.T @ z
    n = sum(b.shape[0] for b in batches)
    slack = 16 * (len(batches) + 2) * unit_roundoff(torch.float64)
    mean_slack = slack * (mean.abs() + 3 * far)
    return e / n + mean_slack, cov_bound / n + torch.outer(e, e) / n**2 + slack * f64 / n


def test_accumulator_window_keeps_one_batch_accuracy(device):
    """256 batches of 8 rows through the Triton accumulator: within the bound of one batch's float32
    sums. The scheme that kept float32 sums over the whole window, shifted by its first sample,
    is off by several times that bound on the same data (its error grows with the window)."""
    batches = window_batches(256, 8, first_off=4.0)
    x = torch.cat(batches).double()
    want_mean, want_cov = x.mean(0), torch.cov(x.T, correction=0)
    acc = prong_ops.CovarianceAccumulator(3, backend="triton")
    shifts = []
    for b in batches:
        acc.update(b.to(device))
        shifts.append(acc.state_dict()["shift"].cpu())  # the shift this batch was summed about
    mean, cov, count = acc.compute()
    assert count == x.shape[0]
    mean_bound, cov_bound = window_bounds(batches, shifts, want_mean)
    assert_within(mean.cpu(), want_mean, mean_bound)
    assert_within(cov.cpu(), want_cov, cov_bound)
    # the earlier scheme, float32 sums of the whole window about the first sample
    shift, s1, s2 = batches[0][0], torch.zeros(3), torch.zeros(3, 3)
    for b in batches:
        y = b - shift
        s1, s2 = s1 + y.sum(0), s2 + y.T @ y
    m1 = s1.double() / count
    window_cov = s2.double() / count - torch.outer(m1, m1)
    assert ((window_cov - want_cov).abs() / cov_bound).max() > 3


def test_cov_accumulate_without_rows_is_a_no_op(device):
    s1, s2 = torch.randn(3, device=device), sym(3, device)
    s1_0, s2_0 = s1.clone(), s2.clone()
    cov_accumulate(torch.empty(0, 3, device=device), torch.zeros(3, device=device), s1, s2)
    ops.cov_accumulate(torch.empty(2, 3, 0, 4, device=device), torch.zeros(3, device=device), s1, s2)
    assert torch.equal(s1, s1_0) and torch.equal(s2, s2_0)


def test_cov_accumulate_rejects_bad_arguments():
    x = torch.randn(5, 3)
    s1, s2 = torch.zeros(3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shift"):
        cov_accumulate(x, torch.zeros(4), s1, s2)
    with pytest.raises(TypeError, match="s2"):
        cov_accumulate(x, torch.zeros(3), s1, s2.double())
    with pytest.raises(TypeError, match="x must be"):
        cov_accumulate(x.double(), torch.zeros(3), s1, s2)
    with pytest.raises(ValueError, match="x must be"):
        cov_accumulate(torch.randn(2, 3, 4), torch.zeros(3), s1, s2)


# --- fold --------------------------------------------------------------------------------------

FOLD_SHAPES = [(5, 1), (4, 3, 3, 3), (6, 17, 2, 3), (3, 123), (2, 257, 1, 1)]


def make_fold_inputs(shape, layout, dtype, device, uc_dtype=torch.float32):
    O, I = shape[:2]
    if layout == "contiguous":
        V = torch.randn(shape, dtype=dtype, device=device)
    elif layout == "channels_last" and len(shape) == 4:
        V = torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    else:  # a sliced view: every other output channel, input channels offset
        big = torch.randn((2 * O, I + 2) + tuple(shape[2:]), dtype=dtype, device=device)
        V = big[::2, 2:]
    U = torch.randn(I, I, dtype=uc_dtype, device=device).T / I**0.5  # a transposed view
    c = torch.randn(2 * I, dtype=uc_dtype, device=device)[::2] + 1.0  # strided
    d = torch.randn(O, dtype=dtype, device=device)
    return V, d, U, c


def poisoned_fold(V, d, U, c):
    W = torch.full(V.shape, float("nan"), dtype=V.dtype, device=V.device)
    b = torch.full((V.shape[0],), float("nan"), dtype=V.dtype, device=V.device)
    grid, kwargs = fold_weights_launch(V, d, U, c, W, b)
    fold_kernel[grid](**kwargs)
    return W, b


def poisoned_fold_backward(gW, gb, U, c):
    gV = torch.full(gW.shape, float("nan"), dtype=gW.dtype, device=gW.device)
    gd = torch.full(gb.shape, float("nan"), dtype=gb.dtype, device=gb.device)
    grid, kwargs = fold_weights_backward_launch(gW, gb, U, c, gV, gd)
    fold_bwd_kernel[grid](**kwargs)
    return gV, gd


FOLD_CASES = [
    (shape, layout, has_d)
    for shape in FOLD_SHAPES
    for layout in ("contiguous", "channels_last", "sliced")
    for has_d in (True, False)
    if (layout != "channels_last" or len(shape) == 4) and (has_d or layout == "sliced")
]


@pytest.mark.parametrize(("shape", "layout", "has_d"), FOLD_CASES, ids=str)
def test_fold_matches_float64(device, shape, layout, has_d):
    V, d, U, c = make_fold_inputs(shape, layout, torch.float32, device)
    d = d if has_d else None
    W, b = poisoned_fold(V, d, U, c)
    eW, eb = reference.fold(*f64(V, d, U, c))
    assert W.shape == V.shape and W.is_contiguous() and b.shape == (V.shape[0],)
    # float32 sums of I products for W, then of I more for b: their bounds, in units of the
    # sums of the terms' sizes (the same fold of |V|, |d|, |U|, |c|)
    aW, ab = reference.fold(*f64(V.abs(), None if d is None else d.abs(), U.abs(), -c.abs()))
    n = V.shape[1]
    assert_within(W, eW, 2 * (n + 1) * F32_U * aW)
    assert_within(b, eb, 2 * (2 * n + 2) * F32_U * ab)
    W2, b2 = fold_weights(V, d, U, c)
    assert torch.equal(W, W2) and torch.equal(b, b2)


@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_fold_backward_matches_float64(device, shape, layout):
    gW, gb, U, c = make_fold_inputs(shape, layout, torch.float32, device)
    gV, gd = poisoned_fold_backward(gW, gb, U, c)
    egV, egd = reference.fold_backward(*f64(gW, gb, U, c))
    assert gV.shape == gW.shape and gV.is_contiguous()
    # gV = (gW - gb c^T) U^T in float32: I products and one subtraction per term (the same
    # computation of |gW| + |gb| |c|^T and |U| bounds the sizes of the terms)
    agV, _ = reference.fold_backward(*f64(gW.abs(), gb.abs(), U.abs(), -c.abs()))
    assert_within(gV, egV, 2 * (gW.shape[1] + 2) * F32_U * agV)
    assert torch.equal(gd, gb)
    gV2, gd2 = fold_weights_backward(gW, gb, U, c)
    assert torch.equal(gV, gV2) and torch.equal(gd, gd2)


def assert_one_rounding(got, want64):
    """got is want64 rounded once to got's dtype: within one ulp (plus float32 accumulation noise)."""
    want = want64.double()
    ulp = torch.finfo(got.dtype).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))))
    slack = 1e-6 * want.abs().max()
    assert ((got.double() - want).abs() <= ulp + slack).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("uc_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("shape", [(6, 17, 2, 3), (3, 40)], ids=str)
def test_fold_half_precision(device, dtype, uc_dtype, shape):
    """Float32 accumulation, one rounding to dtype, and the error against float64 at most 2x that
    of the same computation in plain torch at dtype.

    The interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest even), so
    there bfloat16 is held to the one-rounding bound only.
    """
    uc_dtype = dtype if uc_dtype == "same" else uc_dtype
    V, d, U, c = make_fold_inputs(shape, "sliced", dtype, device, uc_dtype)
    W, b = poisoned_fold(V, d, U, c)
    assert W.dtype == dtype and b.dtype == dtype
    eW, eb = reference.fold(*f64(V, d, U, c))
    assert_one_rounding(W, eW)
    assert_one_rounding(b, eb)
    gV, gd = poisoned_fold_backward(V, d, U, c)
    egV, _ = reference.fold_backward(*f64(V, d, U, c))
    assert gV.dtype == dtype and torch.equal(gd, d)
    assert_one_rounding(gV, egV)
    if ops.INTERPRETED and dtype == torch.bfloat16:
        return
    tW, tb = reference.fold(V, d, U.to(dtype), c.to(dtype))  # plain torch at dtype
    tgV, _ = reference.fold_backward(V, d, U.to(dtype), c.to(dtype))
    assert rel_err(W, eW) <= 2 * rel_err(tW, eW) + 1e-6
    assert rel_err(b, eb) <= 2 * rel_err(tb, eb) + 1e-6
    assert rel_err(gV, egV) <= 2 * rel_err(tgV, egV) + 1e-6


def test_fold_float64_accumulates_in_float64(device):
    V, d, U, c = make_fold_inputs((4, 9, 2, 2), "sliced", torch.float64, device, torch.float64)
    W, b = poisoned_fold(V, d, U, c)
    eW, eb = reference.fold(V, d, U, c)
    torch.testing.assert_close(W, eW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, eb, rtol=1e-12, atol=1e-12)


def test_fold_rejects_bad_arguments():
    V, U, c = torch.randn(4, 3, 3, 3), torch.randn(3, 3), torch.randn(3)
    with pytest.raises(ValueError, match="U must"):
        fold_weights(V, None, torch.randn(4, 4), c)
    with pytest.raises(ValueError, match="c must"):
        fold_weights(V, None, U, torch.randn(4))
    with pytest.raises(ValueError, match="d must"):
        fold_weights(V, torch.randn(3), U, c)
    with pytest.raises(ValueError, match="V must"):
        fold_weights(torch.randn(4, 3, 3), None, U, c)
    with pytest.raises(TypeError, match="V must"):
        fold_weights(V.int(), None, U, c)


# --- ops: opcheck, autograd, the whitened conv, torch.compile ----------------------------------


def test_op_schemas():
    assert str(torch.ops.prong_ext.fold.default._schema) == (
        'prong_ext::fold(Tensor V, Tensor? d, Tensor U, Tensor c, str precision="ieee") -> (Tensor, Tensor)'
    )
    assert str(torch.ops.prong_ext.fold_backward.default._schema) == (
        "prong_ext::fold_backward(Tensor gW, Tensor gb, Tensor U, Tensor c, "
        'str precision="ieee") -> (Tensor, Tensor)'
    )
    schema = torch.ops.prong_ext.cov_accumulate.default._schema
    assert [a.name for a in schema.arguments] == ["x", "shift", "s1", "s2", "allow_tf32", "precision"]
    assert [a.is_write for a in schema.arguments if a.alias_info] == [True, True]
    assert schema.returns == []


def cov_samples(device):
    for x in (make_x("2d", 5, 37, device=device), make_x("channels_last", 3, 37, device=device).half()):
        C = x.shape[1]
        shift = rows64(x)[0].float()
        yield (x, shift, torch.randn(C, device=device), sym(C, device)), {}
    yield (make_x("nchw_sliced", 4, 37, device=device), torch.zeros(4, device=device),
           torch.zeros(4, device=device), torch.zeros(4, 4, device=device)), {"allow_tf32": True}  # fmt: skip


def fold_samples(device):
    for shape, layout, has_d in (((4, 3, 3, 3), "channels_last", True), ((5, 6), "sliced", False)):
        V, d, U, c = make_fold_inputs(shape, layout, torch.float32, device)
        yield (V.requires_grad_(), d.requires_grad_() if has_d else None, U, c)


def test_opcheck_cov_accumulate(device):
    for args, kwargs in cov_samples(device):
        torch.library.opcheck(torch.ops.prong_ext.cov_accumulate.default, args, kwargs)


def test_opcheck_fold(device):
    for args in fold_samples(device):
        torch.library.opcheck(torch.ops.prong_ext.fold.default, args)


def test_opcheck_fold_backward(device):
    for V, _, U, c in fold_samples(device):
        gb = torch.randn(V.shape[0], device=device)
        torch.library.opcheck(torch.ops.prong_ext.fold_backward.default, (V.detach(), gb, U, c))


def test_ops_match_kernels(device):
    V, d, U, c = make_fold_inputs((4, 3, 3, 3), "sliced", torch.float32, device)
    W, b = ops.fold(V, d, U, c)
    W0, b0 = fold_weights(V, d, U, c)
    assert torch.equal(W, W0) and torch.equal(b, b0)
    gV, gd = ops.fold_backward(W, b, U, c)
    assert torch.equal(gV, fold_weights_backward(W, b, U, c)[0]) and torch.equal(gd, b)
    x = make_x("channels_last", 3, 37, device=device)
    shift = rows64(x)[0].float()
    s1a, s1b = torch.zeros(3, device=device), torch.zeros(3, device=device)
    s2a, s2b = torch.zeros(3, 3, device=device), torch.zeros(3, 3, device=device)
    ops.cov_accumulate(x, shift, s1a, s2a)
    cov_accumulate(x, shift, s1b, s2b)
    assert torch.equal(s1a, s1b) and torch.equal(s2a, s2b) and s2a.abs().sum() > 0


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 6)], ids=str)
def test_ops_take_the_torch_path_where_triton_does_not_run(device, shape, monkeypatch):
    """Tensors on a device Triton does not run on (CPU tensors with compiled Triton) take the torch
    forms at the kernels' accumulation dtype, float32 here: within the bounds of its sums."""
    monkeypatch.setattr(ops, "_runs_triton", lambda t: False)
    V, d, U, c = make_fold_inputs(shape, "sliced", torch.float32, device)
    W, b = ops.fold(V, d, U, c)
    eW, eb = reference.fold(*f64(V, d, U, c))
    aW, ab = reference.fold(*f64(V.abs(), d.abs(), U.abs(), -c.abs()))
    n, terms = V.shape[1], V[0].numel()  # b sums W over the taps, then with c
    assert W.dtype == b.dtype == torch.float32 and W.is_contiguous()
    assert_within(W, eW, 2 * (n + 1) * F32_U * aW)
    assert_within(b, eb, 2 * (n + terms + 2) * F32_U * ab)
    gV, gd = ops.fold_backward(V, d, U, c)
    egV, _ = reference.fold_backward(*f64(V, d, U, c))
    agV, _ = reference.fold_backward(*f64(V.abs(), d.abs(), U.abs(), -c.abs()))
    assert_within(gV, egV, 2 * (n + 2) * F32_U * agV)
    assert torch.equal(gd, d) and gd.data_ptr() != d.data_ptr()
    x = make_x("channels_last", 3, 37, device=device)
    shift = rows64(x)[0].float()
    s1, s2 = torch.randn(3, device=device), sym(3, device)
    e1, e2 = shifted_sums64(x, shift)
    e1, e2 = e1 + s1.double(), e2 + s2.double()
    b1, b2 = shifted_sums_bound(x, shift, s1, s2)
    ops.cov_accumulate(x, shift, s1, s2)
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (3, 2)], ids=str)
@pytest.mark.parametrize("has_d", [True, False])
def test_fold_gradcheck(device, shape, has_d):
    V, d, U, c = make_fold_inputs(shape, "sliced", torch.float64, device, torch.float64)
    V.requires_grad_()
    if has_d:
        d.requires_grad_()
        inputs, fn = (V, d), lambda V, d: ops.fold(V, d, U, c)
    else:
        inputs, fn = (V,), lambda V: ops.fold(V, None, U, c)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    if not has_d:
        W, b = ops.fold(V, None, U, c)
        (W.sum() + b.sum()).backward()
        assert V.grad is not None


def whitened_conv(x, V, d, U, c, stride, padding, dilation):
    return F.conv2d(x, *ops.fold(V, d, U, c), stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [((1, 1), (1, 1), (1, 1)), ((2, 1), (2, 1), (2, 1))], ids=str
)
def test_whitened_conv_matches_two_conv_reference(device, stride, padding, dilation):
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, device=device).requires_grad_()
    V, d, U, c = make_fold_inputs((4, 5, 3, 3), "sliced", torch.float64, device, torch.float64)
    V.requires_grad_()
    d.requires_grad_()
    args = (U, c, stride, padding, dilation)
    got = whitened_conv(x, V, d, *args)
    want = reference.whitened_conv2d(x, V, d, *args)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, V, d), g)
    ref_grads = torch.autograd.grad(want, (x, V, d), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_whitened_conv_gradcheck(device):
    """Gradients reach V and d through the fold (x's gradient is conv2d's own, checked above)."""
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=device)
    V, d, U, c = make_fold_inputs((2, 2, 2, 2), "contiguous", torch.float64, device, torch.float64)
    V.requires_grad_()
    d.requires_grad_()
    fn = lambda V, d: whitened_conv(x, V, d, U, c, (1, 2), (1, 1), (1, 1))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (V, d))


def test_whitened_conv_compiles(device):
    x = torch.randn(2, 3, 6, 5, device=device)
    V, d, U, c = make_fold_inputs((4, 3, 3, 3), "contiguous", torch.float32, device)
    V.requires_grad_()
    d.requires_grad_()

    def f(x, V, d):
        return whitened_conv(x, V, d, U, c, (1, 1), (1, 1), (1, 1)).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, V, d)
    gV, gd = torch.autograd.grad(loss, (V, d))
    loss_ref = f(x, V, d)
    rV, rd = torch.autograd.grad(loss_ref, (V, d))
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gV, rV)
    torch.testing.assert_close(gd, rd)


@pytest.mark.parametrize("mode", ["atomics", "two_stage"])
def test_cov_accumulate_compiles(device, programs, deterministic, mode):
    """The op under torch.compile(fullgraph=True) updates s1 and s2 in place as in eager: several
    row splits, added with atomics or (deterministic algorithms) summed after the launch; on CUDA
    the launches are traced through wrap_triton."""
    programs(device)
    C = 12
    x = make_x("channels_last", C, 4096, device=device)
    shift = rows64(x)[0].float()
    zeros = torch.zeros(C, device=device), torch.zeros(C, C, device=device)
    assert cov_accumulate_launches(x, shift, *zeros)[0].grid[1] > 1

    def f(x, shift, s1, s2):
        ops.cov_accumulate(x, shift, s1, s2)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    s1, s2 = torch.randn(C, device=device), sym(C, device)
    e1, e2 = shifted_sums64(x, shift)
    e1, e2 = e1 + s1.double(), e2 + s2.double()
    b1, b2 = shifted_sums_bound(x, shift, s1, s2)
    with deterministic() if mode == "two_stage" else contextlib.nullcontext():
        compiled(x, shift, s1, s2)
    assert_within(s1, e1, b1)
    assert_within(s2, e2, b2)
    if mode == "two_stage":
        assert torch.equal(s2, s2.T)
