"""Tests for gctkd.losses: hand-computed values, equivalences, gradients and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from gctkd.losses import (
    CyclicalFocalLoss,
    attention_transfer_loss,
    cyclical_focal_loss,
    hint_loss,
    kd_loss,
)

# the published cyclical focal loss exponents and smoothing
G_HC, G_FL, G_NEG, EPS = 3.0, 2.0, 2.0, 0.1


def _logits_for(probs: list[float]) -> torch.Tensor:
    """A one-row float64 logit tensor whose softmax is exactly ``probs``."""
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float64)


# ---------------------------------------------------------------- cyclical focal loss


def _two_class_expected(xi: float) -> float:
    # p = (1/4, 3/4), target 1: p_t = 3/4, no smoothing
    weight = xi * (1 + 0.75) ** G_HC + (1 - xi) * (1 - 0.75) ** G_FL
    return -weight * math.log(0.75)


def _three_class_expected(xi: float) -> float:
    # p = (1/8, 2/8, 5/8), target 2, smoothing 0.1 over 3 classes
    q_other, q_target = EPS / 3, 1 - EPS + EPS / 3
    w_target = xi * (1 + 5 / 8) ** G_HC + (1 - xi) * (3 / 8) ** G_FL
    w_0 = xi + (1 - xi) * (1 / 8) ** G_NEG
    w_1 = xi + (1 - xi) * (2 / 8) ** G_NEG
    return -(
        q_target * w_target * math.log(5 / 8)
        + q_other * w_0 * math.log(1 / 8)
        + q_other * w_1 * math.log(2 / 8)
    )


def _soft_target_expected(xi: float) -> float:
    # p = (1/4, 3/4), q = (0.3, 0.7): every class gets the target-class weight
    def weight(p: float) -> float:
        return xi * (1 + p) ** G_HC + (1 - xi) * (1 - p) ** G_FL

    return -(0.3 * weight(0.25) * math.log(0.25) + 0.7 * weight(0.75) * math.log(0.75))


def _batch_expected(xi: float) -> float:
    # two samples, p = (1/4, 3/4) each, targets 1 and 0: p_t = 3/4 and 1/4
    def per_sample(p_t: float) -> float:
        return -(xi * (1 + p_t) ** G_HC + (1 - xi) * (1 - p_t) ** G_FL) * math.log(p_t)

    return (per_sample(0.75) + per_sample(0.25)) / 2


@pytest.mark.parametrize(
    "xi, expected",
    [
        (1.0, 1.75**3 * -math.log(0.75)),  # 1.5418
        (0.0, 0.25**2 * -math.log(0.75)),  # 0.017980
        (0.5, (0.5 * 1.75**3 + 0.5 * 0.25**2) * -math.log(0.75)),  # 0.77990
    ],
)
def test_focal_two_classes_literal(xi: float, expected: float) -> None:
    loss = cyclical_focal_loss(_logits_for([0.25, 0.75]), torch.tensor([1]), xi, G_HC, G_FL)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(_two_class_expected(xi), abs=1e-15)


@pytest.mark.parametrize("xi", [1.0, 0.0, 0.5])
@pytest.mark.parametrize(
    "case",
    ["two_class", "three_class_smoothed", "soft_target", "batch_mean"],
)
def test_focal_hand_values(case: str, xi: float) -> None:
    if case == "two_class":
        logits, target = _logits_for([0.25, 0.75]), torch.tensor([1])
        kwargs, expected = {}, _two_class_expected(xi)
    elif case == "three_class_smoothed":
        logits, target = _logits_for([1 / 8, 2 / 8, 5 / 8]), torch.tensor([2])
        kwargs, expected = {"gamma_neg": G_NEG, "label_smoothing": EPS}, _three_class_expected(xi)
    elif case == "soft_target":
        logits = _logits_for([0.25, 0.75])
        target = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
        kwargs, expected = {}, _soft_target_expected(xi)
    else:
        logits, target = _logits_for([0.25, 0.75]).repeat(2, 1), torch.tensor([1, 0])
        kwargs, expected = {}, _batch_expected(xi)

    loss = cyclical_focal_loss(logits, target, xi, G_HC, G_FL, **kwargs)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_focal_gamma_neg_defaults_to_gamma_fl() -> None:
    logits, target = _logits_for([1 / 8, 2 / 8, 5 / 8]), torch.tensor([2])
    default = cyclical_focal_loss(logits, target, 0.3, G_HC, 2.0, label_smoothing=EPS)
    explicit = cyclical_focal_loss(logits, target, 0.3, G_HC, 2.0, 2.0, label_smoothing=EPS)
    other = cyclical_focal_loss(logits, target, 0.3, G_HC, 2.0, 0.5, label_smoothing=EPS)
    assert default.item() == explicit.item()
    assert other.item() != pytest.approx(default.item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("xi", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_focal_with_zero_gammas_is_cross_entropy(xi: float, eps: float, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (2.0 * torch.randn(8, 5, generator=generator)).to(dtype)
    labels = torch.randint(0, 5, (8,), generator=generator)
    soft = torch.softmax(torch.randn(8, 5, generator=generator), dim=1).to(dtype)

    for target in (labels, soft):
        loss = cyclical_focal_loss(logits, target, xi, 0.0, 0.0, 0.0, label_smoothing=eps)
        expected = F.cross_entropy(logits, target, label_smoothing=eps)
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0.0)


def test_focal_gradient_flows_through_weights() -> None:
    # focal term only, two classes, p_t = 3/4, gamma_fl = 2: L = -(1 - p)^2 log p and
    # dL/dz_t = p (1 - p) * (2 (1 - p) log p - (1 - p)^2 / p); dL/dz_other = -dL/dz_t
    p = 0.75
    expected = p * (1 - p) * (2 * (1 - p) * math.log(p) - (1 - p) ** 2 / p)  # -0.042595
    detached = -((1 - p) ** 2) * (1 - p)  # what detaching the weight would give
    logits = _logits_for([0.25, 0.75]).requires_grad_()
    cyclical_focal_loss(logits, torch.tensor([1]), 0.0, G_HC, G_FL).backward()
    assert logits.grad[0, 1].item() == pytest.approx(expected, abs=1e-12)
    assert logits.grad[0, 0].item() == pytest.approx(-expected, abs=1e-12)
    assert expected != pytest.approx(detached, abs=1e-3)


@pytest.mark.parametrize("soft", [False, True])
def test_focal_gradcheck(soft: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    if soft:
        target = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=generator), 1)
    else:
        target = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(
        lambda x: cyclical_focal_loss(x, target, 0.4, G_HC, G_FL, G_NEG, EPS), (logits,)
    )


def test_focal_low_precision_is_computed_in_float32() -> None:
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 5])
    reference = cyclical_focal_loss(logits.bfloat16().float(), target, 0.5, G_HC, G_FL)
    loss = cyclical_focal_loss(logits.bfloat16(), target, 0.5, G_HC, G_FL)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)


def test_focal_module_reads_xi_each_call() -> None:
    module = CyclicalFocalLoss(gamma_hc=G_HC, gamma_fl=G_FL, gamma_neg=G_NEG, label_smoothing=EPS)
    logits, target = _logits_for([1 / 8, 2 / 8, 5 / 8]), torch.tensor([2])
    for xi in (1.0, 0.0, 0.5):
        module.xi = xi
        assert module(logits, target).item() == pytest.approx(_three_class_expected(xi), abs=1e-12)
    assert "xi=0.5" in repr(module)

    module.xi = 1.5
    with pytest.raises(ValueError, match="xi must be in"):
        module(logits, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"xi": -0.1}, r"xi must be in \[0, 1\], got -0.1"),
        ({"xi": 1.01}, r"xi must be in \[0, 1\], got 1.01"),
        ({"xi": float("nan")}, "xi must be in"),
        ({"gamma_hc": -1.0}, "gamma_hc must be >= 0, got -1.0"),
        ({"gamma_fl": -2.0}, "gamma_fl must be >= 0, got -2.0"),
        ({"gamma_neg": -0.5}, "gamma_neg must be >= 0, got -0.5"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\], got 1.5"),
    ],
)
def test_focal_rejects_bad_knobs(kwargs: dict, match: str) -> None:
    arguments = {"xi": 0.5, "gamma_hc": G_HC, "gamma_fl": G_FL, **kwargs}
    with pytest.raises(ValueError, match=match):
        cyclical_focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), **arguments)


@pytest.mark.parametrize(
    "logits, target, match",
    [
        (torch.zeros(3), torch.tensor([0, 1, 2]), r"logits must have shape \[B, K\]"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), "integer targets must have shape"),
        (torch.zeros(2, 3), torch.zeros(2, 4), "soft targets must have the shape"),
    ],
)
def test_focal_rejects_bad_shapes(logits: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cyclical_focal_loss(logits, target, 0.5, G_HC, G_FL)


# ---------------------------------------------------------------- logit distillation


def _kd_peaked_expected(temperature: float) -> float:
    # student uniform over 10 classes, teacher logit 5 on class 0 and 0 elsewhere
    top = math.exp(5 / temperature)
    p_top, p_rest = top / (top + 9), 1 / (top + 9)
    kl = p_top * math.log(p_top / 0.1) + 9 * p_rest * math.log(p_rest / 0.1)
    return temperature**2 * kl


def _peaked_logits() -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.zeros(4, 10)
    teacher[:, 0] = 5.0
    return torch.zeros(4, 10), teacher


@pytest.mark.parametrize(
    "temperature, expected",
    [(1.0, 1.957839), (2.0, 2.748848), (4.0, 2.030935), (8.0, 1.547325)],
)
def test_kd_hand_values(temperature: float, expected: float) -> None:
    student, teacher = _peaked_logits()
    assert _kd_peaked_expected(temperature) == pytest.approx(expected, abs=1e-6)
    loss = kd_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(_kd_peaked_expected(temperature), abs=1e-5)


def test_kd_brief_value() -> None:
    student, teacher = _peaked_logits()
    assert kd_loss(student, teacher, 4.0).item() == pytest.approx(2.0309, abs=1e-4)


def test_kd_identical_logits_give_zero() -> None:
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_is_not_symmetric() -> None:
    student, teacher = _peaked_logits()
    forward, swapped = kd_loss(student, teacher, 4.0), kd_loss(teacher, student, 4.0)
    assert swapped.item() == pytest.approx(1.557930, abs=1e-5)
    assert abs(forward.item() - swapped.item()) > 0.4


def test_kd_gradient_size_does_not_depend_on_temperature() -> None:
    torch.manual_seed(0)
    student, teacher = 0.1 * torch.randn(4, 10), 0.1 * torch.randn(4, 10)
    norms = []
    for temperature in (1.0, 2.0, 4.0, 8.0, 16.0):
        logits = student.clone().requires_grad_()
        kd_loss(logits, teacher, temperature).backward()
        norms.append(logits.grad.norm().item())
    assert max(norms) / min(norms) - 1 <= 0.05
    # small-logit limit: (z_s - z_t - mean_c(z_s - z_t)) / (K * B)
    centred = (student - teacher) - (student - teacher).mean(dim=1, keepdim=True)
    assert norms[-1] == pytest.approx((centred / 40).norm().item(), rel=0.01)
    assert norms[0] == pytest.approx(0.0215, abs=5e-4)


def test_kd_teacher_gets_no_gradient() -> None:
    student = torch.randn(2, 5, requires_grad=True)
    teacher = torch.randn(2, 5, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kd_low_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    student, teacher = _peaked_logits()
    loss = kd_loss(student.to(dtype), teacher.to(dtype), 4.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.0309, abs=1e-4)


@pytest.mark.parametrize(
    "student, teacher, temperature, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), 0.0, "temperature must be > 0, got 0.0"),
        (torch.zeros(2, 3), torch.zeros(2, 3), -1.0, "temperature must be > 0, got -1.0"),
        (torch.zeros(2, 3), torch.zeros(2, 4), 1.0, r"\(2, 3\) and \(2, 4\)"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), 1.0, r"same shape \[B, K\]"),
    ],
)
def test_kd_rejects_bad_input(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kd_loss(student, teacher, temperature)


# ---------------------------------------------------------------- feature distillation


def test_hint_hand_value() -> None:
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    teacher = torch.tensor([[[[0.0, 2.0], [1.0, 8.0]]]])
    # differences 1, 0, 2, -4 -> squares 1, 0, 4, 16 -> mean 21 / 4
    assert hint_loss(student, teacher).item() == pytest.approx(5.25, abs=1e-12)


def test_hint_teacher_gets_no_gradient_and_identical_is_zero() -> None:
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    hint_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert hint_loss(student, student.detach().clone()).item() == 0.0


def test_hint_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"student \(2, 3, 4, 4\) and teacher \(2, 6, 4, 4\)"):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 4, 4))


# student: two channels over a 1 x 2 map, teacher: one channel
_AT_STUDENT = torch.tensor([[[[1.0, 0.0]], [[-1.0, 2.0]]]], dtype=torch.float64)
_AT_TEACHER = torch.tensor([[[[2.0, 1.0]]]], dtype=torch.float64)


@pytest.mark.parametrize(
    "p, expected",
    [
        # mean_c f^2: student (1, 2) / sqrt 5, teacher (4, 1) / sqrt 17 -> 2 - 2 * 6 / sqrt 85
        (2.0, 2 - 2 * (1 * 4 + 2 * 1) / math.sqrt(5 * 17)),
        # mean_c |f|: student (1, 1) / sqrt 2, teacher (2, 1) / sqrt 5 -> 2 - 2 * 3 / sqrt 10
        (1.0, 2 - 2 * (1 * 2 + 1 * 1) / math.sqrt(2 * 5)),
    ],
)
def test_attention_transfer_hand_values(p: float, expected: float) -> None:
    loss = attention_transfer_loss(_AT_STUDENT, _AT_TEACHER, p=p)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_attention_transfer_averages_over_batch() -> None:
    # the second sample matches exactly, so the mean is half the first sample's distance
    student = torch.cat([_AT_STUDENT, _AT_TEACHER.repeat(1, 2, 1, 1)])
    teacher = torch.cat([_AT_TEACHER, _AT_TEACHER])
    expected = (2 - 12 / math.sqrt(85)) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected, abs=1e-12)


def test_attention_transfer_ignores_channel_count_and_scale() -> None:
    feature = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    wider_teacher = 3.0 * torch.cat([feature, feature], dim=1)
    assert attention_transfer_loss(feature, wider_teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer_loss(feature, feature.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_teacher_gets_no_gradient() -> None:
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 8, 4, 4, requires_grad=True)
    attention_transfer_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_feature_losses_in_low_precision_return_float32() -> None:
    student = torch.randn(2, 3, 4, 4).bfloat16()
    teacher = torch.randn(2, 3, 4, 4).bfloat16()
    assert hint_loss(student, teacher).dtype == torch.float32
    assert attention_transfer_loss(student, teacher).dtype == torch.float32


@pytest.mark.parametrize(
    "student_shape, teacher_shape, p, match",
    [
        ((2, 3, 4, 4), (2, 3, 4, 4), 0.0, "p must be > 0, got 0.0"),
        ((2, 3, 4, 4), (2, 3, 2, 2), 2.0, r"spatial sizes.*\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"),
        ((2, 3, 4, 4), (4, 3, 4, 4), 2.0, "equal batch and spatial sizes"),
        ((2, 3, 16), (2, 3, 16), 2.0, r"needs \[B, C, H, W\] features"),
    ],
)
def test_attention_transfer_rejects_bad_input(
    student_shape: tuple, teacher_shape: tuple, p: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        attention_transfer_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), p=p)


# ---------------------------------------------------------------- no host-device syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_do_not_sync_with_the_host() -> None:
    device = torch.device("cuda")
    logits = torch.randn(8, 10, device=device, requires_grad=True)
    labels = torch.randint(0, 10, (8,), device=device)
    soft = torch.softmax(torch.randn(8, 10, device=device), dim=1)
    teacher_logits = torch.randn(8, 10, device=device)
    student_feature = torch.randn(8, 4, 6, 6, device=device, requires_grad=True)
    teacher_feature = torch.randn(8, 16, 6, 6, device=device)

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = (
            cyclical_focal_loss(logits, labels, 0.5, G_HC, G_FL, G_NEG, EPS)
            + cyclical_focal_loss(logits, soft, 0.5, G_HC, G_FL)
            + kd_loss(logits, teacher_logits, 4.0)
            + hint_loss(student_feature[:, :4], teacher_feature[:, :4])
            + attention_transfer_loss(student_feature, teacher_feature)
        )
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
