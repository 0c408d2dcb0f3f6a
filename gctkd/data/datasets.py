"""Training and validation datasets: the embedded 8x8 digits or an ImageFolder on disk.

``build_datasets`` resolves what ``--data`` points at into a ``DataBundle``: two datasets whose
items are ``(PIL RGB image, int target)`` before any transform, the class names, the mean and
std to normalise with, and one line describing the data for the log.

Three layouts are understood:

* no folder: scikit-learn's 8x8 digits (1,797 images, 10 classes), shipped with scikit-learn;
* ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``: two ImageFolders;
* ``DIR/<class>/*`` (or ``DIR/train/<class>/*`` without ``val/``): one ImageFolder, and a seeded
  stratified validation split is carved out of it.

``per_class=N`` keeps the first N file names (sorted) of each class for training, which is how
the "4K CIFAR-10" set of Smith (2022) is made: 400 per class.

Every dataset here is picklable (no lambdas, no open files), so DataLoader workers started with
``spawn`` receive a copy.
"""

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from gctkd.data.transforms import TransformedDataset
from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

# Per-channel statistics of all 1,797 digits after scaling 0..16 to 0..255 and then to [0, 1];
# the three channels are equal because the images are grey.
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3759, 0.3759, 0.3759)

BAD_IMAGE_POLICIES = ("fail", "skip")

# what a file that PIL cannot decode raises: UnidentifiedImageError and truncated files are
# OSErrors; some plugins raise ValueError or SyntaxError on malformed headers
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_Item = TypeVar("_Item")

_DATA_HINT = (
    "pass --data DIR with DIR/<class>/*.jpg, or leave --data out to use the embedded digits"
)


def _check_options(
    per_class: int | None,
    val_fraction: float,
    val_per_class: int | None,
    seed: int,
    bad_images: str,
) -> None:
    if per_class is not None and per_class < 1:
        raise UserError(
            f"per_class must be at least 1, got {per_class}: pass --per-class N with N >= 1, "
            "or leave it out to keep every image"
        )
    if not 0.0 < val_fraction < 1.0:
        raise UserError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}: "
            "pass e.g. --val-fraction 0.1"
        )
    if val_per_class is not None and val_per_class < 1:
        raise UserError(
            f"val_per_class must be at least 1, got {val_per_class}: pass --val-per-class N "
            "with N >= 1, or leave it out to use --val-fraction"
        )
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise UserError(
            f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}"
        )


def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise UserError(f"{name} needs 3 values (R, G, B), got {len(values)}: {values}")
    if name == "std" and min(values) <= 0:
        raise UserError(f"std values must be positive, got {values}")
    return values


def _split_per_class(
    items_by_class: list[list[_Item]],
    class_names: list[str],
    *,
    where: str,
    carve: bool,
    per_class: int | None,
    val_fraction: float,
    val_per_class: int | None,
    seed: int,
) -> tuple[list[list[_Item]], list[list[_Item]]]:
    """Picks training (and, when ``carve``, validation) items of each class.

    Training keeps the first ``per_class`` items (all when None); validation draws, seeded, from
    the items training does not keep. Without ``per_class`` the training items are the rest of
    the class, in their original order.
    """
    train, val = [], []
    for class_index, (items, name) in enumerate(zip(items_by_class, class_names)):
        count = len(items)
        if not carve:
            if per_class is not None and count < per_class:
                raise UserError(
                    f"class {name!r} in {where} has {count} images, fewer than "
                    f"per_class={per_class}: lower --per-class to at most {count}"
                )
            train.append(items[:per_class] if per_class is not None else list(items))
            val.append([])
            continue

        if val_per_class is not None:
            val_count = val_per_class
        else:
            # round half up, and never leave a class without validation images
            val_count = max(1, math.floor(val_fraction * count + 0.5))
        kept = per_class if per_class is not None else 1
        if count < kept + val_count:
            raise UserError(
                f"class {name!r} in {where} has {count} images, fewer than the {kept} training "
                f"plus {val_count} validation images asked for: lower --per-class, "
                "--val-per-class or --val-fraction, or give a separate DIR/val folder"
            )

        pool = items[per_class:] if per_class is not None else items
        # one generator per class: the split of a class does not depend on the other classes
        rng = np.random.default_rng([seed, class_index])
        chosen = set(rng.permutation(len(pool))[:val_count].tolist())
        val.append([item for i, item in enumerate(pool) if i in chosen])
        if per_class is not None:
            train.append(items[:per_class])
        else:
            train.append([item for i, item in enumerate(pool) if i not in chosen])
    return train, val


