"""The Python steps of scripts/gpu_check.sh: the preflight, the extension check, the summary and
the check of the summary's entries.

    python scripts/gpu_check.py preflight OUTDIR [--dry]   versions and missing pieces -> env.json
    python scripts/gpu_check.py extension OUTDIR [--dry]   prong_ext, _C and cuSOLVER -> extension.json
    python scripts/gpu_check.py summary OUTDIR             summary.md and summary.json, printed
    python scripts/gpu_check.py check OUTDIR [--dry]       the summary holds every expected entry

preflight and extension import torch (extension also prong_ext, from the current folder first, as
pytest run from the checkout does); summary and check use the standard library only, so that the
summary is written whatever else broke. Each command exits non-zero on a problem it names.

OUTDIR, as gpu_check.sh fills it: steps.tsv (one line per step: name, kind, exit code, seconds,
limit, note), env.json, extension.json, junit/<test file>.xml, bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MIN_SETUPTOOLS = (77,)  # pyproject.toml's license expression (PEP 639)
TIMED_OUT = 124  # timeout(1)'s exit code
NO_TESTS = 5  # pytest's exit code when nothing ran (every test deselected)
# The goals that a run on the GPU must report (results.json "goals" keys of benchmarks/run.py).
GPU_GOALS = (
    "covariance_bandwidth",
    "conv_vs_plain",
    "eigh_loop:resnet18:float64",
    "eigh_loop:vgg16:float64",
)
# The goals a dry run reports (size tiny: the eigh layer set is "tiny", float32 on the CPU).
DRY_GOALS = ("covariance_bandwidth", "conv_vs_plain", "eigh_loop:")
# Skip reasons that mean a CUDA test did not run on CUDA (tests/conftest.py, test_extension.py,
# test_triton_kernels.py): a problem on the GPU machine, the expected outcome of a dry run.
CUDA_SKIPS = ("needs a CUDA device", "without CUDA", "TRITON_INTERPRET=0")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str | None:
    """The version of whichever CuPy wheel is installed (cupy-cuda13x, cupy-cuda12x, cupy)."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda"):
            return f"{dist.version} ({name})"
    return None


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits or not piece[0].isdigit():
            break
        parts.append(int(digits))
    return tuple(parts)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# preflight


def preflight(out: Path, dry: bool) -> int:
    """Checks the pieces the run needs and records the versions. Errors (the run stops): pytest not
    importable, no nvcc (the path the shell resolved, in GPU_CHECK_NVCC), torch.cuda not available;
    a dry run tolerates the last two. Notes (reported, the run goes on): setuptools older than 77
    (the build then takes its fallback), pytest-benchmark missing (the benchmark step fails)."""
    errors: list[str] = []
    notes: list[str] = []
    env: dict = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "pytest": _dist_version("pytest"),
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "setuptools": _dist_version("setuptools"),
        "numpy": _dist_version("numpy"),
        "ninja": _dist_version("ninja"),
        "triton": _dist_version("triton"),
        "cupy": _cupy_version(),
        "matplotlib": _dist_version("matplotlib"),
    }
    try:
        import pytest  # noqa: F401
    except Exception as exc:
        errors.append(f"pytest is not importable by {sys.executable}: {exc}")
    if env["pytest_benchmark"] is None:
        notes.append("pytest-benchmark is not installed: the benchmark step cannot run")
    env["setuptools_ok"] = _version_tuple(env["setuptools"]) >= MIN_SETUPTOOLS
    if not env["setuptools_ok"]:
        notes.append(
            f"setuptools {env['setuptools']} is older than 77, which pyproject.toml's license "
            "expression needs: pip install -e . fails; the build falls back to setup.py build_ext "
            "--inplace without pyproject.toml"
        )
    nvcc = os.environ.get("GPU_CHECK_NVCC") or ""
    env["cuda_home"] = os.environ.get("CUDA_HOME")
    if nvcc and os.access(nvcc, os.X_OK):
        run = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if "release" in line]
        env["nvcc"] = f"{nvcc}: {lines[-1].strip() if lines else run.stdout.strip()[-80:]}"
    else:
        env["nvcc"] = None
        message = "nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): _C cannot be built with CUDA"
        (notes if dry else errors).append(message)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        cuda = torch.cuda.is_available()
        if cuda:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["gpu_count"] = torch.cuda.device_count()
        else:
            env["gpu"] = None
            message = (
                f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
            )
            (notes if dry else errors).append(message + (": a dry run, tolerated" if dry else ""))
    except Exception as exc:
        env["torch"] = None
        errors.append(f"torch does not import: {type(exc).__name__}: {exc}")
    if shutil.which("nvidia-smi"):
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["driver"] = (
            run.stdout.strip().splitlines()[0] if run.returncode == 0 and run.stdout.strip() else None
        )
    else:
        env["driver"] = None
    env["errors"], env["notes"], env["dry"] = errors, notes, dry
    _write_json(out / "env.json", env)
    for key, value in env.items():
        if key not in ("errors", "notes"):
            print(f"{key}: {value}")
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"MISSING: {e}")
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------
# extension


