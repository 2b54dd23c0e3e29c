"""The `sharded` layout's parts that need no launcher: the state -> owner map, the batched
update's duplicate semantics, the shard checkpoint files (written, verified, pruned and
quarantined with their step file), and the checks before anything is allocated."""

from __future__ import annotations

import gymnasium as gym
import h5py
import numpy as np
import pytest

from hpcrl.algos.qlearning import (
    QLearningConfig,
    QLearningLearner,
    step_towards_mean_targets,
    update_towards,
)
from hpcrl.algos.tabular import sum_by_pair
from hpcrl.config import build_config
from hpcrl.errors import ConfigError, UserError
from hpcrl.storage import checkpoints as ckpt
from hpcrl.topologies import make_topology
from hpcrl.topologies.sharded import ShardExchange, ShardMap


@pytest.mark.parametrize(("n_states", "world"), [(64, 1), (64, 4), (23, 4), (5, 5), (7, 3)])
def test_every_state_has_exactly_one_owner(n_states, world):
    shards = ShardMap(n_states, world)
    owned = np.concatenate([shards.states(r) for r in range(world)])
    assert sorted(owned.tolist()) == list(range(n_states))
    for rank in range(world):
        states = shards.states(rank)
        assert len(states) == shards.rows(rank)
        assert np.array_equal(states % world, np.full(len(states), rank))
        assert np.array_equal(states // world, np.arange(len(states)))  # the local rows
    assert max(shards.rows(r) for r in range(world)) == -(-n_states // world)


def _reference_towards(q, obs, actions, targets, alpha):
    """The documented semantics, pair by pair: every TD error against the table before the
    batch, each distinct (s, a) moved by α times the mean of its copies' errors."""
    errors: dict[tuple[int, int], list[float]] = {}
    for s, a, target in zip(obs.tolist(), actions.tolist(), targets.tolist(), strict=True):
        errors.setdefault((s, a), []).append(target - q[s, a])
    out = q.copy()
    for (s, a), td in errors.items():
        out[s, a] = q[s, a] + alpha * (sum(td) / len(td))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_update_towards_shares_one_step_among_duplicates_in_any_order(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(6, 3))
    obs, actions = rng.integers(0, 6, 50), rng.integers(0, 3, 50)  # 18 pairs: duplicates
    targets = rng.normal(size=50)
    expected = _reference_towards(q, obs, actions, targets, 0.4)
    got = q.copy()
    update_towards(got, obs, actions, targets, 0.4)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    shuffled = q.copy()
    order = rng.permutation(50)
    update_towards(shuffled, obs[order], actions[order], targets[order], 0.4)
    np.testing.assert_allclose(shuffled, got, rtol=1e-12, atol=1e-12)
    # not K sequential updates: those would step K times
    sequential = q.copy()
    for s, a, target in zip(obs, actions, targets, strict=True):
        sequential[s, a] += 0.4 * (target - sequential[s, a])
    assert not np.allclose(sequential, got)


@pytest.mark.parametrize("n_states", [6, 400])  # a bincount over the table; a sort
def test_sum_by_pair_sums_the_copies_of_each_pair(n_states):
    rng = np.random.default_rng(n_states)
    obs, actions, values = rng.integers(0, 6, 50), rng.integers(0, 3, 50), rng.normal(size=50)
    states, acts, (sums, counts) = sum_by_pair(n_states, 3, obs, actions, values, np.ones(50))
    expected: dict[tuple[int, int], list[float]] = {}
    for s, a, v in zip(obs.tolist(), actions.tolist(), values.tolist(), strict=True):
        expected.setdefault((s, a), []).append(v)
    assert list(zip(states.tolist(), acts.tolist(), strict=True)) == sorted(expected)
    for s, a, total, count in zip(states, acts, sums, counts, strict=True):
        assert total == pytest.approx(sum(expected[s, a])) and count == len(expected[s, a])


@pytest.mark.parametrize("seed", range(4))
def test_the_sharded_step_moves_each_pair_once_towards_its_mean_target(seed):
    """Partial sums from several senders (a pair repeated) add up before the one step."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(6, 3))
    obs, actions, targets = rng.integers(0, 6, 40), rng.integers(0, 3, 40), rng.normal(size=40)
    expected = _reference_towards(q, obs, actions, targets, 0.3)  # mean TD = mean target - Q
    halves = [
        sum_by_pair(6, 3, obs[p], actions[p], targets[p], np.ones(20))
        for p in (slice(0, 20), slice(20, 40))
    ]
    got = q.copy()
    step_towards_mean_targets(
        got,
        *(np.concatenate([h[i] for h in halves]) for i in range(2)),
        np.concatenate([h[2][0] for h in halves]),
        np.concatenate([h[2][1] for h in halves]),
        0.3,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_states", [5, 40])
def test_one_ranks_dense_rounds_give_the_sparse_rounds_floats(n_states):
    """On one rank a small table's round is dense (whole-table sums and counts, one
    masked step); it must return the rows and leave the table bit-identical to the
    sparse round's distinct-pair step, duplicates and empty rounds included."""
    from mpi4py import MPI

    n_actions = 3
    exchanges = []
    for batch in (0, 10**6):
        learner = QLearningLearner(QLearningConfig(alpha=0.5, alpha_end=0.1), n_states, n_actions)
        learner.q_table[:] = np.random.default_rng(3).normal(size=(n_states, n_actions))
        shards = ShardMap(n_states, 1)
        exchanges.append(ShardExchange(MPI.COMM_SELF, shards, learner, 60.0, batch=batch))
    sparse, dense = exchanges
    assert dense.dense and not sparse.dense
    rng = np.random.default_rng(11)
    for round_ in range(8):
        count = 0 if round_ == 2 else 50
        obs = rng.integers(0, n_states, count)
        actions = rng.integers(0, n_actions, count)
        targets = rng.normal(size=count)
        requests = rng.integers(0, n_states, 30)
        progress = round_ / 8
        rows_sparse, inverse_sparse = sparse.round(obs, actions, targets, progress, requests)
        rows_dense, inverse_dense = dense.round(obs, actions, targets, progress, requests)
        np.testing.assert_array_equal(rows_dense[inverse_dense], rows_sparse[inverse_sparse])
        np.testing.assert_array_equal(dense.learner.q_table, sparse.learner.q_table)
    assert dense.learner.learner_updates == sparse.learner.learner_updates == 8


def test_update_towards_an_empty_batch_changes_nothing():
    q = np.ones((3, 2))
    update_towards(q, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0.5)
    assert np.array_equal(q, np.ones((3, 2)))


# --- checks before anything is allocated ---------------------------------------------------


def _sharded(**keys):
    cfg = build_config({"algo": "qlearning", "layout": "sharded", **keys})
    return make_topology(cfg)


def test_the_cap_must_be_a_byte_count():
    for bad in (-1, 1.5, "1GiB", True):
        with pytest.raises(ConfigError, match="max_table_bytes_per_rank"):
            _sharded(max_table_bytes_per_rank=bad)


def test_a_shard_over_the_cap_is_one_line_naming_the_cap_and_the_ranks_needed():
    env = gym.make("FrozenLake8x8-v1")  # 64 states x 4 actions = 2048 bytes
    topology = _sharded(max_table_bytes_per_rank=512)
    topology.check_env(env, 4, {})  # 16 rows x 4 x 8 = 512: fits exactly
    with pytest.raises(UserError) as err:
        topology.check_env(env, 1, {})
    line = str(err.value)
    assert "\n" not in line
    assert "max_table_bytes_per_rank=512" in line and "on 1 ranks" in line
    assert "at least 4 ranks" in line
    with pytest.raises(UserError, match="raise the cap"):
        _sharded(max_table_bytes_per_rank=16).check_env(env, 4, {})  # less than one row
    _sharded().check_env(env, 1, {})  # 0: no cap


def test_more_ranks_than_states_is_refused():
    env = gym.make("FrozenLake-v1")  # 16 states
    with pytest.raises(UserError, match="only 16 states"):
        _sharded().check_env(env, 17, {})


# --- shard files ------------------------------------------------------------------------


def _write_sharded(ckpt_dir, env_steps, shards=2, keep=5):
    for k in range(shards):
        ckpt.write_shard(ckpt_dir, env_steps, k, {"q_shard": np.full((3, 2), k, float)}, {})
    return ckpt.write_checkpoint(
        ckpt_dir, env_steps, {"x": np.zeros(1)}, {"env_steps": env_steps, "shards": shards}, keep
    )


def test_a_step_file_counts_as_intact_only_with_every_shard(tmp_path):
    first = _write_sharded(tmp_path, 100)
    second = _write_sharded(tmp_path, 200)
    assert [p.name for p in ckpt.shard_files(second)] == [
        "step-200.shard-0.h5",
        "step-200.shard-1.h5",
    ]
    ckpt.load_checkpoint(second)
    ckpt.shard_path(second, 1).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"step-200\.shard-1\.h5"):
        ckpt.load_checkpoint(second)
    _, meta, path, skipped = ckpt.load_newest_intact(tmp_path)
    assert path == first and meta["env_steps"] == 100 and skipped[0][0] == second
    moved = ckpt.quarantine([second])
    assert moved[0].name == "step-200.h5.corrupt"
    assert (tmp_path / "step-200.shard-0.h5.corrupt").exists()
    assert ckpt.list_checkpoints(tmp_path) == [first]


