"""The parameter-server exchange, written once for every layout with actors (the tabular
`ps` layout and the deep `actor_learner` layout): actors send experience, a learner rank
answers with versioned parameters, and nobody waits per step.

Actor side (`LearnerLink`): it fills one of two preallocated message buffers while the
other is in flight (`Isend`, double buffering); it waits only when both are still in flight
or when flow control says so (below; both are send wait). New parameters are picked up
between vector steps when the posted `Irecv` has completed (`Test`), not by waiting, except
for the very first ones and for flow-control credit.

Learner side (`ActorPool`): two receives are posted per actor, so both of an actor's
buffers can be in flight; whichever complete are served (`Testsome`) in each actor's send
order. New parameters are stamped with their version (learner updates) and go to an actor
only once its previous ones were delivered: after every learner update that publishes
(`refresh`, `actor_learner`), or in answer to each of its messages when the previous send
has completed (`reply`, tabular `ps`: otherwise that answer is skipped). Policy lag =
learner updates now - the version a message was collected with.

Flow control (`max_in_flight` M): an actor may have at most M messages the learner is not
done with; the learner says how many of an actor's messages it has *retired* (learned from,
or counted and dropped) in every parameters message (`ParamsHeader.RETIRED`), and an actor
at its limit waits for new parameters before filling the next message (counted as send
wait), as IMPALA's and Sample Factory's bounded queues make actors wait. Withholding
receives would not do it: MPICH completes small `Isend`s eagerly, without a matching
receive. Once one of its messages is retired (`retire`), an actor at its limit gets
parameters at the pool's next `publish_pending` (which every `serve` starts with), whether
or not new parameters are due: `actor_learner` calls it right after taking a batch, so the
actor steps during the update (measured in benchmarks/RESULTS.md: 0.18 -> 0.29 of the raw
rate at 2 ranks, when the credit waited for the update to end). The learner
must be able to fill a batch from what M lets in flight; when it cannot (few actors, or the
end of a run), `all_waiting` says so and the learner takes what it has.

Shutdown: an actor's last message says `ActorHeader.FINAL`; its learner answers with final
parameters (`ParamsHeader.FINAL`), so every send has a matching receive and nothing is
cancelled except the second posted receive of an actor that has finished.

Preemption: a learner that decides to stop stamps `ParamsHeader.STOP` on the next
parameters of each actor (`ActorPool.stopping`); the actor ends with its current message
marked final, as at the end of its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
from mpi4py import MPI

from hpcrl.comm.protocol import (
    ActorHeader,
    Message,
    ParamsHeader,
    Schema,
    Tag,
    Timing,
    write_actor_header,
)
from hpcrl.comm.waits import wait_all
from hpcrl.topologies.recording import TrajectoryRecorder, link_trajectories

# How an actor waits for its learner where the learner is the one with work to do (its
# first parameters, flow-control credit): sleeping between polls from the start, up to
# 5 ms, so the cores go to the learner (63 actors polling every 1 ms cost ~30% of 2 cores).
_POLITE = {"spin_s": 0.0, "max_sleep_s": 5e-3}


class Actor:
    """An acting rank: its env copies, its share of the budget and its trajectory file. A
    layout's actor adds `produce(message, poll)`, which fills one message (calling
    `poll()`, which returns the policy version now loaded, before every vector step) and
    stamps it (`stamp`)."""

    def __init__(self, ctx, budget: int):
        self.ctx = ctx
        self.stepper = ctx.make_stepper()
        self.recorder = TrajectoryRecorder(ctx)
        self.budget = budget
        self.env_steps = 0  # in this segment
        self.stop = False  # end with the current message (preemption)

    @property
    def finished(self) -> bool:
        return self.env_steps >= self.budget

    @property
    def done(self) -> bool:
        """Its last message is (being) sent: budget spent or told to stop."""
        return self.finished or self.stop

    def stamp(self, msg: Message, rows: int, policy_version: int, episodes: int, steps: int):
        """Write the message's `ActorHeader` (final when `done`)."""
        write_actor_header(
            msg,
            rows,
            policy_version,
            self.done,
            episodes,
            self.env_steps,
            self.ctx.stop_requested(),
            steps,
        )

    def close(self) -> int:
        """Close the envs and the trajectory file; returns its rows."""
        self.stepper.close()
        return self.recorder.close()