def extension(out: Path, dry: bool) -> int:
    """prong_ext and prong_ext.triton_kernels import from this checkout, _C loads and (unless dry)
    holds its CUDA kernels; records cusolver_info() and the build record."""
    root = Path.cwd().resolve()
    sys.path.insert(0, str(root))
    errors: list[str] = []
    info: dict = {"root": str(root)}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import torch

            import prong_ext
            import prong_ext.triton_kernels as tk
            from prong_ext import _extension

            available = _extension.available()
        except Exception as exc:  # recorded, so that the summary names it
            info["errors"], info["dry"] = [f"import failed: {type(exc).__name__}: {exc}"], dry
            _write_json(out / "extension.json", info)
            raise
    info["warnings"] = [str(w.message) for w in caught if "prong_ext" in str(w.message)]
    info["prong_ext"] = prong_ext.__file__
    info["triton_kernels"] = tk.__file__
    for name, path, expected in (
        ("prong_ext", prong_ext.__file__, root / "prong_ext"),
        ("prong_ext.triton_kernels", tk.__file__, root / "triton_kernels"),
    ):
        if Path(path).resolve().parent != expected.resolve():
            errors.append(f"{name} imports from {path}, not from {expected}")
    info["available"] = available
    info["error"] = _extension.unavailable_reason()
    info["cuda_built"] = _extension.cuda_built()
    cus = _extension.cusolver_info()
    info["cusolver"] = None
    if cus is not None:
        info["cusolver"] = {
            "build": _cusolver_text(cus[0]),
            "runtime": _cusolver_text(cus[1]),
            "xsyev_batched": cus[2],
        }
    try:
        from prong_ext import _build_info

        info["build_info"] = {
            k: getattr(_build_info, k, None) for k in ("torch_version", "cuda_version", "cuda_arch_list")
        }
    except ImportError:
        info["build_info"] = None
    info["torch"] = torch.__version__
    if not available:
        errors.append(f"prong_ext._C does not load: {_extension.unavailable_reason()}")
    elif not info["cuda_built"]:
        message = "prong_ext._C was built without CUDA: the CUDA tests of the extension would all skip"
        if dry:
            print(f"note: {message} (a dry run: expected)")
        else:
            errors.append(message)
    info["errors"], info["dry"] = errors, dry
    _write_json(out / "extension.json", info)
    for key, value in info.items():
        if key != "errors":
            print(f"{key}: {value}")
    print(
        "cuSOLVER (build, runtime, XsyevBatched usable): "
        + ("none (_C without CUDA)" if cus is None else f"{cus} -> {info['cusolver']}")
    )
    for e in errors:
        print(f"FAILED: {e}")
    return 1 if errors else 0


def _cusolver_text(version: int) -> str:
    """major * 1000 + minor * 100 + patch -> 'major.minor.patch'."""
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


# ---------------------------------------------------------------------------------------------
# summary


def read_steps(out: Path) -> list[dict]:
    """steps.tsv: name, kind, rc, seconds, limit, note (tab-separated, one step a line)."""
    steps = []
    path = out / "steps.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, kind, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        steps.append(
            {
                "name": name,
                "kind": kind,
                "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                "seconds": float(seconds) if seconds else None,
                "limit": float(limit) if limit else None,
                "note": note,
            }
        )
    return steps


