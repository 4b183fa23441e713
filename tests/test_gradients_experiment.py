"""The output-side measurement (``python -m prong_ext gradients``): the per-image output
gradients against autograd image by image, the spectrum's three numbers on matrices whose values
are known, and the subcommand's files."""

import csv
import math

import pytest
import torch

import prong_ext
from prong_ext import cli
from prong_ext.experiments import autoencoder, gradients


def _model(whitened):
    torch.manual_seed(0)
    model = autoencoder.build_autoencoder((6, 5, 3, 5, 6), batchnorm=True).double()
    return prong_ext.whiten(model) if whitened else model


@pytest.mark.parametrize("whitened", [False, True])
def test_output_gradients_are_each_images_own(whitened):
    model = _model(whitened)
    x = torch.rand(7, 6, dtype=torch.float64)
    model.train()
    got = gradients.output_gradients(model, x, "empirical", torch.Generator().manual_seed(0))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert [g.shape for g in got] == [(7, 5), (7, 3), (7, 5), (7, 6)]
    model.eval()
    outputs = []
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, prong_ext.WhitenedLinear))]
    handles = [m.register_forward_hook(lambda mod, a, out: outputs.append(out)) for m in layers]
    for i in range(7):
        outputs.clear()
        xi = x[i : i + 1]
        logits = model(xi)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, xi, reduction="sum")
        for g, want in zip(got, torch.autograd.grad(loss, outputs)):
            # float64 (u = 1.1e-16), four layers of sums of at most 6 terms, possibly summed in
            # another order for one row than for seven: differences of order 1e-15, far below 1e-12
            torch.testing.assert_close(g[i], want[0], rtol=1e-12, atol=1e-14)
    for h in handles:
        h.remove()


def test_sampled_targets_are_drawn_from_the_predictions():
    model = _model(False)
    x = torch.rand(4000, 6, dtype=torch.float64)
    g1 = gradients.output_gradients(model, x, "sampled", torch.Generator().manual_seed(1))
    g2 = gradients.output_gradients(model, x, "sampled", torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # the logits' gradient is sigmoid(logit) - y with y ~ Bernoulli(sigmoid(logit)): mean 0, each
    # entry in [-1, 1]; over 4000 images the mean is within 5 standard errors (<= 0.5 / sqrt(4000))
    last = g1[-1]
    assert last.abs().max() <= 1
    assert last.mean(0).abs().max() < 5 * 0.5 / math.sqrt(4000)
    empirical = gradients.output_gradients(model, x, "empirical", torch.Generator().manual_seed(1))[-1]
    assert empirical.mean(0).abs().max() > 0.05  # images as targets: a mean far from 0


def test_spectrum_of_known_matrices():
    a = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    same = gradients.spectrum(a.expand(10, 3))  # S = a a^T, m = a
    assert same["top_over_mean"] == pytest.approx(3, rel=1e-12)
    assert same["mean_share"] == pytest.approx(1, rel=1e-12)
    assert same["top_cos_mean"] == pytest.approx(1, rel=1e-12)
    b = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]], dtype=torch.float64)
    centred = gradients.spectrum(b)  # S = diag(2, 0.5, 0), m = 0
    assert centred["top_over_mean"] == pytest.approx(2 / (2.5 / 3), rel=1e-12)
    assert centred["mean_share"] == 0 and centred["top_cos_mean"] == 0


def test_the_subcommand_writes_its_rows(tmp_path):
    out = tmp_path / "g"
    argv = ["gradients", "--out", str(out), "--quiet", "--updates", "4", "--eval-every", "2"]
    argv += [
        "--batch-size",
        "16",
        "--train-samples",
        "64",
        "--probe-samples",
        "32",
        "--methods",
        "sgd,prong-adam",
    ]
    assert cli.main(argv + ["--num-samples", "32", "--interval", "3"]) == 0
    with open(out / "gradients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    layers = len(autoencoder.DIGITS_ARCH) - 1
    assert len(rows) == 2 * 3 * 2 * layers  # methods x updates 0, 2, 4 x kinds x layers
    assert {(r["method"], r["update"]) for r in rows} == {
        (m, u) for m in ("sgd", "prong-adam") for u in "024"
    }
    for r in rows:
        assert float(r["top_over_mean"]) >= 1 - 1e-12
        assert 0 <= float(r["mean_share"]) <= 1 + 1e-12 and 0 <= float(r["top_cos_mean"]) <= 1 + 1e-12
    md = (out / "summary.md").read_text()
    assert "lambda_1 / mean" in md and "commit" in md


@pytest.mark.parametrize(
    "argv,message", [(["--probe-samples", "0"], "--probe-samples"), (["--loss", "mse"], "--loss")]
)
def test_bad_options_are_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["gradients", "--out", str(tmp_path), "--quiet", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
