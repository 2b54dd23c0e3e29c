"""The distributed greedy evaluation at the end of `train` and in `hpcrl evaluate`: every
rank runs a contiguous share of the episodes, rank 0 gathers the returns."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcrl import preemption
from hpcrl.comm.waits import allreduce_sum, bcast, gather_rows
from hpcrl.evaluation import greedy_episode_returns, policy_episode_returns


def evaluate_greedy(
    comm: MPI.Comm,
    env_id: str,
    env_kwargs: dict,
    q_table: np.ndarray,
    episodes: int,
    seed: int,
    watchdog_s: float,
) -> dict | None:
    """Collective: every rank runs a share of `episodes` greedy episodes of rank 0's table.

    Args:
        q_table: (n_states, n_actions) float64; rank 0's values are used (broadcast).

    Returns:
        On rank 0 `{"mean_return", "std_return", "episodes"}`; None elsewhere.
    """
    q_table = np.ascontiguousarray(q_table, dtype=np.float64)
    bcast(comm, q_table, 0, watchdog_s)
    # Contiguous blocks, so the gathered returns are in episode-id order and the statistics
    # are bitwise the same for every world size.
    ids = np.array_split(np.arange(episodes, dtype=np.int64), comm.Get_size())[comm.Get_rank()]
    returns = greedy_episode_returns(
        env_id, env_kwargs, q_table, ids, seed, stop=preemption.requested
    )
    return return_stats(comm, returns, episodes, watchdog_s)


def evaluate_policy(
    comm: MPI.Comm,
    env_id: str,
    env_kwargs: dict,
    greedy_actions,
    episodes: int,
    seed: int,
    watchdog_s: float,
    env_options: dict | None = None,
) -> dict | None:
    """Collective: like `evaluate_greedy` for a learner every rank holds identically.

    Args:
        greedy_actions: (N, *obs_shape) observations -> (N, ...) deterministic actions.
        env_options: the run's `make_env` options (`RunConfig.env_options()`).
    """
    ids = np.array_split(np.arange(episodes, dtype=np.int64), comm.Get_size())[comm.Get_rank()]
    returns = policy_episode_returns(
        env_id,
        env_kwargs,
        lambda obs: greedy_actions(np.asarray(obs)[None])[0],
        ids,
        seed,
        env_options=env_options,
        stop=preemption.requested,
    )
    return return_stats(comm, returns, episodes, watchdog_s)


def return_stats(comm, returns, episodes, watchdog_s) -> dict | None:
    """Collective: every rank's (n_k,) float64 returns gathered to rank 0, in rank order;
    `{"mean_return", "std_return", "episodes"}` there, None elsewhere.

    Raises:
        preemption.EvaluationInterrupted: on every rank, when a preemption signal reached
            any rank during its share (`hpcrl.preemption.requested`).
    """
    stopped = np.array([int(preemption.requested())], dtype=np.int64)
    allreduce_sum(comm, stopped, watchdog_s)
    if stopped[0]:
        raise preemption.EvaluationInterrupted(
            f"{preemption.signal_name() or 'a preemption signal'} during the evaluation"
        )
    all_returns = gather_rows(comm, returns, 0, watchdog_s)
    if comm.Get_rank() != 0:
        return None
    return {
        "mean_return": float(np.mean(all_returns)) if episodes else float("nan"),
        "std_return": float(np.std(all_returns)) if episodes else float("nan"),
        "episodes": int(episodes),
    }


class TableGreedy:
    """The greedy policy of a Q-table that rank 0 holds (`GreedyPolicy`)."""

    def __init__(self, q_table: np.ndarray):
        self.q_table = q_table  # (n_states, n_actions) float64; rank 0's values count

    def greedy_actions(self, states: np.ndarray) -> np.ndarray:
        """(B,) int64 argmax_a Q(s, a) of (B,) int64 states, ties to the lowest action (as
        `evaluate`)."""
        return np.argmax(self.q_table[states], axis=1)

    def evaluate(self, comm, env_id, env_kwargs, env_options, episodes, seed, watchdog_s):
        return evaluate_greedy(comm, env_id, env_kwargs, self.q_table, episodes, seed, watchdog_s)


class LearnerGreedy:
    """The greedy policy of a deep learner every rank holds identically (`GreedyPolicy`)."""

    def __init__(self, learner):
        self.learner = learner

    def evaluate(self, comm, env_id, env_kwargs, env_options, episodes, seed, watchdog_s):
        return evaluate_policy(
            comm,
            env_id,
            env_kwargs,
            self.learner.greedy_actions,
            episodes,
            seed,
            watchdog_s,
            env_options,
        )
