"""Acceptance of the data-parallel PPO (DD-PPO layout): `mpirun -n 4` on CartPole-v1 with
`configs/cartpole-ppo.yaml` reaches a mean return >= 475 over 20 episodes within its
100,000 env steps, and every rank ends with bit-identical parameters."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest

from conftest import REPO, hpcrl_command

pytestmark = pytest.mark.e2e

BUDGET = 100_000


def test_ppo_cartpole_4_ranks_learns_and_ranks_agree(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        hpcrl_command(
            4,
            "train",
            str(REPO / "configs" / "cartpole-ppo.yaml"),
            "--run-dir",
            str(run_dir),
            "--set",
            "eval_episodes=20",
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f["metrics/env_steps"][-1]) == BUDGET
        returns = f["episodes/return"][()]
        env_steps = f["episodes/env_steps"][()]
        digests = f.attrs["parameter_digests"]
        assert float(f.attrs["eval_mean_return"]) >= 475
    assert len(digests) == 4 and len(set(digests.tolist())) == 1, digests
    windows = np.convolve(returns, np.ones(20) / 20, mode="valid")  # means of 20 episodes
    reached = np.flatnonzero(windows >= 475)
    assert reached.size, f"best mean over 20 episodes: {windows.max():.1f}"
    assert env_steps[reached[0] + 19] <= BUDGET
    assert returns[-20:].mean() >= 475, returns[-20:]
    # `evaluate` rebuilds the learner from the newest checkpoint on every rank.
    evaluated = subprocess.run(
        hpcrl_command(2, "evaluate", str(run_dir), "--episodes", "10"),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["mean_return"] >= 475


def test_ppo_interrupted_and_resumed_equals_uninterrupted(tmp_path, cli_env):
    """The issue-3 rule for every later algorithm: parameters, optimizer state, every
    rank's RNGs (torch sampling, minibatch shuffling) and env states are checkpointed, so a
    SIGUSR1 and `--resume` give the same run bit for bit."""
    import signal
    import time

    args = [
        str(REPO / "configs" / "cartpole-ppo.yaml"),
        "--set",
        "total_env_steps=30000",
        "--set",
        "eval_episodes=0",
        "--set",
        "log_interval_s=0.5",
        "--set",
        "record_trajectories=true",
    ]
    reference = subprocess.run(
        hpcrl_command(2, "train", *args, "--run-dir", str(tmp_path / "ref")),
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env,
    )
    assert reference.returncode == 0, reference.stderr[-4000:]
    proc = subprocess.Popen(
        hpcrl_command(2, "train", *args, "--run-dir", str(tmp_path / "int")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    for line in proc.stdout:  # interrupt once it has updated a few times
        if line.startswith("[hpcrl] env_steps"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out + err
    resumed = subprocess.run(
        hpcrl_command(2, "train", "--resume", str(tmp_path / "int")),
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "exactly" in resumed.stdout
    with h5py.File(tmp_path / "ref" / "run.h5") as a, h5py.File(tmp_path / "int" / "run.h5") as b:
        assert a.attrs["parameter_digests"].tolist() == b.attrs["parameter_digests"].tolist()
        assert len(b["resumes/env_steps"]) == 1
        for name in ("return", "length", "env_steps", "rank"):
            assert np.array_equal(a["episodes"][name][()], b["episodes"][name][()]), name
        for name in ("obs", "action", "reward", "terminated", "truncated"):
            assert np.array_equal(a["trajectories"][name][()], b["trajectories"][name][()]), name
