"""DD-PPO's straggler cut-off (`hpcrl.comm.straggler`) on COMM_WORLD: a rank slowed by a
test-only delay is cut short (after at least 25% of its rollout) while the others complete
theirs; with no delay nobody is cut; 1-2 ranks at the default 0.6 and `sync_frac` 1 are off.

Each "vector step" here is a sleep, so the ranks keep pace in real time even when they
oversubscribe the cores; the rollouts are separated by an allgather (the update's place).
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.mpi(min_size=4)

ROLLOUT = 8  # vector steps of a full rollout


def _rollouts(comm, cutoff, step_s: float, rounds: int) -> list[list[int]]:
    """Steps each rank took in each of `rounds` rollouts: [[rank 0's ...], [rank 1's ...]]."""
    taken = []
    for _ in range(rounds):
        comm.Barrier()
        steps = 0
        while steps < ROLLOUT:
            time.sleep(step_s)
            steps += 1
            if steps < ROLLOUT and cutoff.should_stop(steps):
                break
        cutoff.finish()
        taken.append(steps)
    return comm.allgather(taken)


def test_slowed_rank_is_cut_after_a_quarter_of_its_rollout_and_the_others_are_not():
    from mpi4py import MPI

    from hpcrl.comm.straggler import StragglerCutoff

    comm = MPI.COMM_WORLD
    slow = comm.size - 1
    cutoff = StragglerCutoff(comm, 0.6, ROLLOUT)
    assert cutoff.active and cutoff.min_steps == 2
    step_s = 0.06 if comm.rank == slow else 0.01
    taken = _rollouts(comm, cutoff, step_s, rounds=4)
    cutoff.close()
    for rank, steps in enumerate(taken):
        if rank == slow:
            # the others are done after ~80 ms, when the straggler has taken 1-2 steps
            assert all(2 <= s < ROLLOUT for s in steps), (rank, steps)
        else:
            assert steps == [ROLLOUT] * 4, (rank, steps)


def test_nobody_is_cut_when_no_rank_is_slowed():
    from mpi4py import MPI

    from hpcrl.comm.straggler import StragglerCutoff

    comm = MPI.COMM_WORLD
    cutoff = StragglerCutoff(comm, 0.6, ROLLOUT)
    taken = _rollouts(comm, cutoff, 0.02, rounds=4)
    cutoff.close()
    assert taken == [[ROLLOUT] * 4] * comm.size


def test_threshold_and_when_the_cutoff_is_off():
    from mpi4py import MPI

    from hpcrl.comm.straggler import StragglerCutoff

    world = MPI.COMM_WORLD
    pair = world.Split(world.rank // 2, world.rank)  # sub-communicators of 2 ranks
    try:
        for comm, sync_frac, active, threshold in [
            (MPI.COMM_SELF, 0.6, False, 1),
            (pair, 0.6, False, 2),  # needs both ranks done: nobody can be cut
            (pair, 0.5, True, 1),
            (world, 0.6, True, 3),  # 0.6 x 4 = 2.4: three done
            (world, 1.0, False, 4),
        ]:
            cutoff = StragglerCutoff(comm, sync_frac, rollout_steps=100)
            assert (cutoff.active, cutoff.threshold, cutoff.min_steps) == (active, threshold, 25)
            assert not cutoff.should_stop(99) or active
            cutoff.close()
    finally:
        pair.Free()
    with pytest.raises(ValueError, match="sync_frac"):
        StragglerCutoff(MPI.COMM_SELF, 0.0, 8)
