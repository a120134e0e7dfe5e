#!/usr/bin/env bash
# `make gpu`: the whole GPU path in one command, in under 8 minutes on one H100/H200.
#   1. the `gpu`-marked tests (CUDA kernels against their CPU references)     <= GPU_TESTS_S  (90 s)
#   2. `labkit bench all` in full size -> bench/results/NAME-<device>.json    <= GPU_BENCH_S  (150 s)
#   3. `labkit labs --mode full` -> bench/results/labs-<device>.{md,json}     the rest of GPU_BUDGET_S (480 s),
#      shared equally between the labs (each lab's own timeout), so a slow lab is reported, not waited for
# Every part runs even when an earlier one fails; the exit status is non-zero if any failed or ran out of time.
# Commit what it writes under bench/results/: until a GPU has run it, the GPU path is untested.
#
# LABKIT_GPU_DRY_RUN=1 checks this recipe on a CPU with small settings (smoke sizes, results under
# reports/gpu-dry-run/, nothing written to bench/results/); GPU_LABS="a.ipynb b.ipynb" runs only those labs.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
BUDGET_S=${GPU_BUDGET_S:-480}
TESTS_S=${GPU_TESTS_S:-90}
BENCH_S=${GPU_BENCH_S:-150}
DRY=${LABKIT_GPU_DRY_RUN:-0}

device_type=$("$BIN/python" -c "from labkit.device import get_device; print(get_device().type)" 2>/dev/null)
if [ "$device_type" != "cuda" ] && [ "$DRY" != "1" ]; then
    echo "make gpu: refused, nothing run: it needs CUDA (budget ${BUDGET_S} s on one H100/H200) and the kit's device here is '${device_type:-unknown}' (no GPU visible to torch, or LABKIT_DEVICE set)"
    exit 2
fi
device=$("$BIN/python" -c "from labkit.device import device_name; print(device_name())")
# the same file-name form as the benchmarks' JSON (NAME-<device>.json)
slug=$("$BIN/python" -c "import re, sys; print(re.sub(r'[^A-Za-z0-9]+', '-', sys.argv[1]).strip('-').lower())" "$device")
if [ "$DRY" = "1" ]; then
    results=reports/gpu-dry-run; labs_out=reports/gpu-dry-run/labs; mode=smoke; bench_size=--smoke
else
    results=bench/results; labs_out=reports/gpu; mode=full; bench_size=
fi
# shellcheck disable=SC2206 - GPU_LABS is a space-separated list of notebook paths
labs=(${GPU_LABS:-notebooks/*.ipynb})
echo "make gpu on $device: budget ${BUDGET_S} s = gpu tests <= ${TESTS_S} s + labkit bench all <= ${BENCH_S} s" \
     "+ ${#labs[@]} labs in $mode mode (the rest); results -> $results/"

start=$SECONDS
failed=()
part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, record a failure or an overrun
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        failed+=("$name (over its $limit s)")
    elif [ $rc -ne 0 ]; then
        failed+=("$name (exit $rc)")
    fi
    echo "make gpu: $name took $((SECONDS - t0)) s (limit $limit s, exit $rc)"
}

part "gpu tests" "$TESTS_S" "$BIN/python" -m pytest -q -p no:cacheprovider -m gpu tests
mkdir -p "$results"
part "labkit bench all" "$BENCH_S" "$BIN/labkit" bench all $bench_size --out "$results"

left=$((BUDGET_S - (SECONDS - start)))
if [ "$left" -lt 60 ]; then
    failed+=("labs (not run: ${left} s of the budget left)")
else
    per_lab=$(( (left - 15) / ${#labs[@]} ))  # 15 s for starting and writing the report
    part "labkit labs" "$left" env LABKIT_MODE="$mode" "$BIN/labkit" labs "${labs[@]}" --mode "$mode" \
        --out "$labs_out" --timeout "$per_lab"
    for ext in md json; do
        if [ -f "$labs_out/report.$ext" ]; then
            cp "$labs_out/report.$ext" "$results/labs-$slug.$ext"
        fi
    done
fi

total=$((SECONDS - start))
if [ ${#failed[@]} -eq 0 ] && [ "$total" -le "$BUDGET_S" ]; then
    if [ "$DRY" = "1" ]; then
        echo "make gpu (dry run on $device, $mode sizes): all parts passed in $total s; results in $results/, not for committing"
    else
        echo "make gpu: all parts passed in $total s of $BUDGET_S s on $device; commit $results/*$slug*"
    fi
    exit 0
fi
[ "$total" -gt "$BUDGET_S" ] && failed+=("the whole run ($total s, over its $BUDGET_S s)")
summary=$(printf '%s; ' "${failed[@]}")
echo "make gpu: FAILED on $device: ${summary%; }"
exit 1
