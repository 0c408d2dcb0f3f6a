"""What the engine needs from a task (pretrain, finetune, distill), and nothing more.

The engine never branches on the kind of task: a task hands it the model to export, the
modules to optimise, and a loss function that returns a dict of named parts. The engine
applies the knobs, steps the optimizer and logs whatever parts it gets.
"""

from typing import Any

import torch
from torch import nn


class Task:
    """Base class of the tasks the trainer runs.

    Args:
        model: the network being trained; its weights are what a run exports.
        meta: plain data recorded in every checkpoint (model name, class names, input
            size, normalisation), so a later ``--from`` or ``--teacher`` can rebuild it.
    """

    #: names of settings driven by xi directly, logged as ``knob/<name>`` (e.g. the focal mix)
    xi_driven: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, meta: dict[str, Any]) -> None:
        self.model = model
        self.meta = meta

    def describe(self) -> list[str]:
        """Lines for the setup block of the log (e.g. feature pairs and their connectors)."""
        return []

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules whose parameters the optimizer updates; ``model`` first.

        Tasks with trained helpers (feature connectors) add them here, so they are
        optimised and checkpointed but never exported with the model.
        """
        return {"model": self.model}

    def to(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """Move every module the task holds (teachers included) to the device."""
        for module in self.trainable_modules().values():
            module.to(device=device, memory_format=memory_format)

    def training_loss(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Forward one batch; return ``{"loss": total, <part>: value, ...}`` (scalars).

        Args:
            images: the batch on the device.
            targets: class indices on the device.
            knobs: the knob values in force for this step, ``xi`` included.
        """
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Logits at T = 1 for evaluation (``model`` may be an EMA copy)."""
        return (model or self.model)(images)

    def validation_extras(
        self, images: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Extra per-batch sums for validation (e.g. teacher agreement); counts as sums."""
        return {}
