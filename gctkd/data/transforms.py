"""Image transforms built with timm, and a dataset wrapper that applies them.

Training: random-resized crop, horizontal flip and, when asked, a timm auto-augment policy
(e.g. RandAugment ``rand-m9-mstd0.5-inc1`` as in Smith, 2022, Table 4) and random erasing.
Evaluation: resize and center crop; small inputs (64 px and below, e.g. 8x8 digits, 32x32
CIFAR) default to ``crop_pct=1.0`` so evaluation sees the whole image.

FIXME: cyclical augmentation (GCT.md section 3) is not built yet. It needs a transform whose
strength s = 1 - xi is read at the moment a sample is made, in every DataLoader worker,
persistent workers included. The plan: a callable transform object holding the strength in
shared memory (a ``share_memory_()`` tensor, which survives pickling to spawned workers),
written by the trainer each step and read in ``__call__``. ``TransformedDataset`` needs no
change for it: it only calls whatever transform it holds.
"""

import logging
from typing import Any, Callable, Sequence

from timm.data import DEFAULT_CROP_PCT, create_transform
from torch.utils.data import Dataset

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

# at or below this input size, evaluation keeps the whole image (crop_pct 1.0)
SMALL_IMAGE_SIZE = 64


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} is a probability and must be in [0, 1], got {value}")


def build_transform(
    image_size: int,
    *,
    training: bool,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float,
    scale: tuple[float, float] = (0.35, 1.0),
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    color_jitter: float | None = None,
    crop_pct: float | None = None,
) -> Callable[[Any], Any]:
    """Builds the image transform of a training or evaluation dataset.

    Args:
        image_size: side of the square model input, in pixels.
        training: random augmentation when True, deterministic resize and crop when False.
        mean: per-channel mean (R, G, B) in [0, 1] to normalise with.
        std: per-channel standard deviation (R, G, B).
        hflip: probability of a horizontal flip (training only); 0 for digits and text.
        scale: range of the random-resized crop's area, as fractions of the image area.
        auto_augment: a timm policy string such as ``rand-m9-mstd0.5-inc1``; None for none.
        re_prob: probability of random erasing (training only).
        color_jitter: timm colour-jitter strength (training only, and ignored by timm when an
            auto-augment policy is set); None for none.
        crop_pct: fraction of the resized image kept by the evaluation center crop; None uses
            1.0 for ``image_size <= 64`` and timm's default (0.875) above. Pass 1.0 when small
            images are upscaled to a large input.

    Returns:
        A callable turning a PIL image into a normalised float tensor of shape
        (3, image_size, image_size).

    Raises:
        UserError: a non-positive size, a probability outside [0, 1], a bad scale range or an
            auto-augment string timm does not understand.
    """
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    _check_probability("hflip", hflip)
    _check_probability("re_prob", re_prob)
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise UserError(f"scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    if crop_pct is None:
        crop_pct = 1.0 if image_size <= SMALL_IMAGE_SIZE else DEFAULT_CROP_PCT
    elif not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}")

    try:
        transform = create_transform(
            image_size,
            is_training=training,
            scale=(float(low), float(high)),
            hflip=float(hflip),
            color_jitter=color_jitter,
            auto_augment=auto_augment or None,
            interpolation="bilinear",
            mean=tuple(mean),
            std=tuple(std),
            re_prob=float(re_prob),
            crop_pct=crop_pct,
        )
    except (AssertionError, ValueError, KeyError) as error:
        if not auto_augment:
            raise
        # timm validates policy strings with asserts; report them as a bad option value
        raise UserError(
            f"auto_augment {auto_augment!r} is not a timm augmentation policy ({error}): use "
            "e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'original', or leave it out"
        ) from error
    _logger.debug(f"{'training' if training else 'evaluation'} transform: {transform}")
    return transform


class TransformedDataset(Dataset):
    """Applies an image transform to the ``(image, target)`` items of another dataset.

    Picklable as long as the wrapped dataset and the transform are, which holds for the
    datasets of ``gctkd.data.datasets`` and the transforms of ``build_transform``.

    Args:
        dataset: a dataset of ``(image, target)`` items.
        transform: called on each image; the target is passed through.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[index]
        return self.transform(image), target
