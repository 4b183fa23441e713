"""Runs the benchmark suite on the device present and writes the report.

    python benchmarks/run.py [--quick | --size full|quick|tiny] [--out benchmarks/results]
                             [--device auto|cpu|cuda] [--threads N] [--time-limit S]
                             [--only covariance,whitened,eigh,whitening,e2e]

Each bench file runs under pytest-benchmark in its own pytest process (--benchmark-json into a
temporary file); the medians are then paired by group ("naive" and "prong" on the same inputs in
one group) and written under --out:

- results.md: the GPU goals with the figures achieved, then tables of the ratios (naive/prong,
  prong/plain layer, PRONG step/SGD step at T=100, the reparametrization's share) with their
  targets and floors, and the device;
- results.json: device, versions, the git commit, CPU count, the roofline, the memory's peak
  bandwidth, shapes, every raw median, the goals;
- ratios.png: the ratios against their targets (without matplotlib: not written);
- pytest.log: the pytest-benchmark console tables.

Targets and goals are figures beside the measurements, never asserted. --quick runs a short
shape list (on CUDA the cases that decide the GPU goals first). --time-limit bounds the whole
run: a file still running at the limit is interrupted (the benchmarks it finished are kept),
later files are not started, and the report is written either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# in the order they run: the ones that decide the GPU goals first
FILES = {
    "covariance": "bench_covariance.py",
    "whitened": "bench_whitened.py",
    "eigh": "bench_eigh.py",  # skipped when the file is absent
    "whitening": "bench_whitening.py",
    "e2e": "bench_e2e.py",
}
TIMED_OUT = 124  # the exit code recorded for a file interrupted at --time-limit

# the figure each ratio is compared with in results.md: (comparison, value)
TARGETS = {
    "covariance naive/prong": (">=", 1.2),
    "conv prong/plain": ("<=", 1.10),
    "conv1x1 naive/prong": (">=", 1.5),
    "conv3x3 naive/prong": (">=", 1.0),
    "linear naive/prong": (">=", 1.5),
    "whitening naive/prong": (">=", 1.0),
    "eigh naive/prong": (">=", 1.0),
    "eigh naive/prong cuda": (">=", 20.0),
    "covariance % of memory peak": (">=", 70.0),
    "e2e resnet18 prong/sgd": ("<=", 1.10),
    "e2e autoencoder prong/sgd": ("<=", 2.0),
    "e2e reparam share cuda": ("<=", 0.05),
}


def _met(ratio: float | None, target: tuple[str, float] | None) -> str:
    if ratio is None or target is None:
        return ""
    op, value = target
    ok = ratio >= value if op == ">=" else ratio <= value
    return "yes" if ok else "**no**"


def _fmt_target(target) -> str:
    return "" if target is None else f"{'≥' if target[0] == '>=' else '≤'} {target[1]:g}"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.3g}"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}"


def _row(*cells) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table_head(*columns: str) -> list[str]:
    """A markdown table's header and alignment rows; a column named "name:" is right-aligned."""
    align = "".join("---:|" if c.endswith(":") else "---|" for c in columns)
    return [_row(*(c.removesuffix(":") for c in columns)), "|" + align]


# ---------------------------------------------------------------------------------------------
# Running


