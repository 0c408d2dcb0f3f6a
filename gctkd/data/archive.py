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
import uuid
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from torchvision.datasets.folder import IMG_EXTENSIONS

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

MARKER_NAME = ".gctkd-extracted.json"

# bytes of skipped images held in memory instead of written and deleted again
_MEMORY_BUDGET = 256 * 2**20


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


class _SubsetWriter:
    """Keeps, per class, the ``keep_first`` smallest file names offered so far.

    The archive order is free: a file is deleted as soon as smaller names push it out. Files
    ranked below ``skip`` (those a sorted archive will never need) stay in memory while
    ``memory_budget`` bytes allow, so they cost no disk writes.
    """

    def __init__(self, work: Path, skip: int, keep_first: int | None, memory_budget: int):
        self.work = work
        self.skip = skip
        self.keep_first = keep_first
        self.memory_budget = memory_budget
        self.names: dict[str, list[str]] = {}
        self._held: dict[tuple[str, str], bytes] = {}
        self._held_bytes = 0
        self._made_dirs: set[str] = set()

    def offer(self, class_name: str, file_name: str, source: IO[bytes]) -> None:
        """Considers one image; ``source`` is read only when the image is kept."""
        names = self.names.setdefault(class_name, [])
        position = bisect.bisect_left(names, file_name)
        if position < len(names) and names[position] == file_name:
            # a repeated member: the later copy wins, as with tar itself
            self._drop(class_name, file_name)
            self._store(class_name, file_name, source.read(), hold=position < self.skip)
            return
        if self.keep_first is not None and position >= self.keep_first:
            return

        names.insert(position, file_name)
        self._store(class_name, file_name, source.read(), hold=position < self.skip)
        if position < self.skip < len(names):
            self._release(class_name, names[self.skip])
        if self.keep_first is not None and len(names) > self.keep_first:
            self._drop(class_name, names.pop())

    def finish(self) -> dict[str, list[str]]:
        """Drops the skipped names and returns the kept names of each class."""
        for class_name, names in self.names.items():
            for file_name in names[: self.skip]:
                self._drop(class_name, file_name)
        return {name: names[self.skip :] for name, names in self.names.items()}

    def _path(self, class_name: str, file_name: str) -> Path:
        return self.work / class_name / file_name

    def _write(self, class_name: str, file_name: str, data: bytes) -> None:
        if class_name not in self._made_dirs:
            (self.work / class_name).mkdir(exist_ok=True)
            self._made_dirs.add(class_name)
        self._path(class_name, file_name).write_bytes(data)

    def _store(self, class_name: str, file_name: str, data: bytes, hold: bool) -> None:
        if hold and self._held_bytes + len(data) <= self.memory_budget:
            self._held[(class_name, file_name)] = data
            self._held_bytes += len(data)
        else:
            self._write(class_name, file_name, data)

    def _release(self, class_name: str, file_name: str) -> None:
        data = self._held.pop((class_name, file_name), None)
        if data is not None:
            self._held_bytes -= len(data)
            self._write(class_name, file_name, data)

    def _drop(self, class_name: str, file_name: str) -> None:
        data = self._held.pop((class_name, file_name), None)
        if data is not None:
            self._held_bytes -= len(data)
        else:
            self._path(class_name, file_name).unlink(missing_ok=True)


def _stream_subset(archive: str, writer: _SubsetWriter, root_parts: list[str]) -> None:
    """Offers every image under ``root/<class>/`` of the archive to ``writer``, in one pass."""
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
            writer.offer(parts[-2], parts[-1], tar.extractfile(member))


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
    # not tempfile.mkdtemp: its 0700 mode would stay on dest after the rename
    work = dest_path.parent / f".{dest_path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        keep_first = None if per_class is None else skip_per_class + per_class
        writer = _SubsetWriter(work, skip_per_class, keep_first, _MEMORY_BUDGET)
        try:
            _stream_subset(str(archive_path), writer, root_parts)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise UserError(
                f"cannot read archive '{archive_path}' as a tar.gz ({error}): check the file"
            ) from error
        names_by_class = writer.finish()
        if not names_by_class:
            raise UserError(
                f"archive '{archive_path}' has no images under '{request['root']}/<class>/': "
                "pass the folder that holds the class folders as root"
            )

        counts = {}
        for class_name, names in sorted(names_by_class.items()):
            if not names or (per_class is not None and len(names) < per_class):
                raise UserError(
                    f"class {class_name!r} in '{archive_path}' has only {len(names)} images "
                    f"after the first {skip_per_class}, and {per_class or 1} are needed: "
                    "lower per_class or skip_per_class"
                )
            counts[class_name] = len(names)

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
