"""Small models and comparisons shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn


def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16, bias=bias), nn.Tanh(), nn.Linear(16, 9, bias=bias), nn.Tanh(), nn.Linear(9, 5)
    )


def cnn(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=bias),
        nn.ReLU(),
        nn.Conv2d(6, 5, 1, bias=bias),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
    )


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def grouped_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


MODELS = {
    "mlp": (mlp, (12,)),
    "mlp_nobias": (lambda: mlp(bias=False), (12,)),
    "cnn": (cnn, (3, 8, 8)),
    "cnn_nobias": (lambda: cnn(bias=False), (3, 8, 8)),
    "bn_cnn": (bn_cnn, (3, 8, 8)),
    "grouped_cnn": (grouped_cnn, (4, 8, 8)),
}


def data(shape, n=64, seed=1):
    """Inputs with a non-zero mean and correlated features, so whitening does something."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    mix = torch.randn(shape[0], shape[0], generator=g) / shape[0] ** 0.5
    x = torch.einsum("ij,nj...->ni...", torch.eye(shape[0]) + mix, x)
    return x + 0.5 + torch.arange(shape[0]).view(-1, *([1] * (len(shape) - 1))) * 0.1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output in eval mode (BN on running statistics), training mode restored."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(mode)
    return out


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to `dtype`."""
    return torch.finfo(dtype).eps / 2


def tol(dtype: torch.dtype, n: int = 1, scale: float = 1.0) -> dict:
    """rtol and atol for torch.testing.assert_close of a result computed in `dtype` (float32 state,
    say) against a more precise reference, from the precision instead of assert_close's defaults.

    A sum or dot product of n terms computed in `dtype` is off by at most gamma_n * sum |a_i b_i|,
    gamma_n = n u / (1 - n u) ~ n u (Higham, Accuracy and Stability of Numerical Algorithms, 3.1),
    in whatever order the terms are added: the bound holds for every BLAS blocking, SIMD width and
    number of threads, where a tolerance fitted to one machine's rounding does not. `n` counts the
    roundings that can add up along the longest chain (the reduction length, plus one per
    elementwise step); `scale` is the size of the terms, sum |a_i b_i| (atol = rtol * scale covers
    results that cancel to much less than their terms). The factor 2 leaves room for the rounding
    of the inputs themselves (a float64 reference of float32 operands is not their exact result).
    """
    r = 2 * n * unit_roundoff(dtype)
    return {"rtol": r, "atol": r * scale}


# float64 computed two ways (another order of the same sums, an eigendecomposition of a
# well-conditioned matrix): up to ~1000 roundings of terms of size up to ~10. assert_close's
# float64 defaults (1e-7) are five orders looser and would not notice a float32 step in the path.
F64_TOL = tol(torch.float64, n=1000, scale=10.0)


def cond(*mats: torch.Tensor) -> float:
    """The largest 2-norm condition number of the (batched) matrices: how much the rounding of a
    result that went through their inverses can grow."""
    return max(torch.linalg.cond(m.detach().double()).max().item() for m in mats)


# ---------------------------------------------------------------------------------------------
# Rounding bounds of a whole forward (and backward) pass


def gamma(n: float, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative error of n roundings in `dtype` (Higham 3.1)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} roundings of {dtype} bound nothing"
    return nu / (1 - nu)


def _maybe(f, t):
    return None if t is None else f(t)


class RoundingBound:
    """Elementwise first-order bounds on the rounding errors of a forward pass of `modules`
    (applied in order) computed in `dtype`, against the exact result of the same parameters and
    input, and on request of the backward pass from a given output gradient.

    Running error analysis (Higham 3.1, 3.5): a (whitened) linear or conv layer
    z = V U (h - c) + d, fed an input off by at most E_h, is off by at most
    |V| |U| E_h + gamma_k S, where S = |V| |U| (|h| + |c|) + |d| is the size of its terms
    (summed over the taps and with the padding, as the layer pads) and k the roundings of its
    longest chain: U's sum (k_U = C_in / G; none for a plain layer), V's (taps C_in / G), and one
    each for the centring, the bias and b = d - W c, in either form ops takes (the fold
    W = V U, or U on the activations). Backward, likewise through |U|^T |V|^T, with
    k = (C_out / G) taps + k_U + 4 for the input gradient (the adjoint of a reflect or circular
    padding adds a few terms more) and positions + k_U + 3 for V's (g_V = (sum g h^T - g_b c^T)
    U^T), positions for d's. Tanh is 1-Lipschitz and rounds once (1 ulp <= 2u); its backward
    g (1 - h^2) is off by (1 - h^2) E_g + |g| (2 |h| E_h + 3u). ReLU is exact; its backward mask
    is the same in every computation except where an input lies within its error bound of 0,
    where the gradient may pass or not (off by all of it). An eval-mode BatchNorm is the affine
    map x alpha + beta, alpha = w / sqrt(v + eps) and beta = b - m alpha: 7 roundings. Embedding
    lookups are exact. Sizes and exact values are computed in float64 from the same parameters;
    terms of second order in u are left out.

    `extra` adds roundings to a layer's forward chain (e.g. the rounding to float32 of the
    parameters a re-whitening wrote). Two computations of the same result, each within the
    bound, differ by at most twice it.
    """

    def __init__(self, modules, x, dtype=torch.float32, extra=None):
        self.u = unit_roundoff(dtype)
        self.dtype = dtype
        self.extra = extra or {}
        self.records = []  # (module, input, input bound, output, output bound)
        h = x.detach().double() if x.is_floating_point() else x
        err = torch.zeros_like(h) if x.is_floating_point() else None
        for m in modules:
            z, z_err = self._forward(m, h, err)
            self.records.append((m, h, err, z, z_err))
            h, err = z, z_err
        self.out, self.err = h, err

    def gamma(self, n):
        return gamma(n, self.dtype)

    @staticmethod
    def _parts(m):
        """(V, d, U, c) of a whitened or plain linear/conv layer, float64 (U, c None if plain)."""
        if hasattr(m, "U"):
            c = m.c if m.d is not None else torch.zeros_like(m.c)
            ps = (m.V, m.d, m.U, c)
        else:
            ps = (m.weight, m.bias, None, None)
        return tuple(None if p is None else p.detach().double() for p in ps)

    @staticmethod
    def _apply(m, h, V, d, U, c):
        if V.dim() == 2:
            if U is not None:
                h = F.linear(h - c, U)
            return F.linear(h, V, d)
        if U is None:
            return m._conv_forward(h, V, d)  # nn.Conv2d, with its padding modes
        from prong_ext import reference

        return reference.whitened_conv2d(
            h, V, d, U, c, m.stride, m.padding, m.dilation, m.padding_mode, m.groups
        )

    @staticmethod
    def _abs(V, d, U, c):
        """The sizes: |V|, |d|, |U| and -|c| (so that h - c sums |h| + |c|)."""
        return V.abs(), _maybe(torch.abs, d), _maybe(torch.abs, U), _maybe(lambda t: -t.abs(), c)

    @staticmethod
    def _counts(m, V, U, z):
        k_in, taps = V.shape[1], V[0, 0].numel()
        groups = getattr(m, "groups", 1) if V.dim() > 2 else 1
        k_u = k_in if U is not None else 0
        positions = z.numel() // V.shape[0]
        return {
            "forward": k_u + k_in * taps + 3,
            "input": V.shape[0] // groups * taps + k_u + 4,
            "V": positions + k_u + 3,
            "d": positions,
        }

    @staticmethod
    def _bn(m):
        assert not m.training, "BatchNorm in training mode: batch statistics are not bounded here"
        alpha = m.weight.detach().double() / (m.running_var.double() + m.eps).sqrt()
        return alpha, m.running_mean.double(), m.bias.detach().double()

    def _forward(self, m, h, err):
        if isinstance(m, nn.Embedding):
            z = F.embedding(h, m.weight.detach().double())
            return z, torch.zeros_like(z)
        if isinstance(m, nn.ReLU):
            return torch.relu(h), err
        if isinstance(m, nn.Tanh):
            z = torch.tanh(h)
            return z, err + 2 * self.u * z.abs()
        if isinstance(m, nn.Flatten):
            return m(h), m(err)
        if isinstance(m, nn.BatchNorm1d):
            alpha, mean, bias = self._bn(m)
            z = (h - mean) * alpha + bias
            return z, alpha.abs() * err + self.gamma(7) * ((h.abs() + mean.abs()) * alpha.abs() + bias.abs())
        if isinstance(m, (nn.Linear, nn.Conv2d)) or hasattr(m, "U"):
            V, d, U, c = self._parts(m)
            z = self._apply(m, h, V, d, U, c)
            size = self._apply(m, h.abs(), *self._abs(V, d, U, c))
            through = self._apply(m, err, V.abs(), None, _maybe(torch.abs, U), _maybe(torch.zeros_like, c))
            k = self._counts(m, V, U, z)["forward"] + self.extra.get(m, 0)
            return z, through + self.gamma(k) * size
        raise TypeError(f"no rounding bound for {type(m).__name__}")

    def backward(self, g, g_err):
        """From the output's exact gradient g and a bound g_err on the error of the gradient
        the computation starts from, back to the input. Returns {parameter: (exact gradient,
        bound)} for the layers' V and d (weight and bias); self.output_grads[i] holds the exact
        gradient and bound at the output of modules[i], self.input_grad those at the input."""
        grads = {}
        self.output_grads = [None] * len(self.records)
        for i in reversed(range(len(self.records))):
            m, h, h_err, z, z_err = self.records[i]
            self.output_grads[i] = (g, g_err)
            if isinstance(m, nn.Embedding):
                g = g_err = None
                break
            if isinstance(m, nn.ReLU):
                # an input within its bound of 0 may pass the gradient or not: off by all of it
                unsure = h.abs() <= h_err
                g, g_err = g * (h > 0), g_err * (h > 0) + g.abs() * unsure
            elif isinstance(m, nn.Tanh):
                t = 1 - z.square()
                g, g_err = g * t, t * g_err + g.abs() * (2 * z.abs() * z_err + 3 * self.u)
            elif isinstance(m, nn.Flatten):
                g, g_err = g.reshape(h.shape), g_err.reshape(h.shape)
            elif isinstance(m, nn.BatchNorm1d):
                alpha = self._bn(m)[0]
                g, g_err = g * alpha, alpha.abs() * (g_err + self.gamma(4) * g.abs())
            else:
                g, g_err = self._layer_backward(m, h, h_err, g, g_err, grads)
        self.input_grad = (g, g_err)
        return grads

    def _layer_backward(self, m, h, h_err, g, g_err, grads):
        def vjp(inp, params, cot):
            inp = inp.clone().requires_grad_()
            leaves = [None if p is None else p.clone().requires_grad_() for p in params[:2]]
            out = self._apply(m, inp, *leaves, *params[2:])
            wrt = [inp] + [p for p in leaves if p is not None]
            res = torch.autograd.grad(out, wrt, cot)
            return res[0], res[1], res[2] if len(res) > 2 else None

        V, d, U, c = self._parts(m)
        absolute = self._abs(V, d, U, c)
        k = self._counts(m, V, U, g)
        g_in, g_v, g_d = vjp(h, (V, d, U, c), g)  # exact
        size_in, size_v, size_d = vjp(h.abs(), absolute, g.abs())
        from_g_in, from_g_v, from_g_d = vjp(h.abs(), absolute, g_err)  # the incoming error
        from_h_v = vjp(h_err, (V.abs(), None, absolute[2], _maybe(torch.zeros_like, c)), g.abs())[1]
        params = (m.V, m.d) if hasattr(m, "U") else (m.weight, m.bias)
        grads[params[0]] = (g_v, from_g_v + from_h_v + self.gamma(k["V"]) * size_v)
        if params[1] is not None:
            grads[params[1]] = (g_d, from_g_d + self.gamma(k["d"]) * size_d)
        return g_in, from_g_in + self.gamma(k["input"]) * size_in


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|got - want| <= bound elementwise (in float64)."""
    err = (got.detach().double() - want.detach().double()).abs()
    assert (err <= bound).all(), f"{what}: error/bound up to {(err / bound).max().item():.3g}"


