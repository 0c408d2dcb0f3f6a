"""The run folder: created without touching anyone's files, replaced only when asked.

``--overwrite`` moves the old run aside and deletes it only after the new run has finished;
a failed run puts it back (:func:`settle_replaced`).
"""

import logging
import os
import shutil
import time
from pathlib import Path

from gctkd.engine.checkpoint import BEST_NAME, LAST_NAME, STEP_FOLDER
from gctkd.errors import UserError


def default_run_dir(out: str | None, command: str) -> Path:
    """``--out``, or ``runs/<command>-<date>-<time>``."""
    if out:
        return Path(out)
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


# what a gctkd run folder holds; --overwrite replaces a folder only when it holds nothing else
RUN_ENTRIES = frozenset(
    {"config.yaml", "tensorboard", BEST_NAME, LAST_NAME, "metrics.jsonl", "summary.json",
     "train.log", "checkpoints"}
)


def is_gctkd_run(run_dir: Path) -> bool:
    names = {entry.name for entry in run_dir.iterdir() if not entry.name.startswith(".")}
    return "config.yaml" in names and names <= RUN_ENTRIES


def prepare_run_dir(
    out: str | None, command: str, overwrite: bool, sources: dict[str, str | None] | None = None
) -> tuple[Path, Path | None]:
    """Create the run folder; never write into someone's existing files unasked.

    Returns the folder and, with ``--overwrite``, where the run it replaces was moved: the
    old run is only deleted once the new one has finished (:func:`settle_replaced`).
    ``sources`` maps options to the paths the run reads (``--from``, ``--teacher``, ...): a
    run may not replace the folder it reads from.
    """
    run_dir = default_run_dir(out, command)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out '{run_dir}' is a file: pass a folder for the run")
    replaced = None
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out '{run_dir}' exists and is not empty: pass another folder, or --overwrite "
                "to replace that run"
            )
        if not is_gctkd_run(run_dir):
            raise UserError(
                f"--out '{run_dir}' holds files that are not a gctkd run's; --overwrite only "
                "replaces gctkd runs: pass an empty or new folder"
            )
        for option, source in (sources or {}).items():
            if source is not None and _inside(Path(source), run_dir):
                raise UserError(
                    f"--out '{run_dir}' holds {option} '{source}', which this run reads: "
                    "--overwrite would replace it; write the new run to another folder"
                )
        replaced = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        os.replace(run_dir, replaced)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        if replaced is not None:
            os.replace(replaced, run_dir)
        raise UserError(
            f"--out '{run_dir}' cannot be written ({error.strerror}): pass a writable folder"
        ) from None
    return run_dir, replaced


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def settle_replaced(run_dir: Path, replaced: Path | None, succeeded: bool) -> None:
    """Delete the replaced run after a success; put it back after a failure."""
    if replaced is None:
        return
    if succeeded:
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(replaced, run_dir)


def attach_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("gctkd").addHandler(handler)
    return handler


def close_file_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("gctkd").removeHandler(handler)
        handler.close()


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of a save that a kill interrupted (the finished files are intact)."""
    for folder in (run_dir, run_dir / STEP_FOLDER):
        if folder.is_dir():
            for entry in folder.glob(".*.pt.*"):
                if entry.suffix in (".tmp", ".link"):
                    entry.unlink(missing_ok=True)
