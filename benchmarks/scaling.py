"""How gctkd's step grows with the batch size and with the number of active knobs.

For each model (a small and a larger CIFAR ResNet by default):

* knobs: the real ``Trainer._train_step`` with 0 to 5 cyclical knobs switched on one after
  another (CWD, CST, CGC, CFL, momentum), timed interleaved in one process at one batch size;
  the added milliseconds per step and the ratio to 0 knobs say what the knobs cost;
* batch: step time and peak memory at each batch size with all five knobs, each measured in
  a fresh process (peak resident memory on the CPU, ``torch.cuda.max_memory_allocated`` on
  CUDA), plus 0 knobs at the middle batch size for the memory the knobs add.

The knobs touch a handful of scalars per step plus, for CGC, one pass over the gradients and,
for CFL, a few element-wise operations on the logits: their cost should stay flat in
milliseconds, and shrink as a fraction, as the model grows.

    python benchmarks/scaling.py                          # resnet20 and resnet56, CPU
    python benchmarks/scaling.py --device cuda --models resnet50 --image-size 224
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from common import (  # noqa: E402
    REPO, command_line, describe_machine, machine_info, markdown_table, reset_peak_rss, rss_mib,
    write_json,
)
from overhead import _gctkd_step, _interleaved, _synchronize, build_trainer  # noqa: E402

# knob sets by count: each adds one cyclical knob to the previous one
KNOB_LEVELS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("+CWD", {"weight_decay": "1e-4:1e-3"}),
    ("+CST", {"temperature": "0.5:2"}),
    ("+CGC", {"clip": "4:10", "clip_mode": "value"}),
    ("+CFL", {"focal": "3:2"}),
    ("+momentum", {"momentum": "0.85:0.95"}),
]


def knobs_at(level: int) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for _, added in KNOB_LEVELS[: level + 1]:
        settings.update(added)
    return settings


def _batches(batch_size: int, image_size: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch_size, 3, image_size, image_size, generator=generator),
         torch.randint(0, 10, (batch_size,), generator=generator))
        for _ in range(count)
    ]


def measure_knobs(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-step seconds for 0..5 knobs, interleaved in this process."""
    device = torch.device(args.device)
    batches = _batches(args.knob_batch_size, args.image_size, args.steps)
    with tempfile.TemporaryDirectory() as run_dir:
        trainers = {
            level: build_trainer(model, batches, knobs_at(level), args.device, "auto",
                                 Path(run_dir))
            for level in range(len(KNOB_LEVELS))
        }
        for trainer in trainers.values():
            trainer.task.model.load_state_dict(trainers[0].task.model.state_dict())

        def runner(trainer: Any) -> Any:
            def run() -> None:
                for images, targets in batches:
                    _gctkd_step(trainer, images, targets)
            return run

        for trainer in trainers.values():
            runner(trainer)()  # warm-up
        times = _interleaved({str(level): runner(t) for level, t in trainers.items()},
                             args.repeats, device)
    base = statistics.median(times["0"]) / args.steps
    rows = []
    for level, (name, _) in enumerate(KNOB_LEVELS):
        per_step = statistics.median(times[str(level)]) / args.steps
        ratios = [a / b for a, b in zip(times[str(level)], times["0"])]
        rows.append({"knobs": level, "added": name, "step_ms": per_step * 1e3,
                     "added_ms": (per_step - base) * 1e3,
                     "median_ratio": statistics.median(ratios)})
    return rows


