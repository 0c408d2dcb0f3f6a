"""Accuracy grid: each cyclical knob alone, and all four together, on 4K CIFAR-10.

Smith (2022) reports small gains (0.1 to 0.9 top-1 points) from cyclical weight decay (CWD),
softmax temperature (CST) and gradient clipping (CGC), largest on the 4,000-image CIFAR-10
subset (GCT.md section 5). This script trains every cell with several seeds through the real
gctkd path (``resolve_config`` then ``gctkd.tasks.runner.pretrain``) and writes:

* ``RESULTS/accuracy_grid.md``: a table like GCT.md section 5 (mean +- std over seeds, and the
  difference to the baseline, paired by seed), then one row per cell;
* ``RESULTS/accuracy_grid.json``: the settings, the machine and every run's numbers.

Each finished run is cached as ``CACHE/results/<cell>-seed<k>.json`` with a fingerprint of its
settings, so an interrupted grid resumes at the first missing run; a run cut off half-way
restarts from its first epoch.

The recipe is Table 4's CIFAR-10 SGD recipe scaled down: batch 64 instead of 384 with the
learning rate scaled linearly (0.15 * 64 / 384 = 0.025), which keeps the paper's Eq. 3,
``lr * wd / (bs * (1 - momentum))``, at its 1.95e-6; cosine schedule, one warm-up epoch.

    python benchmarks/accuracy_grid.py --jobs 2                 # 4K, 15 epochs, 3 seeds
    python benchmarks/accuracy_grid.py --quick                  # 1K images, 2 epochs, 2 seeds
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# the grid logs one line per run; per-step progress bars would only fill the log
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from common import (  # noqa: E402
    CIFAR_ARCHIVE, REPO, command_line, describe_machine, machine_info, markdown_table, mean_std,
    write_json,
)
from gctkd.config import resolve_config  # noqa: E402
from gctkd.data.archive import extract_imagefolder_subset  # noqa: E402
from gctkd.data.transforms import build_transform  # noqa: E402
from gctkd.engine.checkpoint import LAST_NAME, load_checkpoint  # noqa: E402
from gctkd.engine.metrics import EvalAccumulator  # noqa: E402
from gctkd.models import create_model  # noqa: E402
from gctkd.tasks.runner import pretrain  # noqa: E402

_logger = logging.getLogger("gctkd.benchmarks.accuracy_grid")

# GCT.md section 2 ranges. Each knob runs on the cycle the paper ran it on; "all" uses
# pretraining's f_c = 1 (one run has one cycle). CFL keeps the paper's gammas and f_c = 4 but
# no label smoothing, so it differs from the baseline in its loss alone.
CELLS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "CWD": {"weight_decay": "1e-4:1e-3", "cyclical_factor": 1},
    "CST": {"temperature": "0.5:2", "cyclical_factor": 1},
    "CGC": {"clip": "4:10", "clip_mode": "value", "cyclical_factor": 2},
    # not a paper setting: value clipping at 4..10 never binds on resnet20 here (the CGC cell
    # equals the baseline bit for bit, RESULTS.md); norm clipping at 1..4 clips at the easy ends
    "CGC-norm": {"clip": "1:4", "clip_mode": "norm", "cyclical_factor": 2},
    "CFL": {"focal": "3:2", "cyclical_factor": 4},
    "all": {
        "weight_decay": "1e-4:1e-3",
        "temperature": "0.5:2",
        "clip": "4:10",
        "clip_mode": "value",
        "focal": "3:2",
        "cyclical_factor": 1,
    },
}

# the baseline: constant weight decay 5e-4, T = 1, no clipping, cross-entropy
RECIPE: dict[str, Any] = {
    "model": "resnet20",
    "image_size": 32,
    "batch_size": 64,
    "opt": "sgd",
    "lr": 0.025,
    "momentum": "0.9",
    "sched": "cosine",
    "warmup_epochs": 1,
    "min_lr": 1e-5,
    "weight_decay": "5e-4",
    "hflip": 0.5,
    "progress_unit": "step",
    "log_interval": 50,
}

# per mode: images per class, validation images per class, epochs, seeds, and for the test
# suite smaller batches and inputs, loading in the main process
MODES: dict[str, dict[str, Any]] = {
    "full": {"per_class": 400, "val_per_class": 200, "epochs": 15, "seeds": 3},
    "quick": {"per_class": 100, "val_per_class": 50, "epochs": 2, "seeds": 2},
    "tiny": {"per_class": 4, "val_per_class": 2, "epochs": 1, "seeds": 2, "batch_size": 8,
             "image_size": 16, "workers": 0},
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1K images, 2 epochs, 2 seeds.")
    mode.add_argument("--tiny", action="store_true", help="Seconds: for the test suite.")
    parser.add_argument("--data", help="ImageFolder with >= per-class + val-per-class images "
                        "per class; default: the first 600 CIFAR-10 training images per class.")
    parser.add_argument("--test-dir", help="Also evaluate every final model on this ImageFolder.")
    parser.add_argument("--per-class", type=int)
    parser.add_argument("--val-per-class", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, help="Seeds 0 .. N-1 per cell.")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="Default: 0.025 scaled linearly with the batch.")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--cells", default=",".join(CELLS), help="Comma-separated cells to run.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's "
                        "choice); 1 keeps a shared machine's load from stalling the runs.")
    parser.add_argument("--cache", help="Run folders and per-run JSON (default under "
                        "benchmarks/cache).")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"),
                        help="Folder for the markdown table and the JSON of every run.")
    parser.add_argument("--name", help="Name of the results files and the cache folder "
                        "(default: accuracy_grid, with _quick or _tiny for those modes); give "
                        "another size of data its own, e.g. --per-class 100 --name "
                        "accuracy_grid_1k.")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Train this many runs at once, each in its own process with "
                        "CPUs / jobs torch threads unless --threads says otherwise.")
    parser.add_argument("--runs", help=argparse.SUPPRESS)  # CELL:SEED,... for one --jobs child
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="Keep best.pt/last.pt of each run (deleted after evaluation).")
    return parser.parse_args(argv)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = {"mode": mode, "workers": 2, "batch_size": RECIPE["batch_size"],
            "image_size": RECIPE["image_size"], **MODES[mode]}
    for name in ("per_class", "val_per_class", "epochs", "seeds", "batch_size", "workers"):
        if getattr(args, name) is not None:
            plan[name] = getattr(args, name)
    plan["lr"] = args.lr or RECIPE["lr"] * plan["batch_size"] / RECIPE["batch_size"]
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    plan["cells"] = [cell.strip() for cell in args.cells.split(",") if cell.strip()]
    unknown = [cell for cell in plan["cells"] if cell not in CELLS]
    if unknown:
        raise SystemExit(f"--cells: unknown cells {unknown}; known: {', '.join(CELLS)}")
    suffix = "" if mode == "full" else f"_{mode}"
    plan["name"] = args.name or f"accuracy_grid{suffix}"
    plan["cache"] = args.cache or str(REPO / "benchmarks" / "cache" / plan["name"])
    return plan


def _default_data() -> str:
    dest = REPO / "benchmarks" / "cache" / "cifar10-first600"
    return extract_imagefolder_subset(CIFAR_ARCHIVE, dest, per_class=600)


def _settings(plan: dict[str, Any], cell: str, seed: int, data: str, run_dir: Path) -> dict:
    return {
        **RECIPE,
        **CELLS[cell],
        "data": data,
        "per_class": plan["per_class"],
        "val_per_class": plan["val_per_class"],
        "epochs": plan["epochs"],
        "batch_size": plan["batch_size"],
        "image_size": plan["image_size"],
        "lr": plan["lr"],
        "workers": plan["workers"],
        "device": plan["device"],
        "seed": seed,
        "out": str(run_dir),
        "overwrite": True,
    }


def _fingerprint(settings: dict[str, Any], test_dir: str | None) -> str:
    # where the run folder lives does not change its numbers
    stable = {key: value for key, value in settings.items() if key not in ("out", "overwrite")}
    stable["data"] = os.path.abspath(stable["data"])
    stable["test_dir"] = os.path.abspath(test_dir) if test_dir else None
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _evaluate_folder(run_dir: Path, folder: str, device: torch.device) -> dict[str, float]:
    """top1 and ece of a run's final model on another ImageFolder (T = 1)."""
    state = load_checkpoint(run_dir / LAST_NAME)
    model = create_model(state["model_name"], int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    transform = build_transform(
        int(state["image_size"]), training=False, mean=state["mean"], std=state["std"], hflip=0.0
    )
    dataset = ImageFolder(folder, transform=transform)
    if dataset.classes != list(state["class_names"]):
        raise SystemExit(f"--test-dir '{folder}' has classes {dataset.classes}, the run "
                         f"{state['class_names']}")
    accumulator = EvalAccumulator(int(state["num_classes"]), device)
    for images, targets in DataLoader(dataset, batch_size=200):
        accumulator.update(model(images.to(device)), targets.to(device))
    metrics = accumulator.compute()
    return {"top1": metrics["top1"], "ece": metrics["ece"], "images": len(dataset)}


def _run_paths(plan: dict[str, Any], cell: str, seed: int) -> tuple[Path, Path]:
    cache = Path(plan["cache"])
    return cache / "results" / f"{cell}-seed{seed}.json", cache / "runs" / cell / f"seed{seed}"


def _cached(plan: dict[str, Any], cell: str, seed: int, data: str,
            test_dir: str | None) -> dict[str, Any] | None:
    """The cached result of a run with exactly these settings, or None."""
    result_path, run_dir = _run_paths(plan, cell, seed)
    if not result_path.is_file():
        return None
    cached = json.loads(result_path.read_text())
    if cached.get("fingerprint") != _fingerprint(_settings(plan, cell, seed, data, run_dir),
                                                 test_dir):
        return None
    # results written before the field existed: the file's time is when the run ended
    cached.setdefault("finished_utc", _utc(result_path.stat().st_mtime))
    return cached


def _train_logged(plan: dict[str, Any], cell: str, seed: int, data: str,
                  args: argparse.Namespace, label: str) -> dict[str, Any]:
    result = _run_one(plan, cell, seed, data, args.test_dir, args.keep_checkpoints)
    _logger.info(f"{label} {cell} seed {seed}: final top1 {result['final_top1']:.2f}, best "
                 f"{result['best_top1']:.2f}, {result['wall_seconds']:.0f}s")
    return result


def _run_one(plan: dict[str, Any], cell: str, seed: int, data: str, test_dir: str | None,
             keep_checkpoints: bool) -> dict[str, Any]:
    cached = _cached(plan, cell, seed, data, test_dir)
    if cached is not None:
        return cached
    result_path, run_dir = _run_paths(plan, cell, seed)
    settings = _settings(plan, cell, seed, data, run_dir)
    fingerprint = _fingerprint(settings, test_dir)
    started = time.perf_counter()
    summary = pretrain(resolve_config("pretrain", {}, settings))
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = summary["final"]
    result = {
        "cell": cell,
        "seed": seed,
        "fingerprint": fingerprint,
        "settings": {k: v for k, v in settings.items() if k not in ("out", "overwrite")},
        "final_top1": final["val/top1"],
        "best_top1": summary["best_top1"],
        "best_epoch": max(history, key=lambda record: record["val/top1"])["epoch"],
        "final_ece": final["val/ece"],
        "final_val_loss": final["val/loss"],
        "top1_by_epoch": [record["val/top1"] for record in history],
        "epoch_seconds": [record["seconds"] for record in history],
        "train_seconds": summary["wall_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "finished_utc": _utc(time.time()),
    }
    if test_dir:
        result["test"] = _evaluate_folder(run_dir, test_dir, torch.device(plan["device"]))
    if not keep_checkpoints:
        for checkpoint in run_dir.glob("*.pt"):
            checkpoint.unlink()
    write_json(result_path, result)
    return result


def _train_in_parallel(args: argparse.Namespace, argv: list[str], missing: list[tuple]) -> None:
    """Trains the ``(cell, seed)`` runs in ``missing`` in ``args.jobs`` child processes.

    Each child is this script with the same arguments and a share of the runs; it caches its
    results as a lone invocation would, and this process then reports from the cache.
    """
    jobs = min(args.jobs, len(missing))
    extra = [] if args.threads else ["--threads", str(max(1, (os.cpu_count() or 1) // jobs))]
    children = []
    for job in range(jobs):
        share = ",".join(f"{cell}:{seed}" for cell, seed in missing[job::jobs])
        command = [sys.executable, str(Path(__file__).resolve()), *argv, *extra,
                   "--jobs", "1", "--runs", share]
        children.append(subprocess.Popen(command))
    failed = [child.args[-1] for child in children if child.wait() != 0]
    if failed:
        raise SystemExit(f"runs {'; '.join(failed)} failed (see their output above); run the "
                         "same command again to retry them, the finished runs are cached")


def _utc(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


def _cell_stats(runs: list[dict[str, Any]], baseline: dict[int, dict[str, Any]]) -> dict:
    def stat(values: list[float]) -> dict[str, float]:
        mean, std = mean_std(values)
        return {"mean": mean, "std": std}

    paired = [run["final_top1"] - baseline[run["seed"]]["final_top1"]
              for run in runs if run["seed"] in baseline]
    stats = {
        "seeds": len(runs),
        "final_top1": stat([run["final_top1"] for run in runs]),
        "best_top1": stat([run["best_top1"] for run in runs]),
        "final_ece": stat([run["final_ece"] for run in runs]),
        "wall_seconds": stat([run["wall_seconds"] for run in runs]),
        "delta_final_top1": stat(paired) if paired else None,
    }
    if all("test" in run for run in runs):
        stats["test_top1"] = stat([run["test"]["top1"] for run in runs])
        test_paired = [run["test"]["top1"] - baseline[run["seed"]]["test"]["top1"]
                       for run in runs if "test" in baseline.get(run["seed"], {})]
        stats["delta_test_top1"] = stat(test_paired) if test_paired else None
    return stats


def _pm(stat: dict[str, float] | None, digits: int = 2, signed: bool = False) -> str:
    if stat is None:
        return "-"
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"


def _markdown(plan: dict[str, Any], stats: dict[str, dict], runs: dict[str, list[dict]],
              info: dict, command: str, wall: float, data: str, test_dir: str | None) -> str:
    cells = list(stats)
    finished = sorted(run["finished_utc"] for cell_runs in runs.values() for run in cell_runs)
    first, last = finished[0], finished[-1]
    images = plan["per_class"] * 10
    label = f"{images // 1000}K CIFAR-10" if images % 1000 == 0 else f"{images}-image CIFAR-10"
    seeds = plan["seeds"]

    def row(title: str, key: str, delta_key: str) -> list[str]:
        cells_text = []
        for cell in cells:
            text = _pm(stats[cell][key])
            if cell != "baseline":
                text += f" ({_pm(stats[cell][delta_key], signed=True)})"
            cells_text.append(text)
        return [title, *cells_text]

    rows = [row(f"{label}, {plan['epochs']} epochs, {seeds} seeds: final val top-1",
                "final_top1", "delta_final_top1")]
    if all("test_top1" in stats[c] for c in cells):
        rows.append(row(f"{label}: test top-1 ({test_dir})", "test_top1", "delta_test_top1"))

    detail_header = ["cell", "settings beyond the baseline", "final val top-1",
                     "Δ to baseline (paired by seed)", "best val top-1", "final ECE",
                     "wall s per run"]
    detail = []
    for cell in cells:
        extra = ", ".join(f"{k}={v}" for k, v in CELLS[cell].items()) or "-"
        delta = "-" if cell == "baseline" else _pm(stats[cell]["delta_final_top1"], signed=True)
        detail.append([cell, extra, _pm(stats[cell]["final_top1"]), delta,
                       _pm(stats[cell]["best_top1"]), _pm(stats[cell]["final_ece"], 4),
                       f"{stats[cell]['wall_seconds']['mean']:.0f}"])
    recipe = ", ".join(
        f"{k}={v}" for k, v in RECIPE.items() if k not in ("lr", "batch_size", "image_size")
    )
    return "\n".join([
        f"# Accuracy grid ({plan['mode']})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {describe_machine(info)}. Runs finished {first} .. {last}; wall time of the "
        f"whole grid: {wall / 60:.1f} min (the sum of the runs' own times, cached ones "
        "included).",
        "",
        f"Data: `{data}`, first {plan['per_class']} images per class for training, "
        f"{plan['val_per_class']} other images per class for validation. Baseline recipe: "
        f"{recipe}, lr={plan['lr']:g}, batch_size={plan['batch_size']}, "
        f"image_size={plan['image_size']}. Mean ± sample std over "
        f"seeds 0..{seeds - 1}; in brackets the difference to the baseline, paired by seed "
        "(same initial weights and data order).",
        "",
        markdown_table(["top-1 %", *cells], rows),
        "",
        markdown_table(detail_header, detail),
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    _logger.setLevel(logging.INFO)
    plan = _plan(args)
    plan["device"] = args.device
    plan["jobs"] = args.jobs
    if args.threads:
        torch.set_num_threads(args.threads)
    plan["threads"] = torch.get_num_threads()
    data = args.data or _default_data()
    command = command_line()
    info = machine_info(args.device)

    started = time.perf_counter()
    # seed-major order: an early stop still leaves every cell with some seeds
    order = [(cell, seed) for seed in range(plan["seeds"]) for cell in plan["cells"]]
    if args.runs is not None:  # a --jobs child: its share only, no report
        share = [(cell, int(seed)) for cell, seed in (r.split(":") for r in args.runs.split(","))]
        for cell, seed in share:
            _train_logged(plan, cell, seed, data, args, f"[job {os.getpid()}]")
        return {"trained": share}
    if args.jobs > 1:
        missing = [(cell, seed) for cell, seed in order
                   if _cached(plan, cell, seed, data, args.test_dir) is None]
        if missing:
            _train_in_parallel(args, list(sys.argv[1:] if argv is None else argv), missing)
    runs: dict[str, list[dict[str, Any]]] = {cell: [] for cell in plan["cells"]}
    for done, (cell, seed) in enumerate(order, 1):
        result = _train_logged(plan, cell, seed, data, args, f"[{done}/{len(order)}]")
        runs[cell].append(result)
    wall = sum(run["wall_seconds"] for cell_runs in runs.values() for run in cell_runs)

    baseline = {run["seed"]: run for run in runs.get("baseline", [])}
    stats = {cell: _cell_stats(cell_runs, baseline) for cell, cell_runs in runs.items()}
    results = Path(args.results)
    report = {
        "command": command,
        "machine": info,
        "plan": plan,
        "recipe": RECIPE,
        "cells": CELLS,
        "data": data,
        "test_dir": args.test_dir,
        "grid_wall_seconds": wall,
        "this_invocation_seconds": time.perf_counter() - started,
        "stats": stats,
        "runs": runs,
    }
    write_json(results / f"{plan['name']}.json", report)
    markdown = _markdown(plan, stats, runs, info, command, wall, data, args.test_dir)
    (results / f"{plan['name']}.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
