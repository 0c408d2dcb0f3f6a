"""The cyclical factor xi: where a run stands between the easy and the hard end of training.

Smith (2022), "General Cyclical Training of Neural Networks", section 3: every knob follows
one factor that is 1 at the easy end and 0 at the hard end. With progress p in [0, 1] and
the cyclical factor ``cyclical_factor`` (f_c >= 1)::

    xi(p) = 1 - f_c * p                 if p <= 1 / f_c
    xi(p) = (f_c * p - 1) / (f_c - 1)   otherwise

The published code compares ``f_c * e`` with E but divides by E - 1, which drives xi below
zero for a non-integer f_c; this formula never leaves [0, 1].

A run may cover only part of a cycle (pretraining the first half, fine-tuning the second):
a :class:`CycleWindow` maps the run's own progress onto the cycle's progress, and its
``state_dict`` is what checkpoints record so that ``gctkd finetune --from`` continues it.
"""

from dataclasses import asdict, dataclass
from typing import Any

from gctkd.errors import UserError

PROGRESS_UNITS = ("step", "epoch", "sample")


def cyclical_xi(progress: float, cyclical_factor: float) -> float:
    """The cyclical factor xi for cycle progress in [0, 1]: 1 is easy, 0 is hard.

    Args:
        progress: fraction of the cycle done, clipped to [0, 1].
        cyclical_factor: f_c >= 1; 1 runs easy to hard, 2 is a symmetric V.
    """
    if cyclical_factor < 1:
        raise UserError(
            f"cyclical factor must be >= 1, got {cyclical_factor}: use 1 for easy-to-hard, "
            "2 for easy-hard-easy"
        )
    progress = min(max(progress, 0.0), 1.0)
    turn = 1.0 / cyclical_factor
    if progress <= turn:
        return max(0.0, 1.0 - cyclical_factor * progress)
    return min(1.0, (cyclical_factor * progress - 1.0) / (cyclical_factor - 1.0))


def run_progress(done: float, total: float) -> float:
    """Progress of a run in [0, 1] from 0 at the first update to 1 at the last.

    Args:
        done: updates (steps, epochs or samples) completed before this one.
        total: updates the run makes; the last one has ``done = total - 1``.

    NOTE: the last update sits at ``total - 1``, as in the paper's ``e / (E - 1)``, so the
    final step of a run sees exactly the end of its window. A run of one update stays at 0.
    """
    if total <= 1:
        return 0.0
    return min(max(done / (total - 1), 0.0), 1.0)


@dataclass(frozen=True)
class CycleWindow:
    """The part of one cycle a run covers.

    Args:
        cyclical_factor: f_c of the whole cycle.
        start: cycle progress at the run's first update, in [0, 1].
        end: cycle progress at the run's last update, in [start, 1].
    """

    cyclical_factor: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.cyclical_factor < 1:
            raise UserError(
                f"--cyclical-factor must be >= 1, got {self.cyclical_factor}: use 1 for "
                "easy-to-hard, 2 for easy-hard-easy"
            )
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise UserError(
                f"cycle window must satisfy 0 <= start <= end <= 1, got start={self.start}, "
                f"end={self.end}"
            )

    def cycle_progress(self, progress: float) -> float:
        """Cycle progress for the run's own progress in [0, 1]."""
        return self.start + (self.end - self.start) * progress

    def xi(self, progress: float) -> float:
        """xi for the run's own progress in [0, 1]."""
        return cyclical_xi(self.cycle_progress(progress), self.cyclical_factor)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CycleWindow":
        return cls(
            cyclical_factor=float(state.get("cyclical_factor", 1.0)),
            start=float(state.get("start", 0.0)),
            end=float(state.get("end", 1.0)),
        )


def continuation_window(recorded_xi: float) -> CycleWindow:
    """The window that takes xi from a recorded value back to the easy end, linearly.

    A pretraining run with f_c = 1 is the first half of a V-shaped cycle (f_c = 2) and
    ends at xi = 0; fine-tuning is the second half. For any recorded xi the rising half of
    the f_c = 2 cycle has xi = 2p - 1, so the continuation starts at p = (1 + xi) / 2.
    """
    recorded_xi = min(max(recorded_xi, 0.0), 1.0)
    return CycleWindow(cyclical_factor=2.0, start=(1.0 + recorded_xi) / 2.0, end=1.0)
