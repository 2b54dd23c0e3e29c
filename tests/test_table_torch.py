"""The tabular GPU path (`hpcrl.table_torch`, `device: cuda` with layout `allreduce`), run
here on torch's CPU device: its samplers against the numpy ones, its transition
frequencies against `env.unwrapped.P` (chi-square), its batched update against
`update_towards` bit for bit, its exact resume, and whole runs through `runner.train`
with `device: cuda` pointed at the CPU, against value iteration."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy import stats

from hpcrl.algos.qlearning import td_targets, update_towards
from hpcrl.frozen_lake import FrozenLakeGrid
from hpcrl.table_torch import DeviceTabular, _GridSampler, _TableSampler
from hpcrl.table_vector import PaddedTable

CPU = torch.device("cpu")
# torch's CPU device everywhere; a GPU as well where torch sees one
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def make(
    env_id="FrozenLake8x8-v1", num_envs=64, q_init=0.0, seed=3, env_kwargs=None, device=CPU, **kw
):
    env = gym.make(env_id, **(env_kwargs or {}))
    shape = (env.observation_space.n, env.action_space.n)
    env.close()
    q_table = np.full(shape, q_init)
    options = {"gamma": 0.9, "exploration": "epsilon_greedy"} | kw
    return DeviceTabular(env_id, env_kwargs, num_envs, q_table, seed=seed, device=device, **options)


@pytest.mark.parametrize("env_id", ["FrozenLake8x8-v1", "CliffWalking-v1", "Taxi-v4"])
def test_table_sampler_equals_the_numpy_one_for_the_same_uniforms(env_id):
    env = gym.make(env_id)
    table = PaddedTable(env.unwrapped)
    rng = np.random.default_rng(0)
    states = rng.integers(0, env.observation_space.n, 5000)
    actions = rng.integers(0, env.action_space.n, 5000)
    u = rng.random(5000)
    expected = table.sample(states, actions, u)
    got = _TableSampler(table, CPU).sample(*(torch.as_tensor(x) for x in (states, actions, u)))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("slippery", [True, False])
def test_grid_sampler_equals_the_numpy_one_for_the_same_uniforms(slippery):
    from hpcrl.frozen_lake import generated_map

    grid = FrozenLakeGrid(generated_map(30, 0.8, 5), is_slippery=slippery)
    rng = np.random.default_rng(1)
    states = rng.integers(0, grid.n_states, 5000)
    actions = rng.integers(0, 4, 5000)
    u = rng.random(5000)
    expected = grid.sample(states, actions, u)
    got = _GridSampler(grid, CPU).sample(*(torch.as_tensor(x) for x in (states, actions, u)))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_transition_frequencies_match_p_chi_square(device):
    """Random actions (ε = 1) on slippery FrozenLake 4x4 for 400,000 transitions: the
    counts of s' per (s, a) against P's probabilities, one chi-square over every (s, a)
    with more than one outcome; rewards and `terminated` as P gives them; and the start
    state and the time limit (100 steps) as gymnasium's."""
    engine = make("FrozenLake-v1", num_envs=2000, device=device)
    p = gym.make("FrozenLake-v1").unwrapped.P
    counts = np.zeros((16, 4, 16))
    starts = [engine.obs]
    for _ in range(200):
        batch = engine.step(alpha=0.1, exploration=1.0, n=2000, keep=True)
        np.add.at(counts, (batch.obs, batch.actions, batch.next_obs), 1)
        for s, a, r, s2, term in zip(
            batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated, strict=True
        ):
            assert (r, term) in {(row[2], row[3]) for row in p[s][a] if row[1] == s2}
        starts.append(engine.obs[batch.terminated | batch.truncated])
    assert set(np.concatenate(starts[1:])) <= {0}  # every reset starts at S
    chi2, dof = 0.0, 0
    for s in range(16):
        for a in range(4):
            expected = np.zeros(16)
            for prob, s2, _, _ in p[s][a]:
                expected[s2] += prob
            seen = counts[s, a]
            support = expected > 0
            assert seen[~support].sum() == 0
            if support.sum() > 1 and seen.sum() > 0:
                exp = expected[support] * seen.sum()
                chi2 += ((seen[support] - exp) ** 2 / exp).sum()
                dof += support.sum() - 1
    assert dof > 50
    assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)


