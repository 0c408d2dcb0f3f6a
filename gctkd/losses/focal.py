"""Cyclical focal loss: a confident-sample term and a focal term mixed by the cyclical factor.

Implements the loss of Smith, "Cyclical Focal Loss" (2022), as restated in section 2 of
the gctkd brief. With ``p_t`` the predicted probability of the true class and xi the
cyclical factor (1 at the easy ends of training, 0 at the hard middle), the per-sample
loss is::

    -(xi * (1 + p_t) ** gamma_hc + (1 - xi) * (1 - p_t) ** gamma_fl) * log(p_t)

The first term (Smith's "high-confidence" term) weights confident samples more than
cross-entropy does; the second is the focal loss of Lin et al., "Focal Loss for Dense
Object Detection" (ICCV 2017), which weights hard samples more. With every gamma at 0
both weights are 1 and the loss is plain cross-entropy, for any xi.

The functions here are pure functions of tensors and Python floats, meant to run every
training step: they never move a value to the host.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _hard_target_weights(
    probs: torch.Tensor,
    is_target: torch.Tensor,
    xi: float,
    gamma_hc: float,
    gamma_fl: float,
    gamma_neg: float,
) -> torch.Tensor:
    """Per-class weights for integer labels: the target class and the others differ."""
    target_weight = xi * (1.0 + probs).pow(gamma_hc) + (1.0 - xi) * (1.0 - probs).pow(gamma_fl)
    other_weight = xi + (1.0 - xi) * probs.pow(gamma_neg)
    return torch.where(is_target, target_weight, other_weight)


def cyclical_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    xi: float,
    gamma_hc: float,
    gamma_fl: float,
    gamma_neg: Optional[float] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cyclical focal loss (Smith, 2022), averaged over the batch.

    The loss of one sample is ``-sum_c q_c * w_c * log p_c`` over the ``K`` classes, with
    ``p = softmax(logits)`` and ``q`` the target distribution.

    Integer labels: ``q = (1 - label_smoothing) * one_hot + label_smoothing / K`` (the
    torch and timm convention) and, with ``t`` the labelled class,

    - ``w_t = xi * (1 + p_t) ** gamma_hc + (1 - xi) * (1 - p_t) ** gamma_fl``;
    - ``w_c = xi * 1 + (1 - xi) * p_c ** gamma_neg`` for every other class ``c``.

    Without smoothing only ``w_t`` matters and this is the per-sample loss of the brief.

    Soft targets (a float ``[B, K]`` distribution, e.g. from mixup or cutmix): there is no
    single labelled class, so every class gets the target-class weight
    ``w_c = xi * (1 + p_c) ** gamma_hc + (1 - xi) * (1 - p_c) ** gamma_fl`` and
    ``gamma_neg`` is unused. ``label_smoothing`` is applied to ``q`` as
    ``torch.nn.functional.cross_entropy`` does with probability targets:
    ``q = (1 - label_smoothing) * q + label_smoothing / K``. Pass 0 when the targets are
    already smoothed (timm's mixup smooths them itself).

    With ``gamma_hc = gamma_fl = gamma_neg = 0`` every weight is 1 and the result equals
    ``F.cross_entropy(logits, target, label_smoothing=label_smoothing)`` for any ``xi``.

    The weights are computed from the probabilities and are NOT detached: the gradient
    flows through ``w`` as well as through ``log p``, as in the published cyclical focal
    loss code. The focal loss of Lin et al. is defined that way too.

    The computation runs in float32 when the logits are float16 or bfloat16 (float64 stays
    float64), and the result has that dtype.

    NOTE: integer labels are not range-checked on the host (that would need a device sync);
    a label outside ``[0, K)`` fails inside ``scatter`` (a device-side assert on CUDA). There
    is no ``ignore_index``.

    Args:
        logits: Unnormalised class scores, shape ``[B, K]``.
        target: Integer class labels of shape ``[B]``, or a float distribution ``[B, K]``.
        xi: Cyclical factor in [0, 1]: 1 is the confident term only, 0 the focal term only.
        gamma_hc: Exponent of the high-confidence term, >= 0 (published runs: 3).
        gamma_fl: Exponent of the focal term for the target class, >= 0 (published: 2).
        gamma_neg: Exponent of the focal term for non-target classes, >= 0; ``None`` uses
            ``gamma_fl`` (published: 2). Only used with integer labels and smoothing > 0.
        label_smoothing: Smoothing ``eps`` in [0, 1] (published: 0.1).

    Returns:
        The scalar loss, mean over the batch.

    Raises:
        ValueError: If a knob is out of range or the shapes of ``logits`` and ``target``
            do not fit together.
    """
    gamma_neg = gamma_fl if gamma_neg is None else gamma_neg
    _check_unit_interval("xi", xi)
    _check_non_negative("gamma_hc", gamma_hc)
    _check_non_negative("gamma_fl", gamma_fl)
    _check_non_negative("gamma_neg", gamma_neg)
    _check_unit_interval("label_smoothing", label_smoothing)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, K], got {tuple(logits.shape)}")
    num_classes = logits.shape[1]

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(compute_dtype), dim=1)
    probs = log_probs.exp()

    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the shape of logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        target_dist = target.to(compute_dtype)
        if label_smoothing > 0.0:
            target_dist = target_dist * (1.0 - label_smoothing) + label_smoothing / num_classes
        weights = xi * (1.0 + probs).pow(gamma_hc) + (1.0 - xi) * (1.0 - probs).pow(gamma_fl)
    else:
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"integer targets must have shape [B] = [{logits.shape[0]}] to match logits "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        one_hot = torch.zeros_like(log_probs).scatter_(1, target.unsqueeze(1), 1.0)
        target_dist = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
        weights = _hard_target_weights(
            probs, one_hot.bool(), xi, gamma_hc, gamma_fl, gamma_neg
        )

    return -(target_dist * weights * log_probs).sum(dim=1).mean()


