"""What the cycle costs: gctkd's training step and data pipeline against hand-written timm code.

Step: the real :meth:`gctkd.engine.trainer.Trainer._train_step`, with every knob cyclical at
once (CWD, CST, CGC, CFL and momentum) and the knob values computed from progress as the loop
does, against a minimal loop built from the same timm and torch parts: the same model (same
initial weights), timm's ``create_optimizer_v2``, the same in-memory batches; forward,
cross-entropy, backward, ``dispatch_clip_grad``, step, ``zero_grad``. The whole training epoch
(``Trainer._train_epoch``: logging, TensorBoard and loss bookkeeping included) is timed as well.
Repetitions alternate A B, B A in one process; the ratio is the median of per-repetition
ratios. Target: at most 1.03.

Loader: gctkd's pipeline (``build_datasets``, ``build_transform``, ``build_loader``) against
``timm.data.create_loader`` with the same transform on the same 4,000 images, epochs
alternating; throughput ratio (target at least 0.95) and the peak resident memory of each,
measured in a fresh process per pipeline (main process and its worker processes).

    python benchmarks/overhead.py                      # 4K CIFAR-10, resnet20, batch 64, CPU
    python benchmarks/overhead.py --device cuda --model resnet50 --image-size 224 --no-loader
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.data import create_loader  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import dispatch_clip_grad  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from common import (  # noqa: E402
    CIFAR_ARCHIVE, REPO, command_line, describe_machine, machine_info, reset_peak_rss, rss_mib,
    write_json,
)
from gctkd.config import focal_gammas, resolve_config  # noqa: E402
from gctkd.cycle import CycleWindow  # noqa: E402
from gctkd.data.archive import extract_imagefolder_subset  # noqa: E402
from gctkd.data.datasets import build_datasets  # noqa: E402
from gctkd.data.loader import build_loader  # noqa: E402
from gctkd.data.transforms import TransformedDataset, build_transform  # noqa: E402
from gctkd.engine.tensorboard import RunLogger  # noqa: E402
from gctkd.engine.trainer import Trainer  # noqa: E402
from gctkd.knobs import KnobSchedule  # noqa: E402
from gctkd.models import create_model  # noqa: E402
from gctkd.tasks.classification import ClassificationTask  # noqa: E402

# every knob cyclical at once; GCT.md section 2 ranges, momentum 0.85..0.95
ALL_KNOBS: dict[str, Any] = {
    "weight_decay": "1e-4:1e-3",
    "temperature": "0.5:2",
    "clip": "4:10",
    "clip_mode": "value",
    "focal": "3:2",
    "momentum": "0.85:0.95",
}
LR = 0.025


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp != "fp16" else torch.float16)


def build_trainer(
    model_name: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    knobs: dict[str, Any],
    device: str,
    amp: str,
    run_dir: Path,
    num_classes: int = 10,
    total_epochs: int = 100,
    compile_model: bool = False,
) -> Trainer:
    """A real gctkd Trainer over in-memory batches, its cycle mid-way between easy and hard.

    ``total_epochs`` only sets the length of the cycle: the knobs move a little every step.
    """
    settings = {"model": model_name, "lr": LR, "epochs": total_epochs, "warmup_epochs": 0,
                "batch_size": len(batches[0][1]), "device": device, "amp": amp,
                "weight_decay": "5e-4", "log_interval": 10, **knobs}
    config = resolve_config("pretrain", {}, settings)
    model = create_model(model_name, num_classes)
    if compile_model:
        model = torch.compile(model)
    task = ClassificationTask(model, {"model_name": model_name, "num_classes": num_classes},
                              focal_gammas(config), config.label_smoothing)
    schedule = KnobSchedule(CycleWindow(config.cyclical_factor or 1.0), config.knob_ranges(),
                            extra_xi_tags=task.xi_driven)
    trainer = Trainer(task, schedule, config, batches, batches, run_dir, torch.device(device))
    # start a quarter into the run, where every knob is between its two ends
    trainer.global_step = trainer.total_steps // 4
    return trainer


class MinimalLoop:
    """What a user would write with timm and torch alone: no knobs, no bookkeeping."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: str, clip: float):
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).train()
        self.memory_format = memory_format
        self.optimizer = create_optimizer_v2(self.model, opt="sgd", lr=LR, weight_decay=5e-4,
                                             momentum=0.9)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.device = device
        self.amp = amp
        self.clip = clip

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with _autocast(self.device, self.amp):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        dispatch_clip_grad(self.parameters, self.clip, mode="value")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _gctkd_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> None:
    # what _train_epoch does around the step: knob values from progress, then the step
    knobs = trainer.schedule.values(trainer.progress())
    trainer._train_step(images, targets, knobs)
    trainer.global_step += 1