def read_junit(path: Path) -> dict:
    """Counts of one pytest junit file: tests, passed, failed, errors, skipped, time, the failed
    tests' names, the skip reasons with their counts and the (name, seconds) of every test case."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "time": 0.0}
    failed_names: list[str] = []
    skips: dict[str, int] = {}
    cases: list[tuple[str, float]] = []
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        counts["time"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            cases.append((name, float(case.get("time", 0.0))))
            if case.find("failure") is not None or case.find("error") is not None:
                failed_names.append(name)
            skipped = case.find("skipped")
            if skipped is not None:
                reason = skipped.get("message") or ""
                skips[reason] = skips.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = failed_names
    counts["skips"] = skips
    counts["cases"] = cases
    return counts


def _fmt_goal_value(goal: dict) -> str:
    if goal.get("value") is None:
        return "not measured"
    unit = goal.get("unit") or ""
    digits = 1 if unit.startswith("%") else 2
    return f"{goal['value']:.{digits}f}" + (f" {unit}" if unit and unit != "x" else "")


def _fmt_target(goal: dict) -> str:
    t = goal.get("target")
    if not t:
        return ""
    unit = goal.get("unit") or ""
    return f"{'≥' if t[0] == '>=' else '≤'} {t[1]:g}" + (f" {unit}" if unit and unit != "x" else "")


def build_summary(out: Path) -> tuple[dict, str]:
    """(summary.json's content, summary.md's text) from what the steps left in `out`."""
    env = _read_json(out / "env.json")
    ext = _read_json(out / "extension.json")
    bench = _read_json(out / "bench" / "results.json")
    steps = read_steps(out)
    dry = bool(env.get("dry"))
    problems: list[str] = []
    problems += [f"preflight: {e}" for e in env.get("errors", [])]
    problems += [f"extension: {e}" for e in ext.get("errors", [])]
    notes = [f"preflight: {n}" for n in env.get("notes", [])]

    tests: dict[str, dict] = {}
    for step in steps:
        if step["kind"] == "test":
            junit = out / "junit" / f"{step['name']}.xml"
            counts = read_junit(junit) if junit.exists() else {"missing": True}
            counts["rc"], counts["seconds"], counts["limit"] = step["rc"], step["seconds"], step["limit"]
            counts["note"] = step["note"]
            tests[step["name"]] = counts
    for step in steps:
        rc = step["rc"]
        if step["note"].startswith("skipped"):
            problems.append(f"{step['name']}: {step['note']}")
        elif rc == TIMED_OUT:
            problems.append(
                f"{step['name']}: timed out after {step['seconds']:.0f} s (limit {step['limit']:.0f} s)"
            )
        elif rc not in (0, None) and not (step["kind"] == "test" and rc == NO_TESTS):
            if step["kind"] == "test":
                t = tests.get(step["name"], {})
                if t.get("failed") or t.get("errors"):
                    continue  # named below, with the failed tests
            problems.append(
                f"{step['name']}: exit code {rc}" + (f" ({step['note']})" if step["note"] else "")
            )
    for name, t in tests.items():
        if t.get("missing") and t["rc"] is not None:
            problems.append(f"{name}: no junit file")
        if t.get("failed") or t.get("errors"):
            problems.append(f"{name}: {t['failed']} failed, {t['errors']} errors")
        cuda_skips = sum(
            n for reason, n in t.get("skips", {}).items() if any(c in reason for c in CUDA_SKIPS)
        )
        if cuda_skips and not dry:
            problems.append(f"{name}: {cuda_skips} CUDA tests skipped on the GPU machine")
    totals = {
        k: sum(t.get(k, 0) for t in tests.values())
        for k in ("tests", "passed", "failed", "errors", "skipped")
    }

    goals = bench.get("goals", [])
    if any(st["kind"] == "preflight" and st["rc"] not in (0, None) for st in steps):
        problems.append("the run stopped after the preflight: nothing was built, tested or measured")
    elif steps and not any(st["kind"] == "bench" for st in steps):
        problems.append("bench: the benchmarks did not run")
    if not dry:
        have = {g["key"] for g in goals if g.get("value") is not None}
        missing = [k for k in GPU_GOALS if k not in have]
        if bench and missing:
            problems.append(f"bench: goals not measured: {', '.join(missing)}")

    versions = {
        "python": env.get("python"),
        "torch": env.get("torch"),
        "torch_cuda": env.get("torch_cuda"),
        "triton": env.get("triton"),
        "cupy": env.get("cupy"),
        "setuptools": env.get("setuptools"),
        "setuptools_ok": env.get("setuptools_ok"),
        "nvcc": env.get("nvcc"),
        "gpu": env.get("gpu"),
        "gpu_capability": env.get("gpu_capability"),
        "driver": env.get("driver"),
        "cusolver": ext.get("cusolver"),
        "cuda_built": ext.get("cuda_built"),
        "commit": os.environ.get("GPU_CHECK_COMMIT") or _commit(),
    }
    summary = {
        "ok": not problems,
        "dry": dry,
        "problems": problems,
        "notes": notes,
        "versions": versions,
        "steps": steps,
        "tests": {k: {kk: vv for kk, vv in v.items() if kk != "cases"} for k, v in tests.items()},
        "totals": totals,
        "goals": goals,
        "bench_files": bench.get("files", {}),
        "bench_size": bench.get("size"),
        "wall_s": sum(s["seconds"] or 0 for s in steps),
    }
    return summary, _markdown(summary, tests)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _commit() -> str | None:
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() or None if run.returncode == 0 else None


def _markdown(s: dict, tests: dict) -> str:
    v = s["versions"]
    cus = v.get("cusolver") or {}
    lines = [
        f"# GPU check{' (dry run, no GPU)' if s['dry'] else ''}: {'PASS' if s['ok'] else 'FAIL'}",
        "",
    ]
    if s["problems"]:
        lines += ["Problems:", ""] + [f"- {p}" for p in s["problems"]] + [""]
    if s["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in s["notes"]] + [""]
    lines += [
        "## Machine",
        "",
        f"- GPU: {v.get('gpu') or 'none'}"
        + (f" (sm_{v['gpu_capability'].replace('.', '')})" if v.get("gpu_capability") else "")
        + (f", driver {v['driver']}" if v.get("driver") else ""),
        f"- Python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), Triton "
        f"{v.get('triton')}, CuPy {v.get('cupy') or 'not installed'}, setuptools {v.get('setuptools')} "
        f"({'>= 77' if v.get('setuptools_ok') else '**older than 77**: the build took its fallback'})",
        f"- nvcc: {v.get('nvcc') or 'not found'}",
        f"- prong_ext._C with CUDA: {v.get('cuda_built')}; cuSOLVER build {cus.get('build')}, runtime "
        f"{cus.get('runtime')}, XsyevBatched usable: {cus.get('xsyev_batched')}",
        f"- commit: {v.get('commit') or 'unknown (no git here; set GPU_CHECK_COMMIT)'}",
        "",
        "## Tests (from the junit files)",
        "",
        "| file | passed | failed | errors | skipped | time s | limit s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, t in tests.items():
        if t.get("missing"):
            status = "no junit file" + (f": {t['note']}" if t["note"] else "")
            lines.append(f"| {name} | | | | | {_num(t['seconds'])} | {_num(t['limit'])} | {status} |")
            continue
        if t.get("unreadable"):
            lines.append(
                f"| {name} | | | | | {_num(t['seconds'])} | {_num(t['limit'])} | {t['unreadable']} |"
            )
            continue
        if t["rc"] == TIMED_OUT:
            status = "**timed out** (tests after that point did not run)"
        elif t["failed"] or t["errors"]:
            status = "**failed**"
        else:
            status = "ok" + (f" ({t['note']})" if t["note"] else "")
        lines.append(
            f"| {name} | {t['passed']} | {t['failed']} | {t['errors']} | {t['skipped']} "
            f"| {_num(t['seconds'])} | {_num(t['limit'])} | {status} |"
        )
    tot = s["totals"]
    lines += [
        f"| **all** | {tot['passed']} | {tot['failed']} | {tot['errors']} | {tot['skipped']} | | | |",
        "",
    ]
    failed = [n for t in tests.values() for n in t.get("failed_names", [])]
    if failed:
        lines += ["Failed tests:", ""] + [f"- {n}" for n in failed[:30]]
        lines += [f"- ... and {len(failed) - 30} more" if len(failed) > 30 else ""] + [""]
    skips: dict[str, int] = {}
    for t in tests.values():
        for reason, n in t.get("skips", {}).items():
            skips[reason] = skips.get(reason, 0) + n
    if skips:
        lines += [
            "Skip reasons: " + "; ".join(f"{n} x {r}" for r, n in sorted(skips.items(), key=lambda x: -x[1])),
            "",
        ]
    cases = sorted(
        (c for t in tests.values() for c in t.get("cases", []) if c[1] >= 0.5), key=lambda c: -c[1]
    )[:8]
    if cases:
        lines += ["Slowest tests: " + ", ".join(f"{n} {sec:.1f} s" for n, sec in cases), ""]
    lines += [f"## GPU goals (benchmarks, size {s['bench_size'] or '?'})", ""]
    if s["goals"]:
        met = [g for g in s["goals"] if g.get("met") == "yes"]
        judged = [g for g in s["goals"] if g.get("met")]
        lines += [
            "| goal | target | achieved | met | case | note |",
            "|---|---|---:|---|---|---|",
        ]
        for g in s["goals"]:
            lines.append(
                f"| {g['goal']} | {_fmt_target(g)} | {_fmt_goal_value(g)} | {g.get('met') or ''} "
                f"| {g.get('case', '')} | {g.get('note', '')} |"
            )
        lines += [
            "",
            f"{len(met)} of {len(judged)} judged goals met" if judged else "Not judged: no GPU in this run.",
            "Full tables: bench/results.md.",
            "",
        ]
    else:
        lines += ["No benchmark results (bench/results.json is missing).", ""]
    lines += [
        "## Steps",
        "",
        "| step | exit | time s | limit s | note |",
        "|---|---:|---:|---:|---|",
    ]
    for st in s["steps"]:
        lines.append(
            f"| {st['name']} | {'' if st['rc'] is None else st['rc']} | {_num(st['seconds'])} "
            f"| {_num(st['limit'])} | {st['note']} |"
        )
    lines += ["", f"Total {s['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def summary_cmd(out: Path) -> int:
    summary, text = build_summary(out)
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------------------------------------
# check


def check(out: Path, dry: bool, test_files: list[str]) -> int:
    """Verifies that summary.json and summary.md hold every expected entry: the versions, one test
    entry with a readable junit file per test file, the build and benchmark steps, the goals with a
    value. Prints what is missing; exit status 1 then."""
    missing: list[str] = []
    s = _read_json(out / "summary.json")
    md = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    if not s:
        print("check: summary.json is missing or unreadable")
        return 1
    for key in ("python", "torch", "triton", "setuptools"):
        if not s["versions"].get(key):
            missing.append(f"versions.{key}")
    if s["versions"].get("cuda_built") is None:
        missing.append("versions.cuda_built (the extension step's record)")
    kinds = {st["kind"] for st in s["steps"]}
    for kind in ("preflight", "build", "extension", "test", "bench"):
        if kind not in kinds:
            missing.append(f"a {kind} step")
    for name in test_files:
        t = s["tests"].get(name)
        if t is None:
            missing.append(f"tests.{name}")
        elif t.get("missing") or t.get("unreadable") or "passed" not in t:
            missing.append(f"junit counts of {name}")
    if not any(t.get("passed", 0) > 0 for t in s["tests"].values()):
        missing.append("a test file with passed tests")
    if dry and not any(t.get("skipped", 0) > 0 for t in s["tests"].values()):
        missing.append("skipped CUDA tests (the dry run selects -m cuda)")
    have = {g["key"] for g in s["goals"] if g.get("value") is not None}
    for key in DRY_GOALS if dry else GPU_GOALS:
        if not any(h == key or (key.endswith(":") and h.startswith(key)) for h in have):
            missing.append(f"goal {key} with a value")
    for heading in ("## Machine", "## Tests", "## GPU goals", "## Steps"):
        if heading not in md:
            missing.append(f"summary.md section {heading}")
    for m in missing:
        print(f"check: missing {m}")
    print(f"check: {'the summary holds every expected entry' if not missing else f'{len(missing)} missing'}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("preflight", "extension", "summary", "check"))
    parser.add_argument("out", type=Path, help="the output folder of gpu_check.sh")
    parser.add_argument("--dry", action="store_true", help="a dry run: no GPU needed")
    parser.add_argument("--test-files", default="", help="check: the test steps expected (comma-separated)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "preflight":
        return preflight(args.out, args.dry)
    if args.command == "extension":
        return extension(args.out, args.dry)
    if args.command == "summary":
        return summary_cmd(args.out)
    return check(args.out, args.dry, [f for f in args.test_files.split(",") if f])


if __name__ == "__main__":
    sys.exit(main())
