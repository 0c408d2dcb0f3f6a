"""Cost of one distillation step against its parts measured apart (issue 3).

Issue 3 asks that one distillation step, with feature matching, cost at most 1.10x a student
training step plus a teacher inference forward measured separately. This script times, in
one process and interleaved (A, B, C, A, B, C, ...) so drifts of a shared machine hit all
three alike:

* A: one trainer step of ``gctkd distill`` with features (``Trainer._train_step`` on a
  :class:`~gctkd.tasks.distill.DistillTask`: teacher forward with taps, student forward with
  taps, connectors, KD + label + feature losses, backward, optimizer step);
* B: one trainer step of the student alone (a :class:`ClassificationTask`);
* C: one forward of the frozen teacher (no autograd graph).

and prints the median over repetitions of A / (B + C), plus the logit-only step for context.
Models start from random weights: the cost does not depend on them. The default pair is the
resnet56 teacher and a wrn_16_2 student, whose wider stages need a 1x1 conv + BN connector at
each of the three taps, so the connectors' cost is in the number.

    python benchmarks/distill_cost.py            # batch 64, 32 px, 15 repetitions
    python benchmarks/distill_cost.py --quick    # a few seconds (used by the tests)
"""

import argparse
import statistics
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import command_line, describe_machine, machine_info
from gctkd.config import resolve_config
from gctkd.cycle import CycleWindow
from gctkd.engine.trainer import Trainer
from gctkd.knobs import KnobSchedule
from gctkd.models import FrozenTeacher, create_model
from gctkd.models.taps import parse_feature_layers
from gctkd.tasks.classification import ClassificationTask
from gctkd.tasks.distill import DistillTask

NUM_CLASSES = 10


def _trainer(
    task: Any, command: str, settings: dict[str, Any], loader: DataLoader, out: str
) -> Trainer:
    config = resolve_config(command, {}, {"warmup_epochs": 0, "epochs": 1, **settings})
    schedule = KnobSchedule(CycleWindow(2.0), config.knob_ranges(), task.xi_driven)
    return Trainer(task, schedule, config, loader, loader, out, torch.device("cpu"))


def _timed(function: Callable[[], Any], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        function()
    return (time.perf_counter() - started) / steps


def measure(args: argparse.Namespace, out: str) -> dict[str, Any]:
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.arange(args.batch_size) % NUM_CLASSES
    loader = DataLoader(TensorDataset(images, targets), batch_size=args.batch_size)
    meta = {"model_name": args.student, "num_classes": NUM_CLASSES, "image_size": args.image_size}
    stats = ((0.5,) * 3, (0.25,) * 3)
    teacher = FrozenTeacher(create_model(args.teacher, NUM_CLASSES), *stats, *stats)

    pairs = parse_feature_layers(args.feature_layers)
    feature_task = DistillTask(
        create_model(args.student, NUM_CLASSES), teacher, meta, feature_layers=pairs,
        feature_loss=args.feature_loss, teacher_name=args.teacher,
    )
    logit_task = DistillTask(create_model(args.student, NUM_CLASSES), teacher, meta)
    student_task = ClassificationTask(create_model(args.student, NUM_CLASSES), meta)
    knobs_settings = {"kd_temperature": "4", "feature_weight": "1"}
    trainers = {
        "distill_features": _trainer(feature_task, "distill", knobs_settings, loader, out),
        "distill_logits": _trainer(logit_task, "distill", {"kd_temperature": "4"}, loader, out),
        "student": _trainer(student_task, "pretrain", {}, loader, out),
    }
    for trainer in trainers.values():
        trainer.trainable.train()
    knobs = {name: trainer.schedule.values(0.5) for name, trainer in trainers.items()}

    def step(name: str) -> Callable[[], Any]:
        return lambda: trainers[name]._train_step(images, targets, knobs[name])

    actions = {name: step(name) for name in trainers}
    actions["teacher"] = lambda: teacher(images)
    for action in actions.values():  # warm-up: allocator, autograd, optimizer state
        for _ in range(min(2, args.repetitions)):
            action()

    seconds: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(args.repetitions):
        for name, action in actions.items():
            seconds[name].append(_timed(action, args.steps))
    ratios = [
        a / (b + c)
        for a, b, c in zip(seconds["distill_features"], seconds["student"], seconds["teacher"])
    ]
    logit_ratios = [
        a / (b + c)
        for a, b, c in zip(seconds["distill_logits"], seconds["student"], seconds["teacher"])
    ]
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "logit_ratio_median": statistics.median(logit_ratios),
        "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
        "connectors": feature_task.describe(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="wrn_16_2")
    parser.add_argument("--feature-layers", default="1,2,3")
    parser.add_argument("--feature-loss", default="mse", choices=("mse", "at"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", default="/tmp/gctkd-distill-cost", help="scratch run folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.student = "resnet20", "resnet20"
        args.batch_size, args.image_size, args.repetitions, args.steps = 4, 8, 2, 1

    started = time.perf_counter()
    result = measure(args, args.out)
    wall = time.perf_counter() - started
    info = machine_info()
    seconds = result["median_seconds"]
    print(f"`{command_line()}`")
    print(f"{describe_machine(info)}; wall {wall:.0f}s")
    print(f"teacher {args.teacher} -> student {args.student}, batch {args.batch_size}, "
          f"{args.image_size}px, features {args.feature_layers} ({args.feature_loss})")
    for line in result["connectors"]:
        print(f"  {line}")
    print(
        f"median seconds: distill step with features {seconds['distill_features']:.4f}, "
        f"logit-only distill step {seconds['distill_logits']:.4f}, student step "
        f"{seconds['student']:.4f}, teacher forward {seconds['teacher']:.4f}"
    )
    print(
        f"ratio distill / (student + teacher): median {result['ratio_median']:.3f} (min "
        f"{result['ratio_min']:.3f}, max {result['ratio_max']:.3f}; {args.repetitions} "
        f"repetitions); logit-only {result['logit_ratio_median']:.3f}; target <= 1.10"
    )
    return {**result, "machine": info, "wall_seconds": wall}


if __name__ == "__main__":
    main()