def run_file(path: Path, json_out: Path, env: dict, log, timeout: float | None = None) -> tuple[int, float]:
    """Runs one bench file under pytest: (exit code, wall seconds). Past `timeout` seconds pytest
    is interrupted (SIGINT: it stops and pytest-benchmark writes the JSON of what it finished),
    killed 30 s later if still running, and the exit code is TIMED_OUT."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(path),
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        f"--benchmark-json={json_out}",
        "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint if os.name == "posix" else None,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        rc = TIMED_OUT
        stderr += f"\nrun.py: interrupted at the time limit ({timeout:.0f} s)\n"
    wall = time.perf_counter() - start
    log.write(f"$ {' '.join(cmd)}\n{stdout}\n{stderr}\n")
    log.flush()
    if rc not in (0, 5):  # 5: nothing collected (e.g. bench_eigh without _C)
        tail = "\n".join((stdout + stderr).splitlines()[-25:])
        print(f"  {path.name} failed (exit {rc}):\n{tail}", file=sys.stderr)
    return rc, wall


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so that the child's Python installs
    its KeyboardInterrupt handler even when this process was started with SIGINT ignored (in the
    background), and the interruption at the time limit reaches pytest."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def collect(json_path: Path, source: str) -> list[dict]:
    if not json_path.exists() or json_path.stat().st_size == 0:
        return []
    data = json.loads(json_path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        extra = dict(b.get("extra_info") or {})
        impl = extra.get("impl") or str(b.get("param") or b["name"]).rstrip("]").split("-")[-1]
        rows.append(
            {
                "file": source,
                "group": b.get("group") or b["name"],
                "name": b["name"],
                "impl": impl,
                "median_s": b["stats"]["median"],
                "min_s": b["stats"]["min"],
                "rounds": b["stats"]["rounds"],
                "extra_info": extra,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The report


def _by_group(rows: list[dict], source: str) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["file"] == source:
            groups.setdefault(r["group"], {})[r["impl"]] = r
    return groups


def _ratio(a: dict | None, b: dict | None, key: str = "median_s") -> float | None:
    if not a or not b or not b.get(key) or a.get(key) is None:
        return None
    return a[key] / b[key]


class _Ratios:
    """The ratios of the report's tables, in order (for results.json and the plot)."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, section: str, label: str, ratio, key: str | None = None, floor=None):
        """Records a ratio with its target (TARGETS[key]) and floor; returns the target."""
        target = TARGETS.get(key) if key else None
        self.items.append(
            {
                "section": section,
                "label": label,
                "ratio": ratio,
                "target": None if target is None else list(target),
                "met": _met(ratio, target).strip("*") or None,
                "floor": floor,
            }
        )
        return target


def build_report(rows: list[dict], meta: dict) -> tuple[str, list[dict]]:
    """Markdown text and the list of ratios (for the JSON and the plot)."""
    ratios = _Ratios()
    out = _header(meta) + goals_table(meta.get("goals", []), meta["device_type"] == "cuda")
    for source, section in SECTIONS:
        groups = _by_group(rows, source)
        if groups:
            out += section(groups, ratios.add, meta) + [""]
    failed = {k: v for k, v in meta["files"].items() if v["rc"] not in (0, 5)}
    if failed:
        out += ["## Failures", ""] + [f"- {k}: {_file_status(v)}" for k, v in failed.items()]
        out.append("")
    return "\n".join(out), ratios.items


def _header(meta: dict) -> list[str]:
    """The device, versions, source and roofline; a warning when the machine was busy."""
    roof = meta["roofline"]
    out = [
        "# prong_ext benchmarks",
        "",
        f"Device: **{meta['device']}** ({meta['device_type']}); Python {meta['python']}, torch "
        f"{meta['torch']}, Triton {meta['triton'] or 'not installed'}; {meta['cpu_count']} CPUs, "
        f"{meta['threads']} torch threads; size `{meta['size']}`; run took {meta['wall_s']:.0f} s.",
        f"Source: {meta['commit_text']}.",
        f"Roofline measured here: float32 GEMM {roof['gemm_gflops']:.0f} GFLOP/s, copy "
        f"{roof['copy_gbps']:.1f} GB/s (read + write).",
        "",
    ]
    load = meta.get("loadavg_1min", {}).get("start")
    if load is not None and load > 0.5 * meta["cpu_count"]:
        out += [
            f"**The machine was busy when the run started** (1-minute load average {load:.1f} on "
            f"{meta['cpu_count']} CPUs): the timings are noisy; quote a quiet run.",
            "",
        ]
    return out + [
        "Times are pytest-benchmark medians in ms (synchronized, after warm-up). Ratios above 1 in "
        "a naive/prong column mean prong is faster. Targets are figures to compare, not asserted.",
        "",
    ]


