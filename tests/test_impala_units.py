"""Unit tests of IMPALA's pieces on one process, without an MPI launcher: the config checks,
the loss against n-step returns (V-trace on-policy), one learner update, the learner side of
the actor-learner loop (`UnrollLearner`: queueing, staleness, partial and stopping unrolls,
episode stamps, batches), the rank-0 metrics and the message schemas."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import env_spaces
from hpcrl.algos.impala import ImpalaConfig
from hpcrl.algos.impala_learner import Impala
from hpcrl.comm import protocol as P
from hpcrl.config import build_config
from hpcrl.envs import make_env
from hpcrl.errors import ConfigError
from hpcrl.returns import n_step_returns
from hpcrl.topologies.actor_learner import (
    ActorLearner,
    UnrollLearner,
    _Group,
    _metrics,
    _unroll_schema,
)

T, B = 3, 2  # the UnrollLearner tests' unroll: vector steps, env copies


class NoGroup:
    """A learner group of one: nothing to average; counts the calls."""

    calls = 0

    def average_gradients(self) -> None:
        self.calls += 1

    def clip_gradients(self, max_norm: float) -> None:
        pass  # FlatGradients.clip is tested in test_deep_units


@pytest.mark.parametrize(
    "key,value",
    [
        ("unroll_length", 0),
        ("unrolls_per_update", 0),
        ("learner_ranks", 0),
        ("max_policy_lag", -1),
        ("publish_interval", 0),
        ("clip_rho_threshold", 0.0),
        ("vtrace_lambda", 1.5),
        ("optimizer", "sgd"),
    ],
)
def test_validate_names_the_bad_key_and_value(key, value):
    """The algorithm's keys and the layout's (`ActorLearnerConfig`) alike."""
    build_config({"algo": "impala"})
    with pytest.raises(ConfigError, match=rf"'{key}': got {re.escape(repr(value))}"):
        build_config({"algo": "impala", key: value})


def test_null_thresholds_mean_no_clipping():
    ImpalaConfig(
        clip_rho_threshold=None, clip_pg_rho_threshold=None, clip_c_threshold=None
    ).validate()


@pytest.mark.parametrize(
    "kw,world,match",
    [
        ({"learner_ranks": 4}, 4, r"'learner_ranks': got 4, .*world size 4"),
        ({"learner_ranks": 6}, 4, r"'learner_ranks': got 6, .*world size 4"),
        ({"learner_ranks": 2}, 1, r"'learner_ranks': got 2 in a one-process run"),
        (
            {"learner_ranks": 2, "unrolls_per_update": 3},
            4,
            r"unrolls_per_update 3 .*2 learner ranks",
        ),
    ],
)
def test_a_layout_that_does_not_fit_the_world_is_refused(kw, world, match):
    """The topology's checks (`check_world`, then `check_env`), before any communication."""
    topology = ActorLearner(build_config({"algo": "impala", "num_envs": 2, **kw}))
    with pytest.raises(ConfigError, match=match):
        topology.check_world(world)
        topology.check_env(make_env("CartPole-v1"), world, {})


def _fits(kw: dict, world: int, num_envs: int) -> int:
    """Run the topology's checks; returns the vector steps of an actor's unroll."""
    cfg = build_config({"algo": "impala", "num_envs": num_envs, **kw})
    topology = ActorLearner(cfg)
    env = make_env("CartPole-v1")
    topology.check_world(world)
    topology.check_env(env, world, {})
    ctx = types.SimpleNamespace(
        cfg=cfg, observation_space=env.observation_space, action_space=env.action_space
    )
    return _unroll_schema(ctx).fields["rewards"][1][0]


def test_rollout_steps_is_the_unroll_length():
    assert _fits({"unroll_length": 7}, 1, 8) == 7
    assert _fits({"unroll_length": 5, "learner_ranks": 2, "unrolls_per_update": 4}, 4, 2) == 5
    assert _fits({"learner_ranks": 3, "unrolls_per_update": 3}, 4, 1) == 20


def test_max_unrolls_per_update_is_at_least_unrolls_per_update():
    # More per update than flow control lets in flight is allowed: a learner whose actors
    # all wait for credit learns from what is queued (`ActorPool.all_waiting`).
    assert _fits({"unrolls_per_update": 7}, 2, 1) == 20
    with pytest.raises(ConfigError, match=r"'max_unrolls_per_update': got 1"):
        _fits({"unrolls_per_update": 2, "max_unrolls_per_update": 1}, 4, 1)


