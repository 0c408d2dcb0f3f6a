"""Connectors: small trained maps from a student feature to the shape of its teacher feature.

A FitNets hint (Romero et al., 2015) compares a student feature map with a teacher map of
another width, so a trained regressor maps one onto the other. gctkd's connector, per
feature pair, does two things, each only when needed:

1. **spatial alignment** to the teacher's height and width: adaptive average pooling when
   the student map is larger, bilinear interpolation when it is smaller. Pooling, because
   each output value is then the mean over exactly the student positions that cover the
   same part of the image, as a strided stage summarises them; bilinear down-sampling by a
   factor above 2 would read only some positions and alias. Pooling cannot enlarge a map,
   so smaller maps are interpolated (smooth, and it keeps the gradient spread out);
2. **channel projection**: a 1x1 convolution without bias and a BatchNorm, from the
   student's channels to the teacher's.

When both shapes already match the connector is the identity and has no parameters.
Attention transfer averages the channels away, so its connectors only align the spatial
size (``project=False``).

The shapes come from one probing forward pass at start (see
:class:`gctkd.models.taps.FeatureTaps`). Connectors are helpers of the student's run: they
are optimised and saved in its checkpoints, never exported with the student's weights.
"""

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)


class Connector(nn.Module):
    """Maps a ``[B, C_s, H_s, W_s]`` student map to the teacher's ``[B, C_t, H_t, W_t]``.

    Args:
        student_shape: ``(C_s, H_s, W_s)`` of the student feature.
        teacher_shape: ``(C_t, H_t, W_t)`` of the teacher feature.
        project: add a 1x1 conv + BatchNorm when the channel counts differ.
    """

    def __init__(
        self, student_shape: Sequence[int], teacher_shape: Sequence[int], project: bool = True
    ) -> None:
        super().__init__()
        student_chs, student_h, student_w = (int(v) for v in student_shape)
        teacher_chs, teacher_h, teacher_w = (int(v) for v in teacher_shape)
        self.size = (teacher_h, teacher_w)
        self.resize = (student_h, student_w) != self.size
        self.pool = student_h >= teacher_h and student_w >= teacher_w
        self.projection: nn.Module = nn.Identity()
        if project and student_chs != teacher_chs:
            self.projection = nn.Sequential(
                nn.Conv2d(student_chs, teacher_chs, kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_chs),
            )
            nn.init.kaiming_normal_(self.projection[0].weight, mode="fan_out", nonlinearity="relu")

    @property
    def is_identity(self) -> bool:
        return not self.resize and isinstance(self.projection, nn.Identity)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.resize:
            if self.pool:
                feature = F.adaptive_avg_pool2d(feature, self.size)
            else:
                feature = F.interpolate(
                    feature, size=self.size, mode="bilinear", align_corners=False
                )
        return self.projection(feature)

    def describe(self) -> str:
        """One phrase for the setup log, e.g. ``pool to 8x8, 1x1 conv 32->16 + BN``."""
        steps = []
        if self.resize:
            steps.append(f"{'pool' if self.pool else 'bilinear'} to {self.size[0]}x{self.size[1]}")
        if not isinstance(self.projection, nn.Identity):
            conv = self.projection[0]
            steps.append(f"1x1 conv {conv.in_channels}->{conv.out_channels} + BN")
        return ", ".join(steps) or "identity"

    def extra_repr(self) -> str:
        how = ("pool" if self.pool else "bilinear") if self.resize else "none"
        return f"size={self.size}, resize={how}"


def connector_key(student_layer: str) -> str:
    """A ``ModuleDict`` key for a student layer name (dots are not allowed in keys)."""
    return student_layer.replace(".", "_")


def build_connectors(
    student_layers: Sequence[str],
    student_shapes: Sequence[Sequence[int]],
    teacher_shapes: Sequence[Sequence[int]],
    project: bool = True,
) -> nn.ModuleDict:
    """One :class:`Connector` per feature pair, keyed by :func:`connector_key` of the student layer.

    Args:
        student_layers: the student layer of each pair (unique).
        student_shapes: ``[B, C, H, W]`` (or ``[C, H, W]``) of each student feature.
        teacher_shapes: the same for each teacher feature.
        project: channel projections for unequal widths (hints); False for attention transfer.
    """
    connectors = nn.ModuleDict()
    for layer, student, teacher in zip(student_layers, student_shapes, teacher_shapes):
        connector = Connector(tuple(student)[-3:], tuple(teacher)[-3:], project)
        connectors[connector_key(layer)] = connector
    return connectors
