"""`hpcrl.envs`: make_env's errors, Discrete sizes, EnvStepper's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import single_line
from hpcrl.envs import EnvStepper, discrete_sizes, make_env, make_vector_env
from hpcrl.errors import UserError


def test_make_env_unknown_id():
    with pytest.raises(UserError) as exc:
        make_env("NoSuch-v0")
    assert "'NoSuch-v0'" in single_line(exc)


def test_make_env_suggests_close_ids():
    with pytest.raises(UserError) as exc:
        make_env("FrozenLake-v2")
    assert "'FrozenLake-v1'" in single_line(exc)


def test_make_env_rejected_kwargs():
    with pytest.raises(UserError) as exc:
        make_env("FrozenLake-v1", {"bogus_kwarg": 1})
    assert "bogus_kwarg" in single_line(exc)


def test_discrete_sizes():
    env = make_env("CartPole-v1")
    try:
        with pytest.raises(UserError) as exc:
            discrete_sizes(env)
        assert "Box" in single_line(exc)
    finally:
        env.close()
    env = make_env("FrozenLake-v1")
    try:
        assert discrete_sizes(env) == (16, 4)
    finally:
        env.close()


FROZEN_LAKE_HOLES = {5, 7, 11, 12}


FROZEN_LAKE_GOAL = 15


def test_env_stepper_bookkeeping():
    num_envs, steps = 4, 2000
    stepper = EnvStepper(make_vector_env("FrozenLake-v1", {"is_slippery": False}, num_envs), seed=0)
    rng = np.random.default_rng(0)
    finished_lengths = np.zeros(num_envs, dtype=np.int64)
    running_return = np.zeros(num_envs)
    ends = {"goal": 0, "hole": 0}
    previous = None
    try:
        for _ in range(steps):
            batch = stepper.step(rng.integers(0, 4, num_envs))
            if previous is not None:  # transitions chain, and a finished copy restarts at 0
                expected_obs = np.where(
                    previous.terminated | previous.truncated, 0, previous.next_obs
                )
                np.testing.assert_array_equal(batch.obs, expected_obs)
            done = batch.terminated | batch.truncated
            np.testing.assert_array_equal(batch.done_envs, np.flatnonzero(done))
            np.testing.assert_array_equal(batch.rewards == 1.0, batch.next_obs == FROZEN_LAKE_GOAL)
            assert set(np.unique(batch.rewards).tolist()) <= {0.0, 1.0}
            for k in np.flatnonzero(batch.terminated):
                assert batch.next_obs[k] in FROZEN_LAKE_HOLES | {FROZEN_LAKE_GOAL}
                ends["goal" if batch.next_obs[k] == FROZEN_LAKE_GOAL else "hole"] += 1
            for k in np.flatnonzero(~batch.terminated):
                assert batch.next_obs[k] not in FROZEN_LAKE_HOLES | {FROZEN_LAKE_GOAL}
            running_return += batch.rewards
            np.testing.assert_array_equal(batch.episode_returns, running_return[batch.done_envs])
            running_return[batch.done_envs] = 0.0
            for k, length in zip(batch.done_envs, batch.episode_lengths, strict=True):
                if batch.truncated[k]:
                    assert length == 100  # FrozenLake-v1's time limit
                finished_lengths[k] += length
            previous = batch
        np.testing.assert_array_equal(finished_lengths + stepper.lengths, steps)
        np.testing.assert_array_equal(stepper.returns, running_return)
        assert ends["goal"] > 0 and ends["hole"] > 0  # both kinds of ending were exercised
    finally:
        stepper.close()
