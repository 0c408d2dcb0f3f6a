"""Seeded, reproducible PyTorch DataLoaders for training and evaluation.

A loader built with the same dataset, batch size, worker count and seed yields the same batches:
the shuffle order comes from a ``torch.Generator`` seeded with ``seed``, and so do the seeds of
the worker processes (PyTorch derives each worker's seed from that generator; ``_seed_worker``
passes it on to NumPy and ``random``, which timm's augmentations draw from).

NOTE: with ``workers=0`` the augmentations run in the main process and draw from its global
random state, so reproducing them also needs the caller to seed ``random`` and ``torch``.
"""

import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

_WORKER_ERROR = "Caught UserError in DataLoader worker"


def _seed_worker(worker_id: int) -> None:
    """Seeds NumPy and ``random`` in a loader worker from the seed PyTorch gave the worker.

    The worker's torch seed is the loader's base seed (drawn from its seeded generator when the
    workers start) plus ``worker_id``, so every worker, and every run, gets its own stream.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def _worker_message(error: UserError) -> str | None:
    """The original one-line message of a UserError a worker raised, or None."""
    text = str(error)
    if not text.startswith(_WORKER_ERROR):
        return None
    # PyTorch re-raises with the worker's traceback as the message; its last line is ours
    tag = f"{UserError.__module__}.{UserError.__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(tag):
            return line[len(tag) :]
    return None


class _Loader(DataLoader):
    """A DataLoader whose workers' UserErrors arrive with their own one-line message."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as error:
                message = _worker_message(error)
                if message is None:
                    raise
                raise UserError(message) from error
            yield batch


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    training: bool,
    workers: int,
    seed: int,
    pin_memory: bool = False,
    drop_last: bool | None = None,
) -> DataLoader:
    """Builds a DataLoader whose order and augmentation are fixed by ``seed``.

    Args:
        dataset: a map-style dataset with a length.
        batch_size: samples per batch; at most the dataset's length.
        training: shuffle (seeded) and, by default, drop the last incomplete batch.
        workers: loader worker processes; 0 loads in the main process. Workers are persistent
            (kept across epochs) when there are any.
        seed: seed of the shuffle order and of the worker processes.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        drop_last: drop the last incomplete batch; None drops it for training when the dataset
            holds more than one batch, and never for evaluation.

    Returns:
        The DataLoader. A ``UserError`` raised in a worker (an undecodable image, say) reaches
        the caller with its original one-line message instead of PyTorch's traceback text.

    Raises:
        UserError: an empty dataset, a batch size below 1 or above the dataset's length, or a
            negative worker count.
    """
    size = len(dataset)
    kind = "training" if training else "evaluation"
    if size == 0:
        raise UserError(f"the {kind} dataset is empty: check --data and the split options")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if batch_size > size:
        raise UserError(
            f"batch size {batch_size} is larger than the {kind} dataset ({size} samples): "
            f"pass a batch size of at most {size}, or use more data"
        )
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    if drop_last is None:
        drop_last = training and size > batch_size

    generator = torch.Generator()
    generator.manual_seed(seed)
    _logger.debug(
        f"{kind} loader: {size} samples, batch {batch_size}, {workers} workers, "
        f"drop_last={drop_last}, seed {seed}"
    )
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0,
    )
