"""Validation metrics accumulated on the device: top-1, top-5, loss and calibration error.

Sums stay on the device until :meth:`EvalAccumulator.compute`, so evaluation waits for
the device once per epoch, not once per batch. Expected calibration error (Guo et al.
2017, "On Calibration of Modern Neural Networks") uses equal-width confidence bins::

    ECE = sum over bins b of |B_b| / N * |accuracy(B_b) - confidence(B_b)|
"""

import torch
import torch.nn.functional as F


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15
) -> torch.Tensor:
    """ECE of one set of predictions (see the module docstring).

    Args:
        confidence: [N] highest softmax probability of each prediction.
        correct: [N] 1 where the prediction is right, else 0.
        num_bins: equal-width bins over (0, 1].
    """
    counts, confidence_sums, correct_sums = _calibration_bins(confidence, correct, num_bins)
    return _ece_from_bins(counts, confidence_sums, correct_sums)


def _calibration_bins(
    confidence: torch.Tensor, correct: torch.Tensor, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # bin b holds confidences in (b / n, (b + 1) / n]
    index = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    counts = torch.zeros(num_bins, device=confidence.device, dtype=torch.float64)
    counts.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    confidence_sums = torch.zeros_like(counts).index_add_(0, index, confidence.double())
    correct_sums = torch.zeros_like(counts).index_add_(0, index, correct.double())
    return counts, confidence_sums, correct_sums


def _ece_from_bins(
    counts: torch.Tensor, confidence_sums: torch.Tensor, correct_sums: torch.Tensor
) -> torch.Tensor:
    total = counts.sum().clamp_min(1)
    return (confidence_sums - correct_sums).abs().sum() / total


class EvalAccumulator:
    """Running sums for top-1, top-5, cross-entropy and ECE over a validation pass.

    Args:
        num_classes: classes of the model; top-5 becomes top-k with k = min(5, classes).
        device: where the sums live.
        num_bins: ECE bins.
    """

    def __init__(self, num_classes: int, device: torch.device, num_bins: int = 15) -> None:
        self.top_k = min(5, num_classes)
        self.num_bins = num_bins
        zeros = torch.zeros((), device=device, dtype=torch.float64)
        self.count = zeros.clone()
        self.top1 = zeros.clone()
        self.top5 = zeros.clone()
        self.loss = zeros.clone()
        self.bins = torch.zeros(3, num_bins, device=device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, target, reduction="sum").double()
        ranked = logits.topk(self.top_k, dim=1).indices
        hits = ranked.eq(target[:, None])
        self.top1 += hits[:, 0].sum()
        self.top5 += hits.any(dim=1).sum()
        self.count += target.numel()
        confidence = logits.softmax(dim=1).max(dim=1).values
        self.bins += torch.stack(_calibration_bins(confidence, hits[:, 0], self.num_bins))

    def compute(self) -> dict[str, float]:
        """``top1`` and ``top5`` in percent, mean ``loss``, ``ece`` in [0, 1]."""
        count = self.count.clamp_min(1)
        values = torch.stack(
            [
                100.0 * self.top1 / count,
                100.0 * self.top5 / count,
                self.loss / count,
                _ece_from_bins(*self.bins),
            ]
        ).tolist()
        return dict(zip(("top1", "top5", "loss", "ece"), values))
