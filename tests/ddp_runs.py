"""Runs for tests/test_distributed.py: started by torchrun, and once in a single process.

``python -m torch.distributed.run --nproc-per-node 2 tests/ddp_runs.py LIBRARY_OUT CLI_OUT DATA``
trains the same small task through the library (compared with a single process afterwards)
and runs ``gctkd pretrain`` through the CLI (checked for one set of logs).
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gctkd.config import resolve_config
from gctkd.cycle import CycleWindow
from gctkd.data.loader import build_loader
from gctkd.engine import distributed
from gctkd.engine.distributed import DistributedContext
from gctkd.engine.trainer import Trainer
from gctkd.knobs import KnobSchedule
from gctkd.tasks.classification import ClassificationTask

GLOBAL_BATCH = 8
SETTINGS = {
    "epochs": 2, "warmup_epochs": 0, "log_interval": 1, "weight_decay": "1e-4:1e-3",
    "momentum": "0.8:0.95", "clip": "1:2", "ema_decay": 0.9, "checkpoint_every": 4,
    "batch_size": GLOBAL_BATCH,
}  # fmt: skip


def _data(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 8, 8, generator=generator)
    return TensorDataset(images, torch.arange(count) % 3)


def library_run(out: Path, context: DistributedContext, device: torch.device) -> dict:
    """Two epochs of a tiny BatchNorm network on fixed tensors (no random augmentation)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    config = resolve_config("pretrain", SETTINGS)
    task = ClassificationTask(model, {"model_name": "tiny", "num_classes": 3})
    schedule = KnobSchedule(CycleWindow(2.0), config.knob_ranges())
    per_rank = GLOBAL_BATCH // context.world_size
    ranks = {"rank": context.rank, "world_size": context.world_size}
    train = build_loader(_data(48, 1), batch_size=per_rank, training=True, workers=0, seed=0,
                         **ranks)  # fmt: skip
    val = build_loader(_data(10, 2), batch_size=per_rank, training=False, workers=0, seed=0,
                       **ranks)  # fmt: skip
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(context)
    trainer = Trainer(task, schedule, config, train, val, out, device, context)
    return trainer.fit()


def main() -> None:
    library_out, cli_out, data = (Path(arg) for arg in sys.argv[1:4])
    context, device = distributed.setup(torch.device("cpu"))
    assert context.world_size == 2, context
    library_run(library_out, context, device)

    # the same process group serves the command, which leaves it when done
    from gctkd_cli.main import main as gctkd

    sys.argv = [
        "gctkd", "pretrain", "--data", str(data), "--out", str(cli_out), "--model", "resnet20",
        "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--workers", "0",
        "--val-per-class", "2", "--log-interval", "1", "--warmup-epochs", "0",
        "--device", "cpu",
    ]  # fmt: skip
    gctkd()


if __name__ == "__main__":
    main()
