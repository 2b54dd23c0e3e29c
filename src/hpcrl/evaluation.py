"""Greedy-policy evaluation (no MPI: callers split the episode ids over ranks)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hpcrl.envs import make_env

_STOP_CHECK_STEPS = 1000  # steps of one episode between two calls of `stop`
_TABLE_CHUNK = 4096  # episodes stepped side by side from a transition table at a time


def greedy_episode_returns(
    env_id: str,
    env_kwargs: dict,
    q_table: np.ndarray,
    episode_ids: np.ndarray,
    seed: int,
    max_episode_steps: int = 10_000,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Undiscounted returns of the greedy policy argmax_a Q(s, a).

    Episode `i` starts from `env.reset(seed=seed + i)`, so the result does not depend on
    how the ids are split across ranks. Ties go to the lowest action index. An episode is
    cut at the env's own time limit, or after `max_episode_steps` when the env has none
    (CliffWalking: a greedy policy that loops would otherwise never end). Envs that
    `hpcrl.table_vector` steps exactly run all their episodes side by side from the
    transition table, with the same returns (`actions_episode_returns`).

    Args:
        env_id, env_kwargs: the environment (Discrete spaces).
        q_table: (n_states, n_actions) float64.
        episode_ids: (n,) int64 episode indices to run.
        seed: base seed (>= 0).
        max_episode_steps: cap on steps per episode for envs without a time limit.
        stop: as for `policy_episode_returns`.

    Returns:
        (n,) float64 returns, in the order of `episode_ids` (fewer when `stop` ended it).
    """
    greedy = np.argmax(q_table, axis=1)
    return actions_episode_returns(
        env_id, env_kwargs, greedy, episode_ids, seed, max_episode_steps, stop=stop
    )


def actions_episode_returns(
    env_id: str,
    env_kwargs: dict,
    actions: np.ndarray,
    episode_ids: np.ndarray,
    seed: int,
    max_episode_steps: int = 10_000,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Undiscounted returns of the deterministic policy `actions[s]` ((n_states,) int) of a
    Discrete env, with the seeding, cut and `stop` of `policy_episode_returns`.

    For the envs `hpcrl.table_vector.steps_exactly` names (FrozenLake, CliffWalking,
    Taxi, `hpcrl/FrozenLake-v0`) the episodes run side by side, `_TABLE_CHUNK` at a time,
    stepped from the transition table: episode i is a `TableVectorEnv` copy seeded with
    seed + i, which draws what `env.reset(seed=seed + i)` and each `env.step` draw, so the
    returns are bit-identical to the episode-by-episode loop (`tests/test_evaluation.py`)
    at a fraction of its time. Other envs run that loop.

    Returns:
        (m,) float64 returns of the first m <= n of `episode_ids`, in their order.
    """
    from hpcrl.table_vector import TableModel, steps_exactly

    env = make_env(env_id, env_kwargs)
    try:
        model = TableModel(env_id, env_kwargs, env) if steps_exactly(env) else None
    finally:
        env.close()
    if model is None:
        return policy_episode_returns(
            env_id,
            env_kwargs,
            lambda obs: actions[obs],
            episode_ids,
            seed,
            max_episode_steps,
            stop=stop,
        )
    limit = model.max_episode_steps or max_episode_steps
    returns = np.zeros(len(episode_ids), dtype=np.float64)
    for start in range(0, len(episode_ids), _TABLE_CHUNK):
        ids = episode_ids[start : start + _TABLE_CHUNK]
        if not _table_returns(
            env_id, env_kwargs, model, actions, ids, seed, limit, stop, returns[start:]
        ):
            return returns[:start]
    return returns


def _table_returns(env_id, env_kwargs, model, actions, ids, seed, limit, stop, out) -> bool:
    """Episodes `ids` side by side from `model`'s table, their returns added into
    `out[:len(ids)]`; False when `stop` said True before they ended."""
    from hpcrl.table_vector import TableVectorEnv

    stopped = stop or (lambda: False)
    if stopped():
        return False
    venv = TableVectorEnv(env_id, env_kwargs, len(ids), model=model)
    venv.reset(seed=[int(seed + i) for i in ids])
    running = np.arange(len(ids))
    for t in range(limit):
        if not running.size:
            break
        _, reward, terminated = venv.transition(running, actions[venv.state[running]])
        out[running] += reward
        running = running[~terminated]
        if t % _STOP_CHECK_STEPS == _STOP_CHECK_STEPS - 1 and stopped():
            return False
    return True


def policy_episode_returns(
    env_id: str,
    env_kwargs: dict,
    policy: Callable[[np.ndarray], np.ndarray],
    episode_ids: np.ndarray,
    seed: int,
    max_episode_steps: int = 10_000,
    env_options: dict | None = None,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Undiscounted returns of a deterministic `policy` (one observation -> one action),
    with the seeding and episode cap of `greedy_episode_returns`; `env_options`: the
    `make_env` options of the run (Atari preprocessing). `stop` (e.g.
    `hpcrl.preemption.requested`) is asked before each episode and every
    `_STOP_CHECK_STEPS` steps: once it says True the episodes left are not run.

    Returns:
        (m,) float64 returns of the first m <= n of `episode_ids`, in their order (m < n
        only when `stop` ended the evaluation early).
    """
    env = make_env(env_id, env_kwargs, **(env_options or {}))
    limit = (env.spec.max_episode_steps if env.spec else None) or max_episode_steps
    returns = np.zeros(len(episode_ids), dtype=np.float64)
    stopped = stop or (lambda: False)
    for j, episode in enumerate(episode_ids):
        if stopped():
            env.close()
            return returns[:j]
        obs, _ = env.reset(seed=int(seed + episode))
        for t in range(limit):
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            returns[j] += reward
            if terminated or truncated:
                break
            if t % _STOP_CHECK_STEPS == _STOP_CHECK_STEPS - 1 and stopped():
                env.close()
                return returns[:j]
    env.close()
    return returns


def batched_policy_returns(
    env_id: str,
    env_kwargs: dict,
    policy: Callable[[np.ndarray], np.ndarray],
    episodes: int,
    seed: int,
    env_options: dict | None = None,
    max_episode_steps: int = 10_000,
) -> np.ndarray:
    """`policy_episode_returns` of episodes 0..episodes-1, run side by side: one call of a
    batched deterministic `policy` ((n, *obs_shape) -> (n, ...) actions) per step for every
    episode still running. Episode i starts from `env.reset(seed=seed + i)`.

    Returns:
        (episodes,) float64 undiscounted returns.
    """
    envs = [make_env(env_id, env_kwargs, **(env_options or {})) for _ in range(episodes)]
    spec = envs[0].spec
    limit = (spec.max_episode_steps if spec else None) or max_episode_steps
    obs = [env.reset(seed=int(seed + i))[0] for i, env in enumerate(envs)]
    returns = np.zeros(episodes, dtype=np.float64)
    running = list(range(episodes))
    for _ in range(limit):
        if not running:
            break
        actions = policy(np.stack([obs[i] for i in running]))
        still = []
        for action, i in zip(actions, running, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            if not (terminated or truncated):
                still.append(i)
        running = still
    for env in envs:
        env.close()
    return returns
