"""Feature distillation: hint regression and attention transfer on intermediate features.

Implements two losses between a student feature map and a teacher feature map:

- the hint loss of Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015): a
  mean-squared error between the student feature (after a connector that maps it to the
  teacher's shape; the connector lives with the models, not here) and the teacher feature;
- the activation-based attention transfer of Zagoruyko and Komodakis, "Paying More
  Attention to Attention" (ICLR 2017): a distance between the normalised spatial
  attention maps, which needs no connector because the channels are averaged away.

The teacher feature is always detached: the teacher is frozen (gctkd brief, section 4).
Both losses run in float32 when an input is float16 or bfloat16 (float64 stays float64).
"""

import logging

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)


def _compute_dtype(first: torch.Tensor, second: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(first.dtype, second.dtype), torch.float32)


def _attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_c |f|^p`` flattened to ``[B, H * W]`` and scaled to unit L2 norm per sample."""
    attention = feature.abs().pow(p).mean(dim=1).flatten(start_dim=1)
    return F.normalize(attention, p=2.0, dim=1)


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., 2015): mean squared error to the teacher feature.

    The loss is ``mean((student_feature - teacher_feature) ** 2)`` over every element
    (batch, channels and positions), i.e. ``F.mse_loss`` with ``reduction="mean"``.
    FitNets writes it as ``1/2 * ||u_h - r(v_g)||^2``; the 1/2 and the sum-versus-mean
    choice only rescale the distillation weight.

    Args:
        student_feature: Student feature, usually ``[B, C, H, W]``, already mapped to the
            teacher's shape by a connector.
        teacher_feature: Teacher feature of exactly the same shape; it is detached.

    Returns:
        The scalar loss.

    Raises:
        ValueError: If the two shapes differ.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint_loss needs equal shapes, got student {tuple(student_feature.shape)} and "
            f"teacher {tuple(teacher_feature.shape)}; map the student feature with a connector"
        )
    dtype = _compute_dtype(student_feature, teacher_feature)
    return F.mse_loss(student_feature.to(dtype), teacher_feature.detach().to(dtype))


def attention_transfer_loss(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis, 2017) between two feature maps.

    For a feature ``f`` of shape ``[B, C, H, W]`` the attention map is
    ``a = mean_c |f_c|^p`` flattened to ``[B, H * W]`` and divided by its L2 norm per
    sample (``F.normalize``, which guards a zero map with ``eps = 1e-12``). The loss is::

        mean_b sum_j (a_s[b, j] - a_t[b, j]) ** 2

    the squared L2 distance between the unit-norm maps averaged over the batch; it lies in
    [0, 2] because both maps are non-negative. The authors' code averages over the
    positions as well (``(a_s - a_t).pow(2).mean()``), which is this value divided by
    ``H * W``, and weights it with beta = 1000; divide a weight taken from there by
    ``H * W`` to match. The paper's own formula uses the unsquared norm with beta / 2.

    Channel counts may differ; the batch size and the spatial size must match (resize one
    map first when the stages have different resolutions).

    Args:
        student_feature: Student feature, ``[B, C_s, H, W]``.
        teacher_feature: Teacher feature, ``[B, C_t, H, W]``; it is detached.
        p: Exponent of the activations, > 0 (the paper uses 2).

    Returns:
        The scalar loss.

    Raises:
        ValueError: If ``p`` is not positive, an input is not 4-D, or the batch or spatial
            sizes differ.
    """
    if not p > 0.0:
        raise ValueError(f"p must be > 0, got {p!r}")
    if student_feature.ndim != 4 or teacher_feature.ndim != 4:
        raise ValueError(
            "attention_transfer_loss needs [B, C, H, W] features, got student "
            f"{tuple(student_feature.shape)} and teacher {tuple(teacher_feature.shape)}"
        )
    student_size = (student_feature.shape[0], *student_feature.shape[2:])
    teacher_size = (teacher_feature.shape[0], *teacher_feature.shape[2:])
    if student_size != teacher_size:
        raise ValueError(
            "attention_transfer_loss needs equal batch and spatial sizes, got student "
            f"{tuple(student_feature.shape)} and teacher {tuple(teacher_feature.shape)}; "
            "resize one feature map (e.g. F.interpolate) before the loss"
        )

    dtype = _compute_dtype(student_feature, teacher_feature)
    student_attention = _attention_map(student_feature.to(dtype), p)
    teacher_attention = _attention_map(teacher_feature.detach().to(dtype), p)
    return (student_attention - teacher_attention).pow(2).sum(dim=1).mean()
