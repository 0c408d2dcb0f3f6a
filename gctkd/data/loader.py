"""Seeded, reproducible PyTorch DataLoaders for training and evaluation.

A loader built with the same dataset, batch size, worker count and seed yields the same batches.
The training order of epoch ``e`` is a pure function of ``(seed, e)`` (:class:`EpochSampler`),
so a resumed run can replay any epoch and skip the batches it had already trained on. The seeds
of the worker processes come from the loader's ``torch.Generator`` (PyTorch derives each
worker's seed from it; ``_seed_worker`` passes it on to NumPy and ``random``, which timm's
augmentations draw from); :meth:`EpochLoader.set_epoch` reseeds it from ``(seed, e)`` too.

With several processes each rank takes its share of the same permutation: every rank sees the
same number of batches, and the ranks' batches at one step together are the batch a single
process with the whole batch size would draw (see :class:`EpochSampler`).

NOTE: with ``workers=0`` the augmentations run in the main process and draw from its global
random state, so reproducing them also needs the caller to seed ``random`` and ``torch`` (the
trainer checkpoints those states).

FIXME: after a resume with ``workers > 0`` the batches are the same but their random
augmentations are new draws: persistent workers keep their random streams across epochs and
a resumed process starts fresh ones. Bit-exact resume with workers needs augmentation seeds
that are a function of (seed, epoch, sample index), set per sample in the dataset wrapper.
"""

import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """A 63-bit seed for one epoch: a pure function of the run's seed, the epoch and ``stream``.

    ``stream`` holds numbers that tell independent uses apart (the worker seeds of one rank).
    """
    state = np.random.SeedSequence([seed, epoch, *stream]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """Dataset indices of one epoch for one rank, a pure function of ``(seed, epoch)``.

    Every rank draws the same permutation of the whole dataset and keeps the positions
    ``rank, rank + world_size, ...``. Rank r's k-th batch of b indices is then the
    permutation's positions ``k * b * world_size + j * world_size + r`` (j < b), so the
    batches of all ranks at step k are exactly positions ``k * B .. (k + 1) * B - 1`` with
    ``B = b * world_size``: the batch a single process with batch size B draws.

    Args:
        size: samples in the dataset.
        seed: the run's seed.
        shuffle: permute (training) or keep the dataset's order (evaluation).
        rank: this process's rank.
        world_size: processes sharing the data.
        even: drop the tail that does not divide by ``world_size``, so every rank yields the
            same count (training); False gives every sample to exactly one rank (evaluation).

    NOTE: iterating advances to the next epoch, so a loader iterated twice sees two epochs;
    :meth:`set_epoch` picks the epoch (and the samples to skip) explicitly, as the trainer
    does at each epoch start.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.even = even
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw the order of ``epoch`` next, leaving out this rank's first ``skip`` samples."""
        self.epoch = epoch
        self.skip = skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.even:
            order = order[: self.size - self.size % self.world_size]
        return order[self.rank :: self.world_size][self.skip :]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        self.epoch, self.skip = self.epoch + 1, 0
        return iter(indices)

    def __len__(self) -> int:
        if self.even:
            share = self.size // self.world_size
        else:
            share = len(range(self.rank, self.size, self.world_size))
        return max(share - self.skip, 0)


class EpochLoader(DataLoader):
    """A DataLoader with selectable epochs whose workers' UserErrors keep their one line."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Yield ``epoch`` next, without its first ``skip_batches`` batches (resuming)."""
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("set_epoch needs a loader built by build_loader(training=True)")
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        if self.generator is not None:
            # the worker seeds: their own stream, and one per rank
            self.generator.manual_seed(epoch_seed(self.sampler.seed, epoch, 1, self.sampler.rank))

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
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Builds a DataLoader whose order and augmentation are fixed by ``seed``.

    Args:
        dataset: a map-style dataset with a length.
        batch_size: samples per batch of this process; at most its share of the dataset.
        training: shuffle (seeded per epoch) and, by default, drop the last incomplete batch.
        workers: loader worker processes; 0 loads in the main process. Workers are persistent
            (kept across epochs) when there are any.
        seed: seed of the shuffle order and of the worker processes.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        drop_last: drop the last incomplete batch; None drops it for training when the dataset
            holds more than one batch, and never for evaluation.
        rank: this process's rank when several processes train together.
        world_size: how many processes share the data; each takes its part (see
            :class:`EpochSampler`), the same count for training.

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
    sampler = None
    if training or world_size > 1:
        sampler = EpochSampler(size, seed, training, rank, world_size, even=training)
    share = len(sampler) if sampler is not None else size
    if batch_size > share:
        where = f"the {kind} dataset ({size} samples)"
        if world_size > 1:
            where = f"one process's share of {where}, {share}"
        raise UserError(
            f"batch size {batch_size} is larger than {where}: pass a batch size of at most "
            f"{share}, or use more data"
        )
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    if drop_last is None:
        drop_last = training and share > batch_size

    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    _logger.debug(
        f"{kind} loader: {size} samples, batch {batch_size}, {workers} workers, "
        f"drop_last={drop_last}, seed {seed}, rank {rank}/{world_size}"
    )
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0,
    )
