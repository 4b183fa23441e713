"""End-to-end runs of every subcommand on tiny configurations, and the CLI's error messages."""

import csv
import gzip
import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prong_ext import cli, data
from prong_ext.experiments import common

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--quiet", "--num-samples", "32"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} is empty"
    return rows


def assert_numeric_finite(path, columns):
    rows = read_csv(path)
    for col in columns:
        vals = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
        assert vals, f"{path}: no values in column {col}"
        assert all(math.isfinite(v) for v in vals), f"{path}: non-finite {col}: {vals}"
    return rows


def assert_png(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG, f"{path} is not a PNG"
    assert len(raw) > 1000


def write_idx(path, arr, gz=True):
    payload = (
        struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    )
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def idx_dir(tmp_path):
    """A tiny MNIST-like directory: 28x28 uint8 images with labels, train and t10k."""
    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    for split, n in (("train", 48), ("t10k", 16)):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = np.zeros((n, 28, 28), np.uint8)
        for i, lab in enumerate(y):  # class-dependent blobs plus noise
            x[i, 2 * lab : 2 * lab + 8, 4:20] = 200
            x[i] = np.clip(x[i] + rng.integers(0, 40, size=(28, 28)), 0, 255)
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def test_autoencoder_all_methods(tmp_path, capsys):
    out = tmp_path / "ae"
    argv = [
        "autoencoder",
        "--out",
        str(out),
        "--updates",
        "6",
        "--batch-size",
        "16",
        "--train-samples",
        "64",
        "--eval-samples",
        "32",
        "--eval-every",
        "2",
        "--interval",
        "2",
        *FAST,
    ]
    assert cli.main(argv) == 0
    rows = assert_numeric_finite(out / "curves.csv", ["update", "seconds", "train_error"])
    assert {r["method"] for r in rows} == set(common.METHODS)
    assert max(int(r["update"]) for r in rows) == 6
    summary = read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == list(common.METHODS)
    assert all(math.isfinite(float(r["step_time_vs_sgd"])) for r in summary)
    assert float(summary[0]["step_time_vs_sgd"]) == 1.0
    for png in ("train_error_vs_updates.png", "train_error_vs_seconds.png", "train_error_vs_cpu_seconds.png"):
        assert_png(out / png)
    md = (out / "summary.md").read_text()
    assert "| prong+ |" in md and "updates to SGD best" in md
    printed = capsys.readouterr().out
    assert "time/step vs SGD" in printed and "prong+" in printed


def test_autoencoder_deterministic_and_tune(tmp_path):
    base = [
        "autoencoder",
        "--updates",
        "4",
        "--batch-size",
        "8",
        "--train-samples",
        "32",
        "--eval-samples",
        "16",
        "--eval-every",
        "2",
        "--interval",
        "2",
        "--methods",
        "sgd,prong",
        "--seed",
        "3",
        *FAST,
    ]
    curves = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        cli.main(base + ["--out", str(out)])
        curves.append([(r["method"], r["update"], r["train_error"]) for r in read_csv(out / "curves.csv")])
    assert curves[0] == curves[1]
    out = tmp_path / "tune"
    cli.main(base + ["--out", str(out), "--tune", "--tune-updates", "2"])
    tune = assert_numeric_finite(out / "tune.csv", ["lr", "train_error"])
    assert len(tune) == 2 * 5
    assert "Learning-rate grid" in (out / "summary.md").read_text()


def test_autoencoder_zca_and_rescale_options_reach_prong(tmp_path):
    base = ["autoencoder", "--updates", "8", "--batch-size", "8", "--train-samples", "32"]
    base += ["--eval-samples", "16", "--eval-every", "4", "--interval", "5", "--methods", "prong", *FAST]
    curves = {}
    for name, extra in (("pca", []), ("zca", ["--whitening", "zca"]), ("rescale", ["--rescale"])):
        out = tmp_path / name
        assert cli.main(base + ["--out", str(out), *extra]) == 0
        rows = assert_numeric_finite(out / "curves.csv", ["train_error"])
        curves[name] = [r["train_error"] for r in rows]
    # SGD is invariant under the rotation that turns PCA into ZCA (U_zca = Q U_pca), so the
    # curves agree; rescaling changes the coordinates between re-whitenings, and the curve
    assert curves["zca"] == curves["pca"] and curves["rescale"] != curves["pca"]
    args = cli.build_parser().parse_args(["autoencoder", "--whitening", "zca", "--rescale"])
    kwargs = common.ProngConfig.from_args(args).kwargs()
    assert kwargs["whitening"] == "zca" and kwargs["rescale"] is True


def test_autoencoder_idx_data(tmp_path, idx_dir):
    out = tmp_path / "ae"
    argv = [
        "autoencoder",
        "--data",
        str(idx_dir / "train-images-idx3-ubyte.gz"),
        "--out",
        str(out),
        "--arch",
        "784,16,4,16,784",
        "--updates",
        "3",
        "--batch-size",
        "8",
        "--methods",
        "sgd,prong+",
        *FAST,
    ]
    cli.main(argv)
    assert_numeric_finite(out / "curves.csv", ["train_error"])
    assert "784-16-4-16-784" in (out / "summary.md").read_text()


def test_fisher(tmp_path):
    out = tmp_path / "fisher"
    argv = [
        "fisher",
        "--out",
        str(out),
        "--updates",
        "4",
        "--checkpoints",
        "2",
        "--hidden",
        "6",
        "--fisher-samples",
        "20",
        "--train-samples",
        "100",
        "--interval",
        "2",
        "--batch-size",
        "16",
        *FAST,
    ]
    cli.main(argv)
    rows = assert_numeric_finite(out / "curves.csv", ["train_loss", "lambda_max", "condition_number"])
    assert {r["method"] for r in rows} == {"sgd", "rmsprop", "bn", "prong"}
    spec = assert_numeric_finite(out / "spectrum.csv", ["eig_before", "eig_after"])
    assert len(spec) == 2 * 36  # init and trained, 6x6 weights
    white = assert_numeric_finite(out / "whitening.csv", ["cond before whitening", "cond after whitening"])
    assert len(white) == 2
    for png in ("fisher_blocks.png", "fisher_spectrum.png", "condition_number.png", "train_loss.png"):
        assert_png(out / png)
    assert "Fig. 2c" in (out / "summary.md").read_text()


def test_sweep(tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--out",
        str(out),
        "--updates",
        "4",
        "--eps-values",
        "0.01,1",
        "--lrs",
        "0.1,0.3",
        "--intervals",
        "2,1000",
        "--train-samples",
        "64",
        "--eval-samples",
        "32",
        "--batch-size",
        "16",
        *FAST,
    ]
    cli.main(argv)
    grid = assert_numeric_finite(out / "eps_lr.csv", ["lr", "final_error"])
    assert len(grid) == 2 + 2 * 2  # sgd per lr, prong per (eps, lr)
    rows = assert_numeric_finite(out / "interval.csv", ["T", "update", "train_error"])
    assert {(r["T"], r["init"]) for r in rows} == {
        ("2", "whitened"),
        ("2", "fan-in"),
        ("1000", "whitened"),
        ("1000", "fan-in"),
        ("0", "fan-in"),
    }
    for png in ("eps_lr.png", "interval.png"):
        assert_png(out / png)
    assert "(b) interval T" in (out / "summary.md").read_text()


def test_cnn_idx_and_digits_fallback(tmp_path, idx_dir, monkeypatch):
    out = tmp_path / "cnn"
    argv = [
        "cnn",
        "--data",
        str(idx_dir),
        "--out",
        str(out),
        "--updates",
        "3",
        "--width",
        "2",
        "--train-samples",
        "32",
        "--test-samples",
        "16",
        "--batch-size",
        "8",
        *FAST,
    ]
    cli.main(argv)
    rows = assert_numeric_finite(out / "curves.csv", ["train_loss", "test_error"])
    assert {r["method"] for r in rows} == {"sgd", "bn", "prong", "prong+"}
    for png in ("test_error.png", "train_loss.png", "test_error_vs_seconds.png"):
        assert_png(out / png)
    # without Fashion-MNIST installed the default is the digits
    monkeypatch.setattr(data, "default_fashion_mnist", lambda: None)
    out2 = tmp_path / "cnn2"
    cli.main(
        [
            "cnn",
            "--out",
            str(out2),
            "--updates",
            "2",
            "--width",
            "2",
            "--train-samples",
            "16",
            "--test-samples",
            "8",
            "--batch-size",
            "8",
            "--methods",
            "sgd,prong",
            *FAST,
        ]
    )
    assert "Convnet (digits)" in (out2 / "summary.md").read_text()
    assert_numeric_finite(out2 / "curves.csv", ["test_error"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["autoencoder", "--data", "/no/such/dir"], "--data path does not exist: /no/such/dir"),
        (["autoencoder", "--methods", "sgd,adagrad"], "--methods 'sgd,adagrad'"),
        (["autoencoder", "--lr", "prong"], "--lr 'prong': expected METHOD=LR"),
        (["autoencoder", "--lr", "foo=0.1"], "unknown method 'foo'"),
        (["autoencoder", "--updates", "0"], "--updates must be > 0"),
        (["autoencoder", "--eps", "-1"], "must be > 0"),
        (["autoencoder", "--whitening", "pcaa"], "invalid choice: 'pcaa'"),
        (["autoencoder", "--arch", "64,8,32"], "first and last sizes must be 64"),
        (["sweep", "--intervals", "1.5"], "positive integers"),
        (["fisher", "--layer", "9"], "--layer 9"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o"), "--quiet"] if argv[0] != "nonsense" else argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_idx_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x03" + bytes(12))
    with pytest.raises(SystemExit):
        cli.main(["autoencoder", "--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert str(bad) in err and "magic number" in err


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "prong_ext", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for sub in cli.SUBCOMMANDS:
        assert sub in res.stdout


ROOT = Path(__file__).resolve().parent.parent


def _git_head():
    if shutil.which("git") is None:
        return None
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def test_summary_records_git_commit(tmp_path):
    """summary.md's environment line, summary.csv and run.json name the commit the run came from."""
    head = _git_head()
    if head is None or Path(common.prong_ext.__file__).resolve().parent.parent != ROOT:
        pytest.skip("not run from a git checkout of this repository")
    out = tmp_path / "ae"
    argv = ["autoencoder", "--out", str(out), "--updates", "2", "--methods", "sgd", "--train-samples", "32"]
    assert cli.main(argv + FAST) == 0
    line = next(x for x in (out / "summary.md").read_text().splitlines() if x.startswith("Environment:"))
    assert re.search(r"torch \S+, triton ", line)
    m = re.search(r"commit ([0-9a-f]{40})( \(clean\)| \+ uncommitted changes to \d+ tracked files?)", line)
    assert m, line
    assert m.group(1) == head
    info = json.loads((out / "run.json").read_text())
    assert info["commit"] == head and isinstance(info["dirty"], bool)
    assert info["command"] == "python -m prong_ext " + " ".join(argv + FAST)
    assert {r["commit"] for r in read_csv(out / "summary.csv")} == {head}


def test_git_state_outside_a_checkout(tmp_path):
    assert common.git_state(tmp_path) == {"commit": None, "dirty": None, "changed": []}
    assert common.commit_text(common.git_state(tmp_path)) == "commit unknown (not a git checkout)"


def _run_without(module, argv, tmp_path):
    """The CLI in a fresh interpreter in which ``import module`` fails, as when it is not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from prong_ext import cli\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


@pytest.mark.parametrize("module", ["matplotlib", "sklearn"])
def test_missing_extra_names_the_pip_command(tmp_path, module):
    res = _run_without(
        module, ["autoencoder", "--updates", "2", "--out", str(tmp_path / "o"), "--quiet"], tmp_path
    )
    assert res.returncode == 1, res.stderr
    assert f"error: {module} is needed for" in res.stderr
    assert "pip install 'prong_ext[experiments]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_tqdm_warns_and_runs_without_bars(tmp_path):
    argv = [
        "autoencoder",
        "--updates",
        "2",
        "--methods",
        "sgd",
        "--train-samples",
        "32",
        "--out",
        str(tmp_path / "o"),
    ]
    res = _run_without("tqdm", argv, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "tqdm is needed for the progress bars" in res.stderr
    assert "pip install 'prong_ext[experiments]'" in res.stderr
    assert (tmp_path / "o" / "summary.md").exists()
