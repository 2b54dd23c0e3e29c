"""The `distributed_replay` layout's pieces without MPI (issue 17): which shard an actor's
messages go to, a replay shard's insert / sample / priority update / checkpoint round trip,
the restore of shard files onto another number of replay ranks, the flow control's
allowance, and the checks a run is refused by."""

from __future__ import annotations

import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from hpcrl.comm import protocol as P
from hpcrl.comm.protocol import ActorHeader, ReplyHeader, RequestHeader
from hpcrl.config import build_config
from hpcrl.errors import ConfigError
from hpcrl.storage.checkpoints import shard_path
from hpcrl.topologies import make_topology
from hpcrl.topologies.distributed_replay import (
    ReplayShard,
    Roles,
    _experience_schema,
    _reply_schema,
    _restore_shard,
)

OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)


def _ctx(tmp_path: Path, resume=None, **values) -> types.SimpleNamespace:
    cfg = build_config(
        {"algo": "apex", "env_id": "CartPole-v1", "minibatch_size": 8, "send_interval": 4} | values
    )
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return types.SimpleNamespace(
        cfg=cfg, observation_space=OBS, resume=resume, run_dir=tmp_path, rank=1
    )


def _message(ctx, rank_offset: int, k: int, episodes: int = 0, final: bool = False):
    msg = _experience_schema(ctx).allocate()
    ids = np.arange(rank_offset, rank_offset + k)
    msg["obs"][:k] = ids[:, None]
    msg["next_obs"][:k] = ids[:, None] + 0.5
    msg["action"][:k] = ids % 2
    msg["reward"][:k] = ids
    msg["discount"][:k] = 0.9
    msg["priority"][:k] = 1.0 + ids
    header = msg["header"]
    header[ActorHeader.TRANSITIONS] = k
    header[ActorHeader.ROWS] = k
    header[ActorHeader.POLICY_VERSION] = 3
    header[ActorHeader.EPISODES] = episodes
    header[ActorHeader.FINAL] = int(final)
    msg["episode_return"][:episodes] = 10.0 + np.arange(episodes)
    msg["episode_length"][:episodes] = 7
    return msg


def test_every_shard_gets_messages_even_from_one_actor():
    roles = Roles(world=4, replay=2)
    assert roles.actors == [3] and roles.shards == [1, 2]
    assert [roles.shard_of(3, m) for m in range(4)] == [1, 2, 1, 2]
    roles = Roles(world=7, replay=2)  # actors 3-6 start on alternate shards
    assert [roles.shard_of(a, 0) for a in roles.actors] == [1, 2, 1, 2]


def test_a_shard_inserts_serves_updates_priorities_and_reports(tmp_path):
    ctx = _ctx(tmp_path)
    shard = ReplayShard(ctx, 0, 16, [3, 4], np.random.default_rng(0))
    shard.insert(_message(ctx, 0, 6, episodes=2), 3)
    shard.insert(_message(ctx, 100, 4, final=True), 4)
    request = P.sample_request_schema(8).allocate()
    reply = _reply_schema(ctx, 2).allocate()
    request["header"][RequestHeader.BATCH] = 8
    request["header"][RequestHeader.CHECKPOINT] = -1
    request["beta"][0] = 0.5
    assert not shard.serve(request, reply)
    header = reply["header"]
    assert header[ReplyHeader.ROWS] == 8
    assert header[ReplyHeader.SIZE] == 10 and header[ReplyHeader.ADDED] == 10
    assert header[ReplyHeader.ENV_STEPS] == 10 and header[ReplyHeader.ACTORS_DONE] == 1
    assert header[ReplyHeader.EPISODES] == 2
    np.testing.assert_array_equal(reply["episodes"][:2, 0], [10.0, 11.0])
    np.testing.assert_array_equal(reply["episodes"][:2, 4], [3, 3])
    np.testing.assert_array_equal(reply["inserted"], [3 * 10, 10])
    # Every sampled row is the transition in its slot, with a weight in (0, 1].
    slots = reply["slots"][:8]
    np.testing.assert_array_equal(reply["obs"][:8], shard.replay.data["obs"][slots])
    np.testing.assert_array_equal(reply["ids"][:8], shard.replay.ids[slots])
    assert (reply["weights"][:8] > 0).all() and reply["weights"][:8].max() == 1.0
    # The next request carries new priorities: applied to those slots, p^alpha in the tree.
    request["header"][RequestHeader.PRIORITIES] = 2
    request["slots"][:2] = slots[:2]
    request["ids"][:2] = reply["ids"][:2]
    request["priorities"][:2] = [5.0, 5.0]
    request["header"][RequestHeader.BATCH] = 0
    shard.serve(request, reply)
    alpha = ctx.cfg.algo.priority_alpha
    np.testing.assert_allclose(shard.replay.tree.leaves(slots[:2]), 5.0**alpha)
    assert reply["header"][ReplyHeader.ROWS] == 0
    assert reply["header"][ReplyHeader.EPISODES] == 0  # each episode is reported once


