"""A frozen teacher: evaluation mode for good, no gradients, its own input normalisation.

The student's batches are normalised with the student's mean and std. A teacher trained
with other statistics or another input size must see the images as it saw them in its
own training, so the wrapper maps the student's input back per channel::

    x_teacher = x_student * (std_student / std_teacher) + (mean_student - mean_teacher) / std_teacher

and resizes when the input sizes differ. ``train()`` never leaves evaluation mode, so
BatchNorm statistics and dropout stay as they were however the caller toggles modes.
"""

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)


class FrozenTeacher(nn.Module):
    """Wraps a trained model for inference only.

    Args:
        model: the teacher network; its parameters are set to ``requires_grad=False``.
        student_mean: per-channel mean the batches were normalised with.
        student_std: per-channel std the batches were normalised with.
        teacher_mean: per-channel mean the teacher was trained with.
        teacher_std: per-channel std the teacher was trained with.
        teacher_size: input size in pixels the teacher expects, or None to keep the batch's.
    """

    def __init__(
        self,
        model: nn.Module,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        teacher_mean: Sequence[float],
        teacher_std: Sequence[float],
        teacher_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        self.same_normalisation = bool(torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.teacher_size = teacher_size

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # a frozen teacher stays in evaluation mode whatever the caller asks
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher expects it."""
        if not self.same_normalisation:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.teacher_size is not None and images.shape[-1] != self.teacher_size:
            images = F.interpolate(
                images, size=(self.teacher_size, self.teacher_size), mode="bilinear",
                align_corners=False,
            )
        return images

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))