def _covariance(groups: dict, add, meta: dict) -> list[str]:
    peak, _, peak_source = _memory_peak(meta)
    variants = sorted({i for g in groups.values() for i in g} - {"naive", "prong", "torch.cov"})
    out = [
        "## Covariance (NCHW float32, float32 products)",
        "",
        "Floor: max(M*C^2 flops / GEMM rate, 4*M*C bytes / copy rate), M = N*H*W. prong GB/s: "
        f"the bytes read (4*M*C) over prong's time; % of peak: of {peak:.0f} GB/s ({peak_source}).",
        "",
    ]
    if variants:
        out += [
            "Variants of prong on the same input, their time over prong's beside them (above 1: slower): "
            "prong-tf32x3, the products on the tensor cores; prong-deterministic, under "
            "torch.use_deterministic_algorithms(True) (row splits summed after the launch, no atomics).",
            "",
        ]
    out += _table_head(
        "shape", "layout", "naive ms:", "prong ms:", "torch.cov ms:", "naive/prong:", "target", "met",
        "floor ms:", "prong/floor:", "prong GB/s:", "% of peak:",
        *(c for v in variants for c in (f"{v} ms:", f"{v}/prong:")),
    )  # fmt: skip
    return out + [_covariance_row(g, add, meta["roofline"], peak, variants) for g in groups.values()]


def _covariance_row(g: dict, add, roof: dict, peak: float, variants: list[str]) -> str:
    p = g.get("prong")
    ex = (p or g.get("naive"))["extra_info"]
    floor = max(ex["flops"] / (roof["gemm_gflops"] * 1e9), ex["bytes"] / (roof["copy_gbps"] * 1e9))
    r = _ratio(g.get("naive"), p)
    t = add("covariance", f"cov {tuple(ex['shape'])} {ex['layout']}", r, "covariance naive/prong")
    gbps = _read_gbps(p)
    return _row(
        tuple(ex["shape"]), ex["layout"], _ms(g.get("naive", {}).get("median_s")), _ms(p and p["median_s"]),
        _ms(g.get("torch.cov", {}).get("median_s")), _x(r), _fmt_target(t), _met(r, t), _ms(floor),
        _x(p and p["median_s"] / floor), "" if gbps is None else f"{gbps:.3g}",
        "" if gbps is None else f"{100 * gbps / peak:.1f}",
        *(c for v in variants for c in (_ms(g.get(v, {}).get("median_s")), _x(_ratio(g.get(v), p)))),
    )  # fmt: skip


def _whitened(groups: dict, add, meta: dict) -> list[str]:
    out = [
        "## Whitened conv and linear, forward + backward (float32)",
        "",
        "prong/plain: the whitened layer against the plain nn.Conv2d / nn.Linear it replaces; its "
        "flop floor is 1 + 2*C_in/(3*N*H_out*W_out) (the fold, forward and backward). naive/prong: "
        "against the two-step form; 'best' is the flop bound naive_floor/prong_floor (1x1 convs: "
        "at most 5/3; linear layers with batch <= width: 1.0, ops.whitened_linear then computes "
        "the two-step form itself).",
        "",
    ]
    out += _table_head(
        "layer", "plain ms:", "naive ms:", "prong ms:", "prong/plain:", "target", "met", "floor:",
        "naive/prong:", "target", "met", "best:",
    )  # fmt: skip
    return out + [_whitened_row(g, add) for g in groups.values()]


def _whitened_row(g: dict, add) -> str:
    p, n, pl = g.get("prong"), g.get("naive"), g.get("plain")
    ex = (p or n or pl)["extra_info"]
    shape = ex["shape"]
    if ex["op"] == "whitened_conv":
        label = _conv_label(shape)
        key = f"conv{shape['k']}x{shape['k']} naive/prong" if shape["k"] in (1, 3) else None
        plain_key = "conv prong/plain"
    else:
        label = f"linear {shape['in']}x{shape['out']} batch={shape['rows']}"
        key, plain_key = "linear naive/prong", None
    t1 = add("whitened", f"{label} prong/plain", _ratio(p, pl), plain_key, ex["prong_floor"])
    best = ex["naive_floor"] / ex["prong_floor"]
    t2 = add("whitened", f"{label} naive/prong", _ratio(n, p), key, best)
    r1, r2 = _ratio(p, pl), _ratio(n, p)
    return _row(
        label, _ms(pl and pl["median_s"]), _ms(n and n["median_s"]), _ms(p and p["median_s"]), _x(r1),
        _fmt_target(t1), _met(r1, t1), f"{ex['prong_floor']:.3f}", _x(r2), _fmt_target(t2), _met(r2, t2),
        f"{best:.2f}",
    )  # fmt: skip


def _conv_label(shape: dict) -> str:
    return f"conv{shape['k']}x{shape['k']} N={shape['N']} C={shape['C_in']} {shape['H']}x{shape['W']}"


