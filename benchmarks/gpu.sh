#!/usr/bin/env bash
# The GPU check, one prepared script (at most 8 minutes): the CUDA path end to end (AMP bf16,
# channels_last), then images/s of a ResNet-50 at 224 px on synthetic data, gctkd's step with
# every knob against the minimal timm loop, eager and (optionally) torch.compile'd, and the
# step time / CUDA memory as the batch grows.
#
# Usage: benchmarks/gpu.sh [OUT]        (default OUT: $OUT, else benchmarks/results/gpu)
# Environment: PYTHON (default python), DEVICE (cuda; cpu for a dry run of the logic),
#   MODEL (resnet50), IMAGE_SIZE (224), BATCH (128), COMPILE (1 to try torch.compile).
# Dry run on a CPU:
#   DEVICE=cpu MODEL=resnet20 IMAGE_SIZE=32 BATCH=8 COMPILE=0 benchmarks/gpu.sh /tmp/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu}}
python=${PYTHON:-python}
device=${DEVICE:-cuda}
model=${MODEL:-resnet50}
size=${IMAGE_SIZE:-224}
batch=${BATCH:-128}
compile=${COMPILE:-1}
mkdir -p "$out"
export TQDM_DISABLE=1
status=0
start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$out/$name.log"
  echo "== $name: exit $rc, $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || status=1
}

{
  date -u
  grep -m1 "model name" /proc/cpuinfo
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.cuda.is_available(), torch.version.cuda)"
} | tee "$out/machine.txt"

# 1. the CUDA path through the CLI: one epoch on the embedded digits, bf16 autocast, channels_last
amp=bf16
[ "$device" = cuda ] || amp=off
cli=(-c "from gctkd_cli.main import main; main()")
step cli_smoke 120 "$python" "${cli[@]}" pretrain --device "$device" --amp "$amp" \
  --model resnet20 --image-size 16 --epochs 1 --weight-decay 1e-4:1e-3 --temperature 0.5:2 \
  --clip 4:10 --clip-mode value --focal 3:2 --out "$out/cli_smoke_run" --overwrite
if [ "$device" = cuda ]; then
  grep -q "cuda bf16 autocast, channels_last" "$out/cli_smoke_run/train.log" \
    && echo "CUDA path: bf16 autocast and channels_last in force" \
    || { echo "CUDA path: bf16/channels_last NOT reported in train.log"; status=1; }
fi

# 2. gctkd's step with every knob vs the minimal loop, synthetic data, eager
step overhead_eager 150 "$python" benchmarks/overhead.py --device "$device" --amp bf16 \
  --model "$model" --image-size "$size" --batch-size "$batch" --steps 10 --repeats 8 \
  --no-loader --out "$out/overhead_eager.json"

# 3. the same with torch.compile on both models (optional: compile time counts in the limit)
if [ "$compile" = 1 ]; then
  step overhead_compile 200 "$python" benchmarks/overhead.py --device "$device" --amp bf16 \
    --model "$model" --image-size "$size" --batch-size "$batch" --steps 10 --repeats 6 \
    --warmup 3 --compile --no-loader --out "$out/overhead_compile.json"
fi

# 4. batch size and knob count on the GPU
step scaling 120 "$python" benchmarks/scaling.py --device "$device" --models "$model" \
  --image-size "$size" --batch-sizes "$((batch / 2)),$batch,$((batch * 2))" \
  --knob-batch-size "$batch" --steps 5 --repeats 4 --memory-repeats 2 --out "$out/scaling"

echo "gpu.sh: $(( $(date +%s) - start ))s, results in $out, exit $status"
exit $status
