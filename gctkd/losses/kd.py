"""Logit distillation: KL divergence between temperature-softened class distributions.

Implements the soft-target loss of Hinton, Vinyals and Dean, "Distilling the Knowledge
in a Neural Network" (arXiv:1503.02531, 2015). Both sets of logits are divided by the
temperature T before the softmax, and the KL divergence is multiplied by T^2: the
gradient with respect to the student logits then keeps about the same size whatever T
is, so a cyclical KD temperature (gctkd brief, section 4) does not rescale the loss.
"""

import logging

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss, ``T^2 * KL(p_teacher || p_student)``.

    With ``p_teacher = softmax(teacher_logits / T)`` and
    ``p_student = softmax(student_logits / T)``, the loss is::

        T**2 * mean_b sum_c p_teacher[b, c] * (log p_teacher[b, c] - log p_student[b, c])

    that is, summed over classes and averaged over the batch (``reduction="batchmean"``).
    The teacher logits are detached, so the teacher never receives a gradient. The
    computation runs in float32 when either input is float16 or bfloat16 (float64 stays
    float64); the result has that dtype.

    For small logits the gradient with respect to the student logits is close to
    ``(z_s - z_t - mean_c(z_s - z_t)) / (K * B)`` whatever T is: the T^2 factor cancels
    the 1/T^2 that the softened softmax brings.

    Args:
        student_logits: Student class scores, shape ``[B, K]``.
        teacher_logits: Teacher class scores, shape ``[B, K]``.
        temperature: Softmax temperature T > 0 (1 is no softening).

    Returns:
        The scalar loss.

    Raises:
        ValueError: If ``temperature`` is not positive or the shapes differ or are not 2-D.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [B, K], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )

    compute_dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    student_log_probs = F.log_softmax(student_logits.to(compute_dtype) / temperature, dim=1)
    teacher_log_probs = F.log_softmax(
        teacher_logits.detach().to(compute_dtype) / temperature, dim=1
    )

    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2
