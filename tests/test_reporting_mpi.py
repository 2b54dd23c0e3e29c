"""`EpisodeRows.gather` on COMM_WORLD: every rank's pending episode rows on rank 0, in rank
order, whatever the ranks' counts (none on some)."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrl.topologies.reporting import EpisodeRows

pytestmark = pytest.mark.mpi(min_size=2)


def _chunks(rank: int) -> list[np.ndarray]:
    """Rank r's chunks: r + 1 chunks of r rows each (rank 0 has none), numbered."""
    return [np.full((rank, 5), 1000.0 * rank + 10 * c) for c in range(rank + 1)]


def test_gather_puts_every_ranks_rows_on_rank_0_in_rank_order():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    episodes = EpisodeRows()
    for chunk in _chunks(rank):
        if len(chunk):
            episodes.add(chunk[:, 0], chunk[:, 1], chunk[:, 2], 0.0, rank)
    rows = episodes.gather(comm, 0, watchdog_s=60.0)
    assert episodes.chunks == []  # taken
    if rank != 0:
        assert rows is None
        return
    expected = np.concatenate([np.concatenate(_chunks(r))[:, 0] for r in range(size)])
    assert rows.shape == (len(expected), 5)
    np.testing.assert_array_equal(rows[:, 0], expected)
    np.testing.assert_array_equal(
        rows[:, 4], np.repeat(np.arange(size), [r * (r + 1) for r in range(size)])
    )


def test_gather_with_rows_on_rank_0_only():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    episodes = EpisodeRows()
    if comm.Get_rank() == 0:
        episodes.add(np.arange(3.0), np.ones(3), np.full(3, 7.0), 0.5, 0)
        episodes.add(np.arange(3.0, 5.0), np.ones(2), np.full(2, 8.0), 0.5, 0)
    rows = episodes.gather(comm, 0, watchdog_s=60.0)
    if comm.Get_rank() == 0:
        np.testing.assert_array_equal(rows[:, 0], np.arange(5.0))
        np.testing.assert_array_equal(rows[:, 2], [7, 7, 7, 8, 8])