def _naive_vs_prong(source: str, title: str, groups: dict, add, meta: dict) -> list[str]:
    """The whitening and eigh sections: naive and prong medians, other implementations beside."""
    impls = sorted({i for g in groups.values() for i in g if i not in ("naive", "prong")})
    cupy = "cupy" in impls
    cuda = meta["device_type"] == "cuda"
    target_key = f"{source} naive/prong" + (" cuda" if cuda and source == "eigh" else "")
    out = [f"## {title}", ""]
    if cupy:
        out += [
            "cupy: CuPy's batched eigh, one cupy.linalg.eigh per size on the stacked matrices; "
            "cupy/prong above 1 means prong is faster (no target).",
            "",
        ]
    others = [f"{i} ms:" for i in impls]
    cupy_column = ["cupy/prong:"] if cupy else []
    out += _table_head(
        "case", "naive ms:", "prong ms:", *others, "naive/prong:", "target", "met", *cupy_column
    )
    for name, g in groups.items():
        r = _ratio(g.get("naive"), g.get("prong"))
        t = add(source, name, r, target_key)
        rc = _ratio(g.get("cupy"), g.get("prong"))
        if cupy:
            add(source, f"{name} cupy/prong", rc)
        times = [_ms(g.get(i, {}).get("median_s")) for i in ("naive", "prong", *impls)]
        out.append(_row(name, *times, _x(r), _fmt_target(t), _met(r, t), *([_x(rc)] if cupy else [])))
    return out


def _e2e(groups: dict, add, meta: dict) -> list[str]:
    out = [
        "## End to end: one training step, amortized over T = 100 updates",
        "",
        "T: sgd = median step; naive = median step + one reparametrization (timed alone) / 100; "
        "prong = ((100 - n) * median step + the n steps of one statistics window, the "
        "re-whitening step included, each timed) / 100. Shares: Prong.timings (statistics, "
        "eigh, projection) over the interval / (100 * T). The paper: PRONG 3.2x SGD per epoch, "
        "38% of the time in the reparametrization (statistics 4%; eigh on the CPU).",
        "",
        "Flop floor: GEMM flops of the PRONG step over the SGD step's (bench_e2e.flop_floors): "
        "'ops' with the forms prong_ext.ops picks (fold when C_out*k^2 <= N*H*W, else whiten "
        "the activations), 'best' with the cheaper exact form per layer by these flop counts.",
        "",
    ]
    out += _table_head(
        "model", "SGD step ms:", "naive T ms:", "prong T ms:", "naive/SGD:", "PRONG/SGD:", "target", "met",
        "flop floor ops / best", "reparam share (stats / eigh / proj)", "target", "naive share:",
    )  # fmt: skip
    for name, g in groups.items():
        # a case interrupted at the time limit has its timing but not its T
        g = {k: r for k, r in g.items() if r["extra_info"].get("T_s") is not None}
        if g:
            out.append(_e2e_row(name, g, add, meta["device_type"] == "cuda"))
    return out


def _e2e_row(name: str, g: dict, add, cuda: bool) -> str:
    s, n, p = (g.get(k) for k in ("sgd", "naive", "prong"))
    ex = (s or p or n)["extra_info"]
    model = ex["model"]
    rn = n["extra_info"]["T_s"] / s["extra_info"]["T_s"] if s and n else None
    rp = p["extra_info"]["T_s"] / s["extra_info"]["T_s"] if s and p else None
    t = add("e2e", f"{model} PRONG/SGD", rp, f"e2e {model} prong/sgd")
    add("e2e", f"{model} naive/SGD", rn)
    share = p["extra_info"].get("reparam_share") if p else None
    st = None
    if share is not None:
        st = add("e2e", f"{model} reparam share", share, "e2e reparam share cuda" if cuda else None)
    sh = p["extra_info"]["shares"] if p else {}
    share_txt = (
        f"{100 * share:.1f}% ({100 * sh['statistics']:.1f} / {100 * sh['eigh']:.1f} / "
        f"{100 * sh['projection']:.1f})"
        if share is not None
        else ""
    )
    nshare = n["extra_info"].get("reparam_share") if n else None
    share_target = _fmt_target(TARGETS["e2e reparam share cuda"]) + ("" if cuda else " (GPU)")
    share_target += (" " + _met(share, st)) if st else ""
    return _row(
        name.removeprefix("e2e "), *(_ms(r and r["extra_info"]["T_s"]) for r in (s, n, p)), _x(rn), _x(rp),
        _fmt_target(t), _met(rp, t), f"{ex['flop_floor_ops']:.2f} / {ex['flop_floor_best']:.2f}", share_txt,
        share_target, "" if nshare is None else f"{100 * nshare:.1f}%",
    )  # fmt: skip