def run_actor(ctx, actor: Actor, link: LearnerLink) -> None:
    """An actor rank's whole loop: messages until its last (final, perhaps empty: a budget
    already spent), then the final handshake and the trajectory link."""
    link.start()

    def poll() -> int:
        version = link.poll()
        actor.stop = actor.stop or link.stop or ctx.stop_requested()
        return version

    while True:
        actor.produce(link.buffer(), poll)
        # On disk before the learner can count these rows in a checkpoint, so a resume
        # after kill -9 finds every trajectory row the checkpoint accounts for.
        actor.recorder.flush()
        link.send()
        if actor.done:
            break
    link.finish()
    link_trajectories(ctx, actor.close())


class LearnerLink:
    """An actor's side of the exchange with its learner rank.

    Call sequence:
        link = LearnerLink(comm, learner_rank, message_schema, params_schema, load, ...)
        link.start()                          # waits for the first parameters, loads them
        while not done:
            msg = link.buffer()               # a free send buffer (may wait: send wait)
            ... fill msg, calling link.poll() before every vector step ...
            link.send()
        link.finish()                         # waits for the final parameters

    Args:
        load: called with the parameters message whenever new parameters arrived.
        timing: the actor's `Timing` counters (send and parameter waits are added), or None.
        max_in_flight: flow control (see the module doc): at most this many sent messages
            the learner has not retired; None for none.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        learner_rank: int,
        message_schema: Schema,
        params_schema: Schema,
        load: Callable[[Message], None],
        watchdog_s: float,
        timing: np.ndarray | None = None,
        max_in_flight: int | None = None,
    ):
        self.comm, self.learner_rank, self.watchdog_s = comm, learner_rank, watchdog_s
        self.load = load
        self.timing = timing if timing is not None else np.zeros(len(Timing))
        self.buffers = [message_schema.allocate(), message_schema.allocate()]
        self.sends: list[MPI.Request | None] = [None, None]
        self.slot = 0
        self.params = params_schema.allocate()
        self.recv: MPI.Request | None = None
        self.version = 0  # of the parameters loaded last
        self.stop = False  # the learner said stop
        self.max_in_flight = max_in_flight
        self.sent = 0  # messages sent
        self.retired = 0  # of them, those the learner said it is done with

    def _post(self) -> None:
        self.recv = self.comm.Irecv(self.params.buffer, source=self.learner_rank, tag=Tag.PARAMS)

    def _loaded(self) -> None:
        header = self.params["header"]
        self.load(self.params)
        self.version = int(header[ParamsHeader.VERSION])
        self.stop = self.stop or bool(header[ParamsHeader.STOP])
        self.retired = int(header[ParamsHeader.RETIRED])

    def start(self) -> None:
        """Wait for the first parameters (parameter wait) and load them."""
        t0 = time.perf_counter()
        self._post()
        what = f"the first parameters from rank {self.learner_rank}"
        wait_all([self.recv], self.comm, what, self.watchdog_s, **_POLITE)
        self.timing[Timing.PARAM_WAIT] += time.perf_counter() - t0
        self._loaded()
        self._post()

    def poll(self) -> int:
        """Load new parameters if they have arrived; returns the version now loaded."""
        if self.recv.Test():
            self._loaded()
            self._post()
        return self.version

    def buffer(self) -> Message:
        """The send buffer to fill next, once the learner has retired enough messages (flow
        control) and the buffer's previous send has completed; both waits are send wait."""
        limit = self.max_in_flight
        if limit is not None and self.sent - self.retired >= limit and not self.stop:
            t0 = time.perf_counter()
            what = f"rank {self.learner_rank} to retire one of our {limit} messages in flight"
            while self.sent - self.retired >= limit and not self.stop:
                wait_all([self.recv], self.comm, what, self.watchdog_s, **_POLITE)
                self._loaded()
                self._post()
            self.timing[Timing.SEND_WAIT] += time.perf_counter() - t0
        send = self.sends[self.slot]
        if send is not None:
            t0 = time.perf_counter()
            what = f"rank {self.learner_rank} to take a message"
            wait_all([send], self.comm, what, self.watchdog_s)
            self.timing[Timing.SEND_WAIT] += time.perf_counter() - t0
        return self.buffers[self.slot]

    def send(self) -> None:
        """Send the buffer `buffer()` returned, and switch to the other one."""
        msg = self.buffers[self.slot]
        self.sends[self.slot] = self.comm.Isend(
            msg.buffer, dest=self.learner_rank, tag=Tag.EXPERIENCE
        )
        self.sent += 1
        self.slot ^= 1

    def finish(self) -> None:
        """After the final message: wait until it is sent and the learner's final
        parameters (its answer) have arrived."""
        sends = [r for r in self.sends if r is not None]
        wait_all(sends, self.comm, "the last messages to go", self.watchdog_s)
        while True:
            what = f"the final parameters from rank {self.learner_rank}"
            wait_all([self.recv], self.comm, what, self.watchdog_s)
            if self.params["header"][ParamsHeader.FINAL]:
                return
            self._post()


