#!/usr/bin/env bash
# The first run on a GPU machine (torch with CUDA preinstalled, no network): build, test and
# measure in one go, in under 8 minutes, with one summary at the end.
#
#   scripts/gpu_check.sh OUTDIR
#   GPU_CHECK_PACK=1 GPU_CHECK_COMMIT=<sha> scripts/gpu_check.sh "$OUT"
#       (on the lent machine: its copy has no .git, and at most 8 files come back from $OUT)
#
# Steps, each with its own time limit cut to what is left of a global budget, each logged to
# OUTDIR/logs/<step>.log and recorded in OUTDIR/steps.tsv:
#   preflight  (seconds) pytest importable, nvcc found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda),
#              torch.cuda available: a missing one ends the run here, named in the summary. Noted,
#              not stopping: setuptools older than 77 (pyproject.toml's license expression needs it:
#              the build takes its fallback), pytest-benchmark missing. Versions into OUTDIR/env.json,
#              nvidia-smi and pip list into OUTDIR/env.txt.
#   build      pip install --no-build-isolation --no-deps --no-index -e . (PIP_BREAK_SYSTEM_PACKAGES=1:
#              the image's Python is externally managed). If that fails: setup.py build_ext --inplace,
#              run from a temporary folder that links setup.py and the sources but not pyproject.toml
#              (so an older setuptools builds too), with a link prong_ext/triton_kernels ->
#              ../triton_kernels standing in for setup.py's package_dir (removed at exit) and the
#              checkout on PYTHONPATH.
#   extension  prong_ext and prong_ext.triton_kernels import from this checkout, _C loads and
#              _extension.cuda_built() is true (else the run is failed: the extension's CUDA tests
#              would skip; the Triton tests still run), cusolver_info() printed (OUTDIR/extension.json).
#   tests      one pytest per tests/test_*.py (all of its tests: with CUDA present the Triton kernels
#              run compiled), OUTDIR/junit/<file>.xml, --durations=10, its own time limit; at the
#              limit pytest is interrupted (SIGINT) and still writes the junit file of the tests it
#              ran. The GPU's files first, then the benchmarks, then the rest, the slow files last.
#              The files run in GPU_CHECK_LANES (default 3) concurrent lanes, dealt in turn: the
#              first run of a test file on a fresh machine is mostly Triton compiling its kernels
#              (about 120 specializations in test_triton_kernels, 100 in test_precision_modes),
#              one CPU core each. The benchmarks run alone.
#   bench      benchmarks/run.py --quick --time-limit S --out OUTDIR/bench: the cases that decide the
#              GPU goals first; results.md opens with the goals and the figures achieved.
#   summary    scripts/gpu_check.py summary: versions (Python, torch, Triton, CUDA, cuSOLVER, GPU),
#              passed/failed/skipped per test file from the junit files, the goals against their
#              targets, every step's time; printed last, saved as OUTDIR/summary.md and summary.json.
# Exit status 0 when every step passed (goals missed are reported, not failures).
#
# GPU_CHECK_DRY=1 (CI on a CPU, `make gpu-check-dry`, about a minute): every step runs, on a copy of
# the checkout in a temporary folder, so nothing is installed and the checkout is untouched. The
# preflight and the extension check tolerate no GPU and no nvcc; the build is the fallback above
# (a CPU _C); the tests run under TRITON_INTERPRET=1 with `-m cuda` (every file is collected and its
# CUDA tests skip, the rest is deselected) except DRY_FULL_TESTS, which run whole; the benchmarks
# run in size tiny. Then scripts/gpu_check.py check verifies that the summary holds every entry.
#
# GPU_CHECK_PACK=1 (the lent machine, which returns at most 8 files from $OUT): after the summary,
# every file of the run goes into OUTDIR/gpu_check.tar.gz, and beside it stay only summary.md,
# summary.json, bench/results.md and bench/results.json; a run left with more than 8 files fails.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 480), GPU_CHECK_DRY,
# GPU_CHECK_PACK, GPU_CHECK_LANES, GPU_CHECK_COMMIT (the commit to record: the copy on the GPU
# machine has no .git), MAX_JOBS (default: the CPU count).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
PY=$(command -v "$PY")
# absolute (the run changes folders), its links kept (a venv's python is one)
[[ $PY == /* ]] || PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
DRY=${GPU_CHECK_DRY:-0}
[ "$DRY" = 0 ] || DRY=1
PACK=${GPU_CHECK_PACK:-0}
[ "$PACK" = 0 ] || PACK=1
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
SUMMARY_RESERVE=30  # kept for the summary by every step (a step may overrun its limit by 15 s)
BENCH_S=170         # the benchmark step's limit, kept free by the test files before it
DRY_FULL_TESTS="test_convert test_gpu_check"  # the files a dry run tests whole (2 s each)

# Test files in the order they are dealt to the lanes, with their limits in seconds (each at most
# what is left). GPU_FIRST run before the benchmarks; files listed nowhere run after them, then
# SLOW_LAST. With 3 lanes the two Triton files and the extension's start at once.
GPU_FIRST="test_triton_kernels:150 test_precision_modes:120 test_extension:60 test_ops:60 test_layers:60
test_robustness:60 test_grouped:45 test_dropin:45 test_prong:60"
SLOW_LAST="test_amp_compile:150 test_distributed:60 test_benchmarks_smoke:60 test_cli:60"
DEFAULT_TEST_S=45
LANES=${GPU_CHECK_LANES:-3}

# What a run writes under OUT (removed first; packed at the end with GPU_CHECK_PACK=1), and what
# stays beside the pack
WRITTEN="logs junit bench steps.tsv summary.md summary.json env.json env.txt extension.json gpu_check.tar.gz"
KEEP="summary.md summary.json bench/results.md bench/results.json"
(cd "$OUT" && rm -rf $WRITTEN)
mkdir -p "$OUT/logs" "$OUT/junit"
: >"$OUT/steps.tsv"

TMP=$(mktemp -d)
LINK=""  # prong_ext/triton_kernels, when this script created it
cleanup() {
    [ -n "$LINK" ] && [ -L "$LINK" ] && rm -f "$LINK"
    rm -rf "$TMP"
}
trap cleanup EXIT

left() { echo $(( DEADLINE - $(date +%s) )); }
clean() { printf '%s' "$*" | tr '\t\n' '  '; }
record() {  # record NAME KIND RC SECONDS LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(clean "$6")" >>"$OUT/steps.tsv"
}
say() { printf '[gpu_check %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# step NAME KIND MAX_S RESERVE_S CMD...: runs CMD for at most min(MAX_S, time left - RESERVE_S)
# seconds (SIGINT at the limit, SIGKILL 15 s later), output to OUT/logs/NAME.log; returns its exit
# code (124: timed out; 125: skipped, out of time). STEP_NOTE, when set, goes into the record.
step() {
    local name=$1 kind=$2 max=$3 reserve=$4 limit rc t0 t
    shift 4
    limit=$(( $(left) - reserve ))
    (( limit > max )) && limit=$max
    if (( limit < 15 )); then
        say "$name: skipped, out of time"
        record "$name" "$kind" 125 0 "$limit" "skipped: out of time (budget ${BUDGET} s)"
        STEP_NOTE=""
        return 125
    fi
    say "$name (limit ${limit} s)"
    t0=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    t=$(( $(date +%s) - t0 ))
    (( rc == 124 )) && say "$name: TIMED OUT after ${t} s" || say "$name: exit $rc in ${t} s"
    record "$name" "$kind" "$rc" "$t" "$limit" "${STEP_NOTE:-}"
    STEP_NOTE=""
    return $rc
}

finish() {
    local rc
    say "summary"
    "$PY" "$SRC/scripts/gpu_check.py" summary "$OUT" >"$OUT/logs/summary.log" 2>&1
    rc=$?
    if [ "$DRY" = 1 ]; then
        # every test step of this run, to check that each left its junit file
        files=$(cut -f1,2 "$OUT/steps.tsv" | awk -F'\t' '$2 == "test" {print $1}' | paste -sd, -)
        "$PY" "$SRC/scripts/gpu_check.py" check "$OUT" --dry --test-files "$files" >>"$OUT/logs/summary.log" 2>&1 \
            || rc=1
    fi
    cat "$OUT/logs/summary.log"
    if [ "$PACK" = 1 ]; then
        pack || rc=1
    fi
    say "done in $(( $(date +%s) - START )) s (budget ${BUDGET} s): $([ $rc = 0 ] && echo PASS || echo FAIL)"
    exit $rc
}

# Every file this run wrote under OUT into OUT/gpu_check.tar.gz; KEEP stays beside it.
pack() {
    local f n keep="$TMP/keep"
    tar -C "$OUT" -czf "$TMP/gpu_check.tar.gz" $(cd "$OUT" && ls -d $WRITTEN 2>/dev/null) || return 1
    mkdir -p "$keep"
    for f in $KEEP; do
        [ -f "$OUT/$f" ] && mkdir -p "$keep/$(dirname "$f")" && cp "$OUT/$f" "$keep/$f"
    done
    (cd "$OUT" && rm -rf $WRITTEN)
    cp -R "$keep/." "$OUT/"
    mv "$TMP/gpu_check.tar.gz" "$OUT/"
    n=$(find "$OUT" -type f | wc -l)
    say "packed into $OUT/gpu_check.tar.gz; $n files in $OUT: $(cd "$OUT" && find . -type f | sort | paste -sd' ' -)"
    if (( n > 8 )); then
        say "more than 8 files in $OUT: the lent machine would not return them all"
        return 1
    fi
}

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset PRONG_EXT_NO_EXTENSION PRONG_EXT_FORCE_CPU TRITON_INTERPRET
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# The folder the run works in: the checkout, or for a dry run a copy of its tracked and untracked
# (not ignored) files, what the GPU machine receives.
WORK=$SRC
if [ "$DRY" = 1 ]; then
    WORK="$TMP/work"
    mkdir -p "$WORK"
    if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (git -C "$SRC" ls-files -z -co --exclude-standard \
            | tar -C "$SRC" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$WORK" -xf -)
    else
        tar -C "$SRC" --exclude='./.venv*' --exclude=./build --exclude=./dist --exclude='*.so' \
            --exclude=./prong_ext/_build_info.py -cf - . | tar -C "$WORK" -xf -
    fi
    [ -z "${GPU_CHECK_COMMIT:-}" ] && GPU_CHECK_COMMIT=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || true)
fi
export GPU_CHECK_COMMIT=${GPU_CHECK_COMMIT:-}
cd "$WORK"
say "$([ $DRY = 1 ] && echo "dry run in a copy, $WORK" || echo "in $WORK"); output $OUT; budget ${BUDGET} s"

# --- preflight --------------------------------------------------------------------------------
# The CUDA toolkit: the first of CUDA_HOME, CUDA_PATH, the folder above the nvcc on PATH (links
# resolved), /usr/local/cuda, /usr/local/cuda-* that holds bin/nvcc and the runtime's headers
# (an nvcc on PATH may be a wrapper script in /usr/local/bin), exported as CUDA_HOME for the build.
NVCC=""
toolkit_candidates() {
    local nvcc
    printf '%s\n' "${CUDA_HOME:-}" "${CUDA_PATH:-}"
    nvcc=$(command -v nvcc 2>/dev/null) && dirname "$(dirname "$(readlink -f "$nvcc")")"
    printf '%s\n' /usr/local/cuda /usr/local/cuda-*
}
while read -r home; do
    [ -n "$home" ] && [ -x "$home/bin/nvcc" ] || continue
    [ -f "$home/include/cuda_runtime.h" ] || ls "$home"/targets/*/include/cuda_runtime.h >/dev/null 2>&1 || continue
    [ -n "${CUDA_HOME:-}" ] && [ "$home" != "$CUDA_HOME" ] && STEP_NOTE="CUDA_HOME=$CUDA_HOME is no CUDA toolkit; "
    export CUDA_HOME=$home
    NVCC="$home/bin/nvcc"
    break
done < <(toolkit_candidates)
export GPU_CHECK_NVCC=$NVCC
{
    date -u
    echo "python: $PY"
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -m pip list 2>/dev/null
} >"$OUT/env.txt" 2>&1
STEP_NOTE="${STEP_NOTE:-}nvcc ${NVCC:-not found}"
step preflight preflight 60 "$SUMMARY_RESERVE" "$PY" "$SRC/scripts/gpu_check.py" preflight "$OUT" \
    $([ $DRY = 1 ] && echo --dry)
rc=$?
cat "$OUT/logs/preflight.log"
if [ $rc != 0 ]; then
    say "preflight failed: stopping here (see the summary)"
    finish
fi

# --- build ------------------------------------------------------------------------------------
# The fallback: _C built in place from a folder that links the sources but not pyproject.toml
# (build_ext writes _C and _build_info.py through the prong_ext link, into the checkout),
# prong_ext.triton_kernels mapped by a link, the checkout on PYTHONPATH (the tests' subprocesses
# import prong_ext too).
SHADOW="$TMP/shadow"
mkdir -p "$SHADOW"
for f in setup.py csrc prong_ext triton_kernels; do ln -sfn "$WORK/$f" "$SHADOW/$f"; done
BUILD_INPLACE=(bash -c 'cd "$1" && exec "$2" setup.py build_ext --inplace' build_inplace "$SHADOW" "$PY")
map_triton_kernels() {
    if [ ! -e prong_ext/triton_kernels ]; then
        ln -s ../triton_kernels prong_ext/triton_kernels
        LINK="$WORK/prong_ext/triton_kernels"
    fi
    export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
}
if [ "$DRY" = 1 ]; then
    STEP_NOTE="dry run: setup.py build_ext --inplace into the copy (the fallback)"
    step build build 240 "$SUMMARY_RESERVE" "${BUILD_INPLACE[@]}"
    map_triton_kernels
else
    export PIP_BREAK_SYSTEM_PACKAGES=1
    STEP_NOTE="pip install --no-build-isolation --no-deps --no-index -e ."
    if ! step build build 300 "$SUMMARY_RESERVE" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
        tail -n 30 "$OUT/logs/build.log"
        STEP_NOTE="the editable install failed: setup.py build_ext --inplace"
        step build_inplace build 300 "$SUMMARY_RESERVE" "${BUILD_INPLACE[@]}"
        map_triton_kernels
    fi
fi

# --- extension ----------------------------------------------------------------------------------
step extension extension 60 "$SUMMARY_RESERVE" "$PY" "$SRC/scripts/gpu_check.py" extension "$OUT" \
    $([ $DRY = 1 ] && echo --dry)
cat "$OUT/logs/extension.log"

# --- tests and benchmarks -------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
fi
# pytest with Python's SIGINT handler installed even when SIGINT was ignored at start (a command
# started in the background): at its time limit pytest stops and writes its junit file.
PYTEST=("$PY" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)
import pytest; sys.exit(pytest.main())')
run_test() {  # run_test NAME MAX_S RESERVE_S
    local name=$1 max=$2 reserve=$3 select=()
    if [ "$DRY" = 1 ] && ! grep -qw "$name" <<<"$DRY_FULL_TESTS"; then
        select=(-m cuda)
        STEP_NOTE="dry run: -m cuda"
    fi
    step "$name" test "$max" "$reserve" "${PYTEST[@]}" "tests/$name.py" -q -rfEs -p no:cacheprovider \
        --durations=10 --junitxml="$OUT/junit/$name.xml" "${select[@]}"
}
# run_lanes RESERVE_S NAME:MAX_S...: the test files dealt in turn to LANES lanes that run at once,
# each its files in order; returns when every lane is done.
run_lanes() {
    local reserve=$1 lane i entry
    shift
    local entries=("$@")
    for (( lane = 0; lane < LANES; lane++ )); do
        (
            for (( i = lane; i < ${#entries[@]}; i += LANES )); do
                entry=${entries[$i]}
                [ -f "tests/${entry%%:*}.py" ] && run_test "${entry%%:*}" "${entry##*:}" "$reserve"
            done
        ) &
    done
    wait
}
listed() { grep -qw "$1" <<<"$GPU_FIRST $SLOW_LAST"; }
all_tests=$(ls tests/test_*.py | xargs -n1 basename | sed 's/\.py$//')

run_lanes $(( BENCH_S + SUMMARY_RESERVE )) $GPU_FIRST

bench_limit=$(( $(left) - SUMMARY_RESERVE ))
(( bench_limit > BENCH_S )) && bench_limit=$BENCH_S
if [ "$DRY" = 1 ]; then
    size=(--size tiny)
else
    size=(--quick)
fi
STEP_NOTE="benchmarks/run.py ${size[*]}"
step bench bench "$BENCH_S" "$SUMMARY_RESERVE" "$PY" benchmarks/run.py "${size[@]}" \
    --time-limit $(( bench_limit > 40 ? bench_limit - 25 : 15 )) --out "$OUT/bench"
grep -E '^prong_ext benchmarks|^  bench_|^wrote ' "$OUT/logs/bench.log"

rest=()
for name in $all_tests; do
    listed "$name" || rest+=("$name:$DEFAULT_TEST_S")
done
run_lanes "$SUMMARY_RESERVE" "${rest[@]}" $SLOW_LAST

finish