class EvalRoundingBound(RoundingBound):
    """RoundingBound's forward (only) of an eval-mode model, BatchNorm2d too (per channel the
    affine map of BatchNorm1d, 7 roundings), with an input's error carried by the exact map the
    float32 computation approximates instead of by the sizes of its factors: through a whitened
    layer by |W| = |V U| (h + e gives W (h + e - c) + d plus the layer's own roundings, which
    still see |V| |U|), through Tanh times its derivative 1 - z^2, and not through ReLU where the
    input lies below minus its bound (the computed input is negative too: an exact 0). Each step
    first order in u, as RoundingBound; tighter than it by the factors |V| |U| / |V U|, which
    whitening makes large."""

    def _forward(self, m, h, err):
        if isinstance(m, nn.BatchNorm2d):
            alpha, mean, bias = (t.view(-1, 1, 1) for t in self._bn(m))
            z = (h - mean) * alpha + bias
            size = (h.abs() + mean.abs()) * alpha.abs() + bias.abs()
            return z, alpha.abs() * err + self.gamma(7) * size
        if isinstance(m, nn.ReLU):
            return torch.relu(h), err * (h >= -err)
        if isinstance(m, nn.Tanh):
            z = torch.tanh(h)
            return z, (1 - z.square()) * err + 2 * self.u * z.abs()
        if hasattr(m, "U"):
            V, d, U, c = self._parts(m)
            z = self._apply(m, h, V, d, U, c)
            size = self._apply(m, h.abs(), *self._abs(V, d, U, c))
            from prong_ext import reference

            eye = torch.eye(U.shape[-1], dtype=U.dtype).expand_as(U).contiguous()  # per group
            # e padded as the layer pads h - c (zeros padding: exact zeros), then |V U|'s taps
            W = reference.fold(V, None, U, None)[0]
            through = self._apply(m, err, W.abs(), None, eye, torch.zeros_like(c))
            k = self._counts(m, V, U, z)["forward"] + self.extra.get(m, 0)
            return z, through + self.gamma(k) * size
        return super()._forward(m, h, err)


def eval_rounding_bound(model: nn.Module, x: torch.Tensor, extra=None) -> torch.Tensor:
    """EvalRoundingBound(...).err of the output eval_out computes (BatchNorm on its running
    statistics), training mode restored; a Sequential's modules in order, else the one module."""
    mode = model.training
    model.eval()
    try:
        modules = list(model) if isinstance(model, nn.Sequential) else [model]
        return EvalRoundingBound(modules, x, extra=extra).err
    finally:
        model.train(mode)