def test_shard_files_restore_onto_fewer_replay_ranks(tmp_path):
    """Two shards checkpointed, resumed with one replay rank: it holds both shards'
    transitions with their priorities; with a smaller capacity, the newest."""
    ctx = _ctx(tmp_path)
    shards = [ReplayShard(ctx, i, 16, [3], np.random.default_rng(i)) for i in range(2)]
    for i, shard in enumerate(shards):
        shard.insert(_message(ctx, 100 * i, 5 + i), 3)
        shard.checkpoint(1234)
    step = tmp_path / "checkpoints" / "step-1234.h5"
    assert shard_path(step, 1).exists()
    resume = types.SimpleNamespace(path=step, meta={"replay_ranks": 2})
    one = _ctx(tmp_path, resume=resume, replay_ranks=1)
    restored = ReplayShard(one, 0, 32, [2], np.random.default_rng(0))
    assert restored.replay.size == 11
    expected = np.concatenate([np.arange(5), 100 + np.arange(6)])
    np.testing.assert_array_equal(restored.replay.data["reward"][:11], expected)
    np.testing.assert_allclose(
        restored.replay.tree.leaves()[:11], (1.0 + expected) ** ctx.cfg.algo.priority_alpha
    )
    small = ReplayShard(one, 0, 4, [2], np.random.default_rng(0))
    _restore_shard(one, small)
    np.testing.assert_array_equal(small.replay.data["reward"], 100 + np.arange(2, 6))


@pytest.mark.parametrize(
    "values,pattern",
    [
        ({"learning_starts": 200, "buffer_size": 100}, "learning_starts"),
        ({"learning_starts": 1000, "total_env_steps": 1000}, "total_env_steps"),
        ({"buffer_size": 1, "replay_ranks": 2, "learning_starts": 1}, "buffer_size"),
    ],
)
def test_a_config_that_never_learns_is_refused(values, pattern):
    cfg = build_config({"algo": "apex", "env_id": "CartPole-v1"} | values)
    env = gym.make("CartPole-v1")
    with pytest.raises(ConfigError, match=pattern) as raised:
        make_topology(cfg).check_env(env, 4, {})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("priority_alpha", 1.5),
        ("priority_alpha", -0.1),
        ("importance_beta_start", -0.1),
        ("importance_beta_end", 1.2),
        ("env_steps_per_update", 0),
        ("replay_ranks", 0),
    ],
)
def test_exponents_and_sizes_out_of_range_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        build_config({"algo": "apex", key: value})


def test_beta_is_annealed_linearly_to_its_end():
    algo = build_config({"algo": "apex"}).algo
    assert algo.beta(0.0) == pytest.approx(0.4)
    assert algo.beta(0.5) == pytest.approx(0.7)
    assert algo.beta(1.0) == pytest.approx(1.0)
