"""Teacher-logit caching for distillation runs without augmentation.

When every epoch shows the student the same image for a sample, the teacher's logits of
that sample never change, and the teacher forward of each step can be replaced by a table
lookup. The table is keyed by **sample index**, never by batch position: the training
loader shuffles, so position i of a batch is another sample every epoch.

How the index reaches the loss: only in runs with ``--cache-teacher-logits``, the training
dataset is wrapped in :class:`IndexedTargets`, whose targets are ``(class, sample index)``
pairs, so batches stay ``(images, targets)`` for the engine, with ``targets`` of shape
``[B, 2]``. The distillation task splits them. Validation batches are unchanged.

The table is filled on the first training step: one pass of the teacher over the training
set in order, on the training device and in the step's autocast dtype, so cached and
uncached runs see the same teacher logits. The fill costs one teacher pass over the data
(about the teacher share of one epoch); each later step saves its teacher forward.

FIXME: the table lives in memory only: a resumed run fills it again, and under DDP every rank
would fill the whole table instead of its shard.
"""

import logging

import torch
from torch import nn
from torch.utils.data import Dataset

from gctkd.data.loader import build_loader

_logger = logging.getLogger(__name__)


class IndexedTargets(Dataset):
    """Items ``(image, tensor([target, index]))`` of an ``(image, target)`` dataset.

    Args:
        dataset: a map-style dataset of ``(image, int target)`` items.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[object, torch.Tensor]:
        image, target = self.dataset[index]
        return image, torch.tensor([int(target), index], dtype=torch.long)


class TeacherLogitCache:
    """The teacher's logits of every training sample, filled once, read by sample index.

    Args:
        dataset: the training dataset as the student sees it (deterministic transform),
            with :class:`IndexedTargets` targets.
        batch_size: images per teacher forward while filling.
        workers: loader workers while filling.
    """

    def __init__(self, dataset: Dataset, batch_size: int, workers: int) -> None:
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.workers = workers
        self.logits: torch.Tensor | None = None
        self.memory_format = torch.contiguous_format

    def fill(self, teacher: nn.Module, device: torch.device) -> None:
        """Run the teacher over the whole dataset in order and keep its logits (float32)."""
        loader = build_loader(
            self.dataset, batch_size=self.batch_size, training=False, workers=self.workers, seed=0
        )
        table = None
        with torch.no_grad():
            for images, targets in loader:
                images = images.to(device, non_blocking=True).contiguous(
                    memory_format=self.memory_format
                )
                logits = teacher(images).float()
                if table is None:
                    table = torch.zeros(len(self.dataset), logits.shape[1], device=device)
                table[targets[:, 1].to(device)] = logits
        self.logits = table
        _logger.info(f"cached the teacher's logits of {len(self.dataset)} training images")

    def lookup(
        self, sample_index: torch.Tensor, teacher: nn.Module, device: torch.device
    ) -> torch.Tensor:
        """The cached logits of a batch's samples (filled on the first call)."""
        if self.logits is None:
            self.fill(teacher, device)
        return self.logits[sample_index]