def test_time_limit_truncates_and_resets():
    engine = make("FrozenLake-v1", num_envs=32, env_kwargs={"is_slippery": False})
    table = engine.table()
    table[:, 0] = 1.0  # greedy: left, into the wall at the start, never ending
    engine.set_table(table)
    truncated_at = []
    for t in range(1, 301):
        batch = engine.step(alpha=1e-9, exploration=0.0, n=32, keep=True)
        truncated_at += [t] * int((batch.truncated & ~batch.terminated).sum())
    assert truncated_at == [100] * 32 + [200] * 32 + [300] * 32


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("exploration", ["epsilon_greedy", "boltzmann"])
def test_update_equals_update_towards_bit_for_bit(exploration, device):
    """Each step's table equals numpy's batched update (`td_targets`, `update_towards`)
    of the step's transitions on the table before it, duplicates averaged; with n < B
    only the first n copies count. Bit for bit on the CPU (`index_add_` adds in batch
    order); on a GPU up to the order of the additions."""
    engine = make(
        "CliffWalking-v1", num_envs=256, q_init=0.5, exploration=exploration, device=device
    )
    for step in range(300):
        before = engine.table()
        n = 256 if step % 3 else 100
        value = 0.3 if exploration == "epsilon_greedy" else 0.5
        batch = engine.step(alpha=0.2, exploration=value, n=n, keep=True)
        targets = td_targets(batch.rewards, before[batch.next_obs], batch.terminated, 0.9)
        update_towards(before, batch.obs[:n], batch.actions[:n], targets[:n], 0.2)
        if device.type == "cpu":
            np.testing.assert_array_equal(engine.table(), before)
        else:
            np.testing.assert_allclose(engine.table(), before, rtol=1e-12, atol=1e-12)
            engine.set_table(before)


def test_episodes_and_visited_come_back_at_the_sync():
    engine = make("FrozenLake-v1", num_envs=128)
    lengths = []
    for _ in range(40):
        engine.step(alpha=0.1, exploration=1.0, n=100, keep=False)
    steps = engine.take_episodes()
    assert len(steps) == 40 and engine.take_episodes() == []
    for returns, ep_lengths in steps:
        assert set(returns) <= {0.0, 1.0} and (ep_lengths >= 1).all()
        lengths += list(ep_lengths)
    assert len(lengths) > 100
    visited = engine.take_visited()
    assert visited.sum() > 0 and set(np.unique(visited)) <= {0.0, 1.0}
    assert engine.take_visited().sum() == 0


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_state_dict_resumes_exactly(device):
    a = make("FrozenLake8x8-v1", num_envs=64, q_init=0.2, device=device)
    for _ in range(57):
        a.step(alpha=0.1, exploration=0.5, n=64, keep=False)
    a.take_episodes()
    state, table = a.state_dict(), a.table()
    b = make("FrozenLake8x8-v1", num_envs=64, seed=99, device=device)
    assert b.load_state_dict(state, fallback_seed=0)
    b.set_table(table)
    for _ in range(80):
        x = a.step(alpha=0.1, exploration=0.5, n=64, keep=True)
        y = b.step(alpha=0.1, exploration=0.5, n=64, keep=True)
        for field in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    np.testing.assert_array_equal(a.table(), b.table())
    for (ra, la), (rb, lb) in zip(a.take_episodes(), b.take_episodes(), strict=True):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(la, lb)
    # a CPU stepper's state (no device generator): every copy starts afresh
    cpu_state = dict(state)
    del cpu_state["device_rng"]
    assert not b.load_state_dict(cpu_state, fallback_seed=5)
    with pytest.raises(ValueError, match="copies"):
        b.load_state_dict(make("FrozenLake8x8-v1", num_envs=8).state_dict(), 0)


def test_gpu_path_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, gpu_path, monkeypatch):
    """`device: cuda`, layout `allreduce`, one process: a run stopped by a preemption
    signal at its 40th sync and resumed ends with the uninterrupted run's table, episodes
    and trajectories, bit for bit."""
    import h5py
    from mpi4py import MPI

    from hpcrl import preemption, runner
    from hpcrl.storage.checkpoints import load_latest

    values = {
        "env_id": "FrozenLake8x8-v1",
        "total_env_steps": 200_000,
        "layout": "allreduce",
        "num_envs": 64,
        "sync_interval": 8,
        "eval_episodes": 0,
        "log_interval_s": 60.0,
        "seed": 3,
        **gpu_path,
    }
    runner.train(MPI.COMM_SELF, values, str(tmp_path / "whole"))
    calls = [0]

    def requested() -> bool:
        calls[0] += 1
        return calls[0] == 40

    monkeypatch.setattr(preemption, "requested", requested)
    runner.train(MPI.COMM_SELF, values, str(tmp_path / "cut"))
    with h5py.File(tmp_path / "cut" / "run.h5", "r") as f:
        assert f.attrs["status"] == "interrupted"
    monkeypatch.setattr(preemption, "requested", lambda: False)
    runner.train(MPI.COMM_SELF, values, resume=str(tmp_path / "cut"))
    tables = []
    for name in ("whole", "cut"):
        arrays, meta, _ = load_latest(tmp_path / name / "checkpoints")
        assert meta["env_steps"] == 200_000
        tables.append(arrays["q_table"])
    np.testing.assert_array_equal(*tables)
    files = [h5py.File(tmp_path / name / "run.h5", "r") for name in ("whole", "cut")]
    try:
        for table in ("episodes", "trajectories"):
            for column in files[0][table]:
                if "time" not in column:  # wall times differ
                    whole, cut = (f[table][column][()] for f in files)
                    np.testing.assert_array_equal(whole, cut, err_msg=f"{table}/{column}")
    finally:
        for f in files:
            f.close()
