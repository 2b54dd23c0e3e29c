"""Table arithmetic the tabular algorithms and layouts share (numpy only, no MPI): a
batch of transitions reduced to its distinct (state, action) pairs, and the max of rows."""

from __future__ import annotations

import numpy as np


def sum_by_pair(
    n_states: int, n_actions: int, obs: np.ndarray, actions: np.ndarray, *weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Each distinct (s, a) pair of a batch once, with the sums of `weights` over its
    copies, added in batch order.

    Args:
        n_states, n_actions: the table's shape (the pairs' range).
        obs, actions: (B,) int64 pairs.
        weights: (B,) float64 arrays to sum per pair.

    Returns:
        (states (P,) int64, actions (P,) int64, [sums (P,) float64 per weight]), the pairs
        sorted by s * n_actions + a.
    """
    flat = obs * n_actions + actions
    if n_states * n_actions <= 8 * len(flat):  # small table: no sort
        size = n_states * n_actions
        entries = np.flatnonzero(np.bincount(flat, minlength=size))
        sums = [np.bincount(flat, weights=w, minlength=size)[entries] for w in weights]
    else:
        entries, inverse = np.unique(flat, return_inverse=True)
        sums = [np.bincount(inverse, weights=w, minlength=len(entries)) for w in weights]
    return entries // n_actions, entries % n_actions, sums


# Up to this many actions, the max of a row is a loop over the columns: numpy's max along
# a short last axis costs up to 19x more (8,192 rows of FrozenLake's 4 actions).
_COLUMN_LOOP = 16
_MIN_ROWS = 128  # fewer rows: the loop's calls cost more than they save


def table_rows(table: np.ndarray, states: np.ndarray) -> np.ndarray:
    """(B, A) rows of an (S, A) table at (B,) int states, exactly `table[states]`: one
    `np.take` along axis 0, which copies whole rows at once, where numpy's fancy indexing
    of 4-float rows costs 8x more (57 us against 7 us for 8,192 rows)."""
    return np.take(table, states, axis=0)


def row_max(rows: np.ndarray) -> np.ndarray:
    """(B, A) -> (B,) max of each row, exactly `rows.max(axis=1)`."""
    if rows.shape[1] > _COLUMN_LOOP or rows.shape[0] < _MIN_ROWS or rows.shape[1] == 0:
        return rows.max(axis=1)
    best = rows[:, 0].copy()
    for column in range(1, rows.shape[1]):
        np.maximum(best, rows[:, column], out=best)
    return best