#: the report's sections in order: (bench file key, section(groups, add_ratio, meta) -> lines)
SECTIONS = (
    ("covariance", _covariance),
    ("whitened", _whitened),
    (
        "whitening",
        functools.partial(_naive_vs_prong, "whitening", "Whitening (U, U^-1) of a network's layers"),
    ),
    ("eigh", functools.partial(_naive_vs_prong, "eigh", "Batched eigh")),
    ("e2e", _e2e),
)


def _file_status(v: dict) -> str:
    if v["rc"] is None:
        return "not run: the time limit was reached before it"
    if v["rc"] == TIMED_OUT:
        return f"interrupted at the time limit after {v['wall_s']:.0f} s (its finished benchmarks are kept)"
    return f"pytest exit code {v['rc']} (see pytest.log)"


def _memory_peak(meta: dict) -> tuple[float, str, str]:
    """(GB/s, short name, where it comes from) of the bandwidth the covariance's reads are
    compared with: the memory's nominal peak where known, else the copy rate the roofline measured."""
    peak = (meta.get("memory_peak") or {}).get("gbps")
    if peak:
        return peak, "memory peak", meta["memory_peak"]["source"]
    return meta["roofline"]["copy_gbps"], "copy rate", "measured copy rate: the memory's peak is unknown here"


def _read_gbps(row: dict | None) -> float | None:
    """GB/s of a covariance case: the input's bytes (4*M*C, read once) over the median time."""
    if not row or not row.get("median_s"):
        return None
    ex = row["extra_info"]
    m = ex["shape"][0] * ex["shape"][2] * ex["shape"][3]
    return 4 * m * ex["shape"][1] / row["median_s"] / 1e9


def goals(rows: list[dict], meta: dict) -> list[dict]:
    """The GPU goals with the figure achieved: the covariance's read bandwidth in % of the
    memory's peak (worst case with C <= 256), whitened conv / plain conv (worst shape), and per
    eigh layer set and dtype the loop of torch.linalg.eigh / prong and CuPy's batched eigh /
    prong. `met` is given on CUDA only: on the CPU the figures are computed alike, and judged
    against nothing.

    Each entry: key (stable: covariance_bandwidth, conv_vs_plain, eigh_loop:<set>:<dtype>,
    eigh_cupy:<set>:<dtype>), goal, value (None when not measured), unit, target, met, case, note.
    """
    cuda = meta["device_type"] == "cuda"
    return [_bandwidth_goal(rows, meta, cuda), _conv_goal(rows, cuda), *_eigh_goals(rows, cuda)]


def _goal(cuda: bool, key: str, goal: str, value, unit: str, target, case: str = "", note: str = "") -> dict:
    met = _met(value, target).strip("*") if (cuda and target is not None) else ""
    return {
        "key": key,
        "goal": goal,
        "value": value,
        "unit": unit,
        "target": None if target is None else list(target),
        "met": met or None,
        "case": case,
        "note": note,
    }


def _bandwidth_goal(rows: list[dict], meta: dict, cuda: bool) -> dict:
    peak, peak_name, _ = _memory_peak(meta)
    target = TARGETS["covariance % of memory peak"]
    shares = []
    for g in _by_group(rows, "covariance").values():
        p = g.get("prong")
        gbps = _read_gbps(p)
        ex = p["extra_info"] if p else {}
        if gbps is not None and ex["shape"][1] <= 256:
            shares.append((100 * gbps / peak, f"{tuple(ex['shape'])} {ex['layout']}"))
    worst = min(shares) if shares else (None, "")
    return _goal(
        cuda,
        key="covariance_bandwidth",
        goal="covariance read bandwidth, C <= 256 (worst case)",
        value=worst[0],
        unit=f"% of {peak_name}",
        target=target,
        case=worst[1],
        note=f"{sum(v >= target[1] for v, _ in shares)} of {len(shares)} cases at or above {target[1]:g}%"
        if shares
        else "no covariance case measured",
    )


