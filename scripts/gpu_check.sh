#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions are called indirectly, as "step_$step"
# The one script to run on a GPU machine, from the repository root, offline:
#
#   bash scripts/gpu_check.sh                       # install, info, GPU tests, every benchmark
#   STEPS="tests" bash scripts/gpu_check.sh         # a subset of the steps
#   STEPS="bench" BENCH_FILTER=comm bash scripts/gpu_check.sh
#
# Steps (STEPS, space separated; default "install info tests bench"):
#   install  hatchling and its needs from .whl/ into /tmp/site, then the five packages editable
#            (--no-index --no-deps --no-build-isolation: nothing is downloaded)
#   info     python, torch, CUDA, triton and NCCL versions, the libnccl bmt loads, the GPUs
#   tests    pytest -m "gpu or gpus" over tests/
#   cpu      the CPU suite as well (pytest -m "not gpu and not gpus"); also added by RUN_CPU_TESTS=1
#   bench    every benchmarks/<area>/bench_*.py whose path contains BENCH_FILTER, each run as
#            `python3 FILE --out JSON` (a benchmark launches its own processes)
# Settings: OUT (default .gpu-out), PYTHON (python3), TEST_TIMEOUT (s, default 420),
#   CPU_TEST_TIMEOUT (s, 900), BENCH_TIMEOUT (s per benchmark, 180), PYTEST_ARGS (extra pytest args),
#   BENCH_ARGS (extra arguments to every benchmark run, e.g. "--config 7b --impls bmt").
# Files under $OUT (8 at most, flat): summary.md, info.log, install.log, pytest-gpu.log,
#   junit-gpu.xml, pytest-cpu.log, bench.log, bench.json (every benchmark's JSON, keyed by file).
# Steps are independent: a failing step does not stop the later ones; the exit status is 1 when
# any step failed, else 0.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
OUT=${OUT:-.gpu-out}
STEPS=${STEPS:-install info tests bench}
[ "${RUN_CPU_TESTS:-0}" = "1" ] && STEPS="$STEPS cpu"
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
CPU_TEST_TIMEOUT=${CPU_TEST_TIMEOUT:-900}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
BENCH_FILTER=${BENCH_FILTER:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
PACKAGES="bmt-comm bmt-zero bmt-ckpt bmt-optim bmtrain"  # dependency order

# NVLink multicast stays off: a program using it can take a shared host's GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1  # logs show progress as it happens, also when a step is killed

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.md"
RESULTS=()   # "step|status|seconds|note"
FAILED=0

has_step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

record() {  # record STEP RC SECONDS NOTE
    local status=ok
    if [ "$2" -ne 0 ]; then status="FAILED (exit $2)"; FAILED=1; fi
    [ "$2" -eq 124 ] && status="FAILED (timed out)"
    RESULTS+=("$1|$status|$3|$4")
    echo "=== step $1: $status in ${3}s${4:+ — $4}"
}

# --- install ---------------------------------------------------------------------------------
step_install() {
    local log="$OUT/install.log" rc=0 site=/tmp/site
    : >"$log"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl \
            >>"$log" 2>&1 || rc=$?
    else
        echo "no .whl/*.whl: using the build backend already installed, if any" >>"$log"
    fi
    for pkg in $PACKAGES; do
        echo "--- pip install -e packages/$pkg" >>"$log"
        # hatchling lives in /tmp/site for the builds only, so pytest keeps the venv's own packaging/pluggy
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pip install --no-index --no-deps \
            --no-build-isolation --disable-pip-version-check -e "packages/$pkg" >>"$log" 2>&1 || {
            rc=$?
            echo "!!! packages/$pkg did not install (exit $rc)" | tee -a "$log"
        }
    done
    if [ "$rc" -ne 0 ]; then
        # later steps still import the sources (without bmt-optim's compiled extension, if that failed)
        local src
        src=$(printf "$PWD/packages/%s/src:" bmt-comm bmt-zero bmt-ckpt bmt-optim bmtrain)
        export PYTHONPATH="${src%:}${PYTHONPATH:+:$PYTHONPATH}"
        echo "install failed: later steps import packages/*/src through PYTHONPATH" | tee -a "$log"
    fi
    tail -n 5 "$log"
    return "$rc"
}

# --- info ------------------------------------------------------------------------------------
step_info() {
    "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/info.log"
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton: not importable ({e})")
if torch.cuda.is_available():
    v = torch.cuda.nccl.version()
    print("torch's NCCL:", ".".join(map(str, v)) if isinstance(v, tuple) else v)
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
from bmt_comm.nccl import get_library, library_candidates
print("bmt NCCL candidates:", [f"{c.source.name}:{c.path}" for c in library_candidates()])
lib = get_library()
print(f"bmt loads NCCL {'.'.join(map(str, lib.version))} from {lib.path}")
for name in ("bmt_comm", "bmt_zero", "bmt_ckpt", "bmt_optim", "bmtrain"):
    try:
        mod = __import__(name)
        print(f"{name}: {mod.__file__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
try:
    import pytest
    print(f"pytest {pytest.__version__}")
except ImportError:
    print("pytest: NOT installed (carry its wheels in .whl/)")
EOF
    local rc=${PIPESTATUS[0]}
    command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$OUT/info.log"
    return "$rc"
}

# --- tests -----------------------------------------------------------------------------------
run_pytest() {  # run_pytest MARKEXPR LOG TIMEOUT [extra args...]
    local mark=$1 log=$2 limit=$3
    shift 3
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    timeout --kill-after=15 "$limit" "$PYTHON" -m pytest tests -m "$mark" -rfEs --durations=15 \
        --continue-on-collection-errors "$@" $PYTEST_ARGS 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
}

step_tests() {
    run_pytest "gpu or gpus" "$OUT/pytest-gpu.log" "$TEST_TIMEOUT" --junitxml="$OUT/junit-gpu.xml"
}

step_cpu() {
    run_pytest "not gpu and not gpus" "$OUT/pytest-cpu.log" "$CPU_TEST_TIMEOUT" -q
}

# --- benchmarks ------------------------------------------------------------------------------
step_bench() {
    local log="$OUT/bench.log" jsondir rc=0 n=0 file name brc
    jsondir=$(mktemp -d /tmp/bmt-bench-json.XXXXXX)
    : >"$log"
    for file in benchmarks/*/bench_*.py; do
        [ -e "$file" ] || continue
        case "$file" in *"$BENCH_FILTER"*) ;; *) continue ;; esac
        n=$((n + 1))
        name=$(basename "$(dirname "$file")")-$(basename "$file" .py)
        echo "### $file" | tee -a "$log"
        # shellcheck disable=SC2086  # BENCH_ARGS is split into words on purpose
        timeout --kill-after=15 "$BENCH_TIMEOUT" "$PYTHON" "$file" --out "$jsondir/$name.json" $BENCH_ARGS 2>&1 | tee -a "$log"
        brc=${PIPESTATUS[0]}
        if [ "$brc" -ne 0 ]; then
            rc=$brc
            echo "!!! $file failed (exit $brc$([ "$brc" -eq 124 ] && echo ", timed out after ${BENCH_TIMEOUT}s"))" \
                | tee -a "$log"
        elif [ ! -s "$jsondir/$name.json" ]; then
            rc=1
            echo "!!! $file wrote no JSON to --out" | tee -a "$log"
        fi
    done
    "$PYTHON" - "$jsondir" "$OUT/bench.json" <<'EOF'
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for f in sorted(src.glob("*.json")):
    text = f.read_text()
    try:
        merged[f.stem] = json.loads(text)
    except ValueError:
        try:  # JSON lines (benchmarks/train appends one record per runner)
            merged[f.stem] = [json.loads(line) for line in text.splitlines() if line.strip()]
            continue
        except ValueError as e:
            merged[f.stem] = {"error": f"unreadable JSON: {e}", "text": text[:2000]}
dst.write_text(json.dumps(merged, indent=1))
EOF
    rm -rf "$jsondir"
    if [ "$n" -eq 0 ]; then
        echo "no benchmarks/*/bench_*.py matched BENCH_FILTER='$BENCH_FILTER'" | tee -a "$log"
        return 1
    fi
    return "$rc"
}

# --- run the chosen steps --------------------------------------------------------------------
echo "gpu_check: steps [$STEPS], output in $OUT"
for step in install info tests cpu bench; do
    has_step "$step" || continue
    echo "=== step $step"
    start=$(date +%s)
    "step_$step"
    rc=$?
    note=""
    case "$step" in
        tests) note=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)" "$OUT/pytest-gpu.log" | tail -n 1) ;;
        cpu) note=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)" "$OUT/pytest-cpu.log" | tail -n 1) ;;
    esac
    record "$step" "$rc" "$(( $(date +%s) - start ))" "$note"
done

{
    echo "# gpu_check summary"
    echo
    echo "host: $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), steps: $STEPS"
    [ -s "$OUT/info.log" ] && { echo; echo '```'; cat "$OUT/info.log"; echo '```'; }
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---:|---|"
    for row in "${RESULTS[@]}"; do
        IFS='|' read -r s st sec nt <<<"$row"
        echo "| $s | $st | $sec | ${nt//|//} |"
    done
    if [ -s "$OUT/pytest-gpu.log" ]; then
        echo
        echo "## GPU tests: failures and skips"
        echo '```'
        grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest-gpu.log" | head -n 60
        echo '```'
    fi
    if [ -s "$OUT/bench.log" ]; then
        echo
        echo "## Benchmarks"
        grep -E "^(\||## |### |!!! |bench.* skipped)" "$OUT/bench.log"
    fi
} >"$SUMMARY"

echo
cat "$SUMMARY"
exit "$FAILED"
