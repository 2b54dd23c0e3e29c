"""The parameter-server exchange's flow control (`hpcrl.topologies.serving`) on COMM_WORLD:
rank 0 serves, the other ranks act. An actor may have at most `max_in_flight` messages its
learner has not retired; beyond that it waits (counted as send wait) until the learner
retires one, whether or not new parameters are due; `all_waiting` tells the learner that
every running actor is blocked on it."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=3)

LIMIT, SENDS = 2, 5


def test_actors_wait_at_the_limit_until_the_learner_retires_their_messages():
    from mpi4py import MPI

    from hpcrl.comm import protocol as P
    from hpcrl.topologies.serving import ActorPool, LearnerLink

    comm = MPI.COMM_WORLD
    message = P.Schema([("header", (len(P.ActorHeader),), np.int64)])
    params = P.parameters_schema(3)
    if comm.rank == 0:
        actors = list(range(1, comm.size))
        seen = dict.fromkeys(actors, 0)
        held: list[int] = []

        def hold(msg, rank) -> bool:  # queued: retired later
            seen[rank] += 1
            held.append(rank)
            return False

        def take(msg, rank) -> bool:  # done with at once
            seen[rank] += 1
            return True

        def write(msg) -> None:
            msg["header"][P.ParamsHeader.VERSION] = 0

        pool = ActorPool(comm, actors, message, params, write, 60.0, max_in_flight=LIMIT)
        pool.publish_all()
        start = time.monotonic()
        while time.monotonic() - start < 0.6:
            pool.serve(hold)
            time.sleep(1e-3)
        at_limit = dict(seen)
        all_waiting = pool.all_waiting()  # every actor blocked on this learner
        for rank in held:
            pool.retire(rank)
        assert not pool.all_waiting()
        while pool.finished < len(actors):
            pool.serve(take)
            time.sleep(1e-4)
        pool.close()
        assert at_limit == dict.fromkeys(actors, LIMIT)  # nobody got past its limit
        assert all_waiting and pool.all_waiting()  # at the end: every actor is done
        assert seen == dict.fromkeys(actors, SENDS)
        waited = None
    else:
        timing = np.zeros(len(P.Timing))
        link = LearnerLink(
            comm, 0, message, params, lambda p: None, 60.0, timing, max_in_flight=LIMIT
        )
        link.start()
        for i in range(SENDS):
            msg = link.buffer()
            msg["header"][:] = 0
            msg["header"][P.ActorHeader.FINAL] = i == SENDS - 1
            link.send()
        link.finish()
        waited = float(timing[P.Timing.SEND_WAIT])
    waits = comm.allgather(waited)
    assert all(w > 0.3 for w in waits[1:]), waits  # blocked for most of the 0.6 s