def _conv_goal(rows: list[dict], cuda: bool) -> dict:
    target = TARGETS["conv prong/plain"]
    convs = []
    for g in _by_group(rows, "whitened").values():
        p, pl = g.get("prong"), g.get("plain")
        r = _ratio(p, pl)
        if r is not None and p["extra_info"]["op"] == "whitened_conv":
            convs.append((r, _conv_label(p["extra_info"]["shape"]), p["extra_info"]["prong_floor"]))
    worst = max(convs) if convs else (None, "", None)
    return _goal(
        cuda,
        key="conv_vs_plain",
        goal="whitened conv fwd+bwd / plain conv (worst shape)",
        value=worst[0],
        unit="x",
        target=target,
        case=worst[1],
        note=f"{sum(r <= target[1] for r, _, _ in convs)} of {len(convs)} shapes at or below {target[1]:g}; "
        f"flop floor of the worst {worst[2]:.3f}"
        if convs
        else "no conv case measured",
    )


def _eigh_goals(rows: list[dict], cuda: bool) -> list[dict]:
    """Per eigh group: the loop of torch.linalg.eigh / prong, and CuPy / prong where measured."""
    out = []
    for g in _by_group(rows, "eigh").values():
        ex = next(iter(g.values()))["extra_info"]
        layers = ex.get("layers", "?")
        case = f"{layers} ({len(ex['sizes'])} matrices) {ex['dtype']}"
        key, goal = f"{layers}:{ex['dtype']}", f"batched eigh, {layers} layer set:"
        target = TARGETS["eigh naive/prong cuda"]
        ratio = _ratio(g.get("naive"), g.get("prong"))
        out.append(
            _goal(
                cuda,
                f"eigh_loop:{key}",
                f"{goal} loop of torch.linalg.eigh / prong",
                ratio,
                "x",
                target,
                case,
            )
        )
        if "cupy" in g:
            looped = g["cupy"]["extra_info"].get("cupy_looped_sizes") or []
            note = f"CuPy decomposed sizes {looped} one at a time (its stacked call failed)" if looped else ""
            ratio = _ratio(g.get("cupy"), g.get("prong"))
            out.append(
                _goal(
                    cuda,
                    f"eigh_cupy:{key}",
                    f"{goal} CuPy's batched eigh / prong",
                    ratio,
                    "x",
                    None,
                    case,
                    note,
                )
            )
    return out


def goals_table(items: list[dict], cuda: bool) -> list[str]:
    """results.md's first section: the goals, the figures achieved, whether each is met."""
    out = [
        "## GPU goals",
        "",
        "The figures that decide the GPU goals, from the tables below."
        + ("" if cuda else " This run had no GPU: the figures are the CPU's, not judged."),
        "",
        *_table_head("goal", "target", "achieved:", "met", "case", "note"),
    ]
    for e in items:
        target = "" if e["target"] is None else f"{'≥' if e['target'][0] == '>=' else '≤'} {e['target'][1]:g}"
        digits = 1 if e["unit"].startswith("%") else 2
        value = "not measured" if e["value"] is None else f"{e['value']:.{digits}f}"
        unit = e["unit"] if e["unit"] != "x" else ""
        met = {"yes": "yes", "no": "**no**"}.get(e["met"] or "", "")
        out.append(
            _row(e["goal"], f"{target} {unit}".strip(), f"{value} {unit}".strip(), met, e["case"], e["note"])
        )
    out.append("")
    return out


