"""Tabular Q-learning (Watkins 1989; Watkins & Dayan 1992) with ε-greedy or Boltzmann exploration.

The update for one transition (s, a, r, s') is

    Q(s, a) <- Q(s, a) + α [ r + γ (1 - terminated) max_a' Q(s', a') - Q(s, a) ]

with no bootstrap past a `terminated` transition and a bootstrap past a `truncated` one (a
time limit is not part of the MDP). Actors step a vector of B environments, so updates come
in batches of B transitions that are applied as one synchronous step: copies of the same
(s, a) in a batch share one step of size α along their mean TD error, which keeps the
step size of every entry at α however many environments visit it at once.

This module knows nothing about ranks: the topology loops in `hpcrl.topologies` decide
whether the table lives on a parameter server or is replicated and averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcrl.algos.tabular import row_max, sum_by_pair, table_rows
from hpcrl.contracts import Algorithm
from hpcrl.errors import ConfigError
from hpcrl.schedules import linear_schedule

EXPLORATIONS = ("epsilon_greedy", "boltzmann")


@dataclass
class QLearningConfig:
    """Tabular Q-learning hyperparameters. Schedules run over the fraction of the budget."""

    exploration: str = "epsilon_greedy"  # or boltzmann (softmax over Q / τ)
    alpha: float = 0.1  # step size α at the start
    alpha_end: float = 0.005  # α decays linearly to this over alpha_decay_fraction
    alpha_decay_fraction: float = 1.0
    gamma: float = 0.99  # discount γ
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_fraction: float = 0.6
    tau_start: float = 1.0  # Boltzmann temperature τ
    tau_end: float = 0.01
    tau_decay_fraction: float = 0.6
    q_init: float = 0.0  # initial value of every Q(s, a)
    # 1: one-step Q-learning; n > 1: n-step returns over rollouts of n vector steps
    # (Mnih et al. 2016, Algorithm S2, tabular), with layout async
    n_step: int = 1

    def validate(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise ConfigError(f"config key '{key}': got {value!r}, expected {expected}")

        check(self.exploration in EXPLORATIONS, "exploration", f"one of {list(EXPLORATIONS)}")
        check(0.0 < self.alpha <= 1.0, "alpha", "a step size α in (0, 1]")
        check(0.0 < self.alpha_end <= 1.0, "alpha_end", "a step size in (0, 1]")
        check(0.0 <= self.gamma <= 1.0, "gamma", "a discount γ in [0, 1]")
        check(0.0 <= self.epsilon_start <= 1.0, "epsilon_start", "a probability in [0, 1]")
        check(0.0 <= self.epsilon_end <= 1.0, "epsilon_end", "a probability in [0, 1]")
        check(self.tau_start > 0.0, "tau_start", "a temperature τ > 0")
        check(self.tau_end > 0.0, "tau_end", "a temperature τ > 0")
        n_step = self.n_step
        check(
            isinstance(n_step, int) and not isinstance(n_step, bool) and n_step >= 1,
            "n_step",
            "an integer >= 1 (1: one-step Q-learning)",
        )
        for key in ("alpha_decay_fraction", "epsilon_decay_fraction", "tau_decay_fraction"):
            check(0.0 <= getattr(self, key) <= 1.0, key, "a fraction in [0, 1]")


def q_learning_update(
    q_table: np.ndarray,
    obs: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_obs: np.ndarray,
    terminated: np.ndarray,
    alpha: float,
    gamma: float,
) -> None:
    """Apply one batch of Watkins Q-learning updates to `q_table` in place.

    All TD errors are computed against the table as it was before the batch; copies of one
    (s, a) pair are averaged, so each touched entry moves by α times its mean TD error
    (`update_towards`).

    Args:
        q_table: (n_states, n_actions) float64, updated in place.
        obs: (B,) int64 states s.
        actions: (B,) int64 actions a.
        rewards: (B,) float64 rewards r.
        next_obs: (B,) int64 next states s' (the final state when the episode ended).
        terminated: (B,) bool; True stops the bootstrap (truncation does not).
        alpha: step size α in (0, 1].
        gamma: discount γ in [0, 1].
    """
    targets = td_targets(rewards, table_rows(q_table, next_obs), terminated, gamma)
    update_towards(q_table, obs, actions, targets, alpha)


def td_targets(
    rewards: np.ndarray, next_q_rows: np.ndarray, terminated: np.ndarray, gamma: float
) -> np.ndarray:
    """One-step Q-learning targets r + γ (1 - terminated) max_a' Q(s', a').

    Args:
        rewards: (B,) float64 rewards r.
        next_q_rows: (B, n_actions) float64, the rows Q(s', ·) of the next states.
        terminated: (B,) bool; True stops the bootstrap (truncation does not).
        gamma: discount γ in [0, 1].

    Returns:
        (B,) float64 targets.
    """
    return rewards + gamma * np.where(terminated, 0.0, row_max(next_q_rows))


def update_towards(
    q_table: np.ndarray, obs: np.ndarray, actions: np.ndarray, targets: np.ndarray, alpha: float
) -> None:
    """Move each Q(s, a) of a batch towards its targets in one vectorized step, in place.

    Duplicates: the K copies of one (s, a) pair in the batch share one step,
    Q(s, a) <- Q(s, a) + α (mean_k target_k - Q(s, a)), every TD error taken against the
    table as it was before the batch. A batch therefore moves each entry by at most one
    step of size α whatever the number of copies, the order of the batch does not matter,
    and the result is not that of K sequential updates (which would step K times, the
    later ones against the partly updated entry); `tests/test_qlearning.py` checks this
    against a loop over the pairs.

    Args:
        q_table: (n_states, n_actions) float64, updated in place.
        obs: (B,) int64 rows s of `q_table`.
        actions: (B,) int64 actions a.
        targets: (B,) float64 targets (e.g. `td_targets`).
        alpha: step size α in (0, 1].
    """
    if len(obs) == 0:
        return
    td_error = targets - q_table[obs, actions]
    flat_index = obs * q_table.shape[1] + actions
    # Sum and count the copies of each pair, in batch order either way (the same floats):
    # over the whole table when it is small next to the batch (no sort), else over the
    # distinct pairs.
    if q_table.size <= 8 * len(flat_index):
        copies = np.bincount(flat_index, minlength=q_table.size)
        entries = np.flatnonzero(copies)
        sums = np.bincount(flat_index, weights=td_error, minlength=q_table.size)[entries]
        mean_td = sums / copies[entries]
    else:
        entries, inverse = np.unique(flat_index, return_inverse=True)
        mean_td = np.bincount(inverse, weights=td_error) / np.bincount(inverse)
    # `entries` are unique, so fancy-index += is exact and works for any memory layout.
    q_table[entries // q_table.shape[1], entries % q_table.shape[1]] += alpha * mean_td


def step_towards_mean_targets(
    q_table: np.ndarray,
    obs: np.ndarray,
    actions: np.ndarray,
    target_sums: np.ndarray,
    counts: np.ndarray,
    alpha: float,
) -> None:
    """The batched update of the `sharded` and `async` layouts, in place: each distinct
    (s, a) moves once, Q(s, a) <- Q(s, a) + α (Σ target / K - Q(s, a)), towards the mean
    of the K targets given for it in this batch (the same step as `update_towards`'s mean
    TD error, with the targets summed before Q(s, a) is subtracted). The input may hold
    partial sums: each `sharded` rank sums its own copies of a pair (`sum_by_pair`) and
    the owner adds those up, in rank order, so the result does not depend on the order
    of any batch.

    Args:
        q_table: (n_rows, n_actions) float64 (a shard), updated in place.
        obs: (P,) int64 rows of `q_table`; a pair may repeat (one entry per sender).
        actions: (P,) int64 actions.
        target_sums: (P,) float64 sums of targets.
        counts: (P,) float64 numbers of targets in each sum (>= 1).
        alpha: step size α in (0, 1].
    """
    if len(obs) == 0:
        return
    rows, acts, (sums, total) = sum_by_pair(
        q_table.shape[0], q_table.shape[1], obs, actions, target_sums, counts
    )
    q_table[rows, acts] += alpha * (sums / total - q_table[rows, acts])


def greedy_actions(q_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """argmax_a Q(s, a) per row, ties broken uniformly at random.

    Args:
        q_rows: (B, n_actions) float64, the rows Q(s, ·) of B states.
        rng: numpy generator for the tie-breaking.

    Returns:
        (B,) int64 actions.
    """
    is_max = q_rows == row_max(q_rows)[:, None]
    return np.argmax(np.where(is_max, rng.random(q_rows.shape), -1.0), axis=1)


def epsilon_greedy(q_rows: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """With probability ε a uniform random action, otherwise the greedy one.

    Args:
        q_rows: (B, n_actions) float64.
        epsilon: exploration probability ε in [0, 1].
        rng: numpy generator.

    Returns:
        (B,) int64 actions.
    """
    batch, n_actions = q_rows.shape
    explore = rng.random(batch) < epsilon
    return np.where(explore, rng.integers(0, n_actions, batch), greedy_actions(q_rows, rng))


def boltzmann(q_rows: np.ndarray, tau: float, rng: np.random.Generator) -> np.ndarray:
    """Sample from the softmax policy π(a|s) ∝ exp(Q(s, a) / τ).

    Args:
        q_rows: (B, n_actions) float64.
        tau: temperature τ > 0 (large: uniform, small: greedy).
        rng: numpy generator.

    Returns:
        (B,) int64 actions.
    """
    logits = (q_rows - q_rows.max(axis=1, keepdims=True)) / tau
    cumulative = np.cumsum(np.exp(logits), axis=1)
    threshold = rng.random((q_rows.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative < threshold).sum(axis=1), q_rows.shape[1] - 1)


class QLearningPolicy:
    """The behaviour policy of an actor: exploration over a (possibly stale) Q-table."""

    def __init__(self, cfg: QLearningConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.rng = rng

    def exploration_value(self, progress: float) -> float:
        """ε (epsilon_greedy) or τ (boltzmann) at this fraction of the budget."""
        c = self.cfg
        if c.exploration == "boltzmann":
            return linear_schedule(c.tau_start, c.tau_end, c.tau_decay_fraction, progress)
        return linear_schedule(c.epsilon_start, c.epsilon_end, c.epsilon_decay_fraction, progress)

    def select_actions(self, q_table: np.ndarray, obs: np.ndarray, progress: float) -> np.ndarray:
        """Actions for a batch of states.

        Args:
            q_table: (n_states, n_actions) float64.
            obs: (B,) int64 states.
            progress: fraction of the budget done, in [0, 1].

        Returns:
            (B,) int64 actions.
        """
        value = self.exploration_value(progress)
        if self.cfg.exploration == "boltzmann":
            return boltzmann(table_rows(q_table, obs), value, self.rng)
        return epsilon_greedy(table_rows(q_table, obs), value, self.rng)


class QLearningLearner:
    """Owns a Q-table and applies batches of transitions to it."""

    def __init__(self, cfg: QLearningConfig, n_states: int, n_actions: int):
        self.cfg = cfg
        self.q_table = np.full((n_states, n_actions), cfg.q_init, dtype=np.float64)
        self.learner_updates = 0
        self.n_step = cfg.n_step

    def behaviour_policy(self, rng: np.random.Generator) -> QLearningPolicy:
        """An actor's ε-greedy or Boltzmann policy, exploring with `rng`."""
        return QLearningPolicy(self.cfg, rng)

    def alpha(self, progress: float) -> float:
        c = self.cfg
        return linear_schedule(c.alpha, c.alpha_end, c.alpha_decay_fraction, progress)

    def update(self, obs, actions, rewards, next_obs, terminated, progress: float) -> None:
        """One batched update; arrays as in `q_learning_update`."""
        q_learning_update(
            self.q_table,
            obs,
            actions,
            rewards,
            next_obs,
            terminated,
            self.alpha(progress),
            self.cfg.gamma,
        )
        self.learner_updates += 1

    def targets(self, rewards, next_q_rows, terminated) -> np.ndarray:
        """(B,) one-step targets from the rows Q(s', ·) (`td_targets`)."""
        return td_targets(rewards, next_q_rows, terminated, self.cfg.gamma)

    def update_towards(self, rows, actions, target_sums, counts, progress: float) -> None:
        """One batched step of this learner's table (the `sharded` layout's shard, or an
        `async` rank's table with its n-step returns, counts 1) towards the mean targets of
        (P,) pairs (`step_towards_mean_targets`)."""
        step_towards_mean_targets(
            self.q_table, rows, actions, target_sums, counts, self.alpha(progress)
        )
        self.learner_updates += 1

    def update_towards_dense(self, target_sums, counts, progress: float, table=None) -> None:
        """`update_towards` given as (S, A) float64 sums of targets and their counts (0
        where a pair has none), applied to `table` ((S, A) float64, the `sharded` layout's
        copy of the whole table; default this learner's table): every pair with a count
        moves once, with the floats of `step_towards_mean_targets` on those pairs."""
        q_table = self.q_table if table is None else table
        has = counts > 0
        q_table[has] += self.alpha(progress) * (target_sums[has] / counts[has] - q_table[has])
        self.learner_updates += 1


def make_learner(
    cfg: QLearningConfig, observation_space, action_space, num_envs=1, world_size=1, seed=0
) -> QLearningLearner:
    """A Q-table of `observation_space.n` x `action_space.n` entries (both `Discrete`,
    checked by the tabular layouts), every entry `q_init`."""
    return QLearningLearner(cfg, int(observation_space.n), int(action_space.n))


ALGORITHM = Algorithm(
    "qlearning", QLearningConfig, ("ps", "allreduce", "sharded", "async"), make_learner
)
