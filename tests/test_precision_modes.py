"""The precision modes of the Triton kernels' products: precision="ieee" (the default) and "tf32x3".

On a GPU (`cuda` cases, TRITON_INTERPRET=0) the contract of triton_kernels/precision.py: with
precision="tf32x3" the error against float64 is at most twice that of the same computation in plain
torch at the inputs' precision (float32 matmul with TF32 off; 16-bit operands and a 16-bit result),
for the covariance sums, the fold W = V U and its gradient.

Under the interpreter (the CPU cases) the tf32x3 dot computes in full float32 like every other dot
(numpy), so those cases test no accuracy of the tensor cores: only that the option reaches the
kernels with its tiles, warps and 16-bit operands, that those tiles compute the right sums, and
that bad values are refused with a message naming the option and the allowed values.
"""

import pytest
import torch

from helpers import assert_within, gamma, unit_roundoff
from prong_ext import _triton_ops as triton_ops
from prong_ext import nn as pnn
from prong_ext import ops, reference
from prong_ext._common import rows
from prong_ext.triton_kernels.covariance import MAX_ROWS, cov_accum_kernel, cov_accumulate_launches
from prong_ext.triton_kernels.precision import PRECISIONS
from prong_ext.triton_kernels.whiten_conv import (
    fold_bwd_kernel,
    fold_kernel,
    fold_weights_backward_launch,
    fold_weights_launch,
)

BAD = "precision='fast' is not one of \\('ieee', 'tf32x3'\\)"
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def gpu():
    """The compiled kernels on CUDA, with torch's matmuls at full precision: no TF32 and no
    reduced-precision reductions of 16-bit products, so that the torch side of the contract is
    as accurate as torch gets."""
    if triton_ops.INTERPRETED:
        pytest.skip("run with TRITON_INTERPRET=0 to test the compiled kernels")
    flags = torch.backends.cuda.matmul
    saved = (
        flags.allow_tf32,
        flags.allow_fp16_reduced_precision_reduction,
        flags.allow_bf16_reduced_precision_reduction,
    )
    flags.allow_tf32 = False
    flags.allow_fp16_reduced_precision_reduction = False
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield "cuda"
    finally:
        (
            flags.allow_tf32,
            flags.allow_fp16_reduced_precision_reduction,
            flags.allow_bf16_reduced_precision_reduction,
        ) = saved


@pytest.fixture
def setting():
    """ops.set_matmul_precision, restored after the test."""
    before = ops.get_matmul_precision()
    yield ops.set_matmul_precision
    ops.set_matmul_precision(before)


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches of the torch.library ops, recorded as (kernel name, kwargs) and run."""
    seen = []
    launch = triton_ops._launch

    def record(kernel, grid, kwargs):
        seen.append((kernel.fn.__name__, kwargs))
        launch(kernel, grid, kwargs)

    monkeypatch.setattr(triton_ops, "_launch", record)
    return seen


def bias_roundings(shape):
    """The longest chain of float32 roundings of the fold's b = d - sum_{j, t} V[o, j, t] (U c)[j]:
    I for each (U c)[j], I * taps for the sum over (j, t), 2 for d and the final rounding."""
    taps = shape[2] * shape[3] if len(shape) == 4 else 1
    return shape[1] + shape[1] * taps + 2


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def rows64(x):
    """(M, C) float64 rows of an (M, C) or (N, C, H, W) input."""
    x = x.double()
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


def make_x(shape, layout, dtype, device, mean=3.0):
    """Random rows with a mean far from 0 (and different per feature), in the given layout."""
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[1])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    offsets = mean + 0.1 * torch.arange(shape[1], dtype=torch.float64)
    x += offsets.view(-1, *([1] * (len(shape) - 2)))
    x = x.to(dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def whitening_inputs(shape, dtype, u_dtype, device):
    """V with V's init scale, a whitening U of a random covariance (PCA form), c and d."""
    O, I = shape[:2]
    g = torch.Generator().manual_seed(O * 7 + I)
    fan_in = I * (shape[2] * shape[3] if len(shape) == 4 else 1)
    V = torch.randn(shape, generator=g, dtype=torch.float64) / fan_in**0.5
    h = torch.randn(4 * I, I, generator=g, dtype=torch.float64) @ torch.randn(
        I, I, generator=g, dtype=torch.float64
    )
    lam, q = torch.linalg.eigh(torch.cov(h.T).reshape(I, I))
    U = (lam.clamp_min(0) + 1e-3).rsqrt()[:, None] * q.T
    c = torch.randn(I, generator=g, dtype=torch.float64) + 1.0
    d = torch.randn(O, generator=g, dtype=torch.float64) * 0.1
    return V.to(device, dtype), d.to(device, dtype), U.to(device, u_dtype), c.to(device, u_dtype)


