"""TensorBoard events of a run, written while it trains."""

import logging
from pathlib import Path
from types import TracebackType

from torch.utils.tensorboard import SummaryWriter

_logger = logging.getLogger(__name__)


class RunLogger:
    """Scalars into ``RUN/tensorboard``; flushed every few seconds so a live view updates.

    Args:
        run_dir: the run folder.
        flush_seconds: how often pending events reach the file.
        purge_step: for a resumed run, the first step it logs: TensorBoard hides the events
            at this step and later that the interrupted process wrote after its checkpoint,
            so each step appears once.
    """

    def __init__(
        self, run_dir: Path, flush_seconds: int = 10, purge_step: int | None = None
    ) -> None:
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), flush_secs=flush_seconds, purge_step=purge_step
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.writer.close()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass
