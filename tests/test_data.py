"""Tests of gctkd.data: datasets, splits, transforms, loaders and archive extraction."""

import gc
import io
import logging
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gctkd.data import archive as archive_module
from gctkd.data.archive import extract_imagefolder_subset
from gctkd.data.datasets import (
    DIGITS_MEAN,
    DIGITS_STD,
    DigitsDataset,
    ImageFileDataset,
    build_datasets,
)
from gctkd.data.loader import build_loader
from gctkd.data.transforms import TransformedDataset, build_transform
from gctkd.errors import UserError

from conftest import CIFAR_CLASSES, write_image_folder

# images per class of sklearn's digits, and 10% of each rounded half up
DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_VAL_PER_CLASS = [18, 18, 18, 18, 18, 18, 18, 18, 17, 18]


def _names(dataset: ImageFileDataset) -> dict[str, list[str]]:
    """File names of each class, in dataset order."""
    names: dict[str, list[str]] = {}
    for path, target in dataset.samples:
        names.setdefault(dataset.classes[target], []).append(os.path.basename(path))
    return names


def _targets(loader) -> list[int]:
    return [t for _, targets in loader for t in targets.tolist()]


# --- the embedded digits


def test_digits_sizes_and_stratified_split():
    bundle = build_datasets(None)
    assert isinstance(bundle.train, DigitsDataset)
    assert len(bundle.train) + len(bundle.val) == 1797
    assert (len(bundle.train), len(bundle.val)) == (1618, 179)
    val_counts = Counter(bundle.val.targets)
    train_counts = Counter(bundle.train.targets)
    assert [val_counts[c] for c in range(10)] == DIGITS_VAL_PER_CLASS
    assert [train_counts[c] for c in range(10)] == [
        n - v for n, v in zip(DIGITS_PER_CLASS, DIGITS_VAL_PER_CLASS)
    ]
    assert not set(bundle.train.indices) & set(bundle.val.indices)
    assert bundle.class_names == [str(c) for c in range(10)] and bundle.num_classes == 10
    assert bundle.default_hflip is False
    assert bundle.description == (
        "embedded sklearn digits 8x8: 10 classes, 1618 train / 179 val (carved, seed 0)"
    )


