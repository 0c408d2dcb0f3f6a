"""The cyclical factor xi: GCT.md section 1 test vectors, windows and continuation."""

import pytest

from gctkd.cycle import CycleWindow, continuation_window, cyclical_xi, run_progress
from gctkd.errors import UserError

EPOCHS = (0, 1, 2, 3, 5, 7, 10)
VECTORS = {
    1: (1, 0.9, 0.8, 0.7, 0.5, 0.3, 0),
    2: (1, 0.8, 0.6, 0.4, 0, 0.4, 1),
    4: (1, 0.6, 0.2, 0.0667, 0.3333, 0.6, 1),
}


@pytest.mark.parametrize("factor", sorted(VECTORS))
def test_gct_vectors_per_epoch(factor):
    for epoch, expected in zip(EPOCHS, VECTORS[factor]):
        xi = cyclical_xi(run_progress(epoch, 11), factor)
        assert xi == pytest.approx(expected, abs=5e-5), (factor, epoch)


@pytest.mark.parametrize("factor", sorted(VECTORS))
def test_gct_vectors_per_step(factor):
    # per step, a run of 101 steps passes through the same progress values as 11 epochs
    for epoch, expected in zip(EPOCHS, VECTORS[factor]):
        xi = cyclical_xi(run_progress(epoch * 10, 101), factor)
        assert xi == pytest.approx(expected, abs=5e-5)


def test_non_integer_factor_stays_in_range():
    # the published code gives -0.056 here (f_c = 1.9, E = 10, e = 5)
    values = [cyclical_xi(run_progress(e, 10), 1.9) for e in range(10)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[5] == pytest.approx((1.9 * 5 / 9 - 1) / 0.9)


def test_continuous_at_turn_and_ends_easy():
    for factor in (1.5, 2.0, 3.0, 7.0):
        turn = 1 / factor
        assert cyclical_xi(turn, factor) == pytest.approx(0.0, abs=1e-12)
        assert cyclical_xi(turn + 1e-9, factor) == pytest.approx(0.0, abs=1e-6)
        assert cyclical_xi(1.0, factor) == 1.0
    assert cyclical_xi(1.0, 1.0) == 0.0


def test_factor_below_one_is_an_input_error():
    with pytest.raises(UserError, match="cyclical factor must be >= 1"):
        cyclical_xi(0.5, 0.9)
    with pytest.raises(UserError, match="--cyclical-factor"):
        CycleWindow(cyclical_factor=0.5)


def test_run_progress_edges():
    assert run_progress(0, 1) == 0.0
    assert run_progress(0, 5) == 0.0
    assert run_progress(4, 5) == 1.0
    assert run_progress(9, 5) == 1.0


def test_window_maps_run_onto_cycle():
    first_half = CycleWindow(2.0, 0.0, 0.5)
    assert [first_half.xi(p) for p in (0.0, 0.5, 1.0)] == [1.0, 0.5, 0.0]
    # pretraining with f_c = 1 over a whole run is the first half of the f_c = 2 cycle
    whole = CycleWindow(1.0)
    for p in (0.0, 0.3, 0.7, 1.0):
        assert whole.xi(p) == pytest.approx(first_half.xi(p))


@pytest.mark.parametrize("recorded", [0.0, 0.2, 0.5])
def test_continuation_goes_from_recorded_xi_back_to_easy(recorded):
    window = continuation_window(recorded)
    assert window.xi(0.0) == pytest.approx(recorded)
    assert window.xi(0.5) == pytest.approx((recorded + 1) / 2)
    assert window.xi(1.0) == 1.0


def test_window_state_round_trip():
    window = CycleWindow(4.0, 0.25, 0.75)
    assert CycleWindow.from_state_dict(window.state_dict()) == window
    assert CycleWindow.from_state_dict({}) == CycleWindow()
    with pytest.raises(UserError, match="start <= end"):
        CycleWindow(2.0, 0.8, 0.2)
