#!/usr/bin/env bash
# One-shot check on a GPU machine, end to end in about 8 minutes on one GPU:
#   1. the tests that need CUDA (tests/test_cuda.py: AMP bf16/fp16 with the scaler, compile, SyncBN
#      under NCCL with one GPU, the gpu loader on CUDA);
#   2. time_to_accuracy with configs/fast.yaml on the carried real CIFAR-10 (test set + a subset of train);
#   3. the framework overhead (Trainer vs bare loop) for fast and attention_resnet;
#   4. train_throughput for attention_resnet and fast with every toggle, in the time left;
#   5. one summary table.
# Needs Python >= 3.10 with torch, numpy, pandas, pyyaml and pytest (nothing else: no network, FFCV,
# matplotlib, ...) and the packed data: `python benchmarks/pack_data.py pack --data-root DIR` writes
# benchmarks/data/cifar10.npz (at most 60 MiB) on a machine that has CIFAR-10.
#
#   bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default python3), GPU_CHECK_DATA (the packed .npz; default
# benchmarks/data/cifar10.npz), OUT (results and the summary go there when set, else
# benchmarks/results/), GPU_CHECK_TARGET (accuracy target, default 0.85), GPU_CHECK_RUNS (default 3),
# GPU_CHECK_BUDGET_S (seconds from the start, default 455; each step's limit is cut to what is left,
# and a step with less than 20 s left is skipped),
# GPU_CHECK_ALLOW_CPU=1 (a dry run on the CPU with tiny sizes: every step, no GPU figures).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
PACKED=${GPU_CHECK_DATA:-benchmarks/data/cifar10.npz}
TARGET=${GPU_CHECK_TARGET:-0.85}  # below airbench's 94%: the carried training subset is a third of the set
RUNS=${GPU_CHECK_RUNS:-3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-455}  # from the start; the summary after the last step adds a few seconds
START=$SECONDS

fail() { echo "gpu_check: error: $*" >&2; exit 2; }

# --- prerequisites --------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || fail "no '$PYTHON' on PATH; set PYTHON to a Python 3.10+ with torch"
"$PYTHON" - <<'EOF' || fail "the Python above lacks what the check needs (see the line before)"
import importlib, sys
if sys.version_info < (3, 10):
    sys.exit(f"Python {sys.version.split()[0]}: need 3.10 or newer")
missing = [m for m in ("torch", "numpy", "pandas", "yaml", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (pyyaml provides yaml)")
EOF
[ -f "$PACKED" ] || fail "no packed data at $PACKED; on a machine with CIFAR-10 run
  python benchmarks/pack_data.py pack --data-root DIR
and carry benchmarks/data/cifar10.npz along (or set GPU_CHECK_DATA)"
command -v timeout >/dev/null || fail "no 'timeout' command (coreutils)"
TORCH=$("$PYTHON" -c 'import sys, torch
print("Python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA build", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")') || fail "torch does not import"
if [[ $TORCH != *"no CUDA device" ]]; then
    DEVICE=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    DEVICE=cpu
    echo "gpu_check: no CUDA device; GPU_CHECK_ALLOW_CPU=1: a dry run on the CPU with tiny sizes"
else
    fail "torch sees no CUDA device ($TORCH);
  run this on a GPU machine, or set GPU_CHECK_ALLOW_CPU=1 for a dry run on the CPU"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ -n "${OUT:-}" ]; then RESULTS=$OUT/results; SUMMARY=$OUT/gpu_check_summary.md
else RESULTS=benchmarks/results; SUMMARY=""; fi
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CIFAR_DIST_DATA=$WORK/data  # tests/test_cuda.py uses synthetic data; this is for the benchmarks
echo "gpu_check: $TORCH"

# The carried file is LZMA-compressed for size; every run reads the data again, so unpack it once.
"$PYTHON" benchmarks/pack_data.py unpack "$PACKED" "$WORK/data/cifar10.npz" || fail "cannot unpack $PACKED"
DATA=(--data-root "$WORK/data" data.require_full_size=false)

if [ "$DEVICE" = cuda ]; then
    SIZES_TT=(--steps 15 --repeats 3)
    SIZES_OH=(--steps 15 --repeats 5)
    SIZES_TTA=(--target "$TARGET" --runs "$RUNS")
    TTA_OVERRIDES=(data.val_fraction=0)
else
    SIZES_TT=(--quick)
    SIZES_OH=(--quick)
    SIZES_TTA=(--quick)
    TTA_OVERRIDES=(data.val_fraction=0)
fi

# --- the steps --------------------------------------------------------------------------------------
STATUS=$WORK/status.tsv
: > "$STATUS"
step() {  # step NAME LIMIT_S command...: run it unless the budget is spent; record its outcome
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped: the %s s budget was spent\t0\n' "$name" "$BUDGET_S" >> "$STATUS"
        echo "gpu_check: skipping $name (time budget spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo; echo "=== gpu_check: $name (at most $limit s) ==="
    local began=$SECONDS
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local code=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    case $code in
        0) printf '%s\tok\t%s\n' "$name" "$took" >> "$STATUS" ;;
        124|137) printf '%s\ttimed out after %s s\t%s\n' "$name" "$limit" "$took" >> "$STATUS" ;;
        *) printf '%s\tfailed (exit code %s)\t%s\n' "$name" "$code" "$took" >> "$STATUS" ;;
    esac
}

step tests 150 "$PYTHON" -m pytest tests/test_cuda.py -q -p no:cacheprovider
step time_to_accuracy 90 "$PYTHON" -m cifar_dist bench time_to_accuracy --device "$DEVICE" \
    --config configs/fast.yaml --results "$RESULTS" "${SIZES_TTA[@]}" "${DATA[@]}" "${TTA_OVERRIDES[@]}"
step overhead 90 "$PYTHON" -m cifar_dist bench overhead --device "$DEVICE" --models fast,attention_resnet \
    --results "$RESULTS" "${SIZES_OH[@]}" "${DATA[@]}"
# Last, with what is left: it stops building rows and starting rounds when its --budget-s is spent,
# and keeps 60 s for the round in flight and its report.
LEFT=$((BUDGET_S - (SECONDS - START)))
[ "$DEVICE" = cuda ] && SIZES_TT+=(--budget-s $((LEFT > 120 ? LEFT - 60 : 60)))
step train_throughput "$LEFT" "$PYTHON" -m cifar_dist bench train_throughput --device "$DEVICE" \
    --results "$RESULTS" "${SIZES_TT[@]}" "${DATA[@]}"

# --- the summary ------------------------------------------------------------------------------------
"$PYTHON" benchmarks/gpu_summary.py --results "$RESULTS" --status "$STATUS" --device "$DEVICE" \
    --tests-log "$WORK/tests.log" --elapsed-s $((SECONDS - START)) ${SUMMARY:+--out "$SUMMARY"}
grep -qv $'\tok\t' "$STATUS" && exit 1
exit 0
