"""Checkpoints: plain data written atomically, read without executing code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts with a format tag and
a version. It is written with ``torch.save`` to a temporary file beside the target and
renamed, so a crash mid-save leaves the previous file intact, and read with
``torch.load(weights_only=True)``, which refuses any pickle that would build arbitrary
objects or run code.
"""

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from gctkd.errors import UserError

_logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gctkd-checkpoint"
CHECKPOINT_VERSION = 1
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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


def load_checkpoint(path: str | Path, option: str = "--from") -> dict[str, Any]:
    """Read a gctkd checkpoint safely onto the CPU; a UserError for anything else."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0][:160]
        raise UserError(
            f"{option} '{path}' was refused: it holds objects other than tensors and plain data "
            f"({reason}); only gctkd checkpoints are loaded, never code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"{option} '{path}' is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{option} '{path}' is not a gctkd checkpoint: pass the best.pt or last.pt of a "
            "gctkd run (timm weights: use a gctkd run, or load them with --pretrained)"
        )
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise UserError(
            f"{option} '{path}' was written by a newer gctkd (checkpoint version "
            f"{state['version']}); upgrade gctkd to read it"
        )
    return state
