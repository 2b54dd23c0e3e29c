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


@pytest.mark.parametrize("layout", ["allreduce", "sharded", "async"])
def test_episodes_sent_in_pieces_make_the_same_run_file(layout, mpi_tmp_path, monkeypatch):
    """Ranks holding `EPISODE_FLUSH_ROWS` episodes together send them to rank 0 at the next
    sync point (`flush_episodes`) instead of at the next log: with the limit at 64 rows
    they go in dozens of pieces, and `/episodes` and `/metrics` are what one piece at
    the end gives."""
    from mpi4py import MPI

    from hpcrl import runner
    from hpcrl.topologies import reporting

    comm = MPI.COMM_WORLD
    values = {
        "env_id": "FrozenLake-v1",
        "total_env_steps": 40_000,
        "layout": layout,
        "num_envs": 16,
        "sync_interval": 4,
        "eval_episodes": 0,
        "record_trajectories": False,
        "log_interval_s": 1000.0,
        "seed": 3,
    }
    runner.train(comm, values, str(mpi_tmp_path / "whole"), overwrite=True)
    gathers = []
    gather_episodes = reporting.gather_episodes
    monkeypatch.setattr(reporting, "EPISODE_FLUSH_ROWS", 64)
    monkeypatch.setattr(
        reporting, "gather_episodes", lambda *a: (gathers.append(1), gather_episodes(*a))
    )
    runner.train(comm, values, str(mpi_tmp_path / "pieces"), overwrite=True)
    assert len(gathers) > 20, len(gathers)  # one at the end alone, before
    if comm.Get_rank() != 0:
        return
    import h5py

    with (
        h5py.File(mpi_tmp_path / "whole" / "run.h5", "r") as whole,
        h5py.File(mpi_tmp_path / "pieces" / "run.h5", "r") as pieces,
    ):
        assert len(whole["episodes/return"]) > 64 * 20
        for name in ("return", "length", "env_steps", "rank"):
            np.testing.assert_array_equal(
                whole["episodes"][name][()], pieces["episodes"][name][()], err_msg=name
            )
        assert len(whole["metrics/env_steps"]) == len(pieces["metrics/env_steps"])