def test_digits_items_and_statistics():
    bundle = build_datasets(None, val_per_class=5)
    image, target = bundle.train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert isinstance(target, int)
    digits = load_digits()
    index = bundle.train.indices[0]
    assert target == digits.target[index]
    expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image)[:, :, 1], expected)

    pixels = np.round(digits.images * 255 / 16) / 255
    assert bundle.mean == DIGITS_MEAN and bundle.std == DIGITS_STD
    assert DIGITS_MEAN[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert DIGITS_STD[0] == pytest.approx(pixels.std(), abs=1e-4)


def test_digits_per_class_keeps_first_in_order():
    bundle = build_datasets(None, per_class=100, val_per_class=20, seed=3)
    assert (len(bundle.train), len(bundle.val)) == (1000, 200)
    targets = load_digits().target
    for c in range(10):
        in_class = np.flatnonzero(targets == c)
        train_ids = [i for i in bundle.train.indices if targets[i] == c]
        val_ids = [i for i in bundle.val.indices if targets[i] == c]
        assert train_ids == in_class[:100].tolist()
        assert len(val_ids) == 20 and set(val_ids) <= set(in_class[100:].tolist())


def test_digits_seed_decides_split():
    first = build_datasets(None, seed=0).val.indices
    assert build_datasets(None, seed=0).val.indices == first
    assert build_datasets(None, seed=1).val.indices != first


# --- ImageFolder layouts and splits


def test_per_class_keeps_first_sorted_names_and_val_from_rest(make_image_folder):
    root = make_image_folder(per_class=10)
    bundle = build_datasets(root, per_class=3, val_per_class=4, seed=0)
    assert (len(bundle.train), len(bundle.val)) == (9, 12)
    all_names = [f"img_{n:02d}.jpg" for n in range(10)]
    train, val = _names(bundle.train), _names(bundle.val)
    for class_name in ("cat", "dog", "frog"):
        assert train[class_name] == all_names[:3]
        assert len(val[class_name]) == 4 and set(val[class_name]) <= set(all_names[3:])
    assert bundle.description == (
        f"ImageFolder {root}: 3 classes, 9 train (first 3 per class) / 12 val (carved, seed 0)"
    )


def test_carved_split_disjoint_stratified_and_seeded(make_image_folder):
    root = make_image_folder(per_class=10)
    bundle = build_datasets(root, val_fraction=0.2, seed=0)
    train_paths = {p for p, _ in bundle.train.samples}
    val_paths = {p for p, _ in bundle.val.samples}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 30
    assert Counter(bundle.val.targets) == {0: 2, 1: 2, 2: 2}
    assert Counter(bundle.train.targets) == {0: 8, 1: 8, 2: 8}
    assert build_datasets(root, val_fraction=0.2, seed=0).val.samples == bundle.val.samples
    assert build_datasets(root, val_fraction=0.2, seed=1).val.samples != bundle.val.samples

    # at least one validation image per class, however small the fraction
    assert Counter(build_datasets(root, val_fraction=0.01).val.targets) == {0: 1, 1: 1, 2: 1}


def test_imagefolder_defaults_and_items(make_image_folder):
    bundle = build_datasets(make_image_folder())
    assert bundle.class_names == ["cat", "dog", "frog"] and bundle.num_classes == 3
    assert bundle.mean == tuple(IMAGENET_DEFAULT_MEAN)
    assert bundle.std == tuple(IMAGENET_DEFAULT_STD)
    assert bundle.default_hflip is True
    image, target = bundle.train[0]
    assert image.mode == "RGB" and image.size == (16, 16) and target == 0

    custom = build_datasets(make_image_folder(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.25, 0.25, 0.25)


def test_train_and_val_folders(tmp_path):
    write_image_folder(tmp_path / "train", per_class=5)
    write_image_folder(tmp_path / "val", per_class=2)
    bundle = build_datasets(tmp_path, per_class=4)
    assert (len(bundle.train), len(bundle.val)) == (12, 6)
    expected = f"12 train (first 4 per class) / 6 val (from {tmp_path / 'val'})"
    assert bundle.description.endswith(expected)
    first_four = [f"img_{n:02d}.jpg" for n in range(4)]
    assert all(names == first_four for names in _names(bundle.train).values())


def test_train_folder_without_val_is_carved(tmp_path):
    write_image_folder(tmp_path / "train", per_class=5)
    bundle = build_datasets(tmp_path, val_per_class=1)
    assert (len(bundle.train), len(bundle.val)) == (12, 3)
    assert all(str(tmp_path / "train") in p for p, _ in bundle.val.samples)


def test_val_classes_must_match(tmp_path):
    write_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    write_image_folder(tmp_path / "val", classes=("cat", "emu"), per_class=2)
    with pytest.raises(UserError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        build_datasets(tmp_path)


def test_hidden_folders_are_not_classes(make_image_folder):
    root = make_image_folder()
    (root / ".ipynb_checkpoints").mkdir()
    assert build_datasets(root).class_names == ["cat", "dog", "frog"]


def _error_case(tmp_path: Path, case: str) -> tuple[Path, dict]:
    root = tmp_path / "data"
    if case == "missing":
        return root, {}
    if case == "file":
        root.write_bytes(b"x")
        return root, {}
    root.mkdir()
    if case == "no class folders":
        (root / "a.jpg").write_bytes(b"x")
    elif case == "empty class":
        write_image_folder(root, classes=("cat", "dog"), per_class=2)
        (root / "emu").mkdir()
        (root / "emu" / "notes.txt").write_text("not an image")
    elif case == "one class":
        write_image_folder(root, classes=("cat",), per_class=2)
    elif case != "empty":
        write_image_folder(root, per_class=4)
    options = {
        "per_class 0": {"per_class": 0},
        "too few for per_class": {"per_class": 4},
        "too few for val": {"val_per_class": 4},
        "val_fraction": {"val_fraction": 1.0},
        "bad_images": {"bad_images": "ignore"},
    }
    return root, options.get(case, {})


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "does not exist: pass --data DIR"),
        ("file", "is a file, not a folder"),
        ("empty", "is empty"),
        ("no class folders", "has no class folders"),
        ("empty class", "emu' has no images"),
        ("one class", "has 1 class folder ('cat'); classification needs at least 2"),
        ("per_class 0", "per_class must be at least 1, got 0"),
        ("too few for per_class", "has 4 images, fewer than the 4 training plus 1 validation"),
        ("too few for val", "has 4 images, fewer than the 1 training plus 4 validation"),
        ("val_fraction", "val_fraction must be between 0 and 1"),
        ("bad_images", "bad_images must be one of fail, skip, got 'ignore'"),
    ],
)
def test_user_errors(tmp_path, case, words):
    root, options = _error_case(tmp_path, case)
    with pytest.raises(UserError) as error:
        build_datasets(root, **options)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_per_class_beyond_class_size_with_val_folder(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3)
    write_image_folder(tmp_path / "val", per_class=1)
    with pytest.raises(UserError, match="has 3 images, fewer than per_class=5"):
        build_datasets(tmp_path, per_class=5)


