"""`hpcrl.evaluation`: greedy episodes, split over ranks."""

from __future__ import annotations

import numpy as np

from hpcrl.envs import make_env
from hpcrl.evaluation import greedy_episode_returns


def frozen_lake_optimal_q(gamma: float = 0.99, sweeps: int = 500) -> np.ndarray:
    """Q* of slippery FrozenLake 4x4 by value iteration over the env's own transition table."""
    env = make_env("FrozenLake-v1")
    transitions = env.unwrapped.P
    env.close()
    q = np.zeros((16, 4))
    for _ in range(sweeps):
        v = q.max(axis=1)
        for s in range(16):
            for a in range(4):
                q[s, a] = sum(
                    p * (r + gamma * (0.0 if term else v[s2]))
                    for p, s2, r, term in transitions[s][a]
                )
    return q


def test_greedy_returns_do_not_depend_on_the_split():
    q = frozen_lake_optimal_q()
    ids = np.arange(20)
    together = greedy_episode_returns("FrozenLake-v1", {}, q, ids, seed=11)
    evens = greedy_episode_returns("FrozenLake-v1", {}, q, ids[0::2], seed=11)
    odds = greedy_episode_returns("FrozenLake-v1", {}, q, ids[1::2], seed=11)
    reassembled = np.empty(len(ids))
    reassembled[0::2], reassembled[1::2] = evens, odds
    np.testing.assert_array_equal(reassembled, together)
    reversed_ids = greedy_episode_returns("FrozenLake-v1", {}, q, ids[::-1], seed=11)
    np.testing.assert_array_equal(reversed_ids[::-1], together)
    # A slippery lake under a good policy: some episodes reach the goal, some do not.
    assert set(together.tolist()) == {0.0, 1.0}


def test_greedy_evaluation_of_a_looping_policy_ends():
    """CliffWalking has no time limit; an all-zero table keeps choosing UP at the start and
    never terminates, so evaluation must cut each episode at `max_episode_steps`."""
    q_table = np.zeros((48, 4))
    returns = greedy_episode_returns(
        "CliffWalking-v1", {}, q_table, np.arange(2), 0, max_episode_steps=50
    )
    assert returns.tolist() == [-50.0, -50.0]
