"""`hpcrl.schedules`."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrl.schedules import linear_schedule


def test_linear_schedule():
    assert linear_schedule(1.0, 0.1, 0.5, 0.0) == pytest.approx(1.0)
    assert linear_schedule(1.0, 0.1, 0.5, 0.25) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 0.5, 0.5) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.5, 1.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 1.0, 1.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.0, 0.0) == pytest.approx(0.1)
    assert linear_schedule(1.0, 0.1, 0.0, 0.7) == pytest.approx(0.1)


def test_linear_schedule_is_monotone_between_ends():
    values = [linear_schedule(2.0, 0.5, 0.6, p) for p in np.linspace(0.0, 1.0, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] == pytest.approx(2.0)
    assert values[-1] == pytest.approx(0.5)