class ActorPool:
    """A learner rank's side of the exchange with its actors.

    Call sequence:
        pool = ActorPool(comm, actors, message_schema, params_schema, write, ...)
        pool.publish_all()                     # the first parameters
        while pool.finished < len(actors):
            pool.serve(consume)                # consume(msg, actor_rank) per message
            ... learn; pool.retire(actor_rank) per message learned from or dropped;
                pool.refresh() when new parameters should go out ...
        pool.close()

    Args:
        write: fills a parameters message's payload and `ParamsHeader.VERSION` (the pool
            sets FINAL, STOP and RETIRED).
        reply: answer each message with new parameters right away if the actor's previous
            ones have been delivered (tabular `ps`: each batch is an update; no answer is
            queued otherwise); without it parameters go out after `refresh()`.
        max_in_flight: the actors' flow-control limit (`LearnerLink`), or None.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        actors: list[int],
        message_schema: Schema,
        params_schema: Schema,
        write: Callable[[Message], None],
        watchdog_s: float,
        reply: bool = False,
        max_in_flight: int | None = None,
    ):
        self.comm, self.actors, self.watchdog_s, self.write = comm, actors, watchdog_s, write
        self.reply, self.max_in_flight = reply, max_in_flight
        n = len(actors)
        self.index = {a: i for i, a in enumerate(actors)}
        # Flow control, per actor: messages received, retired, and retired as last told.
        self.received = [0] * n
        self.retired = [0] * n
        self.credited = [0] * n
        self.inbox = [[message_schema.allocate(), message_schema.allocate()] for _ in actors]
        self.receives = [
            comm.Irecv(self.inbox[i][s].buffer, source=a, tag=Tag.EXPERIENCE)
            for i, a in enumerate(actors)
            for s in range(2)
        ]
        self.outbox = [params_schema.allocate() for _ in actors]
        self.sends: list[MPI.Request | None] = [None] * n
        self.done: set[int] = set()  # actors whose final message was served
        self.told: set[int] = set()  # actors sent parameters that say stop
        self.pending: set[int] = set()  # actors whose latest parameters are not sent yet
        self.stopping = False  # stamp STOP on every snapshot from now on
        # Completed receives not yet consumed, and each actor's slot whose message comes
        # next: an actor's messages match its two receives alternately, but may complete in
        # the same `Testsome` (or out of order); they are consumed in the order sent.
        self.arrived: set[int] = set()
        self.next_slot = [0] * n

    @property
    def finished(self) -> int:
        """Actors whose final message has been served."""
        return len(self.done)

    def publish(self, i: int, final: bool = False) -> None:
        """Send actor i the current parameters (its previous send has completed)."""
        msg = self.outbox[i]
        self.write(msg)
        msg["header"][ParamsHeader.FINAL] = int(final)
        msg["header"][ParamsHeader.STOP] = int(self.stopping)
        msg["header"][ParamsHeader.RETIRED] = self.credited[i] = self.retired[i]
        self.sends[i] = self.comm.Isend(msg.buffer, dest=self.actors[i], tag=Tag.PARAMS)
        self.pending.discard(i)
        if self.stopping:
            self.told.add(i)

    def publish_all(self) -> None:
        for i in range(len(self.actors)):
            self.publish(i)

    def refresh(self) -> None:
        """New parameters for every running actor, sent as each previous send completes."""
        self.pending.update(i for i in range(len(self.actors)) if i not in self.done)

    def stop(self) -> None:
        """Tell every running actor to stop, with its next parameters."""
        self.stopping = True
        self.pending.update(
            i for i in range(len(self.actors)) if i not in self.done and i not in self.told
        )

    def retire(self, rank: int, count: int = 1) -> None:
        """The learner is done with `count` more messages of actor `rank` (learned from or
        dropped); an actor that may be waiting for this credit gets parameters next."""
        i = self.index[rank]
        self.retired[i] += count
        self._credit(i)

    def all_waiting(self) -> bool:
        """Flow control: every actor still running has `max_in_flight` messages received
        and not retired, so none can send more until the learner retires some (near the
        end of a run, when too few actors are left to fill a batch)."""
        if self.max_in_flight is None:
            return False
        return all(
            i in self.done or self.received[i] - self.retired[i] >= self.max_in_flight
            for i in range(len(self.actors))
        )

    def _credit(self, i: int) -> None:
        if (
            self.max_in_flight is not None
            and self.retired[i] > self.credited[i]
            and self.received[i] - self.credited[i] >= self.max_in_flight
            and i not in self.done
        ):
            self.pending.add(i)

    def serve(self, consume: Callable[[Message, int], bool]) -> bool:
        """Send pending parameters whose previous send completed, then consume every
        message that arrived, in each actor's send order; an actor's final message is
        answered with final parameters. `consume(msg, rank)` returns True when it is done
        with the message (retired), False when it keeps it for `retire` later. Returns
        True if any message arrived."""
        self.publish_pending()
        ready = MPI.Request.Testsome(self.receives) or []
        self.arrived.update(ready)
        for j in _in_send_order(self.arrived, self.next_slot):
            i, slot = divmod(j, 2)
            msg = self.inbox[i][slot]
            self.received[i] += 1
            if consume(msg, self.actors[i]):
                self.retired[i] += 1
            self._credit(i)
            if msg["header"][ActorHeader.FINAL]:
                self.done.add(i)
                other = self.receives[2 * i + (1 - slot)]  # nothing follows a final message
                other.Cancel()
                other.Wait()
                what = f"actor {self.actors[i]} to take parameters"
                wait_all([self.sends[i]], self.comm, what, self.watchdog_s)
                self.publish(i, final=True)
            else:
                self.receives[j] = self.comm.Irecv(
                    msg.buffer, source=self.actors[i], tag=Tag.EXPERIENCE
                )
                if self.reply and self.sends[i].Test():
                    self.publish(i)
        return bool(ready)

    def publish_pending(self) -> None:
        """Send every pending actor (new parameters, or credit it waits for) whose
        previous send has completed. `serve` starts with this; a learner also calls it
        right after taking a batch, so that the actors it credited step during its update
        instead of after it."""
        for i in list(self.pending):
            if i not in self.done and self.sends[i].Test():
                self.publish(i)

    def close(self) -> None:
        """Wait until every actor has taken its last parameters."""
        sends = [r for r in self.sends if r is not None]
        wait_all(sends, self.comm, "actors to take parameters", self.watchdog_s)


def _in_send_order(arrived: set[int], next_slot: list[int]) -> Iterator[int]:
    """Yield (and remove from `arrived`) the completed receive indices 2i + slot that are
    next in actor i's send order, advancing `next_slot[i]`; a message whose predecessor
    has not completed yet waits in `arrived`."""
    for i in sorted({j // 2 for j in arrived}):
        while 2 * i + next_slot[i] in arrived:
            j = 2 * i + next_slot[i]
            arrived.discard(j)
            next_slot[i] ^= 1
            yield j


def alternate(ctx, actor, learner, message: Message) -> bool:
    """One process: the actor and the learner take turns in place, one message at a time,
    the actor acting on the learner's live parameters (no policy lag, no copies).

    Call sequence (of the two objects):
        actor.produce(message, version)     # fill `message`; version() = learner's now
        learner.consume(message, 0)
        learner.after(last, stopped)        # learn, log, checkpoint; last: actor is done

    Returns:
        Whether a preemption signal stopped the actor before its budget was spent.
    """
    while True:
        actor.produce(message, lambda: learner.policy_version)
        learner.consume(message, 0)
        if ctx.stop_requested() and not actor.done:
            actor.stop = True
        learner.after(actor.done, actor.stop)
        if actor.done:
            return actor.stop