def test_a_damaged_or_foreign_shard_fails_the_step_file(tmp_path):
    path = _write_sharded(tmp_path, 100)
    with h5py.File(ckpt.shard_path(path, 0), "r+") as f:
        f["q_shard"][0, 0] = 42.0
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_checkpoint(path)
    other = _write_sharded(tmp_path / "other", 300) if (tmp_path / "other").mkdir() is None else 0
    ckpt.shard_path(other, 0).replace(ckpt.shard_path(path, 0))
    with pytest.raises(ckpt.CheckpointError, match="shard 0 is of another checkpoint"):
        ckpt.load_checkpoint(path)


def test_old_step_files_are_pruned_with_their_shards(tmp_path):
    for steps in (100, 200, 300):
        _write_sharded(tmp_path, steps, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "latest.h5",
        "step-200.h5",
        "step-200.shard-0.h5",
        "step-200.shard-1.h5",
        "step-300.h5",
        "step-300.shard-0.h5",
        "step-300.shard-1.h5",
    ]


# --- layout async: the n-step returns of a rollout -----------------------------------------


def test_async_rollout_returns_are_cut_at_exploratory_actions():
    """Three steps of one copy, rewards 1, 2, 4, γ 0.5, the table's max is 10 everywhere:
    all greedy, the first return runs to the end, 1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 10;
    with the second action exploratory, it bootstraps at the state that action was taken
    in, 1 + 0.5 * 10, and the second return still runs on."""
    import importlib

    from hpcrl.algos.qlearning import QLearningConfig, QLearningLearner
    from hpcrl.envs import StepBatch

    rollout_class = importlib.import_module("hpcrl.topologies.async")._Rollout

    def run(greedy):
        learner = QLearningLearner(QLearningConfig(alpha=1.0, alpha_end=1.0), 5, 2)
        learner.q_table[:] = 10.0
        rollout = rollout_class(3, 1)
        for step, reward in enumerate([1.0, 2.0, 4.0]):
            batch = StepBatch(
                obs=np.array([step]),
                actions=np.array([0]),
                rewards=np.array([reward]),
                next_obs=np.array([step + 1]),
                terminated=np.array([False]),
                truncated=np.array([False]),
                done_envs=np.zeros(0, np.int64),
                episode_returns=np.zeros(0),
                episode_lengths=np.zeros(0, np.int64),
            )
            rollout.add(batch, 1, np.array([greedy[step]]))
        rollout.learn(learner, 0.5, 0.0)
        return learner.q_table[:3, 0]  # α = 1: the entries are the returns

    assert run([True, True, True]).tolist() == [1 + 1 + 1 + 1.25, 2 + 2 + 2.5, 4 + 5]
    assert run([True, False, True]).tolist() == [1 + 5, 2 + 2 + 2.5, 4 + 5]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("n", [50, 37])  # every copy counted; the last step's partial one
def test_a_steps_requests_give_every_copy_its_bootstrap_and_acting_state(dense, n):
    """`_requests`: requests[:n] are the counted copies' s', and requests[acting] every
    copy's next acting state, where a sparse round asks again only for the copies whose
    episode ended or that were not counted."""
    from types import SimpleNamespace

    from hpcrl.topologies.sharded import _requests

    rng = np.random.default_rng(3)
    copies = 50
    next_obs = rng.integers(0, 1000, copies)
    done_envs = np.flatnonzero(rng.random(copies) < 0.2)
    obs = next_obs.copy()  # where an episode goes on, it acts from s'
    obs[done_envs] = rng.integers(0, 3, len(done_envs))  # reset states
    obs[n:] = rng.integers(0, 1000, copies - n)  # not counted: any state
    batch = SimpleNamespace(next_obs=next_obs, done_envs=done_envs)
    requests, acting = _requests(batch, n, obs, dense)
    assert np.array_equal(requests[:n], next_obs[:n])
    assert np.array_equal(requests[acting], obs)
    again = len(done_envs[done_envs < n]) + copies - n
    assert len(requests) == (n + copies if dense else n + again)