class CyclicalFocalLoss(nn.Module):
    """Cyclical focal loss as a module; the trainer writes ``xi`` before each step.

    A thin wrapper over :func:`cyclical_focal_loss`: the exponents and the smoothing are
    fixed at construction, the cyclical factor is the plain attribute ``xi``.

    Args:
        gamma_hc: Exponent of the high-confidence term, >= 0.
        gamma_fl: Exponent of the focal term for the target class, >= 0.
        gamma_neg: Exponent of the focal term for non-target classes; ``None`` uses
            ``gamma_fl``.
        label_smoothing: Smoothing ``eps`` in [0, 1].
        xi: Initial cyclical factor in [0, 1] (1 is the easy end).

    The defaults are the exponents of the published runs; those runs also used
    ``label_smoothing=0.1``.

    Raises:
        ValueError: If a knob is out of range.
    """

    def __init__(
        self,
        gamma_hc: float = 3.0,
        gamma_fl: float = 2.0,
        gamma_neg: Optional[float] = None,
        label_smoothing: float = 0.0,
        xi: float = 1.0,
    ) -> None:
        super().__init__()
        _check_non_negative("gamma_hc", gamma_hc)
        _check_non_negative("gamma_fl", gamma_fl)
        if gamma_neg is not None:
            _check_non_negative("gamma_neg", gamma_neg)
        _check_unit_interval("label_smoothing", label_smoothing)
        _check_unit_interval("xi", xi)
        self.gamma_hc = gamma_hc
        self.gamma_fl = gamma_fl
        self.gamma_neg = gamma_neg
        self.label_smoothing = label_smoothing
        self.xi = xi

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss for the current ``xi``; see :func:`cyclical_focal_loss`."""
        return cyclical_focal_loss(
            logits,
            target,
            xi=self.xi,
            gamma_hc=self.gamma_hc,
            gamma_fl=self.gamma_fl,
            gamma_neg=self.gamma_neg,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return (
            f"xi={self.xi}, gamma_hc={self.gamma_hc}, gamma_fl={self.gamma_fl}, "
            f"gamma_neg={self.gamma_neg}, label_smoothing={self.label_smoothing}"
        )
