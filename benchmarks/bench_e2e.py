"""End to end: one training step of a whole network, three ways on the same model, data and
optimizer (SGD, lr 0.01, momentum 0.9, so PRONG also maps the momentum across reparametrizations):

- "sgd": the plain model;
- "naive": naive PRONG (benchmarks/naive.py): two-step whitened layers, statistics from a
  separate forward pass over num_samples examples through reference.covariance, a Python loop
  of torch.linalg.eigh, the projection in float64;
- "prong": prong_ext.whiten(model) + prong_ext.Prong(interval=100).

Models:
- "autoencoder": 784-1000-500-250-30-250-500-1000-784, sigmoid units, linear code layer,
  sigmoid cross-entropy on the output, batch 256, num_samples 1024 (Martens 2010; docs/algorithm.md).
- "resnet18": a ResNet-18-like CNN for small images (3x3 stem, no max-pool, 4 stages of 2 basic
  blocks of 64/128/256/512 channels with batch norm, global average pool, 10 classes), every conv
  and the classifier whitened (PRONG+); on the CPU 16x16 inputs at batch 32 with num_samples 128
  images (--quick: width 32, batch 16, 64 images), on CUDA 32x32 at batch 128, 256 images.

The figure reported is T, the step time amortized over a reparametrization interval of T=100:
- sgd: the median step;
- naive: median step + (one reparametrization, timed on its own) / 100;
- prong: the steps are timed where they are cheap (median of the steps outside the statistics
  window) and every step of one whole window is timed one by one (the hooked forward passes and
  the step that re-whitens): T = ((100 - n_window) * median + sum(window)) / 100. Reaching the
  window fast-forwards the controller with Prong.state_dict / load_state_dict.
The shares of statistics, eigendecompositions and projection are Prong.timings (naive: its
timings) over that interval, divided by 100 * T.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import naive
import torch
import torch.nn.functional as F
from common import median_time, sync
from torch import nn

import prong_ext

IMPLS = ("sgd", "naive", "prong")
INTERVAL = 100
LR, MOMENTUM, EPS = 0.01, 0.9, 1e-2

AE_SIZES = {"full": [784, 1000, 500, 250, 30, 250, 500, 1000, 784], "tiny": [20, 16, 8, 3, 8, 16, 20]}


@dataclass(frozen=True)
class Case:
    model: str  # "autoencoder" or "resnet18"
    batch: int
    hw: int  # image side (0 for the auto-encoder)
    width: int  # autoencoder: sizes key; resnet18: channels of the first stage
    num_samples: int
    impl: str
    ae_sizes: str = "full"

    @property
    def group(self) -> str:
        if self.model == "autoencoder":
            sizes = "-".join(map(str, AE_SIZES[self.ae_sizes]))
            return f"e2e autoencoder {sizes} batch={self.batch}"
        return f"e2e resnet18 width={self.width} {self.hw}x{self.hw} batch={self.batch}"

    @property
    def id(self) -> str:
        if self.model == "autoencoder":
            return f"autoencoder-{self.ae_sizes}-batch{self.batch}-{self.impl}"
        return f"resnet18-w{self.width}-{self.hw}x{self.hw}-batch{self.batch}-{self.impl}"

    @property
    def shape(self) -> dict:
        if self.model == "autoencoder":
            return {"sizes": AE_SIZES[self.ae_sizes], "batch": self.batch, "num_samples": self.num_samples}
        return {
            "input": [self.batch, 3, self.hw, self.hw],
            "width": self.width,
            "num_samples": self.num_samples,
        }


def cases(size: str, device: str) -> list[Case]:
    cuda = device != "cpu"
    # (model, batch, image side, width, num_samples, autoencoder sizes)
    if size == "tiny":
        configs = [("autoencoder", 8, 0, 0, 16, "tiny"), ("resnet18", 4, 8, 4, 8, "full")]
    elif size == "quick":
        cnn = ("resnet18", 128, 32, 64, 256, "full") if cuda else ("resnet18", 16, 16, 32, 64, "full")
        configs = [("autoencoder", 256, 0, 0, 1024, "full"), cnn]
    else:
        cnn = ("resnet18", 128, 32, 64, 256, "full") if cuda else ("resnet18", 32, 16, 64, 128, "full")
        configs = [("autoencoder", 256, 0, 0, 1024, "full"), cnn]
    return [Case(m, b, hw, w, ns, impl, s) for m, b, hw, w, ns, s in configs for impl in IMPLS]


# ---------------------------------------------------------------------------------------------
# Models


def autoencoder(sizes: list[int]) -> nn.Module:
    """Sigmoid units, a linear code layer (the middle one), logits out."""
    layers: list[nn.Module] = []
    code = len(sizes) // 2 - 1  # index of the layer producing the code
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i != code and i != len(sizes) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(width: int = 64, num_classes: int = 10) -> nn.Module:
    """ResNet-18 for small images: 3x3 stem, no max-pool, stages of width * (1, 2, 4, 8)."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    blocks: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, w in enumerate(widths):
        for j in range(2):
            blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*blocks)


