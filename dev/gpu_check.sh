#!/usr/bin/env bash
# Accepts the GPU path on a CUDA machine in one command, and prints one report:
#   1. build     di_maskdino._C in place with the CUDA kernels, for the visible GPUs'
#                architectures, against the PyTorch found here (setup.py finds the toolkit;
#                set CUDA_HOME if it cannot)
#   2. install   tools/check_install.py: what was built, kernel against reference per device
#   3. tests     the operator tests: CUDA against the CPU kernel and the float64 reference in
#                float64/32/16 and bfloat16, gradcheck, opcheck, torch.compile(fullgraph=True),
#                a second GPU if there is one, deterministic mode, bad layouts; plus the host
#                simulation of the CUDA kernels and the layer tests
#   4. bench     dev/benchmark_msda.py on the GPU, value in float32, float16 and bfloat16
#   5. model     (needs detectron2) dev/benchmark_model.py (float32 model time, the paper's
#                FPS column), then dev/gpu_model_check.py: end-to-end FPS in float32 and
#                AMP, 50 AMP training iterations with the peak GPU memory, for
#                configs/coco/dimaskdino_r50_12ep.yaml at 800x1333
# On a machine without a GPU it builds and tests the CPU side and says what it skipped. The
# operator stages need PyTorch only; detectron2, fvcore, yacs and pycocotools are needed for
# stage 5 only (see README, "The deformable attention operator").
#
#   bash dev/gpu_check.sh
#
# Environment: PYTHON (default python), CUDA_HOME (the toolkit, if setup.py cannot find it),
# GPU_CHECK_OUT (logs and report, default output/gpu_check), GPU_CHECK_CONFIG (stage 5's
# config), GPU_CHECK_TRAIN_ITERS (default 50).
# Exit status: 0 when every stage that ran passed (skipped stages included), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-output/gpu_check}
CONFIG=${GPU_CHECK_CONFIG:-configs/coco/dimaskdino_r50_12ep.yaml}
TRAIN_ITERS=${GPU_CHECK_TRAIN_ITERS:-50}
mkdir -p "$OUT"
REPORT="$OUT/report.txt"
: > "$REPORT"
failed=0

say() { echo "$*" | tee -a "$REPORT"; }

# run NAME COMMAND...: runs the command with its output in $OUT/NAME.log, records the outcome.
run() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    if [ $status -eq 0 ]; then
        say "[ok]      $name ($((SECONDS - start)) s)"
    else
        say "[FAILED]  $name (exit $status, $((SECONDS - start)) s; log: $OUT/$name.log)"
        failed=1
    fi
    return $status
}

skip() { say "[skipped] $1: $2"; }

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
"$PYTHON" - <<'PY' 2>&1 | tee -a "$REPORT"
import shutil, subprocess, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
nvcc = shutil.which("nvcc")
lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines() if nvcc else []
version = next((line for line in lines if "release" in line), "none on PATH")
print(f"nvcc: {version}")
PY
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)

# 1. build
if [ "$gpus" -gt 0 ]; then
    archs=$("$PYTHON" -c "import torch; print(';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))")
    run build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" "$PYTHON" setup.py build_ext --inplace
else
    skip "CUDA build" "no GPU visible; building the CPU kernels only"
    run build "$PYTHON" setup.py build_ext --inplace
fi
built=$?

# 2. what was built, and the kernels against the reference
if [ $built -eq 0 ]; then
    run install "$PYTHON" tools/check_install.py
else
    skip install "the build failed"
fi

# 3. operator tests (CUDA tests skip themselves without a GPU, and say so)
if [ $built -eq 0 ]; then
    run tests "$PYTHON" -m pytest -q -rs tests/ops tests/layers tests/test_setup_cuda.py
    "$PYTHON" - "$OUT/tests.log" <<'PY' | tee -a "$REPORT"
import collections, re, sys
text = open(sys.argv[1]).read()
skipped = collections.Counter()
for count, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", text, re.M):
    skipped[reason] += int(count)
summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
print("          " + (summary[-1] if summary else "no pytest summary"))
for reason, count in skipped.most_common():
    print(f"          skipped {count}: {reason}")
PY
else
    skip tests "the build failed"
fi

# 4. operator benchmark on the GPU
if [ "$gpus" -gt 0 ] && [ $built -eq 0 ]; then
    for dtype in float32 float16 bfloat16; do
        run "bench_$dtype" "$PYTHON" dev/benchmark_msda.py --device cuda --dtype "$dtype" --json "$OUT/bench_$dtype.json" \
            && grep -E "^(encoder|decoder)" "$OUT/bench_$dtype.log" | sed "s/^/          $dtype /" | tee -a "$REPORT"
    done
else
    skip benchmark "no GPU (the CPU benchmark: python dev/benchmark_msda.py)"
fi

# 5. model-level stages
if [ "$gpus" -eq 0 ]; then
    skip model "no GPU"
elif ! "$PYTHON" -c "import detectron2, fvcore, yacs; from di_maskdino.d2 import load_config" > "$OUT/model_imports.log" 2>&1; then
    skip model "detectron2 not installed (carry its source and wheels; see README) - $(tail -n 1 "$OUT/model_imports.log")"
elif [ $built -ne 0 ]; then
    skip model "the build failed"
else
    run model_time "$PYTHON" dev/benchmark_model.py --config-file "$CONFIG" --input-size 800x1333 --device cuda --no-flops \
        && grep -E "^(parameters|model time|peak)" "$OUT/model_time.log" | sed 's/^/          /' | tee -a "$REPORT"
    run model_amp "$PYTHON" dev/gpu_model_check.py --config-file "$CONFIG" --device cuda --input-size 800x1333 \
        --train-iters "$TRAIN_ITERS" \
        && grep -E "^(config|inference|training)" "$OUT/model_amp.log" | sed 's/^/          /' | tee -a "$REPORT"
fi

echo
echo "================ report ($REPORT) ================"
cat "$REPORT"
if [ $failed -ne 0 ]; then
    echo "gpu_check: FAILED (see the logs in $OUT)"
    exit 1
fi
echo "gpu_check: every stage that ran passed"
