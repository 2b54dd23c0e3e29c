"""The native vector env backend (`vector_env: native`, `hpcrl.native_vector`): the same
MDP as gymnasium's single-env CartPole, same-step autoreset as hpcrl's steppers expect,
gymnasium's native stream with the reset steps left out, and exact capture/restore."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

from hpcrl.config import build_config
from hpcrl.envs import EnvStepper, make_vector_env
from hpcrl.errors import ConfigError, UserError
from hpcrl.native_vector import SameStepCartPoleVectorEnv, native_env_ids


def test_native_ids_are_gymnasiums_numpy_cartpoles():
    assert native_env_ids() == ["CartPole-v0", "CartPole-v1"]


def test_transitions_equal_the_single_env_from_the_same_states():
    """From each copy's state set into a gymnasium.make("CartPole-v1") copy, the same
    action gives the same observation, reward and flags (bit for bit)."""
    B = 16
    native = make_vector_env("CartPole-v1", {}, B, vector_env="native")
    obs, _ = native.reset(seed=3)
    singles = [gym.make("CartPole-v1") for _ in range(B)]
    for env in singles:
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(3000):
        state = native.unwrapped.state.T.copy()
        steps = native.unwrapped.steps.copy()
        actions = rng.integers(2, size=B)
        obs, rewards, terminated, truncated, info = native.step(actions)
        for i, env in enumerate(singles):
            env.unwrapped.state = state[i].copy()
            env.unwrapped.steps_beyond_terminated = None
            env._elapsed_steps = int(steps[i])  # TimeLimit
            o, r, term, trunc, _ = env.step(int(actions[i]))
            last = info["final_obs"][i] if terminated[i] or truncated[i] else obs[i]
            np.testing.assert_array_equal(last, o)
            assert (rewards[i], terminated[i], truncated[i]) == (r, term, trunc)
        ended += int((terminated | truncated).sum())
    assert ended > 50  # the resets were exercised


def test_stream_is_gymnasiums_native_stream_without_reset_steps():
    B, T = 8, 2000
    ours = SameStepCartPoleVectorEnv(num_envs=B)
    theirs = CartPoleVectorEnv(num_envs=B)
    ours_obs, _ = ours.reset(seed=11)
    theirs_obs, _ = theirs.reset(seed=11)
    np.testing.assert_array_equal(ours_obs, theirs_obs)
    rng = np.random.default_rng(1)
    # Per copy, the transitions (obs, action, reward, next obs, flags) each env produced.
    ours_t = [[] for _ in range(B)]
    theirs_t = [[] for _ in range(B)]
    skip = np.zeros(B, dtype=bool)  # gymnasium's next step is the reset step
    for _ in range(T):
        actions = rng.integers(2, size=B)
        o, r, term, trunc, info = ours.step(actions)
        for i in range(B):
            nxt = info["final_obs"][i] if term[i] or trunc[i] else o[i]
            ours_t[i].append((ours_obs[i].tobytes(), int(actions[i]), r[i], nxt.tobytes(),
                              term[i], trunc[i]))  # fmt: skip
        ours_obs = o
    # gymnasium's env is driven with the actions ours took, per copy in order; its
    # reset steps take any action and are not transitions.
    cursor = np.zeros(B, dtype=int)
    while (cursor < T).all():
        actions = np.array([ours_t[i][cursor[i]][1] for i in range(B)])
        o, r, term, trunc, _ = theirs.step(actions)
        for i in range(B):
            if skip[i]:
                skip[i] = False
            else:
                theirs_t[i].append((theirs_obs[i].tobytes(), int(actions[i]), r[i],
                                    o[i].tobytes(), term[i], trunc[i]))  # fmt: skip
                cursor[i] += 1
                skip[i] = term[i] or trunc[i]
        theirs_obs = o
    # The shared generator's draws interleave differently once copies reset at different
    # steps, so compare up to each copy's first reset after the streams diverge: the whole
    # first episode of every copy, and every episode while resets happen in the same order.
    for i in range(B):
        n = min(len(theirs_t[i]), len(ours_t[i]))
        first_end = next(t for t in range(n) if ours_t[i][t][4] or ours_t[i][t][5])
        assert ours_t[i][: first_end + 1] == theirs_t[i][: first_end + 1]


def test_single_copy_stream_equals_gymnasiums_native_stream():
    """With one copy the draws cannot interleave: the whole stream is the same."""
    ours, theirs = SameStepCartPoleVectorEnv(num_envs=1), CartPoleVectorEnv(num_envs=1)
    a, _ = ours.reset(seed=5)
    b, _ = theirs.reset(seed=5)
    rng = np.random.default_rng(2)
    episodes = 0
    for _ in range(3000):
        action = rng.integers(2, size=1)
        a, ra, ta, ua, info = ours.step(action)
        b, rb, tb, ub, _ = theirs.step(action)
        np.testing.assert_array_equal(info["final_obs"] if ta[0] or ua[0] else a, b)
        assert (ra[0], ta[0], ua[0]) == (rb[0], tb[0], ub[0])
        if ta[0] or ub[0]:
            episodes += 1
            b, rb, tb, ub, _ = theirs.step(action)  # gymnasium's reset step
            np.testing.assert_array_equal(a, b)
            assert (rb[0], tb[0], ub[0]) == (0.0, False, False)
    assert episodes > 50


def test_stepper_bootstraps_from_the_final_obs_and_counts_episodes():
    stepper = EnvStepper(make_vector_env("CartPole-v1", {}, 4, vector_env="native"), seed=0)
    returns = []
    for _ in range(500):
        before = stepper.obs.copy()
        batch = stepper.step(np.zeros(4, dtype=np.int64))  # always left: ends quickly
        np.testing.assert_array_equal(batch.obs, before)
        for i, length in zip(batch.done_envs, batch.episode_lengths, strict=True):
            assert batch.terminated[i]
            assert abs(batch.next_obs[i][2]) > 0.2 or abs(batch.next_obs[i][0]) > 2.4
            assert not np.array_equal(batch.next_obs[i], stepper.obs[i])  # reset since
            returns.append(length)
    assert len(returns) > 100 and min(returns) >= 8


def test_observations_are_c_ordered():
    """gymnasium's are Fortran-ordered; torch's matmul rounds differently on the two
    layouts, and a resumed run's first observations are a C-ordered copy."""
    envs = make_vector_env("CartPole-v1", {}, 3, vector_env="native")
    obs, _ = envs.reset(seed=0)
    assert obs.flags.c_contiguous
    for _ in range(30):
        obs, _, _, _, info = envs.step(np.zeros(3, dtype=np.int64))
        assert obs.flags.c_contiguous


