"""Distillation: a student learns from a frozen teacher's softened logits and the labels.

The loss is ``label_weight * label_loss + kd_weight * T^2 * KL(teacher || student)`` with
the KD temperature T(xi) (Hinton et al. 2015); the T^2 factor keeps the KD gradient the
same size whatever T is, so a cyclical temperature changes what the student sees, not how
hard it is pushed. The teacher runs without autograd in evaluation mode.
"""

import logging
from typing import Any

import torch
from torch import nn

from gctkd.losses import kd_loss
from gctkd.models.teacher import FrozenTeacher
from gctkd.tasks.classification import ClassificationTask

_logger = logging.getLogger(__name__)


class DistillTask(ClassificationTask):
    """Logit distillation with cyclical KD temperature and weights.

    Args:
        model: the student.
        teacher: the frozen teacher, already mapped to the student's inputs.
        meta: plain data for checkpoints.
        focal_gammas: CFL for the label loss, or None for cross-entropy.
        label_smoothing: smoothing of the label loss.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: FrozenTeacher,
        meta: dict[str, Any],
        focal_gammas: tuple[float, float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, meta, focal_gammas, label_smoothing)
        self.teacher = teacher

    def to(self, device: torch.device, memory_format: torch.memory_format) -> None:
        super().to(device, memory_format)
        self.teacher.to(device=device, memory_format=memory_format)

    def training_loss(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher(images)
        logits = self.model(images)
        label = self.label_loss(logits, targets, knobs)
        kd = kd_loss(logits, teacher_logits, knobs["kd_temperature"])
        loss = knobs["label_weight"] * label + knobs["kd_weight"] * kd
        return {"loss": loss, "label": label, "kd": kd}

    def validation_extras(
        self, images: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        teacher_prediction = self.teacher(images).argmax(dim=1)
        return {"agreement": (teacher_prediction == logits.argmax(dim=1)).sum()}