def _measure_one(args: argparse.Namespace) -> None:
    """In a fresh process: one trainer, its step time and peak memory, as one JSON line."""
    device = torch.device(args.device)
    batches = _batches(args.one_batch, args.image_size, args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss()
    start = rss_mib()["now"]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(args.one_model, batches, knobs_at(args.one_level), args.device,
                                "auto", Path(run_dir))
        for images, targets in batches[:2]:
            _gctkd_step(trainer, images, targets)
        seconds = []
        for _ in range(args.memory_repeats):
            _synchronize(device)
            started = time.perf_counter()
            for images, targets in batches:
                _gctkd_step(trainer, images, targets)
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        peak = rss_mib()["peak"]
    result = {"step_ms": statistics.median(seconds) / args.steps * 1e3, "peak_rss_mib": peak,
              "added_rss_mib": peak - start, "peak_was_reset": reset}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def measure_batch(model: str, batch_size: int, level: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--device", args.device, "--image-size",
               str(args.image_size), "--steps", str(args.steps), "--memory-repeats",
               str(args.memory_repeats), "--one-model", model, "--one-batch", str(batch_size),
               "--one-level", str(level)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {"model": model, "batch_size": batch_size, "knobs": level,
            **json.loads(output.strip().splitlines()[-1])}


def _markdown(report: dict[str, Any]) -> str:
    knob_rows = []
    for model, rows in report["knobs"].items():
        for row in rows:
            knob_rows.append([model, row["knobs"], row["added"], f"{row['step_ms']:.1f}",
                              f"{row['added_ms']:+.1f}", f"{row['median_ratio']:.3f}"])
    memory = "cuda_peak_mib" if report["machine"]["device"].startswith("cuda") else "peak_rss_mib"
    batch_rows = [
        [row["model"], row["batch_size"], row["knobs"], f"{row['step_ms']:.1f}",
         f"{row['step_ms'] / row['batch_size']:.2f}", f"{row[memory]:.0f}",
         f"{row['added_rss_mib']:.0f}"]
        for row in report["batch"]
    ]
    settings = report["settings"]
    return "\n".join([
        "# Scaling",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {describe_machine(report['machine'])}. Wall time: "
        f"{report['wall_seconds']:.0f}s.",
        "",
        f"Knobs: batch {settings['knob_batch_size']}, {settings['image_size']} px, median of "
        f"{settings['repeats']} interleaved repetitions of {settings['steps']} steps.",
        "",
        markdown_table(["model", "knobs", "added", "ms/step", "ms vs 0 knobs",
                        "median ratio to 0 knobs"], knob_rows),
        "",
        f"Batch size: fresh process per row, median of {settings['memory_repeats']} "
        f"repetitions of {settings['steps']} steps; memory is the process's peak "
        f"({'CUDA allocated' if memory == 'cuda_peak_mib' else 'resident set'}); the last "
        "column is the resident memory the trainer and its steps added to the process after "
        "the imports.",
        "",
        markdown_table(["model", "batch", "knobs", "ms/step", "ms/image", "peak MiB",
                        "RSS added by training MiB"], batch_rows),
        "",
    ])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--batch-sizes", default="32,64,128")
    parser.add_argument("--knob-batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's "
                        "choice); 1 is steadier on a machine shared with other jobs.")
    parser.add_argument("--steps", type=int, default=3, help="Steps per repetition.")
    parser.add_argument("--repeats", type=int, default=6, help="Interleaved repetitions.")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaling"),
                        help="Writes OUT.json and OUT.md.")
    for hidden in ("--one-model", "--one-batch", "--one-level"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_model:
        args.one_batch, args.one_level = int(args.one_batch), int(args.one_level)
        _measure_one(args)
        return {}
    started = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    top = len(KNOB_LEVELS) - 1
    report: dict[str, Any] = {"command": command_line(), "machine": machine_info(args.device),
                              "settings": {k: v for k, v in vars(args).items()
                                           if not k.startswith("one_") and k != "out"},
                              "knob_levels": KNOB_LEVELS, "knobs": {}, "batch": []}
    for model in models:
        report["knobs"][model] = measure_knobs(model, args)
        for batch_size in batch_sizes:
            report["batch"].append(measure_batch(model, batch_size, top, args))
        report["batch"].append(measure_batch(model, args.knob_batch_size, 0, args))
    report["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    markdown = _markdown(report)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
