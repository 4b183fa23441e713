"""The output side: the second moment of the back-propagated gradients, empirical and sampled.

Two-sided whitening (docs/algorithm.md section 11) would whiten each layer's output gradients
delta = dL/dz with S = E[delta delta^T]. This measures what such an S looks like on the
auto-encoder, per linear layer, at update 0 and every --eval-every updates of training (each
method of --methods at its learning rate):

- empirical: delta from the training targets (the images themselves), as a plain estimate of S
  from the training gradients would take it;
- sampled: delta from targets drawn from the model's own Bernoulli predictions (the true Fisher's
  output factor), one draw per image.

Per layer and kind: lambda_1 / mean(lambda) (how far the top eigenvalue stands above the average),
|m|^2 / tr S (the share of S that is the mean gradient m = E[delta]), and |cos(v_1, m)| (how close
the top eigenvector is to the mean gradient). S is taken over the first --probe-samples training
images, one delta per image.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import prong_ext

from . import autoencoder, common, report
from .methods import REGISTRY
from .report import Table

KINDS = ("empirical", "sampled")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_training_arguments(
        p,
        updates=1000,
        methods="prong-adam",
        default_lr=autoencoder.DEFAULT_LR,
        lr_note="defaults as autoencoder's",
    )
    autoencoder.add_model_arguments(p)
    common.add_eval_arguments(p, every=4)
    p.add_argument(
        "--probe-samples",
        type=int,
        default=1024,
        help="training images whose gradients form S (default: %(default)s)",
    )


def output_gradients(model: nn.Module, x: torch.Tensor, kind: str, generator: torch.Generator) -> list:
    """Per linear layer (plain or whitened, in order), the (N, out) gradients of the loss of each
    image with respect to the layer's output: from the images as targets (``empirical``) or from
    targets drawn from the model's Bernoulli predictions (``sampled``). In eval mode (batch norm
    from its running statistics, no buffer changed); the parameters' .grad are not touched."""
    outputs = []
    linear = [m for m in model.modules() if isinstance(m, (nn.Linear, prong_ext.WhitenedLinear))]
    handles = [m.register_forward_hook(lambda module, args, out: outputs.append(out)) for m in linear]
    was = model.training
    model.eval()
    try:
        logits = model(x)
        if kind == "empirical":
            target = x
        else:
            target = torch.bernoulli(torch.sigmoid(logits.detach()), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        grads = torch.autograd.grad(loss, outputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [g.detach().double() for g in grads]


def spectrum(delta: torch.Tensor) -> dict[str, float]:
    """lambda_1 / mean(lambda), |m|^2 / tr S and |cos(v_1, m)| of S = delta^T delta / N."""
    n = delta.shape[0]
    s = delta.T @ delta / n
    lam, q = torch.linalg.eigh(s)
    m = delta.mean(0)
    trace = lam.clamp_min(0).sum().item()
    cos = (q[:, -1] @ m).abs().item() / max(m.norm().item(), 1e-300)
    return {
        "top_over_mean": lam[-1].item() / max(trace / lam.numel(), 1e-300),
        "mean_share": m.square().sum().item() / max(trace, 1e-300),
        "top_cos_mean": cos,
    }


def measure(model: nn.Module, x: torch.Tensor, update: int, method: str, seed: int) -> list[dict]:
    """The rows of gradients.csv for the model now."""
    rows = []
    for kind in KINDS:
        generator = torch.Generator().manual_seed(seed + update)
        for layer, delta in enumerate(output_gradients(model, x, kind, generator), 1):
            row = {"method": method, "update": update, "layer": layer, "width": delta.shape[1], "kind": kind}
            rows.append(row | spectrum(delta))
    return rows


def _prong_settings(task, method: str) -> str:
    """', T=.., eps=..' of a PRONG method (the registry's over the command line's), else ''."""
    m = REGISTRY[method]
    if not m.prong:
        return ""
    return f", T={m.prong_interval or task.prong.interval}, eps={m.prong_eps or task.prong.eps:g}"


def run(args: argparse.Namespace, out) -> dict:
    """Train each method, measuring the spectra at update 0, every --eval-every and at the end;
    gradients.csv and summary.md (the first and the last measurement per method)."""
    if args.probe_samples <= 0:
        raise common.UsageError(f"--probe-samples must be > 0, got {args.probe_samples}")
    if args.loss != "ce":
        raise common.UsageError(
            f"--loss {args.loss}: the measurement is of the cross-entropy's gradients (--loss ce)"
        )
    ds, x = common.train_rows(args)
    sizes = autoencoder.architecture(args.arch, x.shape[1], ds.name)
    every = common.eval_every(args, 4)
    task = autoencoder.make_task(args, x, sizes, every)
    lrs = autoencoder.learning_rates(args, x.shape[1])
    probe = x[: args.probe_samples]
    rows, notes = [], []
    for method, lr in lrs.items():
        stepper = task.start(method, lr, desc=method)
        rows += measure(stepper.s.model, probe, 0, method, args.seed)
        measured, going = 0, True
        while going:
            going = stepper.advance()
            done = stepper.res.updates  # the updates made (not a diverging one)
            if done != measured and (done % every == 0 or done == task.updates):
                rows += measure(stepper.s.model, probe, done, method, args.seed)
                measured = done
        if stepper.finish().diverged:
            notes.append(f"- {method} diverged at update {stepper.t}: the measurements before it only.")
    report.write_csv(out / "gradients.csv", rows)
    shown = [
        r for r in rows if r["update"] in (0, max(q["update"] for q in rows if q["method"] == r["method"]))
    ]
    table = Table(
        ["method", "update", "layer", "width", "kind", "lambda_1 / mean", "|m|^2 / tr S", "|cos(v_1, m)|"],
        [list(r.values()) for r in shown],
    )
    settings = (
        f"Architecture {'-'.join(map(str, sizes))}, {args.activation} units, {x.shape[0]} training images, "
        f"batch {task.batch_size}, {args.updates} updates; S from {probe.shape[0]} images; per method "
        "its learning rate and (PRONG) Prong's T and eps: "
        + "; ".join(f"{m} lr {lr:g}{_prong_settings(task, m)}" for m, lr in lrs.items())
        + "."
    )
    body = [
        "Per linear layer (1 = the first), S = E[delta delta^T] of the gradients delta of each image's "
        "cross-entropy with respect to the layer's output, from the images as targets (empirical) or "
        "from targets drawn from the model's predictions (sampled). lambda_1 / mean: the top "
        "eigenvalue over the mean one; |m|^2 / tr S: the share of S that is the mean gradient; "
        "|cos(v_1, m)|: the top eigenvector against the mean gradient. First and last measurement per "
        "method; every one in gradients.csv.",
        "",
        table,
        "",
        *notes,
    ]
    report.write_summary(out, args, f"Output-side gradients ({ds.name})", settings, body)
    return {"rows": rows}
