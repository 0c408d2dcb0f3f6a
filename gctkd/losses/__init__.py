"""Training and distillation losses: pure functions of tensors and Python-float knob values.

- :func:`cyclical_focal_loss` / :class:`CyclicalFocalLoss`: Smith (2022), section 2 of the
  brief;
- :func:`kd_loss`: Hinton et al. (2015) logit distillation;
- :func:`hint_loss` and :func:`attention_transfer_loss`: FitNets (Romero et al., 2015) and
  attention transfer (Zagoruyko & Komodakis, 2017) feature distillation.
"""

from gctkd.losses.feature import attention_transfer_loss, hint_loss
from gctkd.losses.focal import CyclicalFocalLoss, cyclical_focal_loss
from gctkd.losses.kd import kd_loss

#: feature losses by their ``--feature-loss`` name: ``loss(student_feature, teacher_feature)``
FEATURE_LOSSES = {"mse": hint_loss, "at": attention_transfer_loss}

__all__ = [
    "FEATURE_LOSSES",
    "CyclicalFocalLoss",
    "attention_transfer_loss",
    "cyclical_focal_loss",
    "hint_loss",
    "kd_loss",
]