class DigitsDataset(Dataset):
    """Scikit-learn's 8x8 digits as RGB PIL images with values 0..255.

    Args:
        images: uint8 array of shape (N, 8, 8).
        targets: class index of each image.
        indices: position of each image in ``sklearn.datasets.load_digits()``.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], indices: Sequence[int]):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return image, self.targets[index]


class ImageFileDataset(Dataset):
    """Image files with class targets, decoded on access by torchvision's ``default_loader``.

    Files are not opened up front. One that fails to decode is handled by ``bad_images``:

    * ``"fail"``: raise a ``UserError`` naming the file;
    * ``"skip"``: log a warning (once per file and process) and return the next decodable sample
      in index order, wrapping around. The batch keeps its size; the neighbour is seen twice.

    Args:
        samples: ``(path, target)`` pairs.
        classes: class names, indexed by target.
        bad_images: ``"fail"`` or ``"skip"``.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], bad_images: str = "fail"
    ):
        self.samples = [(str(path), int(target)) for path, target in samples]
        self.targets = [target for _, target in self.samples]
        self.classes = list(classes)
        self.bad_images = bad_images
        self._bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image | None:
        if path in self._bad_paths:
            return None
        try:
            return default_loader(path)
        except _DECODE_ERRORS as error:
            if self.bad_images == "fail":
                raise UserError(
                    f"cannot decode image '{path}' ({type(error).__name__}: {error}): "
                    "remove the file, or pass --bad-images skip to skip such files"
                ) from error
            self._bad_paths.add(path)
            _logger.warning(f"skipping image '{path}': cannot decode it ({error})")
            return None

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for step in range(len(self.samples)):
            path, target = self.samples[(index + step) % len(self.samples)]
            image = self._load(path)
            if image is not None:
                return image, target
        raise UserError(f"none of the {len(self.samples)} images could be decoded")


