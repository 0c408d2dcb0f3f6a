#!/usr/bin/env bash
# The main job on real data: pretrain a teacher on 4K CIFAR-10 (400 images per class, from
# ../shared), then distil a smaller student from it; prints both validation accuracies and
# the wall times. Validation: 200 other training images per class, disjoint from the 4K.
# Usage: benchmarks/main_job.sh [EPOCHS] [OUT]   (defaults: 15 epochs, benchmarks/cache/main_job)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-15}
out=${2:-benchmarks/cache/main_job}
data=benchmarks/cache/cifar10-first600
python - "$data" <<'PY'
import sys
from pathlib import Path
from gctkd.data.archive import extract_imagefolder_subset
archive = Path("..").resolve() / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
extract_imagefolder_subset(str(archive), sys.argv[1], per_class=600)
PY
mkdir -p "$out"
start=$(date +%s)
gctkd pretrain --config configs/cifar4k-pretrain.yaml --data "$data" --out "$out/teacher" \
  --epochs "$epochs" --overwrite
mid=$(date +%s)
gctkd distill --config configs/cifar4k-distill.yaml --teacher "$out/teacher" --data "$data" \
  --out "$out/student" --epochs "$epochs" --overwrite
end=$(date +%s)
python - "$out" $((mid - start)) $((end - mid)) <<'PY'
import json, sys
out, teacher_s, student_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for role, seconds in (("teacher", teacher_s), ("student", student_s)):
    summary = json.load(open(f"{out}/{role}/summary.json"))
    final = summary["final"]
    print(f"{role}: best val top1 {summary['best_top1']:.2f}, final val top1 "
          f"{final['val/top1']:.2f}, final ece {final['val/ece']:.4f}, wall {seconds}s")
PY
