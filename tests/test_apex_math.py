"""`hpcrl.algos.apex_learner`: n-step double-Q targets, the importance-weighted loss and the
priorities, against hand computations on tiny fixed Q-networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcrl.algos.apex_learner import (
    PRIORITY_EPSILON,
    actor_priorities,
    double_q_targets,
    prioritized_loss,
)


class TableQ(torch.nn.Module):
    """Q(s, ·) = table[s] for integer observations."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float64))

    def forward(self, obs):
        return self.table[obs.long()]


ONLINE = [[1.0, 3.0], [5.0, 2.0], [0.0, 0.0]]
TARGET = [[10.0, 20.0], [30.0, 40.0], [7.0, 7.0]]


def test_double_q_targets_take_the_online_argmax_and_the_target_value():
    """s' = 0: online argmax is action 1, target value 20; s' = 1: action 0, value 30;
    a terminated transition (discount 0) keeps its return alone."""
    y = double_q_targets(
        TableQ(ONLINE),
        TableQ(TARGET),
        torch.tensor([0, 1, 1]),
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        torch.tensor([0.9**3, 0.81, 0.0], dtype=torch.float64),
    )
    np.testing.assert_allclose(y.numpy(), [1.0 + 0.729 * 20.0, 2.0 + 0.81 * 30.0, 3.0])


def test_loss_is_weighted_huber_and_priorities_are_abs_td():
    q = torch.tensor([1.0, 4.0, -2.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.5, 1.0, -2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    loss, priorities = prioritized_loss(q, y, w)
    # Huber: 0.5 δ² for |δ| < 1, |δ| - 0.5 beyond; δ = 0.5, -3, 0
    assert loss.item() == pytest.approx((1.0 * 0.125 + 0.5 * 2.5 + 0.0) / 3)
    np.testing.assert_allclose(priorities, np.array([0.5, 3.0, 0.0]) + PRIORITY_EPSILON)
    loss.backward()
    # d/dq of w Huber(q - y) / 3: w δ / 3 inside, w sign(δ) / 3 outside
    np.testing.assert_allclose(q.grad.numpy(), [1.0 * -0.5 / 3, 0.5 * 1.0 / 3, 0.0])


def test_actor_priorities_are_the_learners_for_the_same_parameters():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    transitions = {
        "obs": np.array([0, 1]),
        "action": np.array([1, 0]),
        "reward": np.array([1.0, -1.0]),
        "next_obs": np.array([1, 2]),
        "discount": np.array([0.5, 0.0]),
    }
    # y = 1 + 0.5 * 30 = 16 against Q(0, 1) = 3; y = -1 against Q(1, 0) = 5
    np.testing.assert_allclose(
        actor_priorities(online, target, transitions), np.array([13.0, 6.0]) + PRIORITY_EPSILON
    )
