"""Prioritized experience replay (Schaul et al. 2016, "Prioritized Experience Replay"),
pure numpy and no MPI: the sum tree and the buffer one Ape-X replay shard keeps (Horgan et
al. 2018, "Distributed Prioritized Experience Replay", Section 3).

Proportional prioritization (Schaul et al. 2016, Section 3.3, Eq. 1): transition i is
sampled with probability

    P(i) = p_i^α / Σ_k p_k^α

and its importance-sampling weight (Section 3.4) is

    w_i = (N · P(i))^(-β) / max_j w_j,

N the transitions held, the max taken over the sampled batch (as Dopamine's prioritized
replay does), so weights only scale updates down. The tree stores p_i^α at its leaves and
every inner node the sum of its two children; a batch of k is drawn stratified, one value
per k-th of the total (Schaul et al. 2016, Appendix B.2.1), and found by one descent from
the root. Eviction is FIFO at capacity, as in Ape-X.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """A binary tree of sums over `capacity` leaf values >= 0.

    The leaves are `tree[L:L + capacity]` for L the smallest power of two >= capacity;
    node i's children are 2i and 2i + 1, the root is node 1. An update recomputes every
    ancestor of the changed leaves from its two children, so the sums never drift from
    their leaves however many updates there are (each node holds exactly the float sum
    of its children).

    Args:
        capacity: the number of leaves, >= 1.

    Raises:
        ValueError: capacity < 1.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a sum tree needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.first_leaf = 1 << max(0, (capacity - 1).bit_length())
        self.tree = np.zeros(2 * self.first_leaf, dtype=np.float64)

    @property
    def total(self) -> float:
        """The sum of every leaf (the root)."""
        return float(self.tree[1])

    def leaves(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The values of the leaves at `indices` ((k,) int64), or all `capacity` of them."""
        start = self.first_leaf
        if indices is None:
            return self.tree[start : start + self.capacity].copy()
        return self.tree[start + np.asarray(indices, dtype=np.int64)]

    def update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaves `indices` ((k,) int64 in [0, capacity)) to `values` ((k,) float64
        >= 0, finite); a leaf given twice takes its last value.

        Raises:
            ValueError: an index out of range, or a value negative or not finite.
        """
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.capacity:
            raise ValueError(f"leaf indices must be in [0, {self.capacity}), got {indices}")
        if not np.all(np.isfinite(values)) or values.min() < 0:
            raise ValueError(f"leaf values must be finite and >= 0, got {values}")
        # the last of repeated indices wins: keep each index's last occurrence
        reverse_unique, first_in_reverse = np.unique(indices[::-1], return_index=True)
        nodes = reverse_unique + self.first_leaf
        self.tree[nodes] = values[::-1][first_in_reverse]
        nodes = np.unique(nodes // 2)
        while nodes[0] >= 1:
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes // 2)

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each value v in [0, total), the leaf i where the running sum of the leaves
        first exceeds v (leaf 0's interval is [0, p_0), leaf 1's [p_0, p_0 + p_1), ...).
        A descent never enters a subtree whose sum is 0, so rounding cannot return a
        leaf of value 0 while the total is positive.

        Args:
            values: (k,) float64.

        Returns:
            (k,) int64 leaf indices.

        Raises:
            ValueError: the tree is empty (total 0).
        """
        if not self.tree[1] > 0:
            raise ValueError("cannot sample from a sum tree whose total is 0")
        v = np.array(values, dtype=np.float64)
        node = np.ones(len(v), dtype=np.int64)
        while node.size and node[0] < self.first_leaf:
            left = 2 * node
            left_sum = self.tree[left]
            right = (v >= left_sum) & (self.tree[left + 1] > 0)
            v = np.where(right, v - left_sum, v)
            node = left + right
        return node - self.first_leaf

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k leaves, leaf i with probability value_i / total, stratified: one uniform in
        each of k equal slices of [0, total) (Schaul et al. 2016, Appendix B.2.1).

        Returns:
            (k,) int64 leaf indices, in slice order.
        """
        edges = (np.arange(k) + rng.random(k)) * (self.tree[1] / k)
        return self.find(edges)


class PrioritizedReplay:
    """One replay shard: `capacity` transitions in FIFO order and their priorities.

    Args:
        capacity: transitions held at most, >= 1; the oldest is overwritten first.
        fields: name -> (shape, dtype) of one transition's arrays, e.g.
            {"obs": ((4,), np.float32), "action": ((), np.int64), ...}.
        alpha: priority exponent α in [0, 1] (0: uniform sampling).

    Raises:
        ValueError: capacity < 1, or α outside [0, 1].
    """

    def __init__(self, capacity: int, fields: dict[str, tuple[tuple, np.dtype]], alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"priority exponent alpha must be in [0, 1], got {alpha}")
        self.tree = SumTree(capacity)
        self.capacity, self.alpha = capacity, alpha
        self.data = {
            name: np.zeros((capacity, *shape), dtype=dtype)
            for name, (shape, dtype) in fields.items()
        }
        # Each slot's transition's number in the order added (-1: empty), so a priority
        # update for a transition evicted since it was sampled is not applied to its
        # replacement (`update_priorities(..., ids)`).
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.size = 0  # transitions held
        self.cursor = 0  # where the next one goes
        self.added = 0  # transitions ever added

    @property
    def nbytes(self) -> int:
        """Bytes of the transitions' arrays, their ids and the tree."""
        data = sum(a.nbytes for a in self.data.values()) + self.ids.nbytes
        return data + self.tree.tree.nbytes

    def add(self, batch: dict[str, np.ndarray], priorities: np.ndarray) -> np.ndarray:
        """Store k transitions ((k, ...) arrays, one per field) with priorities p ((k,)
        float64 > 0, e.g. |TD error| + a small ε); beyond capacity the oldest go first.

        Returns:
            (k,) int64 the slots they were written to (a batch larger than capacity
            keeps only its last `capacity` transitions; the earlier slots repeat).

        Raises:
            ValueError: a priority not positive and finite, or a field missing.
        """
        priorities = np.asarray(priorities, dtype=np.float64)
        if priorities.size and (not np.all(np.isfinite(priorities)) or priorities.min() <= 0):
            raise ValueError(f"priorities must be finite and > 0, got {priorities}")
        missing = set(self.data) - set(batch)
        if missing:
            raise ValueError(f"transitions lack the fields {sorted(missing)}")
        k = len(priorities)
        slots = (self.cursor + np.arange(k)) % self.capacity
        for name, array in self.data.items():
            array[slots] = batch[name]  # a repeated slot keeps its last transition
        self.ids[slots] = self.added + np.arange(k)
        self.tree.update(slots, priorities**self.alpha)
        self.cursor = int((self.cursor + k) % self.capacity)
        self.size = min(self.size + k, self.capacity)
        self.added += k
        return slots

    def sample(
        self, k: int, beta: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """k transitions drawn with P(i) = p_i^α / Σ p^α (stratified), and their
        importance weights w_i = (N P(i))^(-β) / max_j w_j (max over this batch).

        Args:
            k: batch size, >= 1.
            beta: importance-sampling exponent β in [0, 1].
            rng: the sampling generator.

        Returns:
            (slots (k,) int64, weights (k,) float64 in (0, 1], transitions (k, ...) per
            field, copies).

        Raises:
            ValueError: an empty buffer, or β outside [0, 1].
        """
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"importance-sampling exponent beta must be in [0, 1], got {beta}")
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        slots = self.tree.sample(k, rng)
        weights = importance_weights(self.tree.leaves(slots) / self.tree.total, self.size, beta)
        return slots, weights, {name: array[slots] for name, array in self.data.items()}

    def update_priorities(
        self, slots: np.ndarray, priorities: np.ndarray, ids: np.ndarray | None = None
    ) -> int:
        """New priorities p ((k,) float64 > 0) for sampled `slots` (the learner's |TD
        errors|); a slot given twice takes its last value. With `ids` ((k,) int64, what
        `ids[slots]` was when sampled), slots whose transition has been evicted since are
        left alone.

        Returns:
            The number of priorities applied.

        Raises:
            ValueError: a priority not positive and finite, or a slot never filled.
        """
        slots = np.asarray(slots, dtype=np.int64)
        priorities = np.asarray(priorities, dtype=np.float64)
        if priorities.size and (not np.all(np.isfinite(priorities)) or priorities.min() <= 0):
            raise ValueError(f"priorities must be finite and > 0, got {priorities}")
        if slots.size and slots.max() >= self.size:
            raise ValueError(f"slots {slots} include some never filled (size {self.size})")
        if ids is not None:
            current = self.ids[slots] == np.asarray(ids, dtype=np.int64)
            slots, priorities = slots[current], priorities[current]
        self.tree.update(slots, priorities**self.alpha)
        return len(slots)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The filled transitions, their leaf values (p^α) and the counters, for a
        checkpoint (`load_state_dict` restores the same buffer)."""
        state = {f"data/{name}": array[: self.size].copy() for name, array in self.data.items()}
        state["priorities"] = self.tree.leaves()[: self.size]
        state["ids"] = self.ids[: self.size].copy()
        state["counters"] = np.array([self.size, self.cursor, self.added], dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Undo `state_dict` into a buffer of the same capacity and fields.

        Raises:
            ValueError: more transitions than this capacity, or other fields.
        """
        size, cursor, added = (int(x) for x in state["counters"])
        if size > self.capacity:
            raise ValueError(f"{size} transitions do not fit a capacity of {self.capacity}")
        names = {key.removeprefix("data/") for key in state if key.startswith("data/")}
        if names != set(self.data):
            raise ValueError(
                f"the state has fields {sorted(names)}, the buffer {sorted(self.data)}"
            )
        for name, array in self.data.items():
            array[:size] = state[f"data/{name}"]
        self.tree = SumTree(self.capacity)
        self.tree.update(np.arange(size), state["priorities"])
        self.ids[:] = -1
        self.ids[:size] = state["ids"] if "ids" in state else np.arange(size)
        self.size, self.cursor, self.added = size, cursor, added


def importance_weights(probabilities: np.ndarray, n: int, beta: float) -> np.ndarray:
    """w_i = (N P(i))^(-β) / max_j w_j over the batch (Schaul et al. 2016, Section 3.4).

    Args:
        probabilities: (k,) float64 sampling probabilities P(i) > 0.
        n: N, the transitions the batch was drawn from.
        beta: β in [0, 1] (1: full correction of the sampling bias).

    Returns:
        (k,) float64 weights in (0, 1].
    """
    weights = (n * np.asarray(probabilities, dtype=np.float64)) ** (-beta)
    return weights / weights.max()


class NStepTransitions:
    """n-step transitions from a vector env's steps, as an Ape-X actor builds them before
    sending them to replay (Horgan et al. 2018, Algorithm 1; the n-step double-Q target
    y = R + discount * Q_target(s', argmax_a Q(s', a)) is the learner's, from these).

    For each env copy, the transition starting at step t is

        (s_t, a_t, R = Σ_{k=0}^{m-1} γ^k r_{t+k}, s' = s_{t+m}, discount = γ^m)

    with m = n, or fewer where the episode ended at step t + m - 1: then s' is the final
    observation and discount is 0 if it was `terminated` (no bootstrap past a terminal
    state) and γ^m if it was only `truncated` (a time limit is not part of the MDP, so
    the target bootstraps from the final observation).

    A transition is emitted once its n steps are known, or when its episode ends; `push`
    returns them in the order of their first step, copy by copy at an episode's end.

    Args:
        n: the steps per return, >= 1 (1: one-step transitions).
        gamma: discount γ in [0, 1].
        num_envs: B, the copies.

    Raises:
        ValueError: n < 1 or γ outside [0, 1].
    """

    def __init__(self, n: int, gamma: float, num_envs: int):
        if n < 1:
            raise ValueError(f"n-step transitions need n >= 1, got {n}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the discount gamma must be in [0, 1], got {gamma}")
        self.n, self.gamma, self.num_envs = n, gamma, num_envs
        self.powers = gamma ** np.arange(n + 1, dtype=np.float64)
        self.obs: np.ndarray | None = None  # (n, B, *obs_shape), oldest first per copy
        self.actions = np.zeros((n, num_envs), dtype=np.int64)
        self.rewards = np.zeros((n, num_envs), dtype=np.float64)
        self.pending = np.zeros(num_envs, dtype=np.int64)  # steps held per copy, < n

    def push(self, obs, actions, rewards, terminated, truncated, next_obs) -> dict[str, np.ndarray]:
        """One vector step: obs (B, ...) the observations acted on, actions (B,),
        rewards (B,), terminated and truncated (B,) bool, next_obs (B, ...) the next
        observations (the final one where an episode ended).

        Returns:
            {"obs": (k, ...), "action": (k,) int64, "reward": (k,) float64 n-step
             returns, "next_obs": (k, ...), "discount": (k,) float64} for the k
            transitions complete after this step (k may be 0).
        """
        obs, next_obs = np.asarray(obs), np.asarray(next_obs)
        if self.obs is None:
            self.obs = np.zeros((self.n, *obs.shape), dtype=obs.dtype)
        copies = np.arange(self.num_envs)
        slot = self.pending
        self.obs[slot, copies] = obs
        self.actions[slot, copies] = actions
        self.rewards[slot, copies] = rewards
        self.pending = held = self.pending + 1
        terminated = np.asarray(terminated, dtype=bool)
        ended = terminated | np.asarray(truncated, dtype=bool)
        out: dict[str, list] = {
            "obs": [],
            "action": [],
            "reward": [],
            "next_obs": [],
            "discount": [],
        }
        # copies whose oldest step now has its n steps (episode still running): one each
        full = np.flatnonzero((held == self.n) & ~ended)
        if full.size:
            out["obs"].append(self.obs[0, full])
            out["action"].append(self.actions[0, full])
            out["reward"].append(self.powers[: self.n] @ self.rewards[:, full])
            out["next_obs"].append(next_obs[full])
            out["discount"].append(np.full(full.size, self.powers[self.n]))
            for array in (self.obs, self.actions, self.rewards):
                array[:, full] = np.roll(array[:, full], -1, axis=0)
            self.pending[full] = self.n - 1
        # copies whose episode ended: every step they hold starts a shorter transition
        for c in np.flatnonzero(ended):
            m = int(held[c])
            rewards_c = self.rewards[:m, c]
            for j in range(m):
                steps = m - j
                out["obs"].append(self.obs[j, c][None])
                out["action"].append(self.actions[j, c : c + 1])
                out["reward"].append(np.array([self.powers[:steps] @ rewards_c[j:]]))
                out["next_obs"].append(next_obs[c][None])
                out["discount"].append(np.array([0.0 if terminated[c] else self.powers[steps]]))
            self.pending[c] = 0
        if not out["obs"]:
            return {
                "obs": np.zeros((0, *obs.shape[1:]), dtype=obs.dtype),
                "action": np.zeros(0, dtype=np.int64),
                "reward": np.zeros(0),
                "next_obs": np.zeros((0, *next_obs.shape[1:]), dtype=next_obs.dtype),
                "discount": np.zeros(0),
            }
        return {key: np.concatenate(parts) for key, parts in out.items()}


def actor_epsilons(num_actors: int, epsilon: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """Each Ape-X actor's exploration ε_i = ε^(1 + i α / (N - 1)), i = 0..N-1 (Horgan et
    al. 2018, Section 4.1; one actor: ε).

    Returns:
        (N,) float64.
    """
    if num_actors == 1:
        return np.array([epsilon])
    i = np.arange(num_actors, dtype=np.float64)
    return epsilon ** (1.0 + i * alpha / (num_actors - 1))