# --- corrupt files


def test_corrupt_image_fail_and_skip(make_image_folder, caplog):
    root = make_image_folder(per_class=4)
    bad = root / "cat" / "img_00.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)

    failing = build_datasets(root, per_class=2, val_per_class=1)
    assert failing.train.samples[0][0] == str(bad)
    with pytest.raises(UserError, match="pass --bad-images skip to skip such files") as error:
        failing.train[0]
    assert str(bad) in str(error.value)

    skipping = build_datasets(root, per_class=2, val_per_class=1, bad_images="skip")
    with caplog.at_level(logging.WARNING, logger="gctkd.data.datasets"):
        image, target = skipping.train[0]
        skipping.train[0]
    assert image.size == (16, 16) and target == 0
    assert np.array_equal(np.asarray(image), np.asarray(skipping.train[1][0]))
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1


def test_corrupt_image_in_worker_gives_one_line(make_image_folder):
    root = make_image_folder(per_class=4)
    bad = root / "cat" / "img_00.jpg"
    bad.write_bytes(b"garbage")
    bundle = build_datasets(root, per_class=2, val_per_class=1)
    transform = build_transform(16, training=False, mean=bundle.mean, std=bundle.std, hflip=0.0)
    loader = build_loader(
        TransformedDataset(bundle.train, transform), batch_size=2, training=False, workers=1,
        seed=0,
    )  # fmt: skip
    with pytest.raises(UserError) as error:
        list(loader)
    message = str(error.value)
    assert message.startswith(f"cannot decode image '{bad}'") and "\n" not in message
    assert "--bad-images skip" in message
    del error, loader
    gc.collect()


def test_all_images_corrupt_under_skip(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"garbage")
    dataset = ImageFileDataset([(str(path), 0)], ["a"], bad_images="skip")
    with pytest.raises(UserError, match="none of the 1 images could be decoded"):
        dataset[0]


def test_datasets_pickle(make_image_folder):
    for bundle in (build_datasets(None), build_datasets(make_image_folder())):
        transform = build_transform(16, training=True, mean=bundle.mean, std=bundle.std, hflip=0.5)
        wrapped = bundle.with_transform(transform, transform)
        for dataset in (bundle.train, wrapped.train):
            copy = pickle.loads(pickle.dumps(dataset))
            assert len(copy) == len(dataset)
            assert copy[0][1] == dataset[0][1]


