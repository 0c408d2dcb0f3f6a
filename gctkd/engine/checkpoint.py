"""Checkpoints: plain data written atomically, read without executing code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts with a format tag and
a version. It is written with ``torch.save`` to a temporary file beside the target and
renamed, so a crash mid-save leaves the previous file intact, and read with
``torch.load(weights_only=True)``, which refuses any pickle that would build arbitrary
objects or run code.

A run folder holds ``last.pt`` (the full state: weights, EMA, optimizer, scaler, RNG states
and the position in the epoch, what ``--resume`` reads), ``best.pt`` (the exported weights of
the best validation epoch) and, with ``--keep-last K``, the K newest step-numbered copies of
``last.pt`` in ``checkpoints/`` (hard links where the file system allows, else copies).
"""

import logging
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gctkd-checkpoint"
# version 2 added the resume state (position in the epoch, RNG states) and "raw_model"
CHECKPOINT_VERSION = 2
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
STEP_FOLDER = "checkpoints"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def _fsync_folder(folder: Path) -> None:
    # the rename is durable once the folder's entry is on disk; not every OS can open folders
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _read_umask() -> int:
    # read once at import, while no other thread creates files
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# what open() would give; mkstemp's own files are private (0600) whatever the umask
_FILE_MODE = 0o666 & ~_read_umask()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, _FILE_MODE)
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise UserError(
            f"cannot write checkpoint '{path}' ({error.strerror or error}); the previous one is "
            "kept: free disk space or fix the folder's permissions, then --resume the run"
        ) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def step_checkpoint_path(run_dir: str | Path, global_step: int) -> Path:
    """``RUN/checkpoints/step-<global_step>.pt``."""
    return Path(run_dir) / STEP_FOLDER / f"step-{global_step:08d}.pt"


def _replace_with_link(source: Path, target: Path) -> bool:
    """Point ``target`` at ``source``'s data atomically; False where hard links fail."""
    temporary = target.parent / f".{target.name}.{os.getpid()}.link"
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        return False
    _fsync_folder(target.parent)
    return True


def prune_step_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step-numbered checkpoints; returns the deleted."""
    folder = Path(run_dir) / STEP_FOLDER
    if not folder.is_dir():
        return []
    numbered = sorted(
        (int(match.group(1)), entry)
        for entry in folder.iterdir()
        if (match := _STEP_FILE.match(entry.name))
    )
    doomed = [entry for _, entry in numbered[: max(len(numbered) - keep_last, 0)]]
    for entry in doomed:
        entry.unlink(missing_ok=True)
        _logger.debug(f"removed old checkpoint {entry}")
    return doomed


def save_last(state: dict[str, Any], run_dir: str | Path, keep_last: int = 0) -> Path:
    """Write ``RUN/last.pt``; with ``keep_last`` > 0 also a step-numbered copy, K kept.

    The step file is written first (atomically) and ``last.pt`` then replaced by a hard link
    to it, so a crash at any point leaves a loadable ``last.pt``: the old one or the new one.
    """
    run_dir = Path(run_dir)
    last = run_dir / LAST_NAME
    if keep_last <= 0:
        return save_checkpoint(state, last)
    step_path = step_checkpoint_path(run_dir, int(state["global_step"]))
    step_path.parent.mkdir(exist_ok=True)
    save_checkpoint(state, step_path)
    if not _replace_with_link(step_path, last):
        save_checkpoint(state, last)
    prune_step_checkpoints(run_dir, keep_last)
    return last


def capture_rng_states() -> dict[str, Any]:
    """The random states of Python, NumPy, torch (and CUDA) as plain data and tensors."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the random states :func:`capture_rng_states` recorded."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state((
        "MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
        numpy["has_gauss"], numpy["gauss"],
    ))  # fmt: skip
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


def _file_head(path: Path) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(4)


def _is_pickle(path: Path) -> bool:
    # a pickle of protocol 2 or later opens with the PROTO opcode
    head = _file_head(path)
    return head[:1] == b"\x80" or head == _ZIP_MAGIC


def _refusal_reason(error: Exception) -> str:
    """What torch's weights-only loader refused (a Python object, an opcode), in a few words."""
    text = str(error)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it references the Python object {named.group(1)}"
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        return f"pickle opcode {opcode.group(1)} is not allowed"
    return "it holds pickled Python objects"


def require_file(path: str | Path, option: str, expected: str) -> Path:
    """``path`` when it is a non-empty file; else a UserError saying what ``option`` takes."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not there"
        raise UserError(f"{option} '{path}' is {what}: pass {expected}")
    if path.stat().st_size == 0:
        raise UserError(f"{option} '{path}' is an empty file: pass {expected}")
    return path


def read_torch_file(path: str | Path, option: str, expected: str, kind: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, or one UserError naming the problem.

    Tensors and plain data only: a pickle that would build any other Python object is refused
    by torch before anything runs. ``expected`` says what the option takes and ``kind`` what
    the file should have been ("checkpoint", "weights file"), for the messages.
    """
    path = require_file(path, option, expected)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it then refuses anyway; the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _is_pickle(path):
            raise UserError(
                f"{option} '{path}' was refused: it is not made of tensors and plain data only "
                f"({_refusal_reason(error)}) and gctkd never runs code from a file: pass "
                f"{expected}"
            ) from None
        reason = "neither a torch archive nor a pickle"
    except Exception as error:  # noqa: BLE001 - any failure to parse means "not readable"
        if _file_head(path) == _ZIP_MAGIC:
            first_line = (str(error).splitlines() or [""])[0]
            reason = "a damaged torch archive: " + (first_line[:160] or type(error).__name__)
        else:
            # torch's own message for such files is a bare number or a parser detail
            reason = "neither a torch archive nor a pickle"
    raise UserError(f"{option} '{path}' is not a readable {kind} ({reason}): pass {expected}")


def resolve_checkpoint(path: str | Path, prefer: str = BEST_NAME, option: str = "--from") -> Path:
    """A checkpoint file from a run folder (its ``prefer`` file) or a file path."""
    path = Path(path)
    if path.is_dir():
        candidate = path / prefer
        if not candidate.is_file():
            other = path / (LAST_NAME if prefer == BEST_NAME else BEST_NAME)
            if not other.is_file():
                raise UserError(
                    f"{option} '{path}' is a folder without {BEST_NAME} or {LAST_NAME}: "
                    "pass a gctkd run folder or a checkpoint file"
                )
            candidate = other
        return candidate
    if not path.is_file():
        raise UserError(f"{option} '{path}' does not exist: pass a gctkd run folder or .pt file")
    return path


# what to do instead when a file holds plain weights rather than a gctkd checkpoint
_PLAIN_WEIGHTS_HINTS = {
    "--teacher": " (a plain state dict or .safetensors file: pass --teacher-model NAME "
    "--teacher-weights FILE instead)",
    "--from": " (finetune continues a gctkd run; plain weights can serve as a teacher: "
    "gctkd distill --teacher-model NAME --teacher-weights FILE)",
}


def load_checkpoint(path: str | Path, option: str = "--from") -> dict[str, Any]:
    """Read a gctkd checkpoint safely onto the CPU; a UserError for anything else."""
    path = Path(path)
    state = read_torch_file(path, option, "the best.pt or last.pt of a gctkd run", "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{option} '{path}' is not a gctkd checkpoint: pass the best.pt or last.pt of a "
            f"gctkd run{_PLAIN_WEIGHTS_HINTS.get(option, '')}"
        )
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise UserError(
            f"{option} '{path}' was written by a newer gctkd (checkpoint version "
            f"{state['version']}); upgrade gctkd to read it"
        )
    return state