def _interleaved(
    candidates: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each candidate per repetition, the order flipped every repetition."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            _synchronize(device)
            started = time.perf_counter()
            candidates[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - started)
    return times


def _ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, float]:
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        f"median_{numerator}_s": statistics.median(times[numerator]),
        f"median_{denominator}_s": statistics.median(times[denominator]),
    }


def measure_step(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [
        (torch.randn(shape, generator=generator), torch.randint(0, 10, (args.batch_size,),
                                                                generator=generator))
        for _ in range(args.steps)
    ]
    with tempfile.TemporaryDirectory() as run_dir:
        knobs = ALL_KNOBS if args.knobs == "all" else {}
        trainer = build_trainer(args.model, batches, knobs, args.device, args.amp,
                                Path(run_dir), compile_model=args.compile)
        minimal_model = create_model(args.model, 10)
        minimal_model.load_state_dict(trainer.task.model.state_dict())
        if args.compile:
            minimal_model = torch.compile(minimal_model)
        minimal = MinimalLoop(minimal_model, device, args.amp, clip=10.0)

        def gctkd_steps() -> None:
            for images, targets in batches:
                _gctkd_step(trainer, images, targets)

        def minimal_steps() -> None:
            for images, targets in batches:
                minimal.step(images, targets)

        def gctkd_epoch() -> None:
            trainer.epoch_step = 0  # as fit() does between epochs
            trainer._train_epoch()

        with RunLogger(Path(run_dir)) as run_logger:
            trainer.run_logger = run_logger
            for images, targets in batches[: args.warmup]:
                _gctkd_step(trainer, images, targets)
                minimal.step(images, targets)
            steps = _interleaved({"gctkd": gctkd_steps, "minimal": minimal_steps},
                                 args.repeats, device)
            epochs = _interleaved({"gctkd_epoch": gctkd_epoch, "minimal": minimal_steps},
                                  max(3, args.repeats // 2), device)
        knobs_now = trainer.schedule.values(trainer.progress())
    images_per_rep = args.batch_size * args.steps
    step = _ratio(steps, "gctkd", "minimal")
    return {
        "step": step,
        "epoch_loop": _ratio(epochs, "gctkd_epoch", "minimal"),
        "images_per_second": {
            "gctkd": images_per_rep / step["median_gctkd_s"],
            "minimal": images_per_rep / step["median_minimal_s"],
        },
        "knobs_at_end": knobs_now,
        "raw_seconds": {"steps": steps, "epochs": epochs},
    }


def _loader_pair(args: argparse.Namespace, data: str) -> dict[str, Any]:
    """gctkd's training loader and timm's create_loader over the same training images."""
    batch_size, workers, image_size = args.batch_size, args.workers, args.image_size
    bundle = build_datasets(data, per_class=args.per_class, val_per_class=args.val_per_class,
                            seed=0)
    transform = build_transform(image_size, training=True, hflip=0.5, mean=bundle.mean,
                                std=bundle.std)
    gctkd_loader = build_loader(TransformedDataset(bundle.train, transform),
                                batch_size=batch_size, training=True, workers=workers, seed=0)

    folder = ImageFolder(data)
    folder.samples = list(bundle.train.samples)
    folder.imgs = folder.samples
    folder.targets = [target for _, target in folder.samples]
    # the same augmentation gctkd builds: random-resized crop 0.35..1, flip, no colour jitter
    timm_loader = create_loader(
        folder, input_size=(3, image_size, image_size), batch_size=batch_size, is_training=True,
        use_prefetcher=False, scale=(0.35, 1.0), hflip=0.5, color_jitter=None,
        interpolation="bilinear", mean=bundle.mean, std=bundle.std, num_workers=workers,
        device=torch.device("cpu"),
    )
    same = repr(folder.transform) == repr(transform)
    return {"gctkd": gctkd_loader, "timm": timm_loader, "same_transform": same,
            "gctkd_transform": repr(transform), "timm_transform": repr(folder.transform)}


def _drain(loader: Any) -> int:
    images = 0
    for batch, _ in loader:
        images += len(batch)
    return images


def measure_loader(args: argparse.Namespace, data: str) -> dict[str, Any]:
    pair = _loader_pair(args, data)
    counts: dict[str, int] = {}
    for name in ("gctkd", "timm"):  # first epoch starts the persistent workers
        counts[name] = _drain(pair[name])
    times = _interleaved({name: lambda n=name: _drain(pair[n]) for name in ("gctkd", "timm")},
                         args.loader_epochs, torch.device("cpu"))
    ratio = _ratio(times, "timm", "gctkd")  # time ratio timm/gctkd = throughput gctkd/timm
    memory = {name: _loader_memory_subprocess(name, data, args) for name in ("gctkd", "timm")}
    return {
        "throughput_ratio_gctkd_over_timm": ratio["median_ratio"],
        "images_per_second": {name: counts[name] / statistics.median(times[name])
                              for name in ("gctkd", "timm")},
        "images_per_epoch": counts,
        "same_transform": pair["same_transform"],
        "transform": pair["gctkd_transform"],
        "timm_transform": pair["timm_transform"],
        "peak_rss_mib": memory,
        "raw_seconds": times,
    }


def _loader_memory_subprocess(name: str, data: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--loader-memory", name, "--data", data,
               "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--image-size", str(args.image_size), "--per-class", str(args.per_class),
               "--val-per-class", str(args.val_per_class)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _loader_memory(name: str, args: argparse.Namespace) -> None:
    """In a fresh process: two epochs of one pipeline, then its peak memory as a JSON line."""
    reset = reset_peak_rss()
    start = rss_mib()["now"]
    pair = _loader_pair(args, args.data)
    loader = pair.pop(name)
    pair.clear()
    for _ in range(2):
        _drain(loader)
    main_peak = rss_mib()["peak"]
    del loader  # shuts the persistent workers down, so their peak is counted
    gc.collect()
    time.sleep(0.5)
    print(json.dumps({"main_start_mib": start, "main_peak_mib": main_peak,
                      "main_added_mib": main_peak - start,
                      "largest_worker_peak_mib": rss_mib()["largest_child_peak"],
                      "peak_was_reset": reset}))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's "
                        "choice); 1 is steadier on a machine shared with other jobs.")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"),
                        help="Autocast on CUDA for both loops (ignored on the CPU).")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--knobs", default="all", choices=("all", "none"),
                        help="gctkd's step with every knob cyclical, or with none (constants).")
    parser.add_argument("--steps", type=int, default=10, help="Steps per repetition.")
    parser.add_argument("--repeats", type=int, default=12, help="Interleaved repetitions.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps of each first.")
    parser.add_argument("--data", help="ImageFolder for the loader check (default: the first "
                        "600 CIFAR-10 training images per class).")
    parser.add_argument("--per-class", type=int, default=400, help="Training images per class.")
    parser.add_argument("--val-per-class", type=int, default=200,
                        help="Validation images per class (not loaded; gctkd's split needs it).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-epochs", type=int, default=20)
    parser.add_argument("--no-loader", action="store_true", help="Skip the loader check.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    parser.add_argument("--loader-memory", choices=("gctkd", "timm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = min(args.warmup, args.steps)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loader_memory:
        _loader_memory(args.loader_memory, args)
        return {}
    started = time.perf_counter()
    report: dict[str, Any] = {"command": command_line(), "machine": machine_info(args.device),
                              "settings": {k: v for k, v in vars(args).items() if k != "out"},
                              "knobs": ALL_KNOBS if args.knobs == "all" else {}}
    report["step"] = measure_step(args)
    step = report["step"]
    print(f"{describe_machine(report['machine'])}")
    print(f"step ({args.model}, {args.image_size}px, batch {args.batch_size}, {args.device}): "
          f"gctkd {step['step']['median_gctkd_s'] / args.steps * 1e3:.1f} ms, minimal "
          f"{step['step']['median_minimal_s'] / args.steps * 1e3:.1f} ms, median ratio "
          f"{step['step']['median_ratio']:.3f} (target <= 1.03)")
    print(f"whole epoch loop (_train_epoch) / minimal: median ratio "
          f"{step['epoch_loop']['median_ratio']:.3f}")
    print(f"images/s: gctkd {step['images_per_second']['gctkd']:.0f}, minimal "
          f"{step['images_per_second']['minimal']:.0f}")
    if not args.no_loader:
        data = args.data or extract_imagefolder_subset(
            CIFAR_ARCHIVE, REPO / "benchmarks" / "cache" / "cifar10-first600", per_class=600
        )
        loader = report["loader"] = measure_loader(args, data)
        memory = loader["peak_rss_mib"]
        print(f"loader ({args.workers} workers, batch {args.batch_size}): gctkd "
              f"{loader['images_per_second']['gctkd']:.0f} img/s, timm "
              f"{loader['images_per_second']['timm']:.0f} img/s, throughput ratio "
              f"{loader['throughput_ratio_gctkd_over_timm']:.3f} (target >= 0.95); same "
              f"transform: {loader['same_transform']}")
        for name in ("gctkd", "timm"):
            print(f"  peak RSS {name}: main {memory[name]['main_peak_mib']:.0f} MiB (+"
                  f"{memory[name]['main_added_mib']:.0f} over the imports), largest worker "
                  f"{memory[name]['largest_worker_peak_mib']:.0f} MiB")
    report["wall_seconds"] = time.perf_counter() - started
    print(f"wall {report['wall_seconds']:.0f}s")
    write_json(Path(args.out), report)
    return report


if __name__ == "__main__":
    main()
