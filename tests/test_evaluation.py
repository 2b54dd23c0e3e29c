"""`hpcrl.evaluation`: greedy episodes, split over ranks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from hpcrl.envs import make_env
from hpcrl.evaluation import greedy_episode_returns


def optimal_q(env: gym.Env, gamma: float = 0.99, sweeps: int = 500) -> np.ndarray:
    """Q* of a toy-text env by value iteration over its own transition table (closes it)."""
    transitions = env.unwrapped.P
    n_states, n_actions = int(env.observation_space.n), int(env.action_space.n)
    env.close()
    q = np.zeros((n_states, n_actions))
    for _ in range(sweeps):
        v = q.max(axis=1)
        for s in range(n_states):
            for a in range(n_actions):
                q[s, a] = sum(
                    p * (r + gamma * (0.0 if term else v[s2]))
                    for p, s2, r, term in transitions[s][a]
                )
    return q


def frozen_lake_optimal_q() -> np.ndarray:
    """Q* of slippery FrozenLake 4x4."""
    return optimal_q(make_env("FrozenLake-v1"))


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


@pytest.mark.parametrize(
    "env_id,env_kwargs,cap",
    [
        ("FrozenLake-v1", {"map_name": "8x8"}, 10_000),
        ("FrozenLake-v1", {"desc": generate_random_map(size=12, seed=4)}, 10_000),
        ("hpcrl/FrozenLake-v0", {"desc": generate_random_map(size=12, seed=4)}, 10_000),
        ("CliffWalking-v1", {"is_slippery": True}, 120),
        ("Taxi-v4", {"is_rainy": True}, 10_000),
    ],
    ids=["8x8", "generated", "hpcrl-generated", "cliffwalking-cut", "taxi"],
)
def test_table_stepped_returns_equal_the_episode_loops(monkeypatch, env_id, env_kwargs, cap):
    """`actions_episode_returns` steps these envs' episodes side by side from the table:
    bit-identical returns to `policy_episode_returns`'s loop over gymnasium's env, for a
    deterministic policy (greedy in Q* on the lakes, random elsewhere: episodes that end,
    hit the time limit, or the cap), over more episodes than one chunk, with a split and
    unordered episode ids."""
    from hpcrl import evaluation
    from hpcrl.evaluation import actions_episode_returns, policy_episode_returns

    env = make_env(env_id, env_kwargs)
    n_states, n_actions = int(env.observation_space.n), int(env.action_space.n)
    env.close()
    if "FrozenLake" in env_id:  # greedy in Q*: some episodes reach the goal, some fall in
        actions = np.argmax(optimal_q(make_env("FrozenLake-v1", env_kwargs)), axis=1)
    else:
        actions = np.random.default_rng(7).integers(n_actions, size=n_states)
    ids = np.random.default_rng(8).permutation(300)[:90]
    one = policy_episode_returns(env_id, env_kwargs, lambda s: actions[s], ids, 5, cap)
    monkeypatch.setattr(evaluation, "_TABLE_CHUNK", 32)
    side = actions_episode_returns(env_id, env_kwargs, actions, ids, 5, cap)
    np.testing.assert_array_equal(side, one)
    assert len(set(one.tolist())) > 1


def test_table_stepped_evaluation_stops_when_asked(monkeypatch):
    """`stop` ends the side-by-side episodes as it ends the loop: only whole chunks done
    before it said True are returned."""
    from hpcrl import evaluation
    from hpcrl.evaluation import actions_episode_returns

    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2

    monkeypatch.setattr(evaluation, "_TABLE_CHUNK", 10)
    returns = actions_episode_returns(
        "FrozenLake8x8-v1", {}, np.zeros(64, dtype=np.int64), np.arange(50), 0, stop=stop
    )
    assert len(returns) == 20


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