def whitened_widths(model: nn.Module) -> list[int]:
    """Input widths of the layers PRONG whitens (every nn.Linear and ungrouped nn.Conv2d)."""
    return [
        m.in_features if isinstance(m, nn.Linear) else m.in_channels
        for m in model.modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]


def flop_floors(case: Case) -> dict:
    """GEMM flops of one fwd+bwd step of the plain model, and PRONG's ratio to it.

    Per whitened layer (input rows r = N*H*W positions of the input, k x k kernel): plain 3
    products of 2*r_out*C_out*C_in*k^2 (2 for the first layer: no input gradient); fold: 2
    products of 2*C_out*C_in^2*k^2; whitening the activations (1x1 by U on the input, the
    centre in the bias): 2*r*C_in^2 per product, forward and input gradient. "ops" is what
    prong_ext.ops picks (fold when C_out*k^2 <= r, its rule from the forward costs); "best"
    the cheaper form per layer from these counts.
    Elementwise work (batch norm, activations, the optimizer) is left out.
    """
    model = _model(case).to("meta")
    x = torch.empty(_input_shape(case), device="meta")
    layers = []

    def hook(m, args, out):
        layers.append((m, args[0].shape, out.shape))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    model(x)
    for h in handles:
        h.remove()
    plain = ops_extra = best_extra = 0
    for i, (m, xin, out) in enumerate(layers):
        products = 2 if i == 0 else 3
        if isinstance(m, nn.Linear):
            cin, cout, taps = m.in_features, m.out_features, 1
        else:
            cin, cout, taps = m.in_channels, m.out_channels, m.kernel_size[0] * m.kernel_size[1]
        rows, out_rows = xin.numel() // cin, out.numel() // cout
        plain += products * 2 * out_rows * cout * cin * taps
        fold = 2 * 2 * cout * cin * cin * taps
        act = (products - 1) * 2 * rows * cin * cin
        ops_extra += fold if cout * taps <= rows else act
        best_extra += min(fold, act)
    return {
        "plain_gflop": plain / 1e9,
        "flop_floor_ops": 1 + ops_extra / plain,
        "flop_floor_best": 1 + best_extra / plain,
    }


def _model(case: Case) -> nn.Module:
    if case.model == "autoencoder":
        return autoencoder(AE_SIZES[case.ae_sizes])
    return resnet18(case.width)


def _input_shape(case: Case) -> tuple[int, ...]:
    if case.model == "autoencoder":
        return (case.batch, AE_SIZES[case.ae_sizes][0])
    return (case.batch, 3, case.hw, case.hw)


# ---------------------------------------------------------------------------------------------
# Training steps