# --- transforms


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("image_size", [8, 32])
def test_transform_shapes(training, image_size):
    bundle = build_datasets(None, val_per_class=2)
    transform = build_transform(
        image_size, training=training, mean=bundle.mean, std=bundle.std, hflip=0.5,
        auto_augment="rand-m9-mstd0.5-inc1" if training else None, re_prob=0.25,
    )  # fmt: skip
    image, target = TransformedDataset(bundle.train, transform)[3]
    assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
    assert target == bundle.train.targets[3]


def test_small_eval_keeps_whole_image(make_image_folder):
    image, _ = build_datasets(make_image_folder()).val[0]
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    tensor = build_transform(16, training=False, mean=mean, std=std, hflip=0.0)(image)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(tensor, (expected - 0.5) / 0.5)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"hflip": 1.5}, "hflip is a probability"),
        ({"re_prob": -0.1}, "re_prob is a probability"),
        ({"scale": (0.0, 1.0)}, "scale must satisfy"),
        ({"auto_augment": "bogus-m9"}, "auto_augment 'bogus-m9' is not a timm"),
    ],
)
def test_transform_errors(options, words):
    kwargs = {"training": True, "mean": DIGITS_MEAN, "std": DIGITS_STD, "hflip": 0.5, **options}
    with pytest.raises(UserError, match=words):
        build_transform(8, **kwargs)


# --- loaders


