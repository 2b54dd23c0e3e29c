"""`hpcrl.table_vector` (issue 16): the table-stepped toy-text envs are bit-identical to a
same-step `SyncVectorEnv` of gymnasium's own envs with the same seeds and actions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from hpcrl.errors import UserError
from hpcrl.table_vector import BLOCK, TableVectorEnv

CASES = {
    "frozenlake4x4": ("FrozenLake-v1", {}),
    "frozenlake8x8": ("FrozenLake8x8-v1", {}),
    "frozenlake8x8-not-slippery": ("FrozenLake8x8-v1", {"is_slippery": False}),
    "cliffwalking": ("CliffWalking-v1", {}),
    "taxi": ("Taxi-v4", {}),
    "taxi-rainy": ("Taxi-v4", {"is_rainy": True}),
    "generated-20x20": ("FrozenLake-v1", {"desc": generate_random_map(size=20, seed=3)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_sync_vector_env(case):
    env_id, kwargs = CASES[case]
    copies, steps = 16, 10_000
    ours = TableVectorEnv(env_id, kwargs, copies)
    theirs = SyncVectorEnv(
        [lambda: gym.make(env_id, **kwargs) for _ in range(copies)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    obs, _ = ours.reset(seed=7)
    want, _ = theirs.reset(seed=7)
    np.testing.assert_array_equal(obs, want)
    actions = np.random.default_rng(0).integers(0, ours.single_action_space.n, (steps, copies))
    ended = 0
    for t in range(steps):
        obs, rewards, terminated, truncated, info = ours.step(actions[t])
        want_obs, want_rewards, want_term, want_trunc, want_info = theirs.step(actions[t])
        np.testing.assert_array_equal(obs, want_obs, err_msg=f"step {t}")
        np.testing.assert_array_equal(rewards, want_rewards, err_msg=f"step {t}")
        np.testing.assert_array_equal(terminated, want_term, err_msg=f"step {t}")
        np.testing.assert_array_equal(truncated, want_trunc, err_msg=f"step {t}")
        done = want_term | want_trunc
        if done.any():
            ended += int(done.sum())
            np.testing.assert_array_equal(info["_final_obs"], want_info["_final_obs"])
            np.testing.assert_array_equal(info["final_obs"][done], want_info["final_obs"][done])
        else:
            assert "final_obs" not in info
    assert ended > copies  # episodes ended, resets drew from the same streams
    assert steps > BLOCK  # the uniforms were refilled many times
    theirs.close()


MAP_30 = generate_random_map(size=30, p=0.8, seed=5)
GRID_CASES = {
    "slippery": {"desc": MAP_30, "max_episode_steps": 200},
    "not-slippery": {"desc": MAP_30, "is_slippery": False, "max_episode_steps": 200},
    "success-rate": {"desc": MAP_30, "success_rate": 0.6, "reward_schedule": (2, -1, 0)},
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_hpcrl_frozen_lake_is_gymnasiums_frozen_lake_without_its_table(case):
    """`hpcrl/FrozenLake-v0` (steps from the map, `hpcrl.frozen_lake`), one env at a time
    and table-stepped, against gymnasium's FrozenLake-v1 of the same map, bit for bit."""
    kwargs, copies, steps = GRID_CASES[case], 4, 10_000
    theirs, single = (
        SyncVectorEnv(
            [lambda env_id=env_id: gym.make(env_id, **kwargs) for _ in range(copies)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        for env_id in ("FrozenLake-v1", "hpcrl/FrozenLake-v0")
    )
    ours = TableVectorEnv("hpcrl/FrozenLake-v0", kwargs, copies)
    assert not hasattr(gym.make("hpcrl/FrozenLake-v0", **kwargs).unwrapped, "P")
    want = theirs.reset(seed=11)[0]
    np.testing.assert_array_equal(ours.reset(seed=11)[0], want)
    np.testing.assert_array_equal(single.reset(seed=11)[0], want)
    actions = np.random.default_rng(1).integers(0, 4, (steps, copies))
    ended = 0
    for t in range(steps):
        want = theirs.step(actions[t])
        for got in (ours.step(actions[t]), single.step(actions[t])):
            for i in range(4):  # obs, rewards, terminated, truncated
                np.testing.assert_array_equal(got[i], want[i], err_msg=f"step {t}")
        ended += int(want[2].sum())
    assert ended > copies  # holes (and goals) reached, resets drawn


def test_hpcrl_frozen_lake_generates_a_million_cells_without_a_table():
    from hpcrl.frozen_lake import GridFrozenLake

    env = gym.make("hpcrl/FrozenLake-v0", size=1000, p=0.8, map_seed=3)
    assert isinstance(env.unwrapped, GridFrozenLake) and env.observation_space.n == 10**6
    assert env.unwrapped.desc[0, 0] == b"S" and env.unwrapped.desc[-1, -1] == b"G"
    env.reset(seed=0)
    env.step(2)


def test_truncation_and_termination_together_as_time_limit():
    """A copy that terminates on its last allowed step reports both flags, as `TimeLimit`."""
    env = TableVectorEnv("FrozenLake-v1", {"is_slippery": False}, 1)
    env.max_episode_steps = 6  # the shortest path to the goal of the 4x4 map is 6 steps
    env.reset(seed=0)
    for action in (1, 1, 2, 2, 1):  # down, down, right, right, down
        _, _, terminated, truncated, _ = env.step([action])
        assert not (terminated[0] or truncated[0])
    _, reward, terminated, truncated, info = env.step([2])  # right, onto the goal
    assert reward[0] == 1.0 and terminated[0] and truncated[0]
    assert info["final_obs"][0] == 15


@pytest.mark.parametrize(
    ("env_id", "kwargs", "pattern"),
    [
        ("CartPole-v1", {}, "no transition table P"),
        ("Taxi-v4", {"fickle_passenger": True}, "fickle passenger"),
    ],
)
def test_envs_it_cannot_step_are_one_line(env_id, kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        TableVectorEnv(env_id, kwargs, 2)


def test_stepper_state_round_trip_continues_bit_identically():
    """A checkpoint in the middle of episodes and of the uniform blocks: a new stepper
    loaded from it steps on exactly as the original does."""
    from hpcrl.envs import EnvStepper, make_vector_env

    def stepper():
        return EnvStepper(make_vector_env("FrozenLake8x8-v1", {}, 8, vector_env="table"), seed=3)

    actions = np.random.default_rng(1).integers(0, 4, (700, 8))
    first = stepper()
    for t in range(300):  # past one block of 256 uniforms
        first.step(actions[t])
    state = first.state_dict()
    assert state["env_rng"].shape == (8, 6) and (state["env_rng"][:, :4] != 0).all()
    second = stepper()
    assert second.load_state_dict(state, fallback_seed=99)
    for t in range(300, 700):
        a, b = first.step(actions[t]), second.step(actions[t])
        for name in ("obs", "next_obs", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        np.testing.assert_array_equal(a.episode_returns, b.episode_returns)


@pytest.mark.parametrize(
    ("env_id", "env_kwargs", "backend"),
    [
        ("FrozenLake8x8-v1", {}, "table"),
        ("FrozenLake-v1", {"map_name": None, "desc": None}, "table"),  # a generated map
        ("CliffWalking-v1", {}, "table"),
        ("Taxi-v4", {"is_rainy": True}, "table"),
        ("Taxi-v4", {"fickle_passenger": True}, "sync"),  # draws twice a step
        ("CartPole-v1", {}, "sync"),
        ("hpcrl/FrozenLake-v0", {"size": 12}, "table"),
    ],
)
def test_auto_picks_the_table_only_where_it_is_exact(env_id, env_kwargs, backend):
    from hpcrl.envs import make_vector_env, resolve_vector_env

    assert resolve_vector_env(env_id, env_kwargs) == backend
    envs = make_vector_env(env_id, env_kwargs, 2)  # "auto" is the default
    assert isinstance(envs, TableVectorEnv) == (backend == "table")
    envs.close()


@pytest.mark.parametrize(
    ("size", "p"), [(2, 0.5), (3, 0.8), (8, 0.5), (8, 0.8), (20, 0.7), (50, 0.9), (200, 0.8)]
)
def test_generated_maps_are_gymnasiums(size, p):
    """`hpcrl.frozen_lake` checks a map's path with scipy, not gymnasium's Python search,
    and must still keep exactly the map gymnasium keeps for the same seed."""
    from hpcrl.frozen_lake import _generate, generated_map

    for seed in range(4):
        assert _generate(size, p, seed) == generate_random_map(size, p, seed), seed
    assert generated_map(size, p, 1) == generate_random_map(size, p, 1)


def test_map_cells_is_numpys_char_array_of_the_map():
    """`map_cells` (one pass over rows of str) gives what `np.asarray(desc, dtype="c")`
    gives, for a list, a tuple and an array, and falls back to it for anything else."""
    from hpcrl.frozen_lake import generated_map, map_cells

    for desc in (["SFFF", "FHFH", "FFFH", "HFFG"], generated_map(60, 0.8, 3)):
        for form in (desc, tuple(desc), np.asarray(desc, dtype="c")):
            cells = map_cells(form)
            assert cells.dtype == np.dtype("S1") and cells.flags.writeable
            np.testing.assert_array_equal(cells, np.asarray(desc, dtype="c"))
    with pytest.raises(ValueError):
        map_cells(["SF", "FFG"])  # rows of unequal length, as numpy refuses them
