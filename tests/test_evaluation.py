"""`hpcrl.evaluation`: greedy episodes, split over ranks."""

from __future__ import annotations

import gymnasium as gym
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


def test_batched_returns_equal_the_one_episode_at_a_time_returns():
    """Episodes side by side (one batched policy call per step) give the same returns as
    `policy_episode_returns`, episode by episode, with episodes of different lengths."""
    from hpcrl.evaluation import batched_policy_returns, policy_episode_returns

    def policy(obs):  # pushes the cart towards the pole's lean, with a bias: 28-51 steps
        return (np.asarray(obs)[..., 2] > 0.02).astype(np.int64)

    calls = []

    def batched(obs):
        calls.append(len(obs))
        return policy(obs)

    one = policy_episode_returns("CartPole-v1", {}, policy, np.arange(7), seed=11)
    side = batched_policy_returns("CartPole-v1", {}, batched, 7, seed=11)
    np.testing.assert_array_equal(side, one)
    assert len(set(one)) > 1 and calls[0] == 7 and calls[-1] < 7  # finished ones drop out


def _eval_ctx(tmp_path, interval: int, resume=None):
    import types

    from hpcrl.config import build_config

    cfg = build_config(
        {"algo": "impala", "env_id": "CartPole-v1", "eval_interval": interval}
        | {"periodic_eval_episodes": 2}
    )
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    spaces = {
        "observation_space": gym.spaces.Box(-1, 1, (4,)),
        "action_space": gym.spaces.Discrete(2),
    }
    return types.SimpleNamespace(cfg=cfg, run_dir=tmp_path, world_size=3, resume=resume, **spaces)


def test_periodic_eval_keeps_the_best_and_resumes_from_it(tmp_path):
    import types

    from hpcrl.storage.checkpoints import list_checkpoints, load_checkpoint
    from hpcrl.topologies.periodic_eval import PeriodicEval

    peval = PeriodicEval(_eval_ctx(tmp_path, 1000))
    assert peval.threshold == 475.0 and peval.solved == 0
    assert [peval.due(s) for s in (0, 999, 1000)] == [False, False, True]
    left = lambda obs: np.zeros(len(obs), dtype=np.int64)  # noqa: E731 - falls in ~10 steps
    steer = lambda obs: (np.asarray(obs)[:, 2] + np.asarray(obs)[:, 3] > 0).astype(np.int64)  # noqa: E731
    bad = peval.run(1200, left, lambda: {"params/w": np.zeros(2)}, 3)
    assert not peval.due(1999) and peval.due(2000)
    assert peval.take()["eval/best_mean_return"] == bad and peval.take() == {}
    good = peval.run(2100, steer, lambda: {"params/w": np.ones(2)}, 7)
    worse = peval.run(3000, left, lambda: {"params/w": np.full(2, 5.0)}, 9)
    assert good > bad == worse
    assert peval.solved == int(good >= 475)  # the evaluations that reached the threshold
    # ... while the training episodes did too: a lucky greedy evaluation does not count.
    (tmp_path / "lucky").mkdir()
    lucky = PeriodicEval(_eval_ctx(tmp_path / "lucky", 1000))
    steady = lambda obs: (np.asarray(obs)[:, 2] * 10 + np.asarray(obs)[:, 3] > 0).astype(np.int64)  # noqa: E731
    assert lucky.run(1000, steady, lambda: {"w": np.zeros(1)}, 1, training_mean=242.0) >= 475
    assert lucky.solved == 0
    lucky.run(2000, steady, lambda: {"w": np.zeros(1)}, 2, training_mean=490.0)
    assert lucky.solved == 1
    arrays, meta = load_checkpoint(tmp_path / "checkpoints" / "best.h5")
    np.testing.assert_array_equal(arrays["params/w"], np.ones(2))  # the best, not the last
    assert meta["env_steps"] == 2100 and meta["eval_mean_return"] == good
    assert meta["learner_updates"] == 7 and meta["config"]["eval_interval"] == 1000
    assert list_checkpoints(tmp_path / "checkpoints") == []  # never a resume point
    assert peval.summary() == {"best_eval_mean_return": good, "best_eval_env_steps": 2100}
    assert peval.due(3000, final=False) is False and peval.due(3500, final=True)
    # A resumed run starts from the recorded best: only a better mean replaces best.h5.
    resume = types.SimpleNamespace(meta={"solved_evaluations": 2})
    again = PeriodicEval(_eval_ctx(tmp_path, 1000, resume=resume), env_steps=3500)
    assert again.best_mean == good and again.next_at == 4000 and again.solved == 2
    again.run(4000, left, lambda: {"params/w": np.zeros(2)}, 11)
    assert load_checkpoint(tmp_path / "checkpoints" / "best.h5")[1]["env_steps"] == 2100
    assert not PeriodicEval(_eval_ctx(tmp_path, 0)).due(10**9, final=True)
