"""The `sharded` layout: tabular Q-learning with the Q-table split over the ranks. Every
rank owns the rows of the states s with s mod N = rank (`ShardMap`) and also acts; no rank
holds the whole table unless it is smaller than one round's buffers (dense rounds, below).

Every vector step is one exchange round (`ShardExchange.round`), collective over the ranks:

    1. Alltoall     (N, 2) int64 counts: the updates and the row requests for each owner
    2. Alltoallv    records of 4 float64 to their owners: one update per distinct (s, a)
                    of the previous step, (row, action, sum of its targets, their count),
                    then one row request per distinct state, (row, -1, 0, 0)
    3. the owners apply the updates (`TabularLearner.update_towards`, one vectorized
       step per round) and only then read the rows asked for
    4. Alltoallv    the rows Q(s, .) back to whoever asked, in the order asked

A rank asks for the rows of its next states s' (the final state where an episode ended)
and of the states it acts from next (in a sparse round only where they differ: the copies
whose episode ended, `_requests`); it acts ε-greedily on those rows and computes its
targets r + γ (1 - terminated) max_a' Q(s', a') from them (`td_targets`), which it sends
to the owners in the next round. A target is therefore computed from the table as it was
after the previous round, and applied one round later. Within one round an owner adds up
the partial sums of every rank, in rank order, and moves each (s, a) once, by α towards
the mean of all its targets (`hpcrl.algos.qlearning.step_towards_mean_targets`; the mean
TD error of `update_towards`, with the targets summed first), so the outcome does not
depend on the order of any batch, and the whole run is deterministic for a fixed seed
and world size. After the last step one more round sends the last targets.

Why collectives and not one-sided RMA (passive-target `Accumulate` of the updates into the
owners' windows, `Get` of the rows): measured side by side (`benchmarks/shard_exchange.py`),
a round by RMA took 3.4x as long on 2 ranks and 2.3x on 4 (10^6 states, 8,192 copies a
rank: scattered single elements, one indexed datatype per owner per round, and a barrier
on each side of the owners' step), and `Accumulate`'s order over the ranks is not
specified, so its sums are not reproducible to the last bit where these are.

Dense rounds, for a table small next to the round's records (N * 2 * S * A float64 <= 4
float64 per env copy; FrozenLake 8x8 on 2 ranks from 256 copies a rank): steps 1-4 give
way to one `Allgather` of every rank's (2, S, A) target sums and counts, zeros where the
rank has none (two `bincount`s of its batch), posted before the rank steps its envs and
notes their finished episodes, so that it travels, and a slower rank catches up,
meanwhile (`ShardExchange.post`). Every rank then adds them in rank order, as an owner
does, and steps its own copy of the whole table, gathered once at the first round, in
one masked step over the pairs with a count (`QLearningLearner.update_towards_dense`);
its shard is that copy's rows. On one rank the shard is the table, and a round is those
two steps with nothing sent. One meeting per vector step instead of three, overlapped
with the env step, no sort and no counts, and the same floats as the sparse round (the
zeros add exactly; `tests/test_sharded_mpi.py` compares them bit for bit). On 2 ranks of
FrozenLake 8x8 with 8,192 copies a rank it about halved the time a rank waits for the
other; the 2-rank rate stayed within this machine's noise of the earlier dense
round's (`benchmarks/RESULTS.md`). Such a table is no larger than the round buffers
every rank holds anyway, so the rule that no rank holds the whole table applies to the
tables it matters for.

Memory per rank: the shard, ceil(S / N) * A float64 (`max_table_bytes_per_rank` caps it;
a table that does not fit the cap on this many ranks is refused before anything is
allocated), plus the round's buffers, O(B (A + 4)) float64 for B env copies, plus the final
greedy evaluation's (S,) int32 greedy actions (1 / (2A) of the table's bytes), gathered
once at the end. An exchange round is not a stop point: every `sync_interval` vector steps
the ranks' `Vote` flags, summed, decide logs, checkpoints and a stop, as in `allreduce`.
A dense round carries them: each rank votes before it posts the sync step's round, and
reads the sums when the round completes, so a sync point costs no meeting of its own (at
a blocking `Allreduce` there the rank ahead waited for the other, 0.02-0.15 s of a 1.8 s
2-rank run of FrozenLake 8x8; `benchmarks/RESULTS.md`). A sparse round's votes take one
small `Allreduce` after it.

Checkpoints: each rank writes its shard, `checkpoints/step-<N>.shard-<k>.h5`, then rank 0
writes `step-<N>.h5` with every rank's RNG, env and counter state and its pending round
(targets not yet sent, the rows it acts from next), so a resume on the same world size
continues bit-exactly. A resume on another world size reads each old shard in turn and
keeps the rows this rank now owns (one old shard in memory at a time); its envs restart.
`hpcrl evaluate` and `hpcrl.load_policy` read the shards one at a time in one process and
keep only every state's greedy action, (S,) int32 (`Sharded.checkpoint_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import h5py
import numpy as np
from mpi4py import MPI

from hpcrl import preemption
from hpcrl.algos import make_learner
from hpcrl.algos.tabular import sum_by_pair, table_rows
from hpcrl.comm.waits import allreduce_sum, bcast, wait_all
from hpcrl.contracts import LoopResult
from hpcrl.envs import discrete_sizes
from hpcrl.errors import ConfigError, UserError
from hpcrl.evaluation import actions_episode_returns
from hpcrl.storage.checkpoints import shard_path, write_shard
from hpcrl.topologies.checkpointing import (
    gather_rank_states,
    rank_state,
    restore_rank_state,
    save_checkpoint,
)
from hpcrl.topologies.collective_eval import return_stats
from hpcrl.topologies.recording import TrajectoryRecorder, link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter, flush_episodes, gather_and_log
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.segments import Lockstep
from hpcrl.topologies.sync_points import Vote, vote_buffer
from hpcrl.topologies.tabular import TabularConfig, TabularTopology

_MIB = 1 << 20


@dataclass
class ShardedConfig(TabularConfig):
    """Settings of the `sharded` layout: `sync_interval` is the vector steps between two
    votes (log, checkpoint, stop); `max_table_bytes_per_rank` caps the bytes of the
    Q-table shard one rank holds (0: no cap)."""

    max_table_bytes_per_rank: int = 0

    def validate(self) -> None:
        super().validate()
        cap = self.max_table_bytes_per_rank
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ConfigError(
                f"config key 'max_table_bytes_per_rank': got {cap!r}, expected an integer "
                "number of bytes >= 0 (0: no cap)"
            )


class ShardMap:
    """Which rank owns which rows: state s lives on rank s mod N, at local row s // N.

    Round-robin, so the states of any region of a grid spread evenly over the ranks.
    """

    def __init__(self, n_states: int, world_size: int):
        self.n_states, self.world_size = n_states, world_size

    def rows(self, rank: int) -> int:
        """The number of states rank `rank` owns: ceil((S - rank) / N)."""
        return max(0, (self.n_states - rank + self.world_size - 1) // self.world_size)

    def states(self, rank: int) -> np.ndarray:
        """(rows(rank),) int64: the states rank `rank` owns, in local row order."""
        return np.arange(rank, self.n_states, self.world_size, dtype=np.int64)


class ShardExchange:
    """The exchange round of the `sharded` layout (see the module doc); collective."""

    def __init__(
        self, comm: MPI.Comm, shards: ShardMap, learner, watchdog_s: float, batch: int = 0
    ):
        """Args:
        comm: the ranks that share the table (collective).
        shards: which rank owns which rows.
        learner: this rank's `TabularLearner`; its table is this rank's shard.
        watchdog_s: seconds a wait may last before the run is aborted (0: no limit).
        batch: env copies per rank. When every rank's (2, S, A) float64 sums and counts
            together are no larger than the records of `batch` updates (4 float64
            each), rounds are dense (see the module doc). The same on every rank.
        """
        self.comm, self.shards, self.learner = comm, shards, learner
        self.size = comm.Get_size()
        self.n_actions = learner.q_table.shape[1]
        self.watchdog_s = watchdog_s
        n_states = shards.n_states
        dense_floats = self.size * 2 * n_states * self.n_actions
        self.dense = dense_floats <= 4 * batch
        self._posted = None
        self._request = None
        # A dense round also carries each rank's `Vote` flags (`post`); their sums over
        # the ranks, from the last round that carried them (zeros before).
        self.votes = vote_buffer()
        self._carries_votes = False
        if self.dense:  # the dense round's buffers, kept from round to round
            # [target sums (S, A) | counts (S, A) | votes], one row per rank when received
            self._width = 2 * n_states * self.n_actions + len(Vote)
            self._send = np.zeros(self._width)
            self._received = np.zeros((self.size, self._width)) if self.size > 1 else None
            self._total = np.zeros(self._width)  # the received rows' sum
            # the whole table: on one rank the shard itself, else gathered at the first round
            self._table = learner.q_table if self.size == 1 else None
            self._mine = shards.states(comm.Get_rank())

    def round(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        targets: np.ndarray,
        progress: float,
        requests: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Send the updates (obs, actions, targets) to their owners, which apply them, then
        fetch the rows of `requests`: `post` then `complete`.

        Args:
            obs: (U,) int64 states s of the updates (global state ids).
            actions: (U,) int64 actions a.
            targets: (U,) float64 targets for Q(s, a).
            progress: fraction of this rank's budget done, for the owner's step size α.
            requests: (R,) int64 states whose rows are wanted.

        Returns:
            (rows, inverse): (D, n_actions) float64 rows and (R,) int64 indices into them,
            so `rows[inverse[i]]` is the row Q(requests[i], .), read after every rank's
            updates of this round were applied. A sparse round fetches each distinct state
            asked for once (D of them); a dense round returns the whole table this rank
            holds, read-only and valid until the next round, with `requests` as the
            indices (no search for the distinct states).
        """
        self.post(obs, actions, targets)
        return self.complete(progress, requests)

    def post(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        targets: np.ndarray,
        votes: np.ndarray | None = None,
    ) -> None:
        """The first half of a round: a round's updates (as `round`'s), each pair once
        with its targets' sum and count. A dense round sends them now (`Iallgather`), so
        that the rank can step its envs while they travel and while a slower rank
        catches up, and with them this rank's `votes` ((len(Vote),) float64; `complete`
        leaves their sums over the ranks in `self.votes`), when given; a sparse round
        ignores them. `complete` must follow before any other exchange."""
        n_states, n_actions = self.shards.n_states, self.n_actions
        if self.dense:
            if self._table is None:
                self._table = self._gather_table()
            # every (s, a)'s sum of targets (in batch order, as `sum_by_pair`) and count
            flat, size = obs * n_actions + actions, n_states * n_actions
            self._send[:size] = np.bincount(flat, weights=targets, minlength=size)
            self._send[size : 2 * size] = np.bincount(flat, minlength=size)
            self._carries_votes = votes is not None
            self._send[2 * size :] = votes if votes is not None else 0.0
            if self.size > 1:
                self._request = self.comm.Iallgather(self._send, self._received)
            return
        obs, actions, (sums, counts) = sum_by_pair(
            n_states, n_actions, obs, actions, targets, np.ones(len(targets))
        )
        self._posted = (obs, actions, sums, counts)

    def complete(self, progress: float, requests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The second half of a round (`progress`, `requests` and the result as `round`'s)."""
        size, n_actions, n_states = self.size, self.n_actions, self.shards.n_states
        if self.dense:
            return self._complete_dense(progress), requests
        unique, inverse = _distinct(requests, n_states)
        obs, actions, sums, counts = self._posted
        if size == 1:
            self.learner.update_towards(obs, actions, sums, counts, progress)
            return self.learner.q_table[unique], inverse
        records = np.empty((len(obs) + len(unique), 4), dtype=np.float64)
        records[: len(obs), 0] = obs // size
        records[: len(obs), 1] = actions
        records[: len(obs), 2] = sums
        records[: len(obs), 3] = counts
        records[len(obs) :, 0] = unique // size
        records[len(obs) :, 1:] = (-1.0, 0.0, 0.0)
        # 2 * owner + (1 for a request): by owner, its updates before its requests. A
        # stable sort of 16-bit keys is a radix sort.
        key = np.concatenate([obs % size, unique % size])
        key = key.astype(np.int16 if size < 16384 else np.int64)
        key *= 2
        key[len(obs) :] += 1
        order = np.argsort(key, kind="stable")
        counts_out = np.bincount(key, minlength=2 * size).reshape(size, 2).astype(np.int64)
        counts_in = np.empty_like(counts_out)
        self._wait(self.comm.Ialltoall(counts_out, counts_in), "the shard exchange's counts")

        send = records[order].ravel()
        received = np.empty(4 * int(counts_in.sum()), dtype=np.float64)
        self._alltoallv(send, 4 * counts_out.sum(axis=1), received, 4 * counts_in.sum(axis=1))
        received = received.reshape(-1, 4)
        is_update = np.repeat(np.tile([True, False], size), counts_in.ravel())
        updates, asked = received[is_update], received[~is_update]
        self.learner.update_towards(
            updates[:, 0].astype(np.int64),
            updates[:, 1].astype(np.int64),
            updates[:, 2],
            updates[:, 3],
            progress,
        )
        answers = np.ascontiguousarray(self.learner.q_table[asked[:, 0].astype(np.int64)])
        rows = np.empty((len(unique), n_actions), dtype=np.float64)
        self._alltoallv(answers, n_actions * counts_in[:, 1], rows, n_actions * counts_out[:, 1])
        # `rows` came in the order asked: by owner, then by state (`unique` is sorted).
        by_state = np.empty_like(rows)
        by_state[np.argsort(unique % size, kind="stable")] = rows
        return by_state, inverse

    def _complete_dense(self, progress: float) -> np.ndarray:
        """A small table's round: every rank's (2, S, A) sums and counts came to every
        rank in one `Iallgather` (`post`); each rank adds them in rank order, as an owner
        adds the partial sums of a sparse round, and steps its copy of the whole table,
        so every copy and every shard keeps the floats of the sparse round
        (`tests/test_sharded_mpi.py`; on one rank, the shard is the table and nothing
        moves). Returns that table, read-only."""
        if self.size == 1:
            total = self._send
        else:
            self._wait(self._request, "the shard exchange")
            self._request = None
            # in rank order, one rank's row at a time (+ 0.0 is exact), into one buffer
            total = self._total
            np.add(self._received[0], self._received[1], out=total)
            for row in self._received[2:]:
                total += row
        size = self.shards.n_states * self.n_actions
        if self._carries_votes:
            self.votes[:] = total[2 * size :]
        shape = self._table.shape
        sums, counts = total[:size].reshape(shape), total[size : 2 * size].reshape(shape)
        self.learner.update_towards_dense(sums, counts, progress, self._table)
        if self.size > 1:  # this rank's shard is those rows of its copy
            np.take(self._table, self._mine, axis=0, out=self.learner.q_table)
        table = self._table.view()
        table.flags.writeable = False
        return table

    def _gather_table(self) -> np.ndarray:
        """Collective: the whole (S, A) table from every rank's shard (`Allgatherv`)."""
        shards, n_actions = self.shards, self.n_actions
        counts = np.array([shards.rows(r) * n_actions for r in range(self.size)])
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        gathered = np.empty(int(counts.sum()), dtype=np.float64)
        mine = np.ascontiguousarray(self.learner.q_table, dtype=np.float64).ravel()
        request = self.comm.Iallgatherv(mine, [gathered, counts, displs, MPI.DOUBLE])
        self._wait(request, "the shard exchange's first gather")
        table = np.empty((shards.n_states, n_actions), dtype=np.float64)
        for rank in range(self.size):
            chunk = gathered[displs[rank] : displs[rank] + counts[rank]]
            table[shards.states(rank)] = chunk.reshape(-1, n_actions)
        return table

    def _alltoallv(self, send, send_counts, recv, recv_counts) -> None:
        send_displs = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
        recv_displs = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
        request = self.comm.Ialltoallv(
            [send, send_counts, send_displs, MPI.DOUBLE],
            [recv, recv_counts, recv_displs, MPI.DOUBLE],
        )
        self._wait(request, "the shard exchange")

    def _wait(self, request, what: str) -> None:
        wait_all([request], self.comm, what, self.watchdog_s)


def _distinct(states: np.ndarray, n_states: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct states, inverse) as `np.unique(states, return_inverse=True)`; by a
    mask over the states when there are few of them next to the batch (no sort)."""
    if n_states > 8 * len(states):
        return np.unique(states, return_inverse=True)
    present = np.zeros(n_states, dtype=bool)
    present[states] = True
    position = np.cumsum(present) - 1
    return np.flatnonzero(present), position[states]


class ActionsGreedy:
    """A greedy policy given as one action per state (`GreedyPolicy`), (S,) int32
    argmax_a Q(s, a), ties to the lowest action: 1 / (2A) of the table's bytes, so no
    table is broadcast. After training every rank holds the same actions; read from a
    checkpoint (`root_only`), rank 0 holds them and `evaluate` broadcasts them."""

    def __init__(self, actions: np.ndarray, root_only: bool = False):
        self.actions, self.root_only = actions, root_only

    def greedy_actions(self, states: np.ndarray) -> np.ndarray:
        """(B,) int64 actions of (B,) int64 states, as `TableGreedy.greedy_actions`."""
        return self.actions[states].astype(np.int64)

    def evaluate(self, comm, env_id, env_kwargs, env_options, episodes, seed, watchdog_s):
        if self.root_only:
            bcast(comm, self.actions, 0, watchdog_s)
        ids = np.array_split(np.arange(episodes, dtype=np.int64), comm.Get_size())
        actions = self.actions
        returns = actions_episode_returns(
            env_id, env_kwargs, actions, ids[comm.Get_rank()], seed, stop=preemption.requested
        )
        return return_stats(comm, returns, episodes, watchdog_s)


class Sharded(TabularTopology):
    """Every rank acts and owns a shard of the Q-table; rows move in exchange rounds."""

    name = "sharded"
    Config = ShardedConfig
    ROLES = "ranks 0-{last} each act and own 1/{size} of the Q-table"

    def rank_roles(self, world_size: int) -> str:
        return self.ROLES.format(last=world_size - 1, size=world_size)

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Raises:
        UserError: as `TabularTopology.check_env`; more ranks than states; or a shard
            (ceil(S / N) * A float64) over `max_table_bytes_per_rank`, before anything
            is allocated."""
        super().check_env(env, world_size, shapes)
        n_states, n_actions = discrete_sizes(env)
        if world_size > n_states:
            raise UserError(
                f"layout 'sharded' on {world_size} ranks: env {self.cfg.run.env_id!r} has "
                f"only {n_states} states to shard; run on at most {n_states} ranks"
            )
        cap = self.cfg.topology.max_table_bytes_per_rank
        table = n_states * n_actions * 8
        shard = ShardMap(n_states, world_size).rows(0) * n_actions * 8
        if cap and shard > cap:
            need = -(-n_states // (cap // (n_actions * 8))) if cap >= n_actions * 8 else None
            more = f"run on at least {need} ranks or " if need else ""
            raise UserError(
                f"max_table_bytes_per_rank={cap}: a Q-table of {n_states} states x "
                f"{n_actions} actions ({table / _MIB:,.1f} MiB float64) needs "
                f"{shard / _MIB:,.1f} MiB per rank on {world_size} ranks; {more}raise the cap"
            )

    def checkpoint_policy(self, path, meta: dict, shapes: dict, arrays: dict) -> ActionsGreedy:
        """Every state's greedy action, (S,) int32, read from the shards one at a time in
        this one process (rank 0, which `load_checkpoint` gave the arrays; the evaluation
        broadcasts them): no process holds the whole table, here as in training."""
        n_states = int(shapes["q_table"][0])
        actions = np.zeros(n_states, dtype=np.int32)
        if arrays:
            old = ShardMap(n_states, int(meta["shards"]))
            for shard in range(old.world_size):
                with h5py.File(shard_path(path, shard), "r") as f:
                    actions[old.states(shard)] = np.argmax(f["q_shard"][()], axis=1)
        return ActionsGreedy(actions, root_only=True)

    def run(self, ctx: RunContext) -> LoopResult:
        actions, interrupted = _run(ctx)
        return LoopResult(interrupted, ActionsGreedy(actions))


TOPOLOGY = Sharded


def _load_shard(ctx: RunContext, shards: ShardMap, out: np.ndarray) -> None:
    """Fill this rank's shard `out` from the resumed checkpoint's shards (verified by
    `load_checkpoint` on rank 0 when the run was planned), one old shard at a time."""
    meta = ctx.resume.meta
    old = ShardMap(shards.n_states, int(meta["shards"]))
    for shard in range(old.world_size) if old.world_size != shards.world_size else [ctx.rank]:
        states = old.states(shard)
        mine = states % shards.world_size == ctx.rank
        if mine.any():
            with h5py.File(shard_path(ctx.resume.path, shard), "r") as f:
                out[states[mine] // shards.world_size] = f["q_shard"][()][mine]


def _greedy_actions(ctx: RunContext, shards: ShardMap, shard: np.ndarray) -> np.ndarray:
    """Collective: (S,) int32 argmax_a Q(s, a) of every state on every rank (ties to the
    lowest action, as `greedy_episode_returns`), one `Allgatherv` of the shards' argmaxes."""
    size = shards.world_size
    counts = np.array([shards.rows(r) for r in range(size)], dtype=np.int64)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mine = np.argmax(shard, axis=1).astype(np.int32)
    gathered = np.empty(shards.n_states, dtype=np.int32)
    request = ctx.comm.Iallgatherv(mine, [gathered, counts, displs, MPI.INT32_T])
    wait_all([request], ctx.comm, "the greedy actions' Allgatherv", ctx.watchdog_s)
    actions = np.empty(shards.n_states, dtype=np.int32)
    for rank in range(size):
        actions[shards.states(rank)] = gathered[displs[rank] : displs[rank] + counts[rank]]
    return actions


_Index = np.ndarray | slice


def _requests(batch, n: int, obs: np.ndarray, dense: bool) -> tuple[np.ndarray, _Index]:
    """The states whose rows a step needs: s' of its `n` counted copies (bootstrap), then
    the states `obs` ((B,) int64) all B copies act from next; and where in them each
    copy's acting state is ((B,) int64 indices, or a slice). A copy acts from its s'
    unless its episode ended (`batch.done_envs`) or it is not counted (past `n`), so a
    sparse round asks only for those again: on a 10^6-state map, 8,192 + ~1,200 states
    to sort for the distinct ones instead of 16,384. A dense round asks for all 2B (its
    requests index the whole table: nothing is sorted)."""
    if dense:
        return np.concatenate([batch.next_obs[:n], obs]), slice(n, n + len(obs))
    again = batch.done_envs[batch.done_envs < n]
    if n < len(obs):
        again = np.concatenate([again, np.arange(n, len(obs))])
    acting = np.arange(len(obs))
    acting[again] = n + np.arange(len(again))
    return np.concatenate([batch.next_obs[:n], obs[again]]), acting


_EMPTY_INT = np.zeros(0, dtype=np.int64)
_EMPTY_FLOAT = np.zeros(0, dtype=np.float64)


def _run(ctx: RunContext) -> tuple[np.ndarray, bool]:
    """The whole loop; returns every state's greedy action (the same on every rank) and
    whether a preemption signal stopped it."""
    comm, cfg = ctx.comm, ctx.cfg
    num_envs, sync_interval = cfg.run.num_envs, cfg.topology.sync_interval
    segment = ctx.segment
    schedule = Lockstep(segment, num_envs, ctx.rank)
    budget, vector_steps = schedule.budget, schedule.vector_steps
    global_steps_after = schedule.global_steps_after

    shards = ShardMap(ctx.n_states, ctx.world_size)
    rng, env_seed = ctx.rank_seeds()
    # The learner's table is this rank's shard: shards.rows(rank) rows.
    learner = make_learner(
        cfg, gym.spaces.Discrete(shards.rows(ctx.rank)), ctx.action_space, ctx.world_size
    )
    shard = learner.q_table
    policy = learner.behaviour_policy(rng)
    exchange = ShardExchange(comm, shards, learner, ctx.watchdog_s, batch=num_envs)
    stepper = ctx.make_stepper()
    env_steps = 0  # this rank's, in this segment
    first_step, syncs = 0, 0
    # The round in flight: targets of the last step, not sent yet, and the rows to act on.
    pending = (_EMPTY_INT, _EMPTY_INT, _EMPTY_FLOAT)
    rows = None
    if ctx.resume is not None:
        _load_shard(ctx, shards, shard)
        syncs = int(ctx.resume.meta.get("syncs", 0))
        state = ctx.resume.rank_state(ctx.rank)
        if state:
            env_steps, learner.learner_updates = restore_rank_state(
                state, rng, stepper, env_seed + 1
            )
            first_step = int(ctx.resume.meta["vector_step"]) + 1
            pending = (state["pending_obs"], state["pending_actions"], state["pending_targets"])
            rows = state["rows"]
    if rows is None:
        distinct, inverse = exchange.round(*pending, 0.0, stepper.obs)
        rows = table_rows(distinct, inverse)
    votes = vote_buffer()
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interrupted = False
    every_copy = np.arange(num_envs)

    for t in range(first_step, vector_steps):
        n = min(num_envs, budget - env_steps)
        progress = segment.progress(env_steps, max(budget, 1))
        last = t == vector_steps - 1
        sync = last or not (t + 1) % sync_interval
        if n > 0:
            ctx.maybe_fail(env_steps)
        # A dense round carries the sync point's votes: no Allreduce, no meeting of its
        # own (a rank ahead by less than an env step does not wait).
        voting = votes if exchange.dense and sync else None
        if voting is not None:
            ctx.vote(votes, reporter, episodes.pending)
        if n > 0:
            actions = policy.select_actions(rows, every_copy, progress)
            exchange.post(*pending, voting)  # a dense round's updates travel while envs step
            batch = stepper.step(actions)
            # what needs no rows before the round's wait, giving the other ranks' updates
            # that much longer to arrive (2 ranks of FrozenLake 8x8: 1.80x -> 1.84x)
            recorder.record(batch, n)
            episodes.add_finished(batch, n, global_steps_after(t), ctx.elapsed_s(), ctx.rank)
            # the rows of s' (bootstrap) and of the states acted from next
            requests, acting = _requests(batch, n, stepper.obs, exchange.dense)
            distinct, inverse = exchange.complete(progress, requests)
            next_rows = table_rows(distinct, inverse[:n])
            targets = learner.targets(batch.rewards[:n], next_rows, batch.terminated[:n])
            pending = (batch.obs[:n], batch.actions[:n], targets)
            rows = table_rows(distinct, inverse[acting])
            env_steps += n
        else:  # this rank's budget is spent; it still serves its shard
            exchange.post(*pending, voting)
            exchange.complete(progress, _EMPTY_INT)
            pending = (_EMPTY_INT, _EMPTY_INT, _EMPTY_FLOAT)
        if last:  # the last targets (no votes: those of this step's round stand)
            exchange.round(*pending, progress, _EMPTY_INT)
            pending = (_EMPTY_INT, _EMPTY_INT, _EMPTY_FLOAT)
        if not sync:
            continue
        # --- sync: the log, checkpoint and stop votes, summed over the ranks ---
        if voting is not None:
            votes[:] = exchange.votes
        else:  # a sparse round: one Allreduce of its own
            ctx.vote(votes, reporter, episodes.pending)
            allreduce_sum(comm, votes, ctx.watchdog_s)
        syncs += 1
        global_steps = global_steps_after(t)
        interrupted = votes[Vote.STOP] > 0 and not last
        by_steps = ctx.clock.due_by_env_steps(global_steps)
        checkpoint = last or interrupted or by_steps or votes[Vote.CHECKPOINT] > 0
        if votes[Vote.LOG] > 0 or checkpoint:
            exploration = policy.exploration_value(progress)
            gather_and_log(
                ctx, reporter, episodes, global_steps, {"syncs": syncs, "exploration": exploration}
            )
        else:
            flush_episodes(ctx, reporter, episodes, votes)
        if checkpoint:
            recorder.flush()
            write_shard(
                ctx.run_dir / "checkpoints",
                global_steps,
                ctx.rank,
                {"q_shard": shard},
                {"world_size": ctx.world_size, "n_states": ctx.n_states},
            )
            # at the last step the budget is spent: no env copy's state (16 ms for
            # 8,192 table-stepped copies), nothing is left to step
            state = rank_state(
                rng, stepper, env_steps, learner.learner_updates, recorder.rows, not last
            )
            state.update(
                pending_obs=pending[0],
                pending_actions=pending[1],
                pending_targets=pending[2],
                rows=rows,
            )
            # The gather completes on rank 0 only after every rank wrote its shard.
            states = gather_rank_states(ctx, state)
            if ctx.rank == 0:
                save_checkpoint(
                    ctx,
                    {},
                    global_steps,
                    learner.learner_updates,
                    syncs,
                    {k: int(s["counters"][2]) for k, s in states.items()},
                    states,
                    {
                        "vector_step": t,
                        "syncs": syncs,
                        "shards": ctx.world_size,
                        "shapes": {"q_table": [ctx.n_states, ctx.n_actions]},
                    },
                )
            ctx.clock.written(global_steps)
        if interrupted:
            break

    stepper.close()
    link_trajectories(ctx, recorder.close())
    if reporter is not None:
        reporter.close()
    return _greedy_actions(ctx, shards, shard), interrupted