# --- the option and its values -----------------------------------------------------------------


def test_the_modes_and_the_default():
    assert PRECISIONS == ("ieee", "tf32x3")
    assert ops.get_matmul_precision() == "ieee"
    assert ops.CovarianceAccumulator(3).precision == "ieee"


def test_bad_values_raise_naming_the_option_and_the_allowed_values():
    x, V, U, c = torch.randn(6, 3), torch.randn(4, 3), torch.eye(3), torch.zeros(3)
    s1, s2 = torch.zeros(3), torch.zeros(3, 3)
    calls = [
        lambda: ops.set_matmul_precision("fast"),
        lambda: ops.covariance(x, precision="fast"),
        lambda: ops.covariance(x, backend="torch", precision="fast"),
        lambda: ops.CovarianceAccumulator(3, precision="fast"),
        lambda: ops.fold(V, None, U, c, precision="fast"),
        lambda: ops.fold(V, None, U, c, backend="triton", precision="fast"),
        lambda: ops.whitened_linear(x, V, None, U, c, precision="fast"),
        lambda: ops.whitened_conv2d(
            torch.randn(1, 3, 4, 4), V[:, :, None, None], None, U, c, precision="fast"
        ),
        lambda: triton_ops.cov_accumulate(x, torch.zeros(3), s1, s2, precision="fast"),
        lambda: triton_ops.fold(V, None, U, c, precision="fast"),
        lambda: triton_ops.fold_backward(V, torch.zeros(4), U, c, precision="fast"),
        lambda: cov_accumulate_launches(x, torch.zeros(3), s1, s2, precision="fast"),
        lambda: fold_weights_launch(V, None, U, c, V.clone(), torch.zeros(4), precision="fast"),
        lambda: fold_weights_backward_launch(
            V, torch.zeros(4), U, c, V.clone(), torch.zeros(4), precision="fast"
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=BAD):
            call()
    for wrong in ("TF32x3", "tf32", "highest", None, 3):
        with pytest.raises(ValueError, match="precision=.* is not one of"):
            ops.set_matmul_precision(wrong)
    with pytest.raises(ValueError, match="allow_tf32=True .* precision='tf32x3'"):
        triton_ops.cov_accumulate(x, torch.zeros(3), s1, s2, allow_tf32=True, precision="tf32x3")
    assert ops.get_matmul_precision() == "ieee"  # nothing was set


# --- the option reaches the kernels ------------------------------------------------------------


def test_default_launches_are_the_ieee_ones(device, launches):
    x = make_x((50, 40), "2d", torch.float32, device)
    ops.covariance(x, backend="triton")
    V, d, U, c = whitening_inputs((5, 40), torch.float32, torch.float32, device)
    V.requires_grad_()
    W, b = ops.fold(V, d, U, c, backend="triton")
    W.sum().backward()
    assert [name for name, _ in launches] == ["cov_accum_kernel", "fold_kernel", "fold_bwd_kernel"]
    for _, kwargs in launches:
        assert kwargs["INPUT_PRECISION"] == "ieee" and "num_warps" not in kwargs
    assert launches[0][1]["BLOCK_R"] == 32 and launches[0][1]["BLOCK_C"] == 32
    assert not launches[1][1]["HALF_DOT"]


@pytest.mark.parametrize("how", ["argument", "setting"])
def test_tf32x3_reaches_every_kernel(device, launches, setting, how):
    """By the keyword, or by set_matmul_precision (precision=None): the covariance launch, the
    fold's, and the backward and double backward of the fold (the forward's precision)."""
    kw = {"precision": "tf32x3"} if how == "argument" else {}
    if how == "setting":
        setting("tf32x3")
    x = make_x((50, 40), "2d", torch.float32, device)
    ops.covariance(x, backend="triton", **kw)
    V, d, U, c = whitening_inputs((5, 40), torch.float32, torch.float32, device)
    V.requires_grad_()
    W, b = ops.fold(V, d, U, c, backend="triton", **kw)
    (gV,) = torch.autograd.grad((W * W).sum(), V, create_graph=True)
    gV.sum().backward()
    names = [name for name, _ in launches]
    assert names == ["cov_accum_kernel", "fold_kernel", "fold_bwd_kernel", "fold_kernel", "fold_bwd_kernel"]
    for _, kwargs in launches:
        assert kwargs["INPUT_PRECISION"] == "tf32x3"
    cov = launches[0][1]
    assert (cov["BLOCK_R"], cov["BLOCK_C"], cov["num_warps"]) == (16, 64, 8)
    fold = launches[1][1]
    assert (fold["BLOCK_R"], fold["BLOCK_I"], fold["BLOCK_K"]) == (64, 32, 16) and "num_warps" not in fold


def test_narrow_covariance_tiles_keep_four_warps(device, launches):
    for C, block_c in ((3, 16), (17, 32), (33, 64)):
        ops.covariance(make_x((40, C), "2d", torch.float32, device), backend="triton", precision="tf32x3")
        kwargs = launches[-1][1]
        assert kwargs["BLOCK_C"] == block_c
        assert kwargs.get("num_warps") == (8 if block_c == 64 else None)


@pytest.mark.parametrize("dtype", HALF)
def test_fold_multiplies_16_bit_V_and_U_as_they_are(device, launches, dtype):
    """16-bit V and U of one dtype: HALF_DOT (their own products); with float32 U, or in the
    backward (whose operand gW - gb c^T is float32): tf32x3 products of float32 values. Not for
    bfloat16 under the interpreter, whose dot takes bfloat16 operands for their raw bits."""
    same = not (triton_ops.INTERPRETED and dtype == torch.bfloat16)
    for u_dtype, half_dot in ((dtype, same), (torch.float32, False)):
        V, d, U, c = whitening_inputs((6, 20), dtype, u_dtype, device)
        V.requires_grad_()
        W, _ = ops.fold(V, d, U, c, backend="triton", precision="tf32x3")
        W.sum().backward()
        (_, fwd), (_, bwd) = launches[-2:]
        assert fwd["HALF_DOT"] is half_dot and fwd["INPUT_PRECISION"] == "tf32x3"
        assert "HALF_DOT" not in bwd and bwd["INPUT_PRECISION"] == "tf32x3"


def test_float64_fold_ignores_tf32x3(device, launches):
    V, d, U, c = whitening_inputs((4, 9, 2, 2), torch.float64, torch.float64, device)
    W, b = ops.fold(V, d, U, c, backend="triton", precision="tf32x3")
    assert launches[-1][1]["INPUT_PRECISION"] == "ieee" and launches[-1][1]["ACC_F64"]
    eW, eb = reference.fold(V, d, U, c)
    torch.testing.assert_close(W, eW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, eb, rtol=1e-12, atol=1e-12)


def test_the_setting_reaches_the_layers_and_new_accumulators(monkeypatch, setting):
    """The whitened layers' forward folds with set_matmul_precision's value (through ops.fold),
    an accumulator made after the setting keeps it, an explicit precision wins over it."""
    passed = []
    fold = ops.fold

    def spy(*args, **kwargs):
        passed.append(kwargs.get("precision"))
        return fold(*args, **kwargs)

    monkeypatch.setattr(ops, "fold", spy)
    linear, conv = pnn.WhitenedLinear(3, 4), pnn.WhitenedConv2d(3, 4, 3, padding=1)
    linear(torch.randn(8, 3))
    conv(torch.randn(2, 3, 5, 5))
    before = ops.CovarianceAccumulator(3)
    setting("tf32x3")
    linear(torch.randn(8, 3))
    conv(torch.randn(2, 3, 5, 5))
    ops.whitened_linear(torch.randn(8, 3), linear.V, linear.d, linear.U, linear.c, precision="ieee")
    assert passed == ["ieee", "ieee", "tf32x3", "tf32x3", "ieee"]
    assert before.precision == "ieee"
    assert ops.CovarianceAccumulator(3).precision == "tf32x3"
    assert ops.CovarianceAccumulator(3, precision="ieee").precision == "ieee"


def test_the_accumulator_launches_with_its_precision(device, launches, setting):
    acc = ops.CovarianceAccumulator(40, backend="triton", precision="tf32x3")
    setting("ieee")
    for seed in range(2):
        acc.update(make_x((30 + seed, 40), "2d", torch.float32, device))
    assert [kwargs["INPUT_PRECISION"] for _, kwargs in launches] == ["tf32x3", "tf32x3"]


def test_changing_the_setting_retraces_compiled_code(setting):
    """precision=None is read while Dynamo traces (a guarded module global): a compiled layer
    call follows a later set_matmul_precision instead of keeping the traced value."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda x, V, U, c: ops.whitened_linear(x, V, None, U, c), backend=counter)
    args = (torch.randn(8, 3), torch.randn(4, 3), torch.eye(3), torch.zeros(3))
    f(*args)
    f(*args)
    assert counter.frame_count == 1
    setting("tf32x3")
    f(*args)
    assert counter.frame_count == 2


def test_opcheck_with_tf32x3(device):
    x = make_x((37, 20), "2d", torch.float32, device)
    cov_args = (x, rows64(x)[0].float(), torch.zeros(20, device=device), torch.zeros(20, 20, device=device))
    torch.library.opcheck(torch.ops.prong_ext.cov_accumulate.default, cov_args, {"precision": "tf32x3"})
    for dtype, u_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16)):
        V, d, U, c = whitening_inputs((4, 20, 3, 3), dtype, u_dtype, device)
        if dtype == torch.float32:
            V, d = V.requires_grad_(), d.requires_grad_()
        torch.library.opcheck(torch.ops.prong_ext.fold.default, (V, d, U, c), {"precision": "tf32x3"})
        gb = torch.randn(4, device=device, dtype=dtype)
        torch.library.opcheck(
            torch.ops.prong_ext.fold_backward.default, (V.detach(), gb, U, c), {"precision": "tf32x3"}
        )


def test_gradcheck_with_tf32x3(device):
    """float64 inputs take float64 products in every mode: the autograd formulas with the
    precision argument, to second order."""
    V, d, U, c = whitening_inputs((2, 3, 2, 1), torch.float64, torch.float64, device)
    V, d = V.requires_grad_(), d.requires_grad_()

    def f(V, d):
        return triton_ops.fold(V, d, U, c, precision="tf32x3")

    assert torch.autograd.gradcheck(f, (V, d))
    assert torch.autograd.gradgradcheck(f, (V, d))


# --- the tf32x3 tiles compute the right sums ---------------------------------------------------
# In the interpreter these dots are float32 numpy matmuls: the bounds below are those of float32
# sums in any order (Higham 3.1), and hold for the tiles, row blocks, row splits, inputs cut into
# several launches and 16-bit operands of the tf32x3 launches. On a GPU the contract tests below are the ones.


@pytest.mark.parametrize(
    ("shape", "layout", "splits", "max_rows", "n_launches"),
    [
        ((45, 3), "2d", None, MAX_ROWS, 1),
        ((4, 40, 4, 5), "nchw", 3, MAX_ROWS, 1),
        ((3, 70, 4, 4), "channels_last", 2, 32, 2),  # two images a launch, then one
        ((130, 129), "2d", None, 50, 3),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_tf32x3_covariance_tiles(device, shape, layout, splits, max_rows, n_launches, dtype):
    if device == "cuda" and dtype != torch.float32:
        pytest.skip("the contract tests cover 16-bit inputs on CUDA")
    x = make_x(shape, layout, dtype, device)
    C = shape[1]
    y = rows64(x)
    shift = y[0].float()
    s1 = torch.randn(C, device=device)  # the kernel adds onto what is there
    s2 = torch.randn(C, C, device=device)
    s2 = s2 + s2.T
    yc = y - shift.double()
    e1, e2 = yc.sum(0) + s1.double(), yc.T @ yc + s2.double()
    g = 2 * gamma(y.shape[0] + 2)
    b1, b2 = g * (yc.abs().sum(0) + s1.double().abs()), g * (yc.abs().T @ yc.abs() + s2.double().abs())
    launches = cov_accumulate_launches(
        x, shift, s1, s2, precision="tf32x3", num_splits=splits, max_rows=max_rows
    )
    assert len(launches) == n_launches
    assert splits is None or launches[0].grid[1] == splits
    for launch in launches:
        cov_accum_kernel[launch.grid](**launch.kwargs)
        launch.finish()
    assert_within(s1, e1, b1, "s1")
    assert_within(s2, e2, b2, "s2")


def poisoned(launch, kernel, weight, vector, U, c, **kw):
    """A fold launch's two outputs, NaN before the kernel writes them."""
    out = torch.full(weight.shape, float("nan"), dtype=weight.dtype, device=weight.device)
    vec = torch.full((weight.shape[0],), float("nan"), dtype=weight.dtype, device=weight.device)
    grid, kwargs = launch(weight, vector, U, c, out, vec, **kw)
    assert kwargs["ROWS_I32"] is (kw["precision"] == "tf32x3" and not kw["rows_i64"])
    kernel[grid](**kwargs)
    return out, vec


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rows_i64", [False, True], ids=["rows_i32", "rows_i64"])
@pytest.mark.parametrize("shape", [(5, 1), (70, 17, 3, 3), (3, 130)], ids=str)
@pytest.mark.parametrize(("dtype", "u_dtype"), [(torch.float32, torch.float32), *((h, h) for h in HALF)])
def test_fold_tiles(device, shape, dtype, u_dtype, rows_i64, precision):
    """The tiles of both modes; for tf32x3 with 32-bit row splits and with int64 ones (the path
    of weights past 2^31 rows, forced here on small ones)."""
    V, d, U, c = whitening_inputs(shape, dtype, u_dtype, device)
    kw = {"precision": precision, "rows_i64": rows_i64}
    W, b = poisoned(fold_weights_launch, fold_kernel, V, d, U, c, **kw)
    gV, gd = poisoned(fold_weights_backward_launch, fold_bwd_kernel, V, d, U, c, **kw)
    eW, eb = reference.fold(*(t.double() for t in (V, d, U, c)))
    egV, _ = reference.fold_backward(*(t.double() for t in (V, d, U, c)))
    aW, ab = reference.fold(*(t.double().abs() for t in (V, d, U)), -c.double().abs())
    agV, _ = reference.fold_backward(*(t.double().abs() for t in (V, d, U)), -c.double().abs())
    n = shape[1]
    # float32 sums of n products, then one rounding to V's dtype: within one ulp (the interpreter
    # rounds float32 to bfloat16 by truncation)
    one = torch.finfo(dtype).eps if dtype in HALF else 0.0
    assert_within(W, eW, 2 * gamma(n + 1) * aW + one * eW.abs(), "W")
    assert_within(b, eb, 2 * gamma(bias_roundings(shape)) * ab + one * eb.abs(), "b")
    assert_within(gV, egV, 2 * gamma(n + 2) * agV + one * egV.abs(), "gV")
    assert torch.equal(gd, d)


# --- the contract, on a GPU --------------------------------------------------------------------

COV_SHAPES = [
    ((300, 17), "2d"),
    ((8, 64, 16, 16), "nchw"),
    ((4, 130, 12, 12), "channels_last"),
    ((2048, 256), "2d"),
    ((64, 96, 32, 32), "nchw"),  # 65536 rows in many row splits (atomics)
]


@pytest.mark.cuda
@pytest.mark.parametrize(("shape", "layout"), COV_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_covariance_contract(gpu, shape, layout, dtype):
    """s2 with precision="tf32x3" within twice the error of torch's (x - shift)^T (x - shift) at
    x's precision, against float64, and (the kernel's products are of float32 values for every x)
    within twice that of torch's float32 product of x.float() - shift."""
    x = make_x(shape, layout, dtype, gpu)
    y = rows64(x)
    if dtype in HALF and y.shape[0] > 8192:
        pytest.skip("a 16-bit s2 of that many rows would overflow float16 in torch")
    shift = y[0].float()  # the accumulator's first shift; a 16-bit value, exact in both dtypes
    yc = y - shift.double()
    e2 = yc.T @ yc
    C = shape[1]

    def kernel(**kw):
        s1, s2 = torch.zeros(C, device=gpu), torch.zeros(C, C, device=gpu)
        triton_ops.cov_accumulate(x, shift, s1, s2, **kw)
        return s1, s2

    s1, s2 = kernel(precision="tf32x3")
    t = rows(x) - shift.to(dtype)  # plain torch at x's precision
    t2 = t.T @ t
    assert torch.isfinite(t2).all()
    assert rel_err(s2, e2) <= 2 * rel_err(t2, e2)
    t32 = rows(x).float() - shift
    assert rel_err(s2, e2) <= 2 * rel_err(t32.T @ t32, e2)
    g = 2 * gamma(y.shape[0] + 2)
    assert_within(s1, yc.sum(0), g * yc.abs().sum(0), "s1")


@pytest.mark.cuda
def test_tf32x3_is_not_single_tf32(gpu):
    """On the tensor cores tf32x3 is float32-accurate where single TF32 products (allow_tf32)
    lose about 3 digits: a check that the three-product split really runs."""
    x = make_x((300, 17), "2d", torch.float32, gpu)
    shift = x[0].clone()
    yc = rows64(x) - shift.double()
    e2 = yc.T @ yc
    errs = {}
    for kw in ({"precision": "tf32x3"}, {"allow_tf32": True}):
        s1, s2 = torch.zeros(17, device=gpu), torch.zeros(17, 17, device=gpu)
        triton_ops.cov_accumulate(x, shift, s1, s2, **kw)
        errs[next(iter(kw))] = rel_err(s2, e2)
    assert errs["precision"] < errs["allow_tf32"] / 30


FOLD_SHAPES = [(64, 64), (96, 130, 3, 3), (256, 256), (512, 128, 1, 1), (33, 300, 3, 3)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", FOLD_SHAPES, ids=str)
@pytest.mark.parametrize(
    ("dtype", "u_dtype"),
    [(torch.float32, torch.float32), *((h, h) for h in HALF), *((h, torch.float32) for h in HALF)],
    ids=str,
)
def test_fold_contract(gpu, shape, dtype, u_dtype):
    """W and the backward's gV with precision="tf32x3" within twice the error of torch's
    products at V's precision (reference.fold and fold_backward in V's dtype, TF32 off), against
    float64; b (FMA products in both modes) within the float32 bound."""
    V, d, U, c = whitening_inputs(shape, dtype, u_dtype, gpu)
    W, b = triton_ops.fold(V, d, U, c, precision="tf32x3")
    gV, gd = triton_ops.fold_backward(V, d, U, c, precision="tf32x3")
    f64 = [t.double() for t in (V, d, U, c)]
    eW, eb = reference.fold(*f64)
    egV, _ = reference.fold_backward(*f64)
    same = [t.to(dtype) for t in (V, d, U, c)]  # plain torch at V's precision
    tW, _ = reference.fold(*same)
    tgV, _ = reference.fold_backward(*same)
    assert rel_err(W, eW) <= 2 * rel_err(tW, eW)
    assert rel_err(gV, egV) <= 2 * rel_err(tgV, egV)
    aW, ab = reference.fold(*(t.abs() for t in f64[:3]), -f64[3].abs())
    one = unit_roundoff(dtype) if dtype in HALF else 0.0  # b rounded once to V's dtype
    assert_within(b, eb, 2 * gamma(bias_roundings(shape)) * ab + one * eb.abs(), "b")
    assert torch.equal(gd, d)


@pytest.mark.cuda
def test_whitened_layers_with_tf32x3_match_ieee(gpu, setting):
    """A whitened conv's forward and backward through the tf32x3 fold against the ieee fold:
    the same layer output and gradients to a few float32 roundings of their sizes."""
    layer = pnn.WhitenedConv2d(64, 96, 3, padding=1).to(gpu)
    V, d, U, c = whitening_inputs((96, 64, 3, 3), torch.float32, torch.float32, gpu)
    with torch.no_grad():
        for name, value in (("V", V), ("d", d), ("U", U), ("c", c)):
            getattr(layer, name).copy_(value)
    x = make_x((16, 64, 8, 8), "nchw", torch.float32, gpu)
    outs = []
    for precision in PRECISIONS:
        setting(precision)
        out = layer(x)
        out.square().sum().backward()
        outs.append((out.detach(), layer.V.grad.clone(), layer.d.grad.clone()))
        layer.zero_grad()
    for ieee, fast in zip(*outs):
        assert rel_err(fast, ieee) < 1e-5


# --- the benchmark cases -----------------------------------------------------------------------


def test_benchmark_cases_with_tf32x3(monkeypatch):
    """bench_covariance and bench_whitened time "prong-tf32x3" on CUDA at the full size only (the
    quick size of the GPU check keeps its cases); its runners are prong's with the precision, so
    on the CPU, where the torch path ignores it, they give prong's results."""
    import dataclasses
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_covariance
    import bench_whitened

    for module in (bench_covariance, bench_whitened):
        assert module.TENSOR_CORES in {case.impl for case in module.cases("full", "cuda")}
        for size, device in (("quick", "cuda"), ("full", "cpu"), ("tiny", "cpu")):
            assert module.TENSOR_CORES not in {case.impl for case in module.cases(size, device)}
        for case in module.cases("tiny", "cpu"):
            if case.impl != "prong":
                continue
            fast = dataclasses.replace(case, impl=module.TENSOR_CORES)
            got, want = module.make_runner(fast, "cpu")(), module.make_runner(case, "cpu")()
            flat_got, flat_want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
            assert len(flat_got) == len(flat_want)
            for a, b in zip(flat_got, flat_want):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
