"""Validation metrics: top-1, top-5, loss and expected calibration error by hand."""

import math

import pytest
import torch

from gctkd.engine.metrics import EvalAccumulator, expected_calibration_error


def test_ece_by_hand():
    # bins of width 0.5: (0, 0.5] holds 0.3 (wrong); (0.5, 1] holds 0.6 (right), 0.9 (wrong)
    confidence = torch.tensor([0.3, 0.6, 0.9])
    correct = torch.tensor([0, 1, 0])
    expected = (1 / 3) * abs(0 - 0.3) + (2 / 3) * abs(0.5 - 0.75)
    assert expected_calibration_error(confidence, correct, num_bins=2).item() == pytest.approx(
        expected
    )
    # a confidence of exactly 0.5 belongs to the lower bin
    edge = expected_calibration_error(torch.tensor([0.5]), torch.tensor([1]), num_bins=2)
    assert edge.item() == pytest.approx(0.5)


def test_accumulator_over_two_batches():
    logits = torch.log(torch.tensor([
        [0.7, 0.1, 0.1, 0.05, 0.03, 0.02],
        [0.2, 0.5, 0.1, 0.1, 0.05, 0.05],
        [0.1, 0.2, 0.3, 0.35, 0.03, 0.02],
        [0.05, 0.05, 0.1, 0.1, 0.2, 0.5],
    ]))
    targets = torch.tensor([0, 0, 4, 3])
    accumulator = EvalAccumulator(num_classes=6, device=torch.device("cpu"), num_bins=10)
    accumulator.update(logits[:2], targets[:2])
    accumulator.update(logits[2:], targets[2:])
    metrics = accumulator.compute()
    # top-1: only row 0 is right
    assert metrics["top1"] == pytest.approx(25.0)
    # top-5 of 6 classes: every target is among the five largest
    assert metrics["top5"] == pytest.approx(100.0)
    expected_loss = -(math.log(0.7) + math.log(0.2) + math.log(0.03) + math.log(0.1)) / 4
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    # bins: 0.7 right (bin 7), 0.5 wrong (bin 5), 0.35 wrong (bin 4), 0.5 wrong (bin 5)
    expected_ece = (abs(1 - 0.7) + abs(0 - 0.5) * 2 + abs(0 - 0.35)) / 4
    assert metrics["ece"] == pytest.approx(expected_ece, rel=1e-5)


def test_top_k_shrinks_with_few_classes():
    accumulator = EvalAccumulator(num_classes=3, device=torch.device("cpu"))
    accumulator.update(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]))
    assert accumulator.compute()["top5"] == 100.0