def plot(ratios: list[dict], meta: dict, path: Path) -> bool:
    """Writes the ratios' bar chart; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [r for r in ratios if r["ratio"] is not None and "share" not in r["label"]]
    if not items:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(items) + 1.5))
    ys = range(len(items))
    colors = []
    for r in items:
        colors.append({"yes": "tab:green", "no": "tab:red"}.get(r["met"], "tab:gray"))
    ax.barh(list(ys), [r["ratio"] for r in items], color=colors, height=0.6)
    for y, r in zip(ys, items):
        if r["target"] is not None:
            ax.plot([r["target"][1]] * 2, [y - 0.4, y + 0.4], color="black", lw=2)
        ax.text(r["ratio"], y, f" {r['ratio']:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['section']}: {r['label']}" for r in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (black tick: target; green: met, red: missed, gray: no target)")
    ax.set_title(f"prong_ext benchmarks on {meta['device']} ({meta['size']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a much shorter shape list")
    parser.add_argument(
        "--size", choices=("full", "quick", "tiny"), help="overrides --quick (tiny: smoke test)"
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FILES)}")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0,
        help="seconds for the whole run (0: none): a file running then is interrupted, later ones skipped",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    import torch
    from common import device_name, pick_device, roofline

    from prong_ext.experiments.common import git_state

    git = git_state(ROOT)  # before the run rewrites results/
    start = time.perf_counter()
    deadline = start + args.time_limit if args.time_limit > 0 else None
    load_start = _loadavg()
    size = args.size or ("quick" if args.quick else "full")
    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    only = list(FILES) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = set(only) - set(FILES)
    if unknown:
        parser.error(f"unknown --only entries {sorted(unknown)}; choose from {list(FILES)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"prong_ext benchmarks: {device_name(device)}, size {size}, output {out_dir}", flush=True)
    roof = roofline(device, quick=size != "full")
    env = dict(os.environ)
    env.update(PRONG_BENCH_SIZE=size, PRONG_BENCH_DEVICE=device, PRONG_BENCH_THREADS=str(args.threads))
    env.pop("TRITON_INTERPRET", None)  # the benchmarks time compiled kernels (or none)
    rows, files = run_files(only, env, deadline, out_dir)
    meta = _meta(device, git, size, args.time_limit, roof, files)
    meta.update(wall_s=time.perf_counter() - start, loadavg_1min={"start": load_start, "end": _loadavg()})
    meta["goals"] = goals(rows, meta)
    write_results(out_dir, rows, meta)
    return 0 if all(v["rc"] in (0, 5) for v in files.values()) else 1


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def run_files(only: list[str], env: dict, deadline: float | None, out_dir: Path) -> tuple[list, dict]:
    """Runs the bench files of ``only`` in order until ``deadline``: (benchmark rows, per file
    {file, rc, wall_s, benchmarks}); pytest's output goes to pytest.log."""
    rows: list[dict] = []
    files: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, open(out_dir / "pytest.log", "w") as log:
        for key in only:
            path = HERE / FILES[key]
            if not path.exists():
                print(f"  {FILES[key]}: not present, skipped", flush=True)
                continue
            json_out = Path(tmp) / f"{key}.json"
            timeout = None if deadline is None else deadline - time.perf_counter()
            if timeout is not None and timeout < 5:
                files[key] = {"file": FILES[key], "rc": None, "wall_s": 0.0, "benchmarks": 0}
                print(f"  {FILES[key]}: not run (time limit)", flush=True)
                continue
            rc, wall = run_file(path, json_out, env, log, timeout)
            new = collect(json_out, key)
            rows += new
            files[key] = {"file": FILES[key], "rc": rc, "wall_s": wall, "benchmarks": len(new)}
            print(f"  {FILES[key]}: {len(new)} benchmarks in {wall:.0f} s (exit {rc})", flush=True)
    return rows, files


def _meta(device: str, git: dict, size: str, time_limit: float, roof: dict, files: dict) -> dict:
    """The device, versions, git state, machine, settings and files' outcomes of results.json."""
    import torch
    from common import device_name, memory_peak

    from prong_ext.experiments.common import commit_text

    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **git,
        "commit_text": commit_text(git),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "size": size,
        "time_limit_s": time_limit or None,
        "roofline": roof,
        "memory_peak": memory_peak(device),
        "files": files,
    }


def write_results(out_dir: Path, rows: list[dict], meta: dict) -> None:
    """results.md, results.json and ratios.png; prints the report."""
    text, ratios = build_report(rows, meta)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(
        json.dumps({**meta, "ratios": ratios, "results": rows}, indent=1) + "\n"
    )
    png = plot(ratios, meta, out_dir / "ratios.png")
    print(text)
    print(
        f"\nwrote {out_dir / 'results.md'}, results.json"
        + (", ratios.png" if png else " (no ratios.png: matplotlib is not installed)")
        + f" in {meta['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
