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
        self.size = 0  # transitions held
        self.cursor = 0  # where the next one goes
        self.added = 0  # transitions ever added

    @property
    def nbytes(self) -> int:
        """Bytes of the transitions' arrays and the tree."""
        return sum(a.nbytes for a in self.data.values()) + self.tree.tree.nbytes

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

    def update_priorities(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities p ((k,) float64 > 0) for sampled `slots` (the learner's |TD
        errors|); a slot given twice takes its last value.

        Raises:
            ValueError: a priority not positive and finite, or a slot never filled.
        """
        slots = np.asarray(slots, dtype=np.int64)
        priorities = np.asarray(priorities, dtype=np.float64)
        if priorities.size and (not np.all(np.isfinite(priorities)) or priorities.min() <= 0):
            raise ValueError(f"priorities must be finite and > 0, got {priorities}")
        if slots.size and slots.max() >= self.size:
            raise ValueError(f"slots {slots} include some never filled (size {self.size})")
        self.tree.update(slots, priorities**self.alpha)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The filled transitions, their leaf values (p^α) and the counters, for a
        checkpoint (`load_state_dict` restores the same buffer)."""
        state = {f"data/{name}": array[: self.size].copy() for name, array in self.data.items()}
        state["priorities"] = self.tree.leaves()[: self.size]
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
