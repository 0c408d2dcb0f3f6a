"""Knobs: training settings that follow the cyclical factor xi.

A knob is a constant or an ``EASY:HARD`` pair. Its value at xi is the paper's Eq. 1::

    value = xi * easy + (1 - xi) * hard

so xi = 1 gives the easy value and xi = 0 the hard one. Which value is "easy" belongs to
the knob (small weight decay, a sharp softmax, a low clip threshold); the user writes the
easy value first. Every user-facing name comes from :data:`KNOBS`: the option
(``--weight-decay``), the YAML key (``weight_decay``) and the TensorBoard tag
(``knob/weight_decay``), so the CLI, configs and logs cannot drift apart.
"""

import math
from dataclasses import dataclass
from typing import Any, Iterable

from gctkd.cycle import CycleWindow
from gctkd.errors import UserError


@dataclass(frozen=True)
class KnobSpec:
    """What a knob is and which values it accepts.

    Args:
        name: the YAML key and the tag suffix, e.g. ``weight_decay``.
        help: one sentence for ``--help``, saying which end is easy.
        minimum: the smallest valid value.
        minimum_inclusive: whether ``minimum`` itself is valid.
        maximum: the largest valid value (inclusive), or None.
        commands: the commands that use the knob.
    """

    name: str
    help: str
    minimum: float = 0.0
    minimum_inclusive: bool = True
    maximum: float | None = None
    commands: tuple[str, ...] = ("pretrain", "finetune", "distill")

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def tag(self) -> str:
        return f"knob/{self.name}"

    def check(self, value: float) -> None:
        """Raise a UserError when ``value`` is outside the knob's range."""
        too_small = value < self.minimum or (not self.minimum_inclusive and value == self.minimum)
        too_large = self.maximum is not None and value > self.maximum
        if math.isfinite(value) and not too_small and not too_large:
            return
        low = ">=" if self.minimum_inclusive else ">"
        bound = f"{low} {self.minimum:g}"
        if self.maximum is not None:
            bound += f" and <= {self.maximum:g}"
        raise UserError(f"{self.option} must be {bound}, got {value:g}")


@dataclass(frozen=True)
class KnobRange:
    """A knob's easy and hard values; equal values make a constant."""

    easy: float
    hard: float

    @property
    def is_cyclical(self) -> bool:
        return self.easy != self.hard

    def at(self, xi: float) -> float:
        """The value at cyclical factor xi (1 easy, 0 hard): paper Eq. 1."""
        return xi * self.easy + (1.0 - xi) * self.hard

    def __str__(self) -> str:
        return f"{self.easy:g}:{self.hard:g}" if self.is_cyclical else f"{self.easy:g}"


KNOBS: dict[str, KnobSpec] = {}


def register_knob(spec: KnobSpec) -> KnobSpec:
    if spec.name in KNOBS:
        raise ValueError(f"knob {spec.name!r} is registered twice")
    KNOBS[spec.name] = spec
    return spec


for _spec in (
    KnobSpec("weight_decay", "Weight decay (CWD) of the decaying groups: small is easy."),
    KnobSpec(
        "temperature",
        "Softmax temperature of the training loss (CST): logits / T, low T is easy.",
        minimum_inclusive=False,
    ),
    KnobSpec(
        "clip",
        "Gradient clip threshold (CGC) for --clip-mode: low is easy; unset means no clipping.",
        minimum_inclusive=False,
    ),
    KnobSpec(
        "momentum",
        "SGD momentum (first beta for Adam-style optimizers): small is easy.",
        maximum=0.999,
    ),
    KnobSpec(
        "kd_temperature",
        "Distillation temperature: low is easy, high shows which classes the teacher finds close.",
        minimum_inclusive=False,
        commands=("distill",),
    ),
    KnobSpec("kd_weight", "Weight of the KD loss.", commands=("distill",)),
    KnobSpec("label_weight", "Weight of the label (cross-entropy or focal) loss.", commands=("distill",)),
    KnobSpec(
        "feature_weight",
        "Weight of the feature losses, with --feature-layers (then default 0.3 for mse, 1 for at).",
        commands=("distill",),
    ),
):
    register_knob(_spec)


def _number(text: Any, spec: KnobSpec) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UserError(
            f"{spec.option} takes a number or EASY:HARD (e.g. 1e-4:1e-3), got {text!r}"
        ) from None


def parse_knob(name: str, value: Any) -> KnobRange:
    """Parse a knob value from the command line or YAML and check its range.

    Accepts a number, ``"VALUE"``, ``"EASY:HARD"``, a two-item list ``[easy, hard]`` or a
    mapping ``{easy: .., hard: ..}``.
    """
    spec = KNOBS[name]
    if isinstance(value, KnobRange):
        easy, hard = value.easy, value.hard
    elif isinstance(value, dict):
        unknown = set(value) - {"easy", "hard"}
        if unknown or "easy" not in value or "hard" not in value:
            raise UserError(f"{spec.name} as a mapping needs exactly the keys easy and hard")
        easy, hard = _number(value["easy"], spec), _number(value["hard"], spec)
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise UserError(f"{spec.name} as a list needs two values [easy, hard], got {value}")
        easy, hard = _number(value[0], spec), _number(value[1], spec)
    elif isinstance(value, str) and ":" in value:
        parts = value.split(":")
        if len(parts) != 2:
            raise UserError(f"{spec.option} takes VALUE or EASY:HARD, got {value!r}")
        easy, hard = _number(parts[0], spec), _number(parts[1], spec)
    else:
        easy = hard = _number(value, spec)
    spec.check(easy)
    spec.check(hard)
    return KnobRange(easy, hard)


class KnobSchedule:
    """Knob values as a pure function of the run's progress.

    Resuming restores progress and recomputes: the values that are applied, logged and
    checkpointed come from this one place.

    Args:
        window: the part of the cycle the run covers.
        knobs: active knobs by name.
        extra_xi_tags: names of settings driven by xi directly (e.g. the focal mix), logged
            as ``knob/<name>`` with the value xi.
    """

    def __init__(
        self,
        window: CycleWindow,
        knobs: dict[str, KnobRange],
        extra_xi_tags: Iterable[str] = (),
    ) -> None:
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}; known: {sorted(KNOBS)}")
        self.window = window
        self.knobs = dict(knobs)
        self.extra_xi_tags = tuple(extra_xi_tags)

    def values(self, progress: float) -> dict[str, float]:
        """``{"xi": .., <knob>: ..}`` at the run's progress in [0, 1]."""
        xi = self.window.xi(progress)
        values = {"xi": xi}
        for name, knob in self.knobs.items():
            values[name] = knob.at(xi)
        for name in self.extra_xi_tags:
            values[name] = xi
        return values

    def describe(self) -> str:
        parts = [f"{name}={knob}" for name, knob in self.knobs.items()]
        window = self.window
        return (
            f"cycle f_c={window.cyclical_factor:g} window {window.start:g}..{window.end:g}; "
            + ", ".join(parts)
        )

