#!/usr/bin/env bash
# GPU benchmarks in one command (about 8 minutes on one H200):
#
#   bash benchmarks/gpu.sh OUT_DIR [--device cuda|cpu] [--quick] [--seconds 480]
#
# Parts, each in its own process with its own time limit; a part that fails is logged and the others still run:
#   1. speed, eager      gpu_speed.py --modes eager: DeiT-S/B, dense vs OFB/UVC exports (and Torch-Pruning) at
#                        70/50/30% MACs, bf16, batch 1/64/256/1024, with the sdpa backend each one ran
#   2. search overhead   overhead.py --bf16: one OFB / UVC search step vs one plain step, DeiT-S shape, batch 128
#   3. quality smoke     quality.py --quick on a CIFAR-10 subset (every method, 50%), on the GPU
#   4. speed budget      latency_budget.py: DeiT-T/S, bf16, batch 1/64/256, targets 1.5/2/3x: predicted vs measured
#                        speed-up of speed-budgeted OFB/UVC models, and the MACs budget reaching the same speed
#   5. speed, compile    gpu_speed.py --modes compile with the time left (groups that do not fit are listed)
# OUT_DIR gets few files: speed_gpu.json, overhead_gpu.json, quality_gpu_quick.json, latency_budget_gpu.json,
# speed_gpu_compile.json (each with
# command, date, git commit, machine and versions inside), gpu.md (every part's Markdown report) and gpu.log.
# Missing packages come from .whl/ and the CIFAR subset from .gpu_data/ (benchmarks/gpu_prepare.sh makes both).
# --device cpu --quick runs the same code paths on tiny shapes on a CPU (give it --seconds 900 there).
set -uo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda; QUICK=(); TOTAL=480
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        --quick) QUICK=(--quick); shift ;;
        --seconds) TOTAL=${2:?--seconds needs a number}; shift 2 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; usage ;;
    esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu.sh $(date +%H:%M:%S) +$(elapsed)s] $*"; }
FAILED=()

# -- environment --------------------------------------------------------------------------------------------------
if ! "$PY" -c "import datasets, torch_pruning" 2>/dev/null; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site" || log "wheel install FAILED"
    else
        log "datasets or torch_pruning missing and no .whl/ (run benchmarks/gpu_prepare.sh): parts needing them fail"
    fi
fi
if [ -z "$(git rev-parse --short HEAD 2>/dev/null)" ] && [ -f .gpu_data/git_commit ]; then
    BENCH_GIT_COMMIT="$(tr '\n' ' ' < .gpu_data/git_commit | sed 's/ *$//') (recorded by gpu_prepare.sh)"
    export BENCH_GIT_COMMIT
fi
log "repository $REPO, commit ${BENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}, device $DEVICE, ${TOTAL} s"
"$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("transformers", "accelerate", "datasets", "torch_pruning", "pyarrow", "fsspec"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:  # noqa: BLE001
        print(name, "MISSING:", error)
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

# -- parts ----------------------------------------------------------------------------------------------------------
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    if [ "$limit" -le 0 ]; then log "part $name: SKIPPED (no time left)"; FAILED+=("$name (no time)"); return; fi
    log "part $name: start (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then log "part $name: FAILED (exit $rc$([ $rc -ge 124 ] && echo ', time limit'))"; FAILED+=("$name"); else log "part $name: done"; fi
}
if [ ${#QUICK[@]} -gt 0 ]; then
    SPEED=(--quick --device "$DEVICE" --threads 0)
    OVERHEAD=(--quick --bf16 --threads 0)
    LATENCY=(--quick --device "$DEVICE" --threads 0)
    LIMITS=(240 300 240 240)
else
    SPEED=(--device "$DEVICE" --threads 0)
    OVERHEAD=(--models deit-small --batch-size 128 --bf16 --steps 14 --warmup 4 --rounds 1 --no-demo --threads 0)
    LATENCY=(--device "$DEVICE" --dtype bfloat16 --batches 1,64,256 --threads 0)
    LIMITS=(150 120 90 240)
fi
DATA=""
for candidate in .gpu_data/cifar10 ../shared/data/cifar10; do
    if ls "$candidate"/test-*.parquet > /dev/null 2>&1; then DATA=$candidate; break; fi
done

part speed-eager "${LIMITS[0]}" "$PY" benchmarks/gpu_speed.py "${SPEED[@]}" --modes eager --output-dir "$WORK" \
    --name speed_gpu
part overhead "${LIMITS[1]}" "$PY" benchmarks/overhead.py "${OVERHEAD[@]}" --output-dir "$WORK" --name overhead_gpu
if [ -n "$DATA" ]; then
    part quality "${LIMITS[2]}" "$PY" benchmarks/quality.py --quick --methods ofb,uvc,tp-magnitude,tp-taylor,uniform \
        --budgets 0.5 --seeds 0 --threads 0 --data-dir "$DATA" --cache-dir "$WORK/cache" --output-dir "$WORK" \
        --name quality_gpu_quick
else
    log "part quality: SKIPPED (no CIFAR-10 parquet in .gpu_data/cifar10 or ../shared/data/cifar10)"; FAILED+=("quality (no data)")
fi
part latency-budget "${LIMITS[3]}" "$PY" benchmarks/latency_budget.py "${LATENCY[@]}" --output-dir "$WORK" \
    --name latency_budget_gpu
LEFT=$(( TOTAL - $(elapsed) - 10 ))
part speed-compile $(( LEFT > 0 ? LEFT + 60 : 0 )) "$PY" benchmarks/gpu_speed.py "${SPEED[@]}" --modes compile \
    --no-tp --time-budget "$LEFT" --output-dir "$WORK" --name speed_gpu_compile

# -- results --------------------------------------------------------------------------------------------------------
{
    echo "# GPU benchmarks (benchmarks/gpu.sh)"
    echo
    echo "- command: \`bash benchmarks/gpu.sh OUT_DIR --device $DEVICE ${QUICK[*]} --seconds $TOTAL\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s"
    echo "- parts that failed or were skipped: ${FAILED[*]:-none} (details in gpu.log)"
    for name in speed_gpu overhead_gpu quality_gpu_quick latency_budget_gpu speed_gpu_compile; do
        echo
        if [ -f "$WORK/$name.md" ]; then sed 's/^# /## /' "$WORK/$name.md"; else echo "## $name: no results (see gpu.log)"; fi
    done
} > "$OUT/gpu.md"
for name in speed_gpu overhead_gpu quality_gpu_quick latency_budget_gpu speed_gpu_compile; do
    [ -f "$WORK/$name.json" ] && cp "$WORK/$name.json" "$OUT/"
done
rm -rf "$WORK"
log "wrote $(ls "$OUT" | tr '\n' ' ')in $OUT; failed or skipped: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
