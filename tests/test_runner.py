"""`hpcrl.runner` pieces that need no launcher."""

from __future__ import annotations

import numpy as np

from hpcrl.runner import solved_line


def _episodes(returns) -> dict:
    n = len(returns)
    return {
        "return": np.asarray(returns, dtype=np.float64),
        "env_steps": np.arange(1, n + 1) * 100,
        "wall_time": np.arange(1, n + 1) * 0.5,
    }


def test_solved_line_shows_a_small_threshold_s_mean_without_rounding_it_below():
    """FrozenLake8x8's threshold is 0.85: a mean of 0.85 must not print as 0.8."""
    line = solved_line(_episodes([0.0] * 30 + [1.0] * 17 + [0.0] * 3), "FrozenLake8x8-v1")
    assert line.startswith("reached a mean return of 0.85 >= 0.85"), line
    assert "4,700 env steps" in line


def test_solved_line_when_not_reached_gives_the_best_window():
    line = solved_line(_episodes([100.0] * 25), "CartPole-v1")
    assert line == (
        "did not reach CartPole-v1's reward threshold 475: best mean return over 20 "
        "training episodes 100"
    )
