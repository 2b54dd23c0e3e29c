"""Unit tests of env creation: Atari preprocessing and its exact capture/restore, async vector
envs, and the one-line errors for missing optional dependencies."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from hpcrl.envs import EnvStepper, _wrappers, capture_env_state, make_env, make_vector_env
from hpcrl.errors import UserError

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

PONG = "ALE/Pong-v5"


def test_atari_ids_get_the_standard_preprocessing():
    env = make_env(PONG)
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    names = [type(w).__name__ for w in _wrappers(env)]
    assert names[:3] == ["FrameStackObservation", "AtariPreprocessing", "StickyAction"]
    assert env.unwrapped._frameskip == 1  # AtariPreprocessing skips the frames
    # v5's sticky actions (p = 0.25 per frame) run in the wrapper, not in the emulator
    assert _wrappers(env)[2].repeat_action_probability == 0.25
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    env.close()

    single = make_env(PONG, frame_stack=1)
    assert single.observation_space.shape == (84, 84)
    single.close()
    raw = make_env(PONG, atari_preprocessing=False)
    assert raw.observation_space.shape == (210, 160, 3)
    assert raw.unwrapped._frameskip == 4  # the v5 default, untouched
    raw.reset(seed=0)
    # The emulator's own sticky actions keep a last action its saved state lacks: the
    # documented fallback (episodes restart on resume), unless they are off.
    assert capture_env_state(raw) is None
    raw.close()
    not_sticky = make_env(PONG, {"repeat_action_probability": 0.0}, atari_preprocessing=False)
    not_sticky.reset(seed=0)
    assert capture_env_state(not_sticky) is not None
    not_sticky.close()
    assert "StickyAction" not in [
        type(w).__name__ for w in _wrappers(make_env(PONG, {"repeat_action_probability": 0.0}))
    ]


def test_frameskip_kwarg_with_preprocessing_is_refused():
    with pytest.raises(UserError, match=r"frameskip=4.*atari_preprocessing=false"):
        make_env(PONG, {"frameskip": 4})
    make_env(PONG, {"frameskip": 1}).close()  # the value the wrapper needs is fine


def test_preprocessed_atari_restore_replays_the_same_transitions():
    # Episodes of 202 emulator frames (noop resets of 1-30 frames count too) end, truncated,
    # every ~45 agent steps, mostly in the middle of a 4-frame skip, where
    # AtariPreprocessing returns the max-pooling buffers of the step before. The capture is
    # taken just before such an end, so the first restored step needs those buffers and
    # the next ones need the stacked frames.
    frames_per_episode = 202
    kwargs = {"max_num_frames_per_episode": frames_per_episode}
    source = EnvStepper(make_vector_env(PONG, kwargs, 2), seed=7)
    target = EnvStepper(make_vector_env(PONG, kwargs, 2), seed=999)
    ale = source.envs.envs[0].unwrapped.ale
    rng = np.random.default_rng(1)
    for _ in range(200):
        source.step(rng.integers(0, 6, size=2))
        if 0 < frames_per_episode - ale.getEpisodeFrameNumber() < 4:
            break
    assert target.load_state_dict(source.state_dict(), fallback_seed=0)
    assert np.array_equal(target.obs, source.obs)
    episodes = 0
    for t in range(100):  # crosses episode ends and autoresets (noop resets draw the RNG)
        actions = rng.integers(0, 6, size=2)
        x, y = source.step(actions), target.step(actions)
        assert t > 0 or x.truncated[0]  # the first step ends copy 0 mid-skip
        assert np.array_equal(x.next_obs, y.next_obs)
        assert np.array_equal(x.obs, y.obs)
        assert np.array_equal(x.rewards, y.rewards)
        assert np.array_equal(x.terminated, y.terminated)
        assert np.array_equal(x.truncated, y.truncated)
        assert np.array_equal(x.episode_lengths, y.episode_lengths)
        episodes += len(x.done_envs)
    assert episodes >= 3
    source.close()
    target.close()


def test_async_vector_env_steps_like_sync_and_falls_back_on_restore():
    sync = EnvStepper(make_vector_env("CartPole-v1", {}, 2), seed=5)
    asynchronous = EnvStepper(make_vector_env("CartPole-v1", {}, 2, vector_env="async"), seed=5)
    assert isinstance(asynchronous.envs, gym.vector.AsyncVectorEnv)
    rng = np.random.default_rng(0)
    for _ in range(60):  # crosses episode ends
        actions = rng.integers(0, 2, size=2)
        x, y = sync.step(actions), asynchronous.step(actions)
        assert np.array_equal(x.next_obs, y.next_obs)
        assert np.array_equal(x.terminated, y.terminated)
        assert np.array_equal(x.episode_returns, y.episode_returns)
    state = asynchronous.state_dict()
    assert int(state["env_captured"][0]) == 0
    assert not asynchronous.load_state_dict(state, fallback_seed=11)
    assert np.all(asynchronous.lengths == 0)
    # A captured (sync) state cannot reach an async env's copies either: same fallback.
    assert not asynchronous.load_state_dict(sync.state_dict(), fallback_seed=11)
    sync.close()
    asynchronous.close()


def test_unknown_vector_env_kind_is_refused():
    with pytest.raises(ValueError, match="'threads'"):
        make_vector_env("CartPole-v1", {}, 1, vector_env="threads")


def test_missing_box2d_names_the_extra(monkeypatch):
    def not_installed(*args, **kwargs):
        raise gym.error.DependencyNotInstalled("Box2D is not installed, run `pip install swig`")

    monkeypatch.setattr(gym, "make", not_installed)
    for env_id in ("LunarLander-v3", "BipedalWalker-v3", "CarRacing-v3"):
        with pytest.raises(UserError, match=r"needs Box2D: pip install 'hpcrl\[box2d\]'$"):
            make_env(env_id)
    with pytest.raises(UserError, match=r"'CartPole-v1' needs a package.*Box2D is not"):
        make_env("CartPole-v1")


def test_box2d_env_is_made_when_installed():
    pytest.importorskip("Box2D")
    env = make_env("LunarLander-v3")
    assert env.observation_space.shape == (8,)
    env.close()
