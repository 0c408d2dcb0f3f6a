"""Pretraining and fine-tuning: a classifier trained on labels with CST and CFL.

Cyclical softmax temperature (CST) divides the training logits by T(xi); evaluation and
exported models use T = 1. Cyclical focal loss (CFL) mixes a confident term at the easy
end with a focal term at the hard end, weighted by xi itself (GCT.md section 2).
"""

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gctkd.engine.task import Task
from gctkd.losses import cyclical_focal_loss

_logger = logging.getLogger(__name__)


class ClassificationTask(Task):
    """Cross-entropy (or CFL) on ``logits / T``.

    Args:
        model: the classifier.
        meta: plain data for checkpoints (see :class:`gctkd.engine.task.Task`).
        focal_gammas: ``(gamma_hc, gamma_fl)`` to switch CFL on, or None for cross-entropy.
        label_smoothing: smoothing of the label distribution.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        focal_gammas: tuple[float, float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, meta)
        self.focal_gammas = focal_gammas
        self.label_smoothing = label_smoothing
        self.xi_driven = ("focal",) if focal_gammas is not None else ()

    def label_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> torch.Tensor:
        """The label loss of a batch at the step's temperature and focal mix."""
        temperature = knobs.get("temperature", 1.0)
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        if self.focal_gammas is None:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        gamma_hc, gamma_fl = self.focal_gammas
        return cyclical_focal_loss(
            logits, targets, knobs["xi"], gamma_hc, gamma_fl, label_smoothing=self.label_smoothing
        )

    def training_loss(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        return {"loss": self.label_loss(self.model(images), targets, knobs)}
