"""Greedy-policy evaluation (no MPI: callers split the episode ids over ranks)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hpcrl.envs import make_env


def greedy_episode_returns(
    env_id: str,
    env_kwargs: dict,
    q_table: np.ndarray,
    episode_ids: np.ndarray,
    seed: int,
    max_episode_steps: int = 10_000,
) -> np.ndarray:
    """Undiscounted returns of the greedy policy argmax_a Q(s, a).

    Episode `i` starts from `env.reset(seed=seed + i)`, so the result does not depend on
    how the ids are split across ranks. Ties go to the lowest action index. An episode is
    cut at the env's own time limit, or after `max_episode_steps` when the env has none
    (CliffWalking: a greedy policy that loops would otherwise never end).

    Args:
        env_id, env_kwargs: the environment (Discrete spaces).
        q_table: (n_states, n_actions) float64.
        episode_ids: (n,) int64 episode indices to run.
        seed: base seed (>= 0).
        max_episode_steps: cap on steps per episode for envs without a time limit.

    Returns:
        (n,) float64 returns, in the order of `episode_ids`.
    """
    greedy = np.argmax(q_table, axis=1)
    return policy_episode_returns(
        env_id, env_kwargs, lambda obs: greedy[obs], episode_ids, seed, max_episode_steps
    )


def policy_episode_returns(
    env_id: str,
    env_kwargs: dict,
    policy: Callable[[np.ndarray], np.ndarray],
    episode_ids: np.ndarray,
    seed: int,
    max_episode_steps: int = 10_000,
    env_options: dict | None = None,
) -> np.ndarray:
    """Undiscounted returns of a deterministic `policy` (one observation -> one action),
    with the seeding and episode cap of `greedy_episode_returns`; `env_options`: the
    `make_env` options of the run (Atari preprocessing).

    Returns:
        (n,) float64 returns, in the order of `episode_ids`.
    """
    env = make_env(env_id, env_kwargs, **(env_options or {}))
    limit = (env.spec.max_episode_steps if env.spec else None) or max_episode_steps
    returns = np.zeros(len(episode_ids), dtype=np.float64)
    for j, episode in enumerate(episode_ids):
        obs, _ = env.reset(seed=int(seed + episode))
        for _ in range(limit):
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            returns[j] += reward
            if terminated or truncated:
                break
    env.close()
    return returns
