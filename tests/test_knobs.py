"""Knobs: parsing EASY:HARD, range checks, and each knob's value at the first, middle and last step."""

import pytest

from gctkd.cycle import CycleWindow, run_progress
from gctkd.errors import UserError
from gctkd.knobs import KNOBS, KnobRange, KnobSchedule, parse_knob


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1e-4:1e-3", KnobRange(1e-4, 1e-3)),
        ("0.5", KnobRange(0.5, 0.5)),
        (2, KnobRange(2.0, 2.0)),
        ([4, 10], KnobRange(4.0, 10.0)),
        ({"easy": 0.5, "hard": 2}, KnobRange(0.5, 2.0)),
    ],
)
def test_parse_forms(value, expected):
    assert parse_knob("temperature", value) == expected


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("weight_decay", "-1e-4:1e-3", "--weight-decay must be >= 0, got -0.0001"),
        ("temperature", "0:2", "--temperature must be > 0, got 0"),
        ("kd_temperature", "-1", "--kd-temperature must be > 0"),
        ("clip", "0", "--clip must be > 0"),
        ("momentum", "0.9:1.5", "--momentum must be >= 0 and <= 0.999, got 1.5"),
        ("temperature", "a:b", "takes a number or EASY:HARD"),
        ("temperature", "1:2:3", "takes VALUE or EASY:HARD"),
        ("temperature", "nan", "--temperature must be > 0, got nan"),
        ("temperature", [1, 2, 3], "needs two values"),
    ],
)
def test_invalid_values_name_the_option(name, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_knob(name, value)


def test_value_is_paper_eq1():
    knob = KnobRange(easy=1e-4, hard=1e-3)
    assert knob.at(1.0) == 1e-4
    assert knob.at(0.0) == 1e-3
    assert knob.at(0.25) == pytest.approx(0.25 * 1e-4 + 0.75 * 1e-3)
    assert str(knob) == "0.0001:0.001"
    assert str(KnobRange(3, 3)) == "3" and not KnobRange(3, 3).is_cyclical


RANGES = {
    "weight_decay": (1e-4, 1e-3),
    "temperature": (0.5, 2.0),
    "clip": (4.0, 10.0),
    "momentum": (0.85, 0.95),
    "kd_temperature": (1.0, 8.0),
    "kd_weight": (0.5, 1.0),
    "label_weight": (1.0, 0.1),
    "feature_weight": (0.0, 2.0),
}


@pytest.mark.parametrize("name", sorted(KNOBS))
@pytest.mark.parametrize(
    "factor, at_middle", [(1.0, 0.5), (2.0, 0.0)]  # xi at the middle step of 11
)
def test_every_knob_first_middle_last_step(name, factor, at_middle):
    easy, hard = RANGES[name]
    schedule = KnobSchedule(CycleWindow(factor), {name: KnobRange(easy, hard)})
    steps = 11
    first, middle, last = (schedule.values(run_progress(s, steps)) for s in (0, 5, 10))
    assert first[name] == pytest.approx(easy)
    assert middle[name] == pytest.approx(at_middle * easy + (1 - at_middle) * hard)
    assert last[name] == pytest.approx(hard if factor == 1.0 else easy)
    assert (first["xi"], last["xi"]) == (1.0, 0.0 if factor == 1.0 else 1.0)


def test_every_registered_knob_has_a_test_range():
    assert set(RANGES) == set(KNOBS)


def test_schedule_logs_xi_driven_settings():
    schedule = KnobSchedule(CycleWindow(2.0), {}, extra_xi_tags=("focal",))
    assert schedule.values(0.25) == {"xi": 0.5, "focal": 0.5}