def _on_policy_batch(learner: Impala, T: int = 5, N: int = 3) -> dict[str, np.ndarray]:
    """A CartPole batch whose behaviour log-probs are the learner's own, with a terminal
    step (t=1, copy 0) and a time-limit cut (t=3, copy 1) inside the unroll."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(T + 1, N, 4)).astype(np.float32)
    actions = rng.integers(0, 2, size=(T, N))
    terminated = np.zeros((T, N), np.float32)
    truncated = np.zeros((T, N), np.float32)
    truncation_values = np.zeros((T, N), np.float32)
    terminated[1, 0] = 1.0
    truncated[3, 1] = 1.0
    truncation_values[3, 1] = 7.5
    with torch.no_grad():
        log_probs, _, _ = learner.model.evaluate_actions(
            torch.as_tensor(obs[:T].reshape(T * N, 4)), torch.as_tensor(actions.reshape(-1))
        )
    return {
        "obs": obs,
        "actions": actions,
        "behaviour_log_probs": log_probs.reshape(T, N).numpy(),
        "rewards": rng.uniform(0.0, 2.0, size=(T, N)).astype(np.float32),
        "terminated": terminated,
        "truncated": truncated,
        "truncation_values": truncation_values,
    }


def test_on_policy_loss_is_the_n_step_return_regression():
    """With π = μ and ρ̄ = c̄ = λ = 1, V-trace targets are the n-step returns and the
    policy-gradient advantages are G - V."""
    torch.manual_seed(0)
    cfg = ImpalaConfig(gamma=0.9, hidden_size=16)
    learner = Impala(cfg, *env_spaces())
    batch = _on_policy_batch(learner)
    T, N = batch["rewards"].shape
    loss, metrics = learner.loss(batch)

    model = learner.model
    with torch.no_grad():
        values = model.value(torch.as_tensor(batch["obs"].reshape(-1, 4))).reshape(T + 1, N)
        log_probs, entropy, _ = model.evaluate_actions(
            torch.as_tensor(batch["obs"][:T].reshape(-1, 4)),
            torch.as_tensor(batch["actions"].reshape(-1)),
        )
    values = values.numpy().astype(np.float64)
    next_values = values[1:].copy()
    cut = batch["truncated"] != 0
    next_values[cut] = batch["truncation_values"][cut]
    returns = n_step_returns(
        batch["rewards"], next_values, batch["terminated"], batch["truncated"], cfg.gamma
    )
    advantages = returns - values[:T]
    value_loss = 0.5 * np.mean(advantages**2)
    policy_loss = -np.mean(advantages * log_probs.reshape(T, N).numpy())
    entropy = float(entropy.mean())

    assert metrics["losses/value"] == pytest.approx(value_loss, rel=1e-5)
    assert metrics["losses/policy"] == pytest.approx(policy_loss, rel=1e-5, abs=1e-6)
    assert metrics["losses/entropy"] == pytest.approx(entropy, rel=1e-6)
    assert metrics["rho_mean"] == pytest.approx(1.0, abs=1e-6)
    expected = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_update_steps_the_optimizer_and_anneals_the_learning_rate():
    torch.manual_seed(0)
    learner = Impala(ImpalaConfig(hidden_size=16, learning_rate=1e-3), *env_spaces())
    before = [p.detach().clone() for p in learner.model.parameters()]
    group = NoGroup()
    metrics = learner.update(_on_policy_batch(learner), group, progress=0.25)
    assert group.calls == 1 and learner.learner_updates == 1
    assert metrics["learning_rate"] == pytest.approx(0.75e-3)
    assert "losses/value" in metrics
    after = list(learner.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("group_kind", ["stub", "comm_world"])
def test_update_without_a_batch_on_a_fresh_learner_moves_nothing(group_kind):
    """A learner with no batch still steps (the group's gradient; here nothing or, through
    the real `_Group` of one rank, zeros), and a fresh Adam does not move on zeros."""
    torch.manual_seed(0)
    learner = Impala(ImpalaConfig(hidden_size=16), *env_spaces())
    before = [p.detach().clone() for p in learner.model.parameters()]
    group = NoGroup() if group_kind == "stub" else _Group(MPI.COMM_WORLD, learner.model, 10.0)
    assert learner.update(None, group, progress=0.0) == {"learning_rate": 1e-3}
    assert learner.learner_updates == 1
    for a, p in zip(before, learner.model.parameters(), strict=True):
        assert torch.equal(a, p)
        if group_kind == "comm_world":  # a missing gradient counts as zeros
            assert p.grad is not None and not p.grad.any()


def _server(
    batch_unrolls: int = 2, max_policy_lag: int = 2, record: bool = True, max_unrolls: int = 0
):
    cfg = build_config(
        {
            "algo": "impala",
            "env_id": "CartPole-v1",
            "num_envs": B,
            "unroll_length": T,
            "max_policy_lag": max_policy_lag,
            "hidden_size": 8,
            "record_trajectories": record,
        }
    )
    obs_space, act_space = env_spaces()
    ctx = types.SimpleNamespace(
        cfg=cfg, world_size=4, observation_space=obs_space, action_space=act_space
    )
    learner = Impala(cfg.algo, *env_spaces())
    server = UnrollLearner(ctx, learner, batch_unrolls, max_unrolls or batch_unrolls)
    server.retired = []  # (actor rank, count) per `retire` call
    server.retire = lambda rank, count: server.retired.append((rank, count))
    return server, ctx


def _fill(msg: P.Message, marker: float, version: int, rows: int = T * B, actor_steps=None):
    """Every experience field set to `marker`; no episodes."""
    for name in ("obs", "actions", "behaviour_log_probs", "rewards", "truncation_values"):
        msg[name][...] = marker
    header = msg["header"]
    header[:] = 0
    header[P.ActorHeader.STEPS] = -(-rows // B)
    header[P.ActorHeader.ROWS] = rows
    header[P.ActorHeader.POLICY_VERSION] = version
    header[P.ActorHeader.ACTOR_ENV_STEPS] = rows if actor_steps is None else actor_steps
    return msg


def test_unroll_learner_queues_counts_and_drops():
    server, ctx = _server(max_policy_lag=2)
    msg = _unroll_schema(ctx).allocate()
    server.learner.learner_updates = 5
    assert not server.consume(_fill(msg, 1.0, version=3), 2)  # lag 2: the bound, kept
    assert len(server.queue) == 1 and server.stats.lags == [2]
    assert server.local_steps == T * B and server.traj_rows[2] == T * B
    assert server.consume(_fill(msg, 2.0, version=2), 2)  # lag 3: stale, retired at once
    assert len(server.queue) == 1 and server.stats.dropped_stale == 1
    assert server.stats.dropped_steps == T * B
    assert server.consume(_fill(msg, 3.0, version=5, rows=T * B - 1), 3)  # partial
    assert len(server.queue) == 1 and server.stats.dropped_stale == 1
    assert server.local_steps == 3 * T * B - 1 and server.unrolls_dropped == 0
    server.stopping = True
    assert server.consume(_fill(msg, 4.0, version=5), 3)
    assert len(server.queue) == 1 and server.unrolls_dropped == 1
    assert server.local_steps == 4 * T * B - 1
    assert not server.ready() and server.retired == []  # consume's answer says it
    server.drop_queue()
    assert server.queue == [] and server.unrolls_dropped == 2
    assert server.retired == [(2, 1)]  # the queued unroll's credit goes back to its actor


def test_unroll_learner_stamps_episodes_with_learner_env_steps():
    server, ctx = _server(record=False)
    msg = _unroll_schema(ctx).allocate()
    server.env_steps, server.local_steps = 100, 6
    _fill(msg, 0.0, version=0, actor_steps=50)  # this unroll: the actor's steps 44..50
    msg["header"][P.ActorHeader.EPISODES] = 2
    msg["episode_return"][:2] = [10.0, 20.0]
    msg["episode_length"][:2] = [10, 20]
    msg["episode_actor_env_steps"][:2] = [46, 50]
    msg["episode_wall_time"][:2] = [1.5, 2.5]
    msg["timing"][:] = [9.0, 4.0, 2.0, 1.0, 0.5, 8.0]
    server.consume(msg, 3)
    expected = [[10.0, 10, 108, 1.5, 3], [20.0, 20, 112, 2.5, 3]]
    np.testing.assert_array_equal(server.episodes.take(), expected)
    np.testing.assert_array_equal(server.stats.timing[3], msg["timing"])
    assert not server.traj_rows.any()  # not recording


def test_take_batch_is_the_oldest_unrolls_side_by_side():
    server, ctx = _server(batch_unrolls=2)
    msg = _unroll_schema(ctx).allocate()  # one buffer, reused as the receives do
    for k in range(3):
        server.consume(_fill(msg, float(k), version=0), 1)
        assert server.ready() == (k >= 1), k  # two unrolls make a batch
    batch, taken = server.take_batch()
    assert taken == 2 and server.retired == [(1, 1), (1, 1)]
    assert batch["obs"].shape == (T + 1, 2 * B, 4) and batch["obs"].dtype == np.float32
    assert batch["actions"].shape == (T, 2 * B) and batch["actions"].dtype == np.int64
    for name in ("behaviour_log_probs", "rewards", "terminated", "truncated"):
        assert batch[name].shape == (T, 2 * B), name
    for name in ("obs", "actions", "rewards"):
        assert (batch[name][:, :B] == 0).all() and (batch[name][:, B:] == 1).all(), name
    assert len(server.queue) == 1 and not server.ready()
    assert server.queue[0][0] == 1 and (server.queue[0][1]["obs"] == 2).all()


def test_take_batch_takes_what_is_queued_up_to_the_maximum():
    server, ctx = _server(batch_unrolls=2, max_unrolls=3)
    msg = _unroll_schema(ctx).allocate()
    for k in range(5):
        server.consume(_fill(msg, float(k), version=0), 1 + k % 2)
    batch, taken = server.take_batch()  # five queued: the oldest three
    assert taken == 3 and batch["obs"].shape == (T + 1, 3 * B, 4)
    assert server.retired == [(1, 1), (2, 1), (1, 1)]
    assert (batch["rewards"][:, 2 * B :] == 2).all()
    assert server.ready()  # two left: a batch
    batch, taken = server.take_batch()
    assert taken == 2 and not server.queue


def test_metrics_merge_the_learners_rows():
    a, _ = _server()
    b, _ = _server()
    a.stats.timing[2] = np.array([10.0, 4.0, 2.0, 1.0, 0.5, 5.0])
    a.log_row()  # the next row holds differences from this one
    a.stats.lags, a.stats.dropped_stale, a.stats.wait_s, a.stats.updates = [0, 2, 1], 1, 0.5, 3
    a.stats.dropped_steps, a.stats.batch_unrolls = 64, [1, 2, 3]
    a.stats.timing[2] = np.array([20.0, 10.0, 4.0, 1.0, 0.5, 14.0])
    b.stats.lags, b.stats.dropped_stale, b.stats.wait_s, b.stats.updates = [3], 2, 1.5, 3
    b.stats.dropped_steps, b.stats.batch_unrolls = 128, [2, 2, 2]
    b.stats.timing[3] = np.array([5.0, 1.0, 1.5, 2.0, 0.5, 2.5])
    rows = np.concatenate([np.concatenate([[r.size], r]) for r in (a.log_row(), b.log_row())])
    out = _metrics(rows, 2, elapsed=4.0, updates_s=0.75)
    assert out["policy_lag_mean"] == pytest.approx(1.5) and out["policy_lag_max"] == 3
    assert out["unrolls_dropped_stale"] == 3 and out["env_steps_dropped_stale"] == 192
    # 12 unrolls in 3 group updates (each learner counts each one: 6)
    assert out["unrolls_per_update"] == pytest.approx(4.0)
    assert out["learner_wait_frac"] == pytest.approx(2.0 / 8.0)
    assert out["learner_updates_per_s"] == 0.75
    expected = {
        2: {
            "env_frac": 0.6,
            "inference_frac": 0.2,
            "send_wait_frac": 0.0,
            "param_wait_frac": 0.0,
            "cpu_frac": 0.9,
        },
        3: {
            "env_frac": 0.2,
            "inference_frac": 0.3,
            "send_wait_frac": 0.4,
            "param_wait_frac": 0.1,
            "cpu_frac": 0.5,
        },
    }
    for rank, fractions in expected.items():
        for name, value in fractions.items():
            assert out[f"actor_{rank}/{name}"] == pytest.approx(value), (rank, name)
    assert out["actor_efficiency"] == pytest.approx((0.8 + 0.5) / 2)
    assert a.log_row().tolist() == [0.0] * 8  # the statistics restart after each row


def test_metrics_of_a_learner_that_saw_nothing():
    row = _server()[0].log_row()
    out = _metrics(np.concatenate([[row.size], row]), 1, elapsed=1.0, updates_s=0.0)
    assert out["policy_lag_mean"] == 0.0 and out["policy_lag_max"] == 0
    assert "actor_efficiency" not in out


def test_parameters_schema():
    schema = P.parameters_schema(5)
    msg = schema.allocate()
    assert msg["header"].shape == (len(P.ParamsHeader),) == (5,) and msg["header"].dtype == np.int64
    assert msg["parameters"].shape == (5,) and msg["parameters"].dtype == np.float32
    assert schema.nbytes == 40 + 24  # 20 bytes of parameters padded to 8
    msg["parameters"][:] = np.arange(5)
    msg["header"][P.ParamsHeader.VERSION] = 7
    copy = P.Message(schema, msg.buffer.copy())  # what the receiving rank sees
    assert copy["header"][P.ParamsHeader.VERSION] == 7
    np.testing.assert_array_equal(copy["parameters"], np.arange(5))


@pytest.mark.parametrize(
    "env_id,obs_shape,obs_dtype,action_shape,action_dtype",
    [
        ("CartPole-v1", (4,), np.float32, (), np.int64),
        ("FrozenLake-v1", (), np.int64, (), np.int64),
        ("Pendulum-v1", (3,), np.float32, (1,), np.float32),
    ],
)
def test_unroll_schema_follows_the_env_spaces(
    env_id, obs_shape, obs_dtype, action_shape, action_dtype
):
    cfg = build_config({"algo": "impala", "num_envs": 1, "unroll_length": 3})
    obs_space, act_space = env_spaces(env_id)
    ctx = types.SimpleNamespace(cfg=cfg, observation_space=obs_space, action_space=act_space)
    schema = _unroll_schema(ctx)
    msg = schema.allocate()
    assert msg["obs"].shape == (4, 1, *obs_shape) and msg["obs"].dtype == obs_dtype
    assert msg["actions"].shape == (3, 1, *action_shape) and msg["actions"].dtype == action_dtype
    assert msg["header"].shape == (8,) and msg["timing"].shape == (6,)
    for name in ("behaviour_log_probs", "rewards", "terminated", "truncated"):
        assert msg[name].shape == (3, 1) and msg[name].dtype == np.float32
    for name in ("episode_return", "episode_length", "episode_actor_env_steps"):
        assert msg[name].shape == (3,)
    spans = sorted(
        (off, off + int(np.prod(s)) * d.itemsize) for off, s, d in schema.fields.values()
    )
    assert all(off % 8 == 0 for off, _ in spans)
    ends, starts = [end for _, end in spans], [off for off, _ in spans[1:]] + [schema.nbytes]
    assert all(end <= nxt for end, nxt in zip(ends, starts, strict=True))  # no overlap
    if env_id == "CartPole-v1":  # 64 + 40 + 64 + 24 + 5 x 16 (12 padded) + 4 x 24
        assert schema.nbytes == 376


def test_messages_are_consumed_in_each_actors_send_order():
    """An actor's two receive slots alternate; when both complete in one `Testsome`, or
    its later message completes first, they are still consumed in send order (once a
    final unroll made the learner cancel the other slot before consuming it)."""
    from hpcrl.topologies.serving import _in_send_order

    next_slot = [1, 0]  # actor 0 expects slot 1 next, actor 1 slot 0
    arrived = {0, 1, 3}  # actor 0: both slots; actor 1: only its later slot
    assert list(_in_send_order(arrived, next_slot)) == [1, 0]
    assert arrived == {3} and next_slot == [1, 0]  # actor 1's message waits
    arrived.add(2)
    assert list(_in_send_order(arrived, next_slot)) == [2, 3]
    assert arrived == set() and next_slot == [1, 0]


def test_adam_beta2_reaches_the_optimizer_and_is_validated():
    learner = Impala(ImpalaConfig(hidden_size=16, adam_beta2=0.99), *env_spaces())
    assert learner.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match=f"'adam_beta2': got {bad!r}"):
            ImpalaConfig(adam_beta2=bad).validate()


def test_solved_lr_decay_scales_the_annealed_learning_rate_and_is_checked():
    learner = Impala(ImpalaConfig(hidden_size=16, learning_rate=1e-3), *env_spaces())
    learner.lr_scale = 0.25  # two evaluations reached the threshold with decay 0.5
    metrics = learner.update(_on_policy_batch(learner), NoGroup(), progress=0.5)
    assert metrics["learning_rate"] == pytest.approx(0.125e-3)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=f"'solved_lr_decay': got {bad!r}"):
            ImpalaConfig(solved_lr_decay=bad).validate()


@pytest.mark.parametrize(
    "values,match",
    [
        ({"eval_interval": 0}, "with eval_interval 0"),
        ({"env_id": "Pendulum-v1", "eval_interval": 1000}, "Pendulum-v1 has no reward threshold"),
    ],
)
def test_solved_lr_decay_needs_evaluations_and_a_threshold(values, match):
    import gymnasium as gym

    from hpcrl.config import build_config
    from hpcrl.topologies import actor_learner

    cfg = build_config({"algo": "impala", "solved_lr_decay": 0.5} | values)
    topology = actor_learner.ActorLearner(cfg)
    env = gym.make(cfg.run.env_id)
    with pytest.raises(ConfigError, match=match):
        topology.check_env(env, 4, {})