class _ScanFolder(ImageFolder):
    """An ImageFolder that ignores hidden folders (``.ipynb_checkpoints``, ``.git``)."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
        return classes, {name: index for index, name in enumerate(classes)}


def _scan_folder(root: Path, role: str) -> tuple[list[str], list[list[str]]]:
    """Returns the class names and the sorted image paths of each class under ``root``."""
    if not root.exists():
        raise UserError(f"{role} '{root}' does not exist: {_DATA_HINT}")
    if not root.is_dir():
        raise UserError(f"{role} '{root}' is a file, not a folder: {_DATA_HINT}")
    entries = [e for e in os.scandir(root) if e.name[0] != "."]
    if not entries:
        raise UserError(f"{role} '{root}' is empty: put one folder of images per class in it")
    if not any(e.is_dir() for e in entries):
        raise UserError(
            f"{role} '{root}' has no class folders, only files: move the images into one "
            "sub-folder per class, DIR/<class>/*.jpg"
        )

    folder = _ScanFolder(str(root), allow_empty=True)
    paths_by_class: list[list[str]] = [[] for _ in folder.classes]
    for path, target in folder.samples:
        paths_by_class[target].append(path)
    for name, paths in zip(folder.classes, paths_by_class):
        if not paths:
            raise UserError(
                f"class folder '{root / name}' has no images (looked for "
                f"{', '.join(IMG_EXTENSIONS)}): add images or remove the folder"
            )
        paths.sort(key=lambda p: os.path.relpath(p, root / name))
    if len(folder.classes) < 2:
        raise UserError(
            f"{role} '{root}' has {len(folder.classes)} class folder ({folder.classes[0]!r}); "
            "classification needs at least 2"
        )
    return folder.classes, paths_by_class


def _flatten(items_by_class: list[list[_Item]]) -> list[tuple[_Item, int]]:
    return [(item, target) for target, items in enumerate(items_by_class) for item in items]


@dataclass
class DataBundle:
    """What the trainer needs to know about its data.

    Args:
        train: training dataset; items are ``(PIL RGB image, int target)`` until a transform is
            attached with ``with_transform``.
        val: validation dataset, items as in ``train``.
        class_names: class names, indexed by target.
        num_classes: ``len(class_names)``.
        mean: per-channel mean (R, G, B) in [0, 1] to normalise with.
        std: per-channel standard deviation (R, G, B) to normalise with.
        description: one line for the log.
        default_hflip: whether horizontal flips suit the data (False for digits).
    """

    train: Dataset
    val: Dataset
    class_names: list[str]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    default_hflip: bool

    def with_transform(
        self, train_transform: Callable[[Any], Any], val_transform: Callable[[Any], Any]
    ) -> "DataBundle":
        """Returns a copy whose datasets apply the given image transforms."""
        return replace(
            self,
            train=TransformedDataset(self.train, train_transform),
            val=TransformedDataset(self.val, val_transform),
        )


def _digits_bundle(
    split: dict[str, Any],
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    class_names = [str(c) for c in range(10)]
    indices_by_class = [np.flatnonzero(digits.target == c).tolist() for c in range(10)]
    train_ids, val_ids = _split_per_class(
        indices_by_class, class_names, where="the digits", carve=True, **split
    )
    train_ids = sorted(i for ids in train_ids for i in ids)
    val_ids = sorted(i for ids in val_ids for i in ids)

    def subset(ids: list[int]) -> DigitsDataset:
        return DigitsDataset(images[ids], digits.target[ids], ids)

    kept = f" (first {split['per_class']} per class)" if split["per_class"] else ""
    return DataBundle(
        train=subset(train_ids),
        val=subset(val_ids),
        class_names=class_names,
        num_classes=10,
        mean=mean or DIGITS_MEAN,
        std=std or DIGITS_STD,
        description=(
            f"embedded sklearn digits 8x8: 10 classes, {len(train_ids)} train{kept} / "
            f"{len(val_ids)} val (carved, seed {split['seed']})"
        ),
        default_hflip=False,
    )


def build_datasets(
    data_dir: str | os.PathLike | None,
    *,
    per_class: int | None = None,
    val_fraction: float = 0.1,
    val_per_class: int | None = None,
    seed: int = 0,
    bad_images: str = "fail",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """Builds the training and validation datasets for ``--data``.

    Args:
        data_dir: an ImageFolder (``DIR/<class>/*``, or ``DIR/train/<class>/*`` with an optional
            ``DIR/val/<class>/*``); None for the embedded 8x8 digits.
        per_class: keep only the first N file names (sorted) of each class for training; the
            digits keep their first N in scikit-learn's order. None keeps every image.
        val_fraction: when no ``val/`` folder exists, the fraction of each class's images
            (counted before ``per_class``) carved out for validation, rounded half up, at
            least 1. Ignored when ``val_per_class`` is given or ``DIR/val`` exists.
        val_per_class: carve exactly this many validation images per class instead.
        seed: seed of the validation split; the same seed gives the same split.
        bad_images: ``"fail"`` raises on a file that cannot be decoded, ``"skip"`` warns and
            uses the next sample instead (see ``ImageFileDataset``).
        mean: normalisation mean (R, G, B); default: the digits' own statistics, or ImageNet's
            (``timm.data.IMAGENET_DEFAULT_MEAN``) for an ImageFolder.
        std: normalisation std (R, G, B); default as for ``mean``.

    Returns:
        The datasets, class names, normalisation and a description line.

    Raises:
        UserError: a missing, empty or malformed folder, a class without images, fewer than 2
            classes, too few images for ``per_class`` and the validation split, a validation
            folder whose classes differ from training, or a bad option value.

    NOTE: carved validation images are never training images. With ``per_class`` they are drawn
    from the images after the first N, so the training set does not change with the seed.
    """
    _check_options(per_class, val_fraction, val_per_class, seed, bad_images)
    mean = _check_stats("mean", mean) if mean is not None else None
    std = _check_stats("std", std) if std is not None else None
    split = dict(
        per_class=per_class, val_fraction=val_fraction, val_per_class=val_per_class, seed=seed
    )
    if data_dir is None:
        bundle = _digits_bundle(split, mean, std)
        _logger.debug(bundle.description)
        return bundle

    root = Path(data_dir).expanduser()
    if (root / "train").is_dir():
        train_root, val_root = root / "train", root / "val"
        if not val_root.is_dir():
            val_root = None
    else:
        train_root, val_root = root, None

    class_names, train_paths = _scan_folder(train_root, "data folder")
    if val_root is None:
        train_paths, val_paths = _split_per_class(
            train_paths, class_names, where=f"'{train_root}'", carve=True, **split
        )
        val_note = f"carved, seed {seed}"
    else:
        train_paths, _ = _split_per_class(
            train_paths, class_names, where=f"'{train_root}'", carve=False, **split
        )
        val_names, val_paths = _scan_folder(val_root, "validation folder")
        if val_names != class_names:
            only_train = sorted(set(class_names) - set(val_names))
            only_val = sorted(set(val_names) - set(class_names))
            raise UserError(
                f"validation classes in '{val_root}' differ from the training classes in "
                f"'{train_root}' (only in train: {only_train}, only in val: {only_val}): "
                "give both folders the same class sub-folders"
            )
        val_note = f"from {val_root}"

    train = ImageFileDataset(_flatten(train_paths), class_names, bad_images)
    val = ImageFileDataset(_flatten(val_paths), class_names, bad_images)
    kept = f" (first {per_class} per class)" if per_class else ""
    bundle = DataBundle(
        train=train,
        val=val,
        class_names=class_names,
        num_classes=len(class_names),
        mean=mean or tuple(IMAGENET_DEFAULT_MEAN),
        std=std or tuple(IMAGENET_DEFAULT_STD),
        description=(
            f"ImageFolder {root}: {len(class_names)} classes, {len(train)} train{kept} / "
            f"{len(val)} val ({val_note})"
        ),
        default_hflip=True,
    )
    _logger.debug(bundle.description)
    return bundle
