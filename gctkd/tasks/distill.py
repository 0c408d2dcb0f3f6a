"""Distillation: a student learns from a frozen teacher's logits, features and the labels.

The loss of a batch is::

    label_weight * label_loss + kd_weight * T^2 * KL(teacher || student)
        + feature_weight * sum_layers feature_loss(connector(student_feature), teacher_feature)

with the KD temperature T(xi) (Hinton et al. 2015); the T^2 factor keeps the KD gradient the
same size whatever T is, so a cyclical temperature changes what the student sees, not how
hard it is pushed. Every weight is a knob: a constant or ``EASY:HARD`` following xi.

The feature term matches intermediate maps at several depths (deep supervision): FitNets
hints (``mse``, Romero et al. 2015) through trained connectors, or attention transfer
(``at``, Zagoruyko and Komodakis 2017). It is the sum over the layer pairs, each pair logged
as its own part ``feature/<student layer>``. The student gives its logits and its features
in one forward pass; the teacher runs once per batch without autograd, in evaluation mode,
in the trainer's autocast dtype, and its features are detached.

FIXME: one feature loss per run (``mse`` or ``at``) and one weight for all its layers;
mixing both losses or weighting layers apart needs a weight per (loss, layer) pair.
"""

import logging
from typing import Any, Sequence

import torch
from torch import nn

from gctkd.errors import UserError
from gctkd.losses import FEATURE_LOSSES, kd_loss
from gctkd.models.connectors import build_connectors, connector_key
from gctkd.models.taps import FeatureTaps, LayerSpec
from gctkd.models.teacher import FrozenTeacher
from gctkd.tasks.classification import ClassificationTask
from gctkd.tasks.logit_cache import TeacherLogitCache

_logger = logging.getLogger(__name__)

# --feature-weight when --feature-layers comes without it: at the start of a resnet56 -> resnet20
# run on CIFAR-10 the feature term's gradient is then about the size of the KD term's
DEFAULT_FEATURE_WEIGHT = {"mse": 0.3, "at": 1.0}


class DistillTask(ClassificationTask):
    """Logit and feature distillation with cyclical KD temperature and weights.

    Args:
        model: the student.
        teacher: the frozen teacher, already mapped to the student's inputs.
        meta: plain data for checkpoints; ``meta["image_size"]`` sizes the probing pass.
        focal_gammas: CFL for the label loss, or None for cross-entropy.
        label_smoothing: smoothing of the label loss.
        feature_layers: ``(teacher layer, student layer)`` pairs, tap indices or module
            names; empty for logit distillation only.
        feature_loss: ``"mse"`` (FitNets hints) or ``"at"`` (attention transfer).
        teacher_name: the teacher's model name, for messages.
        logit_cache: precomputed teacher logits by sample index; the training targets are
            then ``[B, 2]`` tensors of (class, sample index). Logit distillation only.

    Raises:
        UserError: an unknown or unusable layer, a student layer named twice, an unknown
            feature loss, or a logit cache together with feature layers.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: FrozenTeacher,
        meta: dict[str, Any],
        focal_gammas: tuple[float, float] | None = None,
        label_smoothing: float = 0.0,
        feature_layers: Sequence[tuple[LayerSpec, LayerSpec]] = (),
        feature_loss: str = "mse",
        teacher_name: str = "",
        logit_cache: TeacherLogitCache | None = None,
    ) -> None:
        super().__init__(model, meta, focal_gammas, label_smoothing)
        self.teacher = teacher
        self.logit_cache = logit_cache
        self.student_taps: FeatureTaps | None = None
        self.setup_lines: list[str] = []
        self.connectors: nn.ModuleDict | None = None
        if feature_loss not in FEATURE_LOSSES:
            raise UserError(
                f"--feature-loss must be one of {', '.join(FEATURE_LOSSES)}, got {feature_loss!r}"
            )
        self.feature_loss_name = feature_loss
        self.feature_loss = FEATURE_LOSSES[feature_loss]
        if feature_layers:
            if logit_cache is not None:
                raise UserError(
                    "--cache-teacher-logits cannot go with --feature-layers: feature matching "
                    "runs the teacher on every batch anyway; drop one of the two"
                )
            self._build_feature_path(feature_layers, teacher_name)

    def _build_feature_path(
        self, pairs: Sequence[tuple[LayerSpec, LayerSpec]], teacher_name: str
    ) -> None:
        student_name = self.meta.get("model_name", "")
        self.student_taps = FeatureTaps(self.model, [s for _, s in pairs], "student", student_name)
        self.teacher_taps = FeatureTaps(
            self.teacher.model, [t for t, _ in pairs], "teacher", teacher_name
        )
        names = self.student_taps.names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UserError(
                f"--feature-layers: student layer(s) {repeated} appear in more than one pair; "
                "match each student layer with one teacher layer"
            )

        # one probing pass of both networks, in evaluation mode, sizes the connectors
        size = int(self.meta.get("image_size") or 32)
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, size, size, generator=generator)
        student_shapes = self.student_taps.check(probe)
        teacher_shapes = self.teacher_taps.check(self.teacher.prepare(probe))
        self.connectors = build_connectors(
            names, student_shapes, teacher_shapes, project=self.feature_loss_name == "mse"
        )
        for teacher_layer, name, student, teacher in zip(
            self.teacher_taps.names, names, student_shapes, teacher_shapes
        ):
            how = self.connectors[connector_key(name)].describe()
            self.setup_lines.append(
                f"feature {self.feature_loss_name}: student {name} {list(student[1:])} -> "
                f"teacher {teacher_layer} {list(teacher[1:])} ({how})"
            )

    def describe(self) -> list[str]:
        return list(self.setup_lines)

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"model": self.model}
        if self.connectors is not None:
            modules["connectors"] = self.connectors
        return modules

    def to(self, device: torch.device, memory_format: torch.memory_format) -> None:
        super().to(device, memory_format)
        self.teacher.to(device=device, memory_format=memory_format)
        if self.logit_cache is not None:
            self.logit_cache.memory_format = memory_format

    def training_loss(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        feature_parts: dict[str, torch.Tensor] = {}
        if self.logit_cache is not None:
            targets, sample_index = targets[:, 0], targets[:, 1]
            teacher_logits = self.logit_cache.lookup(sample_index, self.teacher, images.device)
            logits = self.model(images)
        elif self.student_taps is None:
            teacher_logits = self.teacher(images)
            logits = self.model(images)
        else:
            with torch.no_grad():
                teacher_logits, teacher_features = self.teacher_taps(self.teacher.prepare(images))
            logits, student_features = self.student_taps(images)
            for name, student, teacher in zip(
                self.student_taps.names, student_features, teacher_features
            ):
                mapped = self.connectors[connector_key(name)](student)
                feature_parts[f"feature/{name}"] = self.feature_loss(mapped, teacher.detach())

        label = self.label_loss(logits, targets, knobs)
        kd = kd_loss(logits, teacher_logits, knobs["kd_temperature"])
        loss = knobs["label_weight"] * label + knobs["kd_weight"] * kd
        if feature_parts:
            loss = loss + knobs["feature_weight"] * sum(feature_parts.values())
        return {"loss": loss, "label": label, "kd": kd, **feature_parts}

    def validation_extras(
        self, images: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        teacher_prediction = self.teacher(images).argmax(dim=1)
        return {"agreement": (teacher_prediction == logits.argmax(dim=1)).sum()}