def test_loader_is_reproducible_with_workers():
    bundle = build_datasets(None, per_class=10, val_per_class=2)
    transform = build_transform(8, training=True, mean=bundle.mean, std=bundle.std, hflip=0.5)
    dataset = TransformedDataset(bundle.train, transform)

    def epochs(seed: int) -> list[torch.Tensor]:
        loader = build_loader(dataset, batch_size=16, training=True, workers=2, seed=seed)
        assert loader.persistent_workers and loader.drop_last
        return [torch.cat([images for images, _ in loader]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (96, 3, 8, 8)


def test_loader_order_and_drop_last():
    bundle = build_datasets(None, per_class=10, val_per_class=2)
    transform = build_transform(8, training=False, mean=bundle.mean, std=bundle.std, hflip=0.0)
    dataset = TransformedDataset(bundle.train, transform)

    def order(seed: int, **options) -> list[int]:
        loader = build_loader(
            dataset, batch_size=32, training=True, workers=0, seed=seed, **options
        )
        return [i for _, targets in loader for i in targets.tolist()]

    assert order(0) == order(0) and order(0) != order(5)
    assert len(order(0)) == 96 and len(order(0, drop_last=False)) == 100

    whole = build_loader(dataset, batch_size=100, training=True, workers=0, seed=0)
    assert not whole.drop_last and len(_targets(whole)) == 100
    val = build_loader(dataset, batch_size=32, training=False, workers=0, seed=0)
    assert not val.drop_last and _targets(val) == bundle.train.targets


def test_loader_errors():
    dataset = build_datasets(None, per_class=5, val_per_class=1).train
    with pytest.raises(UserError, match=r"batch size 64 is larger than the training dataset \(50"):
        build_loader(dataset, batch_size=64, training=True, workers=0, seed=0)
    with pytest.raises(UserError, match="batch size must be at least 1"):
        build_loader(dataset, batch_size=0, training=False, workers=0, seed=0)
    with pytest.raises(UserError, match="workers must be 0 or more"):
        build_loader(dataset, batch_size=8, training=False, workers=-1, seed=0)


# --- archives


def test_cifar_dir_is_an_imagefolder(cifar_dir):
    bundle = build_datasets(cifar_dir, per_class=20, val_per_class=5)
    assert bundle.class_names == CIFAR_CLASSES
    assert (len(bundle.train), len(bundle.val)) == (200, 50)
    assert all(n == [f"{i:04d}.jpg" for i in range(20)] for n in _names(bundle.train).values())
    image, _ = bundle.val[0]
    assert image.mode == "RGB" and image.size == (32, 32)


def test_extract_window_and_idempotent(cifar_archive, tmp_path, monkeypatch):
    first = extract_imagefolder_subset(cifar_archive, tmp_path / "first", per_class=3)
    window = extract_imagefolder_subset(
        cifar_archive, tmp_path / "window", per_class=3, skip_per_class=3
    )
    assert sorted(p.name for p in Path(first).iterdir() if p.is_dir()) == CIFAR_CLASSES
    for class_name in CIFAR_CLASSES:
        assert sorted(os.listdir(Path(first) / class_name)) == ["0000.jpg", "0001.jpg", "0002.jpg"]
        assert sorted(os.listdir(Path(window) / class_name)) == ["0003.jpg", "0004.jpg", "0005.jpg"]
    with tarfile.open(cifar_archive, "r:gz") as tar:
        original = tar.extractfile("train/airplane/0004.jpg").read()
    assert (Path(window) / "airplane" / "0004.jpg").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["first", "window"]

    # a second call returns without opening the archive
    monkeypatch.setattr(archive_module.tarfile, "open", None)
    assert extract_imagefolder_subset(cifar_archive, tmp_path / "first", per_class=3) == first
    with pytest.raises(UserError, match="does not hold this subset"):
        extract_imagefolder_subset(cifar_archive, tmp_path / "first", per_class=4)


def _write_tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar.gz of regular files (bytes) and symlinks (None), in the order given."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_from_unsorted_archive(tmp_path):
    order = [5, 1, 7, 0, 3, 6, 2, 4]
    members = [(f"train/{c}/{n}.png", f"{c}{n}".encode()) for n in order for c in ("a", "b")]
    members += [("train/a/notes.txt", b"x"), ("README", b"x"), ("train/a/deep/9.png", b"x")]
    archive = _write_tar(tmp_path / "shuffled.tar.gz", members)
    dest = extract_imagefolder_subset(archive, tmp_path / "out", per_class=3, skip_per_class=2)
    dest = Path(dest)
    for c in ("a", "b"):
        assert sorted(os.listdir(dest / c)) == ["2.png", "3.png", "4.png"]
        assert (dest / c / "3.png").read_bytes() == f"{c}3".encode()
    everything = extract_imagefolder_subset(archive, tmp_path / "all", per_class=None)
    assert sorted(os.listdir(Path(everything) / "a")) == [f"{n}.png" for n in range(8)]
    with pytest.raises(UserError, match="only 6 images after the first 2, and 7 are needed"):
        extract_imagefolder_subset(archive, tmp_path / "more", per_class=7, skip_per_class=2)
    assert not (tmp_path / "more").exists()


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("../evil.jpg", b"x", "points outside its folder"),
        ("train/a/../../../evil.jpg", b"x", "points outside its folder"),
        ("/tmp/evil.jpg", b"x", "absolute path"),
        ("train/a/link.jpg", None, "not a regular file"),
    ],
)
def test_extract_refuses_malicious_members(tmp_path, name, data, words):
    members = [("train/a/0.jpg", b"x"), ("train/b/0.jpg", b"x"), (name, data)]
    archive = _write_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(UserError, match=words):
        extract_imagefolder_subset(archive, tmp_path / "out" / "dest", per_class=1)
    assert os.listdir(tmp_path / "out") == []
    assert not (tmp_path / "evil.jpg").exists()


def test_extract_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        extract_imagefolder_subset(tmp_path / "none.tar.gz", tmp_path / "d", per_class=1)
    (tmp_path / "plain.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read archive"):
        extract_imagefolder_subset(tmp_path / "plain.tar.gz", tmp_path / "d", per_class=1)
    archive = _write_tar(tmp_path / "other.tar.gz", [("val/a/0.jpg", b"x")])
    with pytest.raises(UserError, match="has no images under 'train/<class>/'"):
        extract_imagefolder_subset(archive, tmp_path / "d", per_class=1)
    with pytest.raises(UserError, match="per_class must be at least 1"):
        extract_imagefolder_subset(archive, tmp_path / "d", per_class=0)
    assert sorted(os.listdir(tmp_path)) == ["other.tar.gz", "plain.tar.gz"]
