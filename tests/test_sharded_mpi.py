"""The `sharded` layout's exchange round (`ShardExchange.round`) on COMM_WORLD: each rank
sends updates and row requests for states anywhere in the table; the outcome must be the
one batched update of every rank's transitions applied to the whole table (each pair one
step towards the mean of all its targets), read back, and no rank may hold more than its
shard."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrl.algos.qlearning import QLearningConfig, QLearningLearner, step_towards_mean_targets
from hpcrl.topologies.sharded import ShardExchange, ShardMap

pytestmark = pytest.mark.mpi(min_size=2)

ALPHA = 0.5


def _batch(round_, rank, n_states, n_actions):
    """Rank `rank`'s updates and requests in round `round_` (any rank can recompute them).
    Rank 1 sends no update in round 1; every rank asks for some state twice."""
    rng = np.random.default_rng([round_, rank])
    count = 0 if (round_, rank) == (1, 1) else 6 + 3 * rank
    obs = rng.integers(0, n_states, count)
    actions = rng.integers(0, n_actions, count)
    targets = rng.normal(size=count)
    requests = rng.integers(0, n_states, 9)
    requests[-1] = requests[0]
    return obs, actions, targets, requests


# 3: fewer states than ranks; 500: sorted pairs; batch 10**6: dense rounds, 0: sparse
@pytest.mark.parametrize("batch", [0, 10**6])
@pytest.mark.parametrize("n_states", [23, 3, 500])
def test_a_round_equals_one_batch_on_the_whole_table(n_states, batch):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size > n_states:
        pytest.skip("the layout refuses more ranks than states")
    n_actions = 3
    table = np.random.default_rng(7).normal(size=(n_states, n_actions))
    shards = ShardMap(n_states, size)
    learner = QLearningLearner(
        QLearningConfig(alpha=ALPHA, alpha_end=ALPHA), shards.rows(rank), n_actions
    )
    learner.q_table[:] = table[shards.states(rank)]
    exchange = ShardExchange(comm, shards, learner, watchdog_s=60.0, batch=batch)
    assert exchange.dense == (batch > 0)
    for round_ in range(4):
        obs, actions, targets, requests = _batch(round_, rank, n_states, n_actions)
        distinct, inverse = exchange.round(obs, actions, targets, 0.0, requests)
        everyone = [_batch(round_, r, n_states, n_actions) for r in range(size)]
        all_obs, all_actions, all_targets = (
            np.concatenate([b[i] for b in everyone]) for i in range(3)
        )
        step_towards_mean_targets(
            table, all_obs, all_actions, all_targets, np.ones(len(all_obs)), ALPHA
        )
        # the same arithmetic up to the order of the additions (partial sums per rank)
        np.testing.assert_allclose(distinct[inverse], table[requests], rtol=0, atol=1e-12)
        np.testing.assert_allclose(learner.q_table, table[shards.states(rank)], rtol=0, atol=1e-12)
        if exchange.dense:  # the whole table this rank holds, read-only
            assert distinct.shape == (n_states, n_actions) and not distinct.flags.writeable
        else:
            assert len(distinct) == len(np.unique(requests))  # each state fetched once
    assert learner.q_table.shape == (shards.rows(rank), n_actions)


@pytest.mark.parametrize("n_states", [23, 3])
def test_dense_and_sparse_rounds_give_the_same_floats(n_states):
    """A dense round (one Allgather of every rank's sums and counts, each rank stepping
    its copy of the whole table) leaves every shard and returns every row bit-identical
    to a sparse one."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size > n_states:
        pytest.skip("the layout refuses more ranks than states")
    n_actions = 3
    shards = ShardMap(n_states, size)
    exchanges = []
    for batch in (0, 10**6):
        learner = QLearningLearner(
            QLearningConfig(alpha=ALPHA, alpha_end=ALPHA), shards.rows(rank), n_actions
        )
        learner.q_table[:] = np.random.default_rng(3).normal(size=(n_states, n_actions))[
            shards.states(rank)
        ]
        exchanges.append(ShardExchange(comm, shards, learner, watchdog_s=60.0, batch=batch))
    sparse, dense = exchanges
    assert dense.dense and not sparse.dense
    for round_ in range(6):
        obs, actions, targets, requests = _batch(round_, rank, n_states, n_actions)
        rows_sparse, inverse_sparse = sparse.round(obs, actions, targets, 0.0, requests)
        rows_dense, inverse_dense = dense.round(obs, actions, targets, 0.0, requests)
        np.testing.assert_array_equal(rows_dense[inverse_dense], rows_sparse[inverse_sparse])
        np.testing.assert_array_equal(dense.learner.q_table, sparse.learner.q_table)


def test_a_dense_round_carries_the_votes_summed_over_the_ranks():
    """The votes of a sync step ride in its dense round (`ShardExchange.post`): after
    `complete` every rank holds their sums; a round posted without votes keeps them."""
    from mpi4py import MPI

    from hpcrl.topologies.sync_points import Vote, vote_buffer

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    n_states, n_actions = 3, 2
    shards = ShardMap(n_states, size)
    learner = QLearningLearner(QLearningConfig(), shards.rows(rank), n_actions)
    exchange = ShardExchange(comm, shards, learner, watchdog_s=60.0, batch=10**6)
    assert exchange.dense
    votes = vote_buffer()
    votes[Vote.LOG] = 1.0 if rank == 0 else 0.0
    votes[Vote.STOP] = 1.0 if rank == size - 1 else 0.0
    votes[Vote.CHECKPOINT] = rank
    votes[Vote.EPISODES] = 10 * rank + 1
    obs, actions, targets, requests = _batch(0, rank, n_states, n_actions)
    exchange.post(obs, actions, targets, votes)
    exchange.complete(0.0, requests)
    expected = [1.0, size * (size - 1) / 2, 1.0, 5 * size * (size - 1) + size]
    np.testing.assert_array_equal(exchange.votes, expected)
    exchange.round(obs, actions, targets, 0.0, requests)  # no votes: the sums stand
    np.testing.assert_array_equal(exchange.votes, expected)
