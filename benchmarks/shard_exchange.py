"""The `sharded` layout's exchange round two ways, side by side in one run (issue 16:
"Alltoallv, or MPI RMA windows with passive-target Get/Accumulate; measure and choose").

    mpiexec -n K .venv/bin/python benchmarks/shard_exchange.py [--states 1000000]
        [--actions 4] [--copies 8192] [--rounds 300] [--json OUT]

Each round, every rank sends the targets of `--copies` transitions (random states,
actions and targets from a per-rank seeded generator, the same for both ways) to the
owners of their states (state s on rank s mod K) and fetches the rows of as many random
states plus a tenth more (the layout's acting states whose episode ended), as a step of
`sharded` does:

- **alltoallv**: `hpcrl.topologies.sharded.ShardExchange`, the layout's own sparse round
  (`Alltoall` of counts, `Alltoallv` of update records and row requests, the owners apply
  then answer, `Alltoallv` of rows back).
- **rma**: two windows per rank over its shard's target sums and counts and one over its
  shard of the table, in one passive-target epoch (`Lock_all`) for the whole run. Each
  rank `Accumulate`s (`MPI.SUM`) its distinct pairs' sums and counts into their owners'
  windows (one indexed datatype per owner per round), `Flush_all`, a `Barrier`; each owner
  steps its pairs with a count (`step_towards_mean_targets`) and clears them; a `Barrier`;
  then one `Get` per owner of the rows asked for (an indexed-block datatype), `Flush_all`.

Both apply the same rule (each (s, a) moved once towards the mean of the round's targets),
so their shards agree to rounding; `Accumulate`'s order over the ranks is not specified
by MPI, so the rma shards are not bit-for-bit reproducible, where the alltoallv round adds
the ranks' sums in rank order. The rounds alternate (one of each, repeated) so the
machine's load falls on both alike; prints the median time a round per way, and their
ratio, from rank 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from hpcrl.algos.qlearning import QLearningConfig, QLearningLearner, step_towards_mean_targets
from hpcrl.algos.tabular import sum_by_pair
from hpcrl.topologies.sharded import ShardExchange, ShardMap

ALPHA = 0.1


class RmaExchange:
    """The round by one-sided communication (see the module doc); collective."""

    def __init__(self, comm: MPI.Comm, shards: ShardMap, n_actions: int, table: np.ndarray):
        self.comm, self.shards, self.n_actions = comm, shards, n_actions
        self.size = comm.Get_size()
        rows = shards.rows(comm.Get_rank())
        self.table = table  # (rows, A) float64, this rank's shard
        self.sums = np.zeros((rows, n_actions))
        self.counts = np.zeros((rows, n_actions))
        self.windows = [MPI.Win.Create(a, 8, comm=comm) for a in (self.sums, self.counts, table)]
        for window in self.windows:
            window.Lock_all()

    def close(self) -> None:
        for window in self.windows:
            window.Unlock_all()
            window.Free()

    def round(self, obs, actions, targets, requests) -> np.ndarray:
        """Apply the updates at their owners, then return the (R, A) rows of `requests`."""
        size, n_actions = self.size, self.n_actions
        sums_win, counts_win, table_win = self.windows
        states, acts, (sums, counts) = sum_by_pair(
            self.shards.n_states, n_actions, obs, actions, targets, np.ones(len(targets))
        )
        owner = states % size
        order = np.argsort(owner.astype(np.int16), kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(size + 1))
        local = ((states // size) * n_actions + acts)[order]
        sums, counts = sums[order], counts[order]
        for rank in range(size):
            lo, hi = bounds[rank], bounds[rank + 1]
            if hi == lo:
                continue
            datatype = MPI.DOUBLE.Create_indexed_block(1, local[lo:hi].tolist()).Commit()
            target = (0, 1, datatype)
            sums_win.Accumulate([sums[lo:hi], MPI.DOUBLE], rank, target, MPI.SUM)
            counts_win.Accumulate([counts[lo:hi], MPI.DOUBLE], rank, target, MPI.SUM)
            datatype.Free()
        sums_win.Flush_all()
        counts_win.Flush_all()
        self.comm.Barrier()
        sums_win.Sync()
        counts_win.Sync()
        rows, cols = np.nonzero(self.counts)
        step_towards_mean_targets(
            self.table, rows, cols, self.sums[rows, cols], self.counts[rows, cols], ALPHA
        )
        self.sums[rows, cols] = 0.0
        self.counts[rows, cols] = 0.0
        table_win.Sync()
        self.comm.Barrier()

        unique, inverse = np.unique(requests, return_inverse=True)
        owner = unique % size
        order = np.argsort(owner.astype(np.int16), kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(size + 1))
        got = np.empty((len(unique), n_actions))
        for rank in range(size):
            lo, hi = bounds[rank], bounds[rank + 1]
            if hi == lo:
                continue
            displs = ((unique[order[lo:hi]] // size) * n_actions).tolist()
            datatype = MPI.DOUBLE.Create_indexed_block(n_actions, displs).Commit()
            table_win.Get([got[lo:hi], MPI.DOUBLE], rank, (0, 1, datatype))
            datatype.Free()
        table_win.Flush_all()
        rows_by_state = np.empty_like(got)
        rows_by_state[order] = got
        return rows_by_state[inverse]


def _learner(rows: int, n_actions: int) -> QLearningLearner:
    cfg = QLearningConfig(alpha=ALPHA, alpha_end=ALPHA)
    return QLearningLearner(cfg, rows, n_actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=1_000_000)
    parser.add_argument("--actions", type=int, default=4)
    parser.add_argument("--copies", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    shards = ShardMap(args.states, size)
    learner = _learner(shards.rows(rank), args.actions)
    alltoallv = ShardExchange(comm, shards, learner, 600.0, batch=0)  # sparse rounds
    rma_table = np.zeros((shards.rows(rank), args.actions))
    rma = RmaExchange(comm, shards, args.actions, rma_table)
    rng = np.random.default_rng(1000 + rank)
    times = {"alltoallv": [], "rma": []}
    largest_difference = 0.0
    for _ in range(args.rounds):
        b = args.copies
        obs = rng.integers(0, args.states, b)
        actions = rng.integers(0, args.actions, b)
        targets = rng.random(b)
        requests = rng.integers(0, args.states, b + b // 10)
        comm.Barrier()
        start = time.perf_counter()
        rows, inverse = alltoallv.round(obs, actions, targets, 1.0, requests)
        times["alltoallv"].append(time.perf_counter() - start)
        comm.Barrier()
        start = time.perf_counter()
        got = rma.round(obs, actions, targets, requests)
        times["rma"].append(time.perf_counter() - start)
        largest_difference = max(largest_difference, float(np.abs(got - rows[inverse]).max()))
    rma.close()
    # a round's time is its slowest rank's
    slowest = {}
    for key, values in times.items():
        slowest[key] = np.empty(len(values))
        comm.Allreduce(np.array(values), slowest[key], op=MPI.MAX)
    difference = comm.allreduce(largest_difference, op=MPI.MAX)
    if rank == 0:
        median = {k: statistics.median(v.tolist()) for k, v in slowest.items()}
        result = {
            "ranks": size,
            "states": args.states,
            "actions": args.actions,
            "copies": args.copies,
            "rounds": args.rounds,
            "median_round_s": median,
            "rma_over_alltoallv": median["rma"] / median["alltoallv"],
            "largest_row_difference": difference,
        }
        print(
            f"{size} ranks, {args.states:,} states, {args.copies:,} copies a rank: "
            f"alltoallv {median['alltoallv'] * 1e3:.3f} ms a round, rma "
            f"{median['rma'] * 1e3:.3f} ms ({result['rma_over_alltoallv']:.2f}x); rows "
            f"differ by at most {difference:.1e}"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
