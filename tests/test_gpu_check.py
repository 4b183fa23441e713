"""scripts/gpu_check.py, the summary of scripts/gpu_check.sh: junit files, steps and benchmark goals
read into summary.json / summary.md, failures and timeouts named, and the check of a dry run's
entries; benchmarks/run.py's goals from benchmark rows. Synthetic output folders, no subprocess."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check", ROOT / "scripts" / "gpu_check.py")
sys.path.insert(0, str(ROOT / "benchmarks"))
run = _load("bench_run", ROOT / "benchmarks" / "run.py")


def _junit(path, cases):
    """A pytest-style junit file; cases: (name, outcome, seconds, skip reason)."""
    counts = {o: sum(c[1] == o for c in cases) for o in ("failure", "error", "skipped")}
    body = []
    for name, outcome, seconds, reason in cases:
        inner = ""
        if outcome == "failure":
            inner = '<failure message="assert 1 == 2">trace</failure>'
        elif outcome == "error":
            inner = '<error message="fixture">trace</error>'
        elif outcome == "skipped":
            inner = f'<skipped type="pytest.skip" message="{reason}">skip</skipped>'
        body.append(f'<testcase classname="tests.x" name="{name}" time="{seconds}">{inner}</testcase>')
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        f'<testsuite name="pytest" errors="{counts["error"]}" failures="{counts["failure"]}" '
        f'skipped="{counts["skipped"]}" tests="{len(cases)}" time="1.5">'
        + "".join(body)
        + "</testsuite></testsuites>"
    )


def _goal(key, value, unit, target, met, case=""):
    return {
        "key": key,
        "goal": key,
        "value": value,
        "unit": unit,
        "target": target,
        "met": met,
        "case": case,
        "note": "",
    }


GOALS = [
    _goal(
        "covariance_bandwidth", 81.5, "% of memory peak", [">=", 70.0], "yes", "(256, 64, 32, 32) contiguous"
    ),
    _goal("conv_vs_plain", 1.04, "x", ["<=", 1.1], "yes"),
    _goal("eigh_loop:resnet18:float64", 12.0, "x", [">=", 20.0], "no"),
    _goal("eigh_loop:vgg16:float64", 25.0, "x", [">=", 20.0], "yes"),
]


def _outdir(tmp_path, dry=False, steps=None, goals=GOALS):
    out = tmp_path / "out"
    (out / "junit").mkdir(parents=True)
    (out / "bench").mkdir()
    env = {
        "python": "3.12.3",
        "torch": "2.11.0+cu130",
        "torch_cuda": "13.0",
        "triton": "3.6.0",
        "setuptools": "80.9.0",
        "setuptools_ok": True,
        "gpu": None if dry else "NVIDIA H200",
        "gpu_capability": None if dry else "9.0",
        "errors": [],
        "notes": [],
        "dry": dry,
    }
    (out / "env.json").write_text(json.dumps(env))
    ext = {
        "cuda_built": not dry,
        "errors": [],
        "cusolver": None if dry else {"build": "12.0.3", "runtime": "12.0.3"},
    }
    (out / "extension.json").write_text(json.dumps(ext))
    (out / "bench" / "results.json").write_text(json.dumps({"goals": goals, "size": "quick", "files": {}}))
    steps = steps or [
        ("preflight", "preflight", 0, 2, 60, "nvcc /usr/local/cuda/bin/nvcc"),
        ("build", "build", 0, 80, 300, "pip install -e ."),
        ("extension", "extension", 0, 3, 60, ""),
        ("test_a", "test", 0, 10, 60, ""),
        ("bench", "bench", 0, 120, 170, "benchmarks/run.py --quick"),
    ]
    (out / "steps.tsv").write_text("".join("\t".join(map(str, s)) + "\n" for s in steps))
    return out


def test_clean_run_passes_and_counts(tmp_path):
    out = _outdir(tmp_path)
    _junit(
        out / "junit" / "test_a.xml",
        [("t1", "ok", 0.1, ""), ("t2", "ok", 2.5, ""), ("t3", "skipped", 0, "slow")],
    )
    summary, text = gpu_check.build_summary(out)
    assert summary["ok"], summary["problems"]
    t = summary["tests"]["test_a"]
    assert (t["tests"], t["passed"], t["failed"], t["errors"], t["skipped"]) == (3, 2, 0, 0, 1)
    assert t["skips"] == {"slow": 1}
    assert summary["totals"]["passed"] == 2
    assert summary["versions"]["cusolver"]["runtime"] == "12.0.3"
    assert "# GPU check: PASS" in text
    assert "| test_a | 2 | 0 | 0 | 1 |" in text
    assert "≥ 20" in text and "12.00" in text and "81.5 % of memory peak" in text
    assert "3 of 4 judged goals met" in text
    assert "tests.x::t2 2.5 s" in text  # slowest tests


def test_failures_timeouts_and_cuda_skips_are_problems(tmp_path):
    steps = [
        ("preflight", "preflight", 0, 2, 60, ""),
        ("build", "build", 1, 30, 300, "pip install -e ."),
        ("build_inplace", "build", 0, 70, 270, "fallback"),
        ("extension", "extension", 0, 3, 60, ""),
        ("test_a", "test", 1, 10, 60, ""),
        ("test_b", "test", 124, 60, 60, ""),
        ("test_c", "test", 0, 5, 60, ""),
        ("test_d", "test", 125, 0, 3, "skipped: out of time (budget 480 s)"),
        ("bench", "bench", 0, 120, 170, ""),
    ]
    out = _outdir(tmp_path, steps=steps)
    _junit(out / "junit" / "test_a.xml", [("t1", "failure", 0.1, ""), ("t2", "ok", 0.1, "")])
    _junit(out / "junit" / "test_b.xml", [("t1", "ok", 30, "")])  # interrupted: what ran is kept
    _junit(out / "junit" / "test_c.xml", [("t1", "skipped", 0, "needs a CUDA device"), ("t2", "ok", 0, "")])
    summary, text = gpu_check.build_summary(out)
    assert not summary["ok"]
    problems = "\n".join(summary["problems"])
    assert "build: exit code 1 (pip install -e .)" in problems  # the fallback that followed passed
    assert "test_a: 1 failed, 0 errors" in problems
    assert "test_a: exit code" not in problems  # named once, with its failed tests
    assert "test_b: timed out after 60 s" in problems
    assert "test_c: 1 CUDA tests skipped on the GPU machine" in problems
    assert "test_d: skipped: out of time" in problems
    assert summary["tests"]["test_b"]["passed"] == 1
    assert "**timed out**" in text and "tests.x::t1" in text and "# GPU check: FAIL" in text


def test_missing_goals_and_stopped_preflight(tmp_path):
    out = _outdir(tmp_path, goals=GOALS[:2])
    _junit(out / "junit" / "test_a.xml", [("t1", "ok", 0.1, "")])
    summary, _ = gpu_check.build_summary(out)
    assert any("eigh_loop:resnet18:float64" in p for p in summary["problems"])

    stopped = _outdir(tmp_path / "stopped", steps=[("preflight", "preflight", 1, 1, 60, "")])
    env = json.loads((stopped / "env.json").read_text())
    env["errors"] = ["torch.cuda.is_available() is False"]
    (stopped / "env.json").write_text(json.dumps(env))
    summary, text = gpu_check.build_summary(stopped)
    assert not summary["ok"]
    assert summary["problems"][0] == "preflight: torch.cuda.is_available() is False"
    assert any("stopped after the preflight" in p for p in summary["problems"])


def test_junit_with_a_testsuite_root_and_an_unreadable_file(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(
        '<testsuite tests="2" failures="0" errors="0" skipped="1" time="0.5">'
        '<testcase classname="c" name="n" time="0.1"/>'
        '<testcase classname="c" name="m" time="0"><skipped message="why"/></testcase></testsuite>'
    )
    counts = gpu_check.read_junit(path)
    assert (counts["passed"], counts["skipped"], counts["skips"]) == (1, 1, {"why": 1})
    (tmp_path / "b.xml").write_text("<testsuite")
    assert "unreadable" in gpu_check.read_junit(tmp_path / "b.xml")


def test_check_of_a_dry_run(tmp_path, capsys):
    dry_goals = [dict(GOALS[0]), dict(GOALS[1]), dict(GOALS[2], key="eigh_loop:tiny:float32")]
    steps = [
        ("preflight", "preflight", 0, 2, 60, ""),
        ("build", "build", 0, 20, 240, ""),
        ("extension", "extension", 0, 1, 60, ""),
        ("test_a", "test", 5, 1, 60, "dry run: -m cuda"),
        ("test_b", "test", 0, 2, 60, ""),
        ("bench", "bench", 0, 12, 170, ""),
    ]
    out = _outdir(tmp_path, dry=True, steps=steps, goals=dry_goals)
    _junit(out / "junit" / "test_a.xml", [("t1", "skipped", 0, "needs a CUDA device")])
    _junit(out / "junit" / "test_b.xml", [("t1", "ok", 0.1, "")])
    assert gpu_check.summary_cmd(out) == 0
    assert gpu_check.check(out, True, ["test_a", "test_b"]) == 0
    assert gpu_check.check(out, False, ["test_a", "test_b"]) == 1  # a GPU run needs the GPU goals
    assert "goal eigh_loop:resnet18:float64" in capsys.readouterr().out
    assert gpu_check.check(out, True, ["test_a", "test_b", "test_c"]) == 1
    (out / "junit" / "test_b.xml").unlink()
    gpu_check.summary_cmd(out)
    assert gpu_check.check(out, True, ["test_a", "test_b"]) == 1


def _row(file, group, impl, median, **extra):
    return {
        "file": file,
        "group": group,
        "name": f"x-{impl}",
        "impl": impl,
        "median_s": median,
        "min_s": median,
        "rounds": 3,
        "extra_info": extra,
    }


@pytest.mark.parametrize(
    "device_type", ["cuda", "cpu"], ids=["gpu_run", "cpu_run"]
)  # an id "cuda" would skip it (conftest)
def test_run_goals(device_type):
    rows = []
    for c, prong_s in ((64, 1e-3), (256, 4e-3), (512, 1.0)):
        shape = [256, c, 32, 32]
        ex = {"shape": shape, "layout": "contiguous"}
        rows += [
            _row("covariance", f"cov{c}", "prong", prong_s, **ex),
            _row("covariance", f"cov{c}", "naive", 1.0, **ex),
        ]
    conv = {
        "op": "whitened_conv",
        "prong_floor": 1.02,
        "shape": {"k": 3, "N": 128, "C_in": 64, "H": 32, "W": 32},
    }
    rows += [_row("whitened", "w", "prong", 1.2e-3, **conv), _row("whitened", "w", "plain", 1e-3, **conv)]
    lin = {"op": "whitened_linear", "prong_floor": 1.0, "shape": {"rows": 8, "in": 4, "out": 4}}
    rows += [_row("whitened", "l", "prong", 9.0, **lin), _row("whitened", "l", "plain", 1.0, **lin)]
    eig = {"layers": "resnet18", "sizes": [3, 64], "dtype": "float64"}
    rows += [_row("eigh", "e", i, t, **eig) for i, t in (("naive", 0.5), ("prong", 0.02), ("cupy", 0.04))]
    rows[-1]["extra_info"]["cupy_looped_sizes"] = [64]
    meta = {
        "device_type": device_type,
        "memory_peak": {"gbps": 4800.0, "source": "test"},
        "roofline": {"copy_gbps": 1.0},
    }
    goals = {g["key"]: g for g in run.goals(rows, meta)}
    cov = goals["covariance_bandwidth"]
    # C = 256: 4 * 256 * 32 * 32 * 256 bytes in 4 ms against 4800 GB/s; C = 512 is outside the goal
    assert cov["value"] == pytest.approx(100 * 4 * 256 * 32 * 32 * 256 / 4e-3 / 1e9 / 4800)
    assert cov["case"] == "(256, 256, 32, 32) contiguous"
    assert goals["conv_vs_plain"]["value"] == pytest.approx(1.2)  # the linear layer is no conv
    assert goals["eigh_loop:resnet18:float64"]["value"] == pytest.approx(25.0)
    assert goals["eigh_cupy:resnet18:float64"]["value"] == pytest.approx(2.0)
    assert "[64]" in goals["eigh_cupy:resnet18:float64"]["note"]
    if device_type == "cuda":
        assert [goals[k]["met"] for k in ("covariance_bandwidth", "conv_vs_plain")] == ["no", "no"]
        assert goals["eigh_loop:resnet18:float64"]["met"] == "yes"
    else:
        assert all(g["met"] is None for g in goals.values())
    table = "\n".join(run.goals_table(list(goals.values()), device_type == "cuda"))
    assert "| ≥ 20 | 25.00 |" in table


def test_covariance_section_shows_variants():
    """A variant of prong (prong-deterministic, prong-tf32x3) gets its time and its time over
    prong's in the covariance table; without variants the table has no such columns."""
    ex = {"shape": [256, 64, 32, 32], "layout": "contiguous", "flops": 1e9, "bytes": 4e9}
    group = {
        "naive": _row("covariance", "cov", "naive", 8e-3, **ex),
        "prong": _row("covariance", "cov", "prong", 2e-3, **ex),
        "prong-deterministic": _row("covariance", "cov", "prong-deterministic", 3e-3, **ex),
    }
    meta = {
        "device_type": "cuda",
        "memory_peak": {"gbps": 4800.0, "source": "test"},
        "roofline": {"copy_gbps": 1000.0, "gemm_gflops": 1000.0},
    }
    lines = run._covariance({"cov": group}, lambda *args: None, meta)
    head = next(line for line in lines if line.startswith("| shape"))
    assert head.endswith("| prong-deterministic ms | prong-deterministic/prong |")
    assert lines[-1].endswith("| 33.6 | 0.7 | 3 | 1.50 |")  # GB/s and % of peak, then the variant
    del group["prong-deterministic"]
    lines = run._covariance({"cov": group}, lambda *args: None, meta)
    assert "prong-deterministic" not in "\n".join(lines)