class Trainer:
    """One case's model, optimizer, controller and data; `step()` is one synchronized update."""

    def __init__(self, case: Case, device: str):
        self.case, self.device = case, device
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = _model(case)
        shape = (max(case.batch, case.num_samples), *_input_shape(case)[1:])
        if case.model == "autoencoder":
            x = torch.rand(shape, generator=g)
            self.loss_fn = lambda out, xb, yb: F.binary_cross_entropy_with_logits(out, xb)
            y = None
        else:
            x = torch.randn(shape, generator=g)
            y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
            self.loss_fn = lambda out, xb, yb: F.cross_entropy(out, yb)
        self.x = x.to(device)
        self.y = y
        model = model.to(device).train()
        self.controller = None
        if case.impl == "naive":
            model = naive.whiten_naive(model)
        elif case.impl == "prong":
            model = prong_ext.whiten(model)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        if case.impl == "naive":
            self.controller = naive.NaiveProng(
                model, self.optimizer, interval=INTERVAL, num_samples=case.num_samples, eps=EPS
            )
        elif case.impl == "prong":
            self.controller = prong_ext.Prong(
                model, self.optimizer, interval=INTERVAL, num_samples=case.num_samples, eps=EPS
            )
        self.batch = 0

    def _next(self):
        b = self.case.batch
        n = self.x.shape[0] // b
        i = self.batch % n
        self.batch += 1
        xb = self.x[i * b : (i + 1) * b]
        yb = None if self.y is None else self.y[i * b : (i + 1) * b]
        return xb, yb

    def step(self) -> bool:
        """One training update; True when it re-whitened."""
        xb, yb = self._next()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(xb), xb, yb)
        loss.backward()
        self.optimizer.step()
        done = False
        if self.case.impl == "prong":
            done = self.controller.step()
        elif self.case.impl == "naive":
            done = self.controller.step(self.x[: self.case.num_samples])
        sync(self.device)
        return done


def amortize(trainer: Trainer, step_median: float, reparam_rounds: int = 1) -> dict:
    """T (the step amortized over INTERVAL updates) and the reparametrization's shares."""
    impl = trainer.case.impl
    out = {"step_s": step_median, "interval": INTERVAL}
    if impl == "sgd":
        out["T_s"] = step_median
        return out
    ctl = trainer.controller
    before = dict(ctl.timings)
    if impl == "naive":
        data = trainer.x[: trainer.case.num_samples]
        reparam, _ = median_time(lambda: ctl.reparametrize(data), reparam_rounds, warmup=0)
        cost = {k: (ctl.timings[k] - before[k]) / reparam_rounds for k in before}
        out["reparam_s"] = reparam
        out["T_s"] = step_median + reparam / INTERVAL
    else:
        # fast-forward to just before the statistics window of the next re-whitening
        batch = trainer.case.batch
        window = -(-ctl.num_samples // batch)
        due = -(-ctl.updates // INTERVAL) * INTERVAL
        start = due - window - 1
        if start > ctl.updates:
            state = ctl.state_dict()
            state["step"] = start
            ctl.load_state_dict(state)
        tail = []
        while True:
            t = time.perf_counter()
            done = trainer.step()
            tail.append(time.perf_counter() - t)
            if done:
                break
        cost = {k: ctl.timings[k] - before[k] for k in before}
        out["window_steps"] = tail
        out["T_s"] = ((INTERVAL - len(tail)) * step_median + sum(tail)) / INTERVAL
    total = INTERVAL * out["T_s"]
    out["shares"] = {k: v / total for k, v in cost.items()}
    out["reparam_share"] = sum(cost.values()) / total
    out["reparam_cost_s"] = cost
    return out


def measure(case: Case, device: str, rounds: int = 5) -> dict:
    """Without pytest-benchmark: the same figures from a plain loop (smoke test, quick checks)."""
    trainer = Trainer(case, device)
    trainer.step()  # the whitened initialization (PRONG) / warm-up
    trainer.step()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        trainer.step()
        samples.append(time.perf_counter() - t)
    return amortize(trainer, statistics.median(samples))


def test_e2e(timed, benchmark, case, device):
    trainer = Trainer(case, device)
    trainer.step()  # step 0: PRONG's whitened initialization; a warm-up for all
    median = timed(
        trainer.step,
        warmup=3,  # the first steps after step 0 run slower (allocator and oneDNN warm-up)
        group=case.group,
        op="e2e",
        impl=case.impl,
        model=case.model,
        shape=case.shape,
        device=device,
        optimizer=f"SGD(lr={LR}, momentum={MOMENTUM})",
    )
    benchmark.extra_info.update(amortize(trainer, median), **flop_floors(case))
