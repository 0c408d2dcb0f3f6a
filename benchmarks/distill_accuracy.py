"""Distillation accuracy on 4K CIFAR-10: student alone vs logit KD vs logit + feature KD vs
the same with a cyclical KD temperature (issue 3).

Four arms, the same student (resnet20, 32 px), recipe and epochs, several seeds:

* ``student``: the student trained on labels alone (``gctkd pretrain`` with the distillation
  recipe's cycle and weight decay);
* ``kd``: logit distillation at a constant T = 4 (``kd_weight`` 0.9, ``label_weight`` 0.1);
* ``kd+feat``: the same plus attention transfer at the three stage outputs (deep supervision,
  ``--feature-layers 1,2,3 --feature-loss at``, the default feature weight);
* ``kd+feat+cyc``: the same with the cyclical KD temperature ``1:4`` (f_c = 2: T peaks mid-run).

The teacher is a gctkd run (default: the main job's resnet56 teacher). Data: the first 400
training images per class (the 4K set), validation the other 200 per class of the first 600.
Every run goes through the real gctkd path (``resolve_config`` then the runner) and is cached
as ``CACHE/<arm>-seed<k>.json`` with a fingerprint of its settings, so an interrupted study
resumes at the first missing run. Each run holds ``/tmp/gctkd-cpu.lock`` (``flock``) while it
trains, so heavy jobs of other developers run between runs instead of thrashing with them.

Writes ``benchmarks/results/distill_accuracy.md`` (mean +- sample std over seeds, and the
difference to the student alone, paired by seed) and ``benchmarks/results/distill_accuracy.json``.

    python benchmarks/distill_accuracy.py --epochs 3 --threads 1   # the recorded study, 3 seeds
    python benchmarks/distill_accuracy.py --epochs 1 --seeds 0     # one epoch of each arm (timing)

``--threads 1 --lock OTHER_FILE`` lets the study share the two cores with another one-thread
job instead of queueing behind it (how the recorded run was made).
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

# one line per run in the log; per-step progress bars would only fill it
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from common import (  # noqa: E402
    CIFAR_ARCHIVE, REPO, command_line, describe_machine, machine_info, markdown_table, mean_std,
    write_json,
)
from gctkd.config import resolve_config  # noqa: E402
from gctkd.data.archive import extract_imagefolder_subset  # noqa: E402
from gctkd.tasks.runner import distill, pretrain  # noqa: E402

_logger = logging.getLogger("gctkd.benchmarks.distill_accuracy")

LOCK_PATH = "/tmp/gctkd-cpu.lock"
RECIPE: dict[str, Any] = {
    "per_class": 400,
    "val_per_class": 200,
    "model": "resnet20",
    "image_size": 32,
    "batch_size": 64,
    "lr": 0.05,
    "warmup_epochs": 1,
    "hflip": 0.5,
    "cyclical_factor": 2,
    "weight_decay": "1e-4:1e-3",
    "workers": 1,
    "log_interval": 20,
}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "student": ("pretrain", {}),
    "kd": ("distill", {"kd_temperature": "4"}),
    "kd+feat": (
        "distill", {"kd_temperature": "4", "feature_layers": "1,2,3", "feature_loss": "at"}
    ),
    "kd+feat+cyc": (
        "distill", {"kd_temperature": "1:4", "feature_layers": "1,2,3", "feature_loss": "at"}
    ),
}


@contextlib.contextmanager
def cpu_lock(path: str = LOCK_PATH) -> Iterator[None]:
    """Hold the machine-wide lock heavy jobs share (the same file ``flock`` uses)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_arm(arm: str, seed: int, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Train one arm with one seed, or read its cached result."""
    command, extra = ARMS[arm]
    settings = {**RECIPE, **extra, "epochs": args.epochs, "seed": seed, "data": str(args.data)}
    if command == "distill":
        settings["teacher"] = str(args.teacher)
    fingerprint = _fingerprint({"command": command, **settings})
    result_path = cache / "results" / f"{arm}-seed{seed}.json"
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("fingerprint") == fingerprint:
            return cached
    out = cache / "runs" / f"{arm}-seed{seed}"
    config = resolve_config(command, {}, {**settings, "out": str(out), "overwrite": True})
    with cpu_lock(args.lock):
        started = time.perf_counter()
        summary = (distill if command == "distill" else pretrain)(config)
        wall = time.perf_counter() - started
    final = summary["final"]
    result = {
        "arm": arm,
        "seed": seed,
        "fingerprint": fingerprint,
        "settings": {"command": command, **settings},
        "final_top1": final["val/top1"],
        "best_top1": summary["best_top1"],
        "final_agreement": final.get("val/agreement"),
        "final_ece": final["val/ece"],
        "wall_seconds": wall,
    }
    write_json(result_path, result)
    _logger.info(
        f"{arm} seed {seed}: final top1 {result['final_top1']:.2f}, best "
        f"{result['best_top1']:.2f}, {wall:.0f}s"
    )
    return result


def _cell(values: list[float]) -> str:
    mean, spread = mean_std(values)
    return f"{mean:.2f} +- {spread:.2f}"


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by_arm = {arm: [r for r in results if r["arm"] == arm] for arm in ARMS}
    baseline = {r["seed"]: r["final_top1"] for r in by_arm["student"]}
    rows = []
    for arm, runs in by_arm.items():
        if not runs:
            continue
        gains = [r["final_top1"] - baseline[r["seed"]] for r in runs if r["seed"] in baseline]
        agreement = [r["final_agreement"] for r in runs if r["final_agreement"] is not None]
        rows.append([
            arm,
            len(runs),
            _cell([r["final_top1"] for r in runs]),
            _cell([r["best_top1"] for r in runs]),
            _cell(gains) if arm != "student" and gains else "-",
            _cell(agreement) if agreement else "-",
            f"{sum(r['wall_seconds'] for r in runs) / len(runs):.0f}",
        ])
    header = [
        "arm", "seeds", "final val top1", "best val top1", "final gain vs student (paired)",
        "final val agreement", "wall s / run",
    ]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--teacher", type=Path, default=REPO / "benchmarks/cache/main_job/teacher")
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks/cache/cifar10-first600")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks/cache/distill_accuracy")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--lock", default=LOCK_PATH, help="lock file held while a run trains")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gctkd").setLevel(logging.WARNING)
    _logger.setLevel(logging.INFO)

    if not (args.teacher / "summary.json").is_file():
        sys.exit(f"teacher run {args.teacher} is not finished (no summary.json)")
    extract_imagefolder_subset(str(CIFAR_ARCHIVE), str(args.data), per_class=600)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    results = [run_arm(arm, seed, args, args.cache) for seed in seeds for arm in arms]
    wall = time.perf_counter() - started

    teacher = json.loads((args.teacher / "summary.json").read_text())
    table = summarise(results, args)
    info = machine_info()
    text = (
        "# Distillation accuracy on 4K CIFAR-10 (issue 3)\n\n"
        f"`{command_line()}`\n\n{describe_machine(info)}; wall time of this invocation "
        f"{wall / 60:.1f} min (cached runs cost nothing).\n\n"
        f"Student resnet20, {args.epochs} epochs; teacher `{args.teacher.relative_to(REPO)}` "
        f"(best val top1 {teacher['best_top1']:.2f}). Val: 2,000 images (200 per class), "
        "disjoint from the 4,000 training images. Mean +- sample std over seeds.\n\n"
        f"{table}\n"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "distill_accuracy.md").write_text(text)
    write_json(args.results / "distill_accuracy.json", {
        "command": command_line(), "machine": info, "wall_seconds": wall, "recipe": RECIPE,
        "arms": {arm: ARMS[arm] for arm in arms}, "teacher_best_top1": teacher["best_top1"],
        "runs": results,
    })
    print(text)


if __name__ == "__main__":
    main()