def test_time_limit_truncates_at_max_episode_steps():
    envs = make_vector_env("CartPole-v1", {"max_episode_steps": 5}, 2, vector_env="native")
    envs.reset(seed=0)
    flags = [envs.step(np.array([0, 1]))[3] for _ in range(5)]
    assert not any(f.any() for f in flags[:4]) and flags[4].all()


def test_capture_and_restore_continue_exactly():
    source = EnvStepper(make_vector_env("CartPole-v1", {}, 3, vector_env="native"), seed=7)
    rng = np.random.default_rng(0)
    for _ in range(137):
        source.step(rng.integers(2, size=3))
    state = source.state_dict()
    assert int(state["env_captured"][0]) == 2
    target = EnvStepper(make_vector_env("CartPole-v1", {}, 3, vector_env="native"), seed=999)
    assert target.load_state_dict(state, fallback_seed=1)
    for _ in range(400):
        actions = rng.integers(2, size=3)
        a, b = source.step(actions), target.step(actions)
        for name in ("obs", "rewards", "next_obs", "terminated", "truncated", "done_envs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_a_sync_state_falls_back_to_a_reset_in_a_native_env_and_back():
    sync = EnvStepper(make_vector_env("CartPole-v1", {}, 2), seed=1)
    native = EnvStepper(make_vector_env("CartPole-v1", {}, 2, vector_env="native"), seed=1)
    assert not native.load_state_dict(sync.state_dict(), fallback_seed=2)
    assert not sync.load_state_dict(native.state_dict(), fallback_seed=2)


def test_an_env_without_a_native_implementation_is_one_line():
    with pytest.raises(UserError, match=r"'FrozenLake-v1' has no native vector env .*CartPole-v1"):
        make_vector_env("FrozenLake-v1", {}, 2, vector_env="native")
    with pytest.raises(ConfigError, match="vector_env.*auto or sync or async or native or table"):
        build_config({"vector_env": "envpol"})
