"""Extract a per-class subset of an ImageFolder tar.gz, safely and once.

Benchmarks build their data from one archive in ImageFolder layout (``train/<class>/NNNN.jpg``,
e.g. 50,000 CIFAR-10 JPEGs): the 4K CIFAR-10 training set of Smith (2022) is the first 400 names
of each class, and a disjoint validation set the next 200 (``skip_per_class=400``).

The archive is streamed once. Files land in a temporary folder beside the destination, which is
renamed into place only when complete, with a marker file recording what it holds; a second call
with the same request returns at once.
"""

import bisect
import gzip
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from torchvision.datasets.folder import IMG_EXTENSIONS

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

MARKER_NAME = ".gctkd-extracted.json"


def _member_parts(member: tarfile.TarInfo, archive: str) -> list[str]:
    """Splits a member name into path components, refusing absolute paths and ``..``."""
    name = member.name
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or name.startswith("\\"):
        raise UserError(f"archive '{archive}' holds an absolute path {name!r}: refusing to extract")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if any(part == ".." or "\\" in part or "\0" in part for part in parts):
        raise UserError(
            f"archive '{archive}' holds a member {name!r} that points outside its folder: "
            "refusing to extract"
        )
    return parts


def _stream_subset(
    archive: str, work: Path, root_parts: list[str], keep_first: int | None
) -> dict[str, list[str]]:
    """Writes the first ``keep_first`` image names of each class into ``work``; returns them.

    The archive order is free: each class keeps its ``keep_first`` smallest names seen so far on
    disk and deletes a file as soon as a smaller name pushes it out.
    """
    names_by_class: dict[str, list[str]] = {}
    depth = len(root_parts) + 2
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = _member_parts(member, archive)
            if member.isdir() or parts[: len(root_parts)] != root_parts:
                continue
            if not member.isfile():
                raise UserError(
                    f"archive '{archive}' holds {member.name!r}, which is not a regular file "
                    "(a link or device): refusing to extract"
                )
            if len(parts) != depth or not parts[-1].lower().endswith(IMG_EXTENSIONS):
                continue

            class_name, file_name = parts[-2:]
            names = names_by_class.setdefault(class_name, [])
            position = bisect.bisect_left(names, file_name)
            is_new = position == len(names) or names[position] != file_name
            if is_new and keep_first is not None and len(names) >= keep_first:
                if file_name > names[-1]:
                    continue
            class_dir = work / class_name
            class_dir.mkdir(exist_ok=True)
            with tar.extractfile(member) as source, open(class_dir / file_name, "wb") as target:
                shutil.copyfileobj(source, target)
            if is_new:
                names.insert(position, file_name)
                if keep_first is not None and len(names) > keep_first:
                    (class_dir / names.pop()).unlink()
    return names_by_class


def _same_request(marker: Path, request: dict) -> bool:
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in request.items())


def extract_imagefolder_subset(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    per_class: int | None,
    skip_per_class: int = 0,
    root: str = "train",
) -> str:
    """Extracts, per class, a window of the sorted file names of an ImageFolder archive.

    Of the images under ``root/<class>/`` in the archive, sorted by file name, the first
    ``skip_per_class`` are skipped and the next ``per_class`` written to ``dest/<class>/``.
    Files with other extensions, or in folders below the class folders, are ignored.

    Args:
        archive: a ``.tar.gz`` holding ``root/<class>/<image>`` members.
        dest: the ImageFolder to create; its parent is created when missing.
        per_class: images to keep per class; None keeps all after the skipped ones.
        skip_per_class: images to skip per class before keeping any.
        root: folder inside the archive that holds the class folders (``/`` separated).

    Returns:
        ``dest`` as a string.

    Raises:
        UserError: a missing or unreadable archive, a member with an absolute path, a ``..``
            component or of a type other than file and folder (under ``root``), a class with too
            few images, or a ``dest`` that exists but holds something else.

    NOTE: an interrupted extraction leaves at most a hidden ``.<dest>.partial-*`` folder beside
    ``dest`` (removed on ordinary errors and Ctrl-C; left behind only if the process is killed),
    never a half-filled ``dest``.
    """
    if per_class is not None and per_class < 1:
        raise UserError(f"per_class must be at least 1 or None (all), got {per_class}")
    if skip_per_class < 0:
        raise UserError(f"skip_per_class must be 0 or more, got {skip_per_class}")
    archive_path = Path(archive).expanduser()
    dest_path = Path(dest).expanduser().absolute()
    if not archive_path.is_file():
        raise UserError(f"archive '{archive_path}' does not exist or is not a file")
    root_parts = [part for part in root.split("/") if part not in ("", ".")]
    request = {
        "archive": archive_path.name,
        "archive_bytes": archive_path.stat().st_size,
        "root": "/".join(root_parts),
        "skip_per_class": skip_per_class,
        "per_class": per_class,
    }

    marker = dest_path / MARKER_NAME
    if dest_path.exists():
        if _same_request(marker, request):
            _logger.debug(f"'{dest_path}' already holds the requested subset")
            return str(dest_path)
        raise UserError(
            f"'{dest_path}' exists but does not hold this subset of '{archive_path.name}' "
            f"(per_class={per_class}, skip_per_class={skip_per_class}): delete it or pick "
            "another destination"
        )

    dest_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.partial-", dir=dest_path.parent))
    try:
        keep_first = None if per_class is None else skip_per_class + per_class
        try:
            names_by_class = _stream_subset(str(archive_path), work, root_parts, keep_first)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise UserError(
                f"cannot read archive '{archive_path}' as a tar.gz ({error}): check the file"
            ) from error
        if not names_by_class:
            raise UserError(
                f"archive '{archive_path}' has no images under '{request['root']}/<class>/': "
                "pass the folder that holds the class folders as root"
            )

        counts = {}
        for class_name, names in sorted(names_by_class.items()):
            for name in names[:skip_per_class]:
                (work / class_name / name).unlink()
            kept = len(names) - skip_per_class
            if kept < 1 or (per_class is not None and kept < per_class):
                raise UserError(
                    f"class {class_name!r} in '{archive_path}' has {len(names)} images, too few "
                    f"to skip {skip_per_class} and keep {per_class or 'at least 1'}"
                )
            counts[class_name] = kept

        (work / MARKER_NAME).write_text(json.dumps({**request, "classes": counts}, indent=1))
        try:
            os.rename(work, dest_path)
        except OSError:
            # another process finished the same extraction first
            if not _same_request(marker, request):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _logger.info(
        f"extracted {sum(counts.values())} images of {len(counts)} classes from "
        f"'{archive_path.name}' into '{dest_path}'"
    )
    return str(dest_path)
