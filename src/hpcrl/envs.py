"""Gymnasium environments: creation with clear errors, vector envs, episode bookkeeping."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from hpcrl.errors import UserError


def make_env(env_id: str, env_kwargs: dict | None = None) -> gym.Env:
    """`gymnasium.make(env_id, **env_kwargs)` with one-line errors.

    Raises:
        UserError: unknown id (closest registered ids suggested), or kwargs the env rejects.
    """
    kwargs = dict(env_kwargs or {})
    if env_id not in gym.registry:
        hint = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        near = f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
        raise UserError(f"unknown env id {env_id!r}: not in the gymnasium registry{near}")
    try:
        return gym.make(env_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any constructor failure is the user's input
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"env {env_id!r} could not be made with env_kwargs {kwargs!r}: "
            f"{type(exc).__name__}: {detail}"
        ) from None


def discrete_sizes(env: gym.Env) -> tuple[int, int]:
    """(n_states, n_actions) of an env whose spaces are both `Discrete`.

    Raises:
        UserError: either space is not `Discrete` (tabular methods need both).
    """
    obs_space, act_space = env.observation_space, env.action_space
    for kind, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, gym.spaces.Discrete):
            raise UserError(
                f"env {env.spec.id if env.spec else env!r} has {kind} space {space}: "
                "tabular Q-learning needs Discrete observation and action spaces"
            )
        if int(space.start) != 0:
            raise UserError(f"{kind} space {space} does not start at 0: tabular needs 0..n-1")
    return int(obs_space.n), int(act_space.n)


def make_vector_env(env_id: str, env_kwargs: dict | None, num_envs: int) -> SyncVectorEnv:
    """A gymnasium `SyncVectorEnv` of `num_envs` copies that resets finished copies in the
    same step (`AutoresetMode.SAME_STEP`), so every call to `step` is one real transition
    per copy and the final observation is in `info["final_obs"]`."""
    make_env(env_id, env_kwargs).close()  # one clear error instead of num_envs tracebacks
    kwargs = dict(env_kwargs or {})
    return SyncVectorEnv(
        [lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )


@dataclass
class StepBatch:
    """One vector step of B transitions (arrays of shape (B,))."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray  # the final observation where the episode ended
    terminated: np.ndarray
    truncated: np.ndarray
    done_envs: np.ndarray  # indices of copies whose episode ended in this step
    episode_returns: np.ndarray  # (len(done_envs),) float64, undiscounted
    episode_lengths: np.ndarray  # (len(done_envs),) int64


class EnvStepper:
    """Steps a vector env and keeps each copy's running episode return and length."""

    def __init__(self, envs: SyncVectorEnv, seed: int):
        self.envs = envs
        self.num_envs = envs.num_envs
        obs, _ = envs.reset(seed=seed)
        self.obs = np.asarray(obs)
        self.returns = np.zeros(self.num_envs, dtype=np.float64)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every copy once with `actions` ((B,) int64 for Discrete)."""
        obs = self.obs
        next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
        rewards = np.asarray(rewards, dtype=np.float64)
        done = np.logical_or(terminated, truncated)
        self.returns += rewards
        self.lengths += 1
        final_next = next_obs
        done_envs = np.flatnonzero(done)
        ep_returns = ep_lengths = _EMPTY
        if done_envs.size:
            final_next = next_obs.copy()
            final_next[done_envs] = np.stack(info["final_obs"][done_envs])
            ep_returns = self.returns[done_envs].copy()
            ep_lengths = self.lengths[done_envs].copy()
            self.returns[done_envs] = 0.0
            self.lengths[done_envs] = 0
        self.obs = np.asarray(next_obs)
        return StepBatch(
            obs,
            np.asarray(actions),
            rewards,
            final_next,
            np.asarray(terminated),
            np.asarray(truncated),
            done_envs,
            ep_returns,
            ep_lengths,
        )

    def close(self) -> None:
        self.envs.close()


_EMPTY = np.zeros(0)
