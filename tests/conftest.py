"""Shared fixtures: a small real CIFAR-10 ImageFolder and tiny synthetic ImageFolders."""

import sys
from pathlib import Path
from typing import NamedTuple
from typing import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

from gctkd.data.archive import extract_imagefolder_subset
from gctkd_cli.main import main

CIFAR_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / (
    "cifar10-train-jpeg.tar.gz"
)
CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
]  # fmt: skip


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The CIFAR-10 training JPEG archive (50,000 images, 5,000 per class), or a skip."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def cifar_dir(cifar_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of the first 30 CIFAR-10 training images of each class (300 images)."""
    dest = tmp_path_factory.mktemp("cifar") / "train30"
    return Path(extract_imagefolder_subset(cifar_archive, dest, per_class=30))


def write_image_folder(
    root: Path, classes: Sequence[str] = ("cat", "dog", "frog"), per_class: int = 6, size: int = 16
) -> Path:
    """Writes ``root/<class>/img_NN.jpg``: random RGB JPEGs, files created in shuffled order."""
    rng = np.random.default_rng(0)
    for class_name in classes:
        class_dir = root / class_name
        class_dir.mkdir(parents=True, exist_ok=True)
        for number in rng.permutation(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(class_dir / f"img_{number:02d}.jpg", quality=90)
    return root


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Returns ``make(name, classes, per_class, size)``, which writes an ImageFolder in tmp_path."""

    def make(
        name: str = "data",
        classes: Sequence[str] = ("cat", "dog", "frog"),
        per_class: int = 6,
        size: int = 16,
    ) -> Path:
        return write_image_folder(tmp_path / name, classes, per_class, size)

    return make


class CliResult(NamedTuple):
    """Exit code (0 on success) and stderr of one in-process ``gctkd`` run."""

    returncode: int
    stderr: str


@pytest.fixture
def gctkd_main(monkeypatch, capsys):
    """Run the console entry point in-process; returns its exit code and stderr."""

    def run(*args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["gctkd", *args])
        code = 0
        try:
            main()
        except SystemExit as stopped:
            code = stopped.code or 0
        return CliResult(code, capsys.readouterr().err)

    return run
