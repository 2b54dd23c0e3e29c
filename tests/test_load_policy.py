"""`hpcrl.load_policy` (issue 15): a trained policy in a plain `python` process, acting as
`hpcrl evaluate` does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import hpcrl_command, subprocess_env

pytestmark = pytest.mark.e2e

RUNS = {  # algo: train arguments (one process, a few seconds each)
    "qlearning": ["--algo", "qlearning", "--env", "FrozenLake-v1", "--total-env-steps", "4000"],
    "ppo": ["--algo", "ppo", "--env", "CartPole-v1", "--total-env-steps", "2048"],
    "dqn": ["--algo", "dqn", "--env", "CartPole-v1", "--total-env-steps", "2000",
            "--set", "learning_starts=500"],
    "impala": ["--algo", "impala", "--env", "CartPole-v1", "--total-env-steps", "4096"],
    "a3c": ["--algo", "a3c", "--env", "CartPole-v1", "--total-env-steps", "2000"],
    "a2c": ["--algo", "a2c", "--env", "CartPole-v1", "--total-env-steps", "2000"],
    "async_q": ["--algo", "async_q", "--env", "CartPole-v1", "--total-env-steps", "2000"],
    "async_nstep_q": ["--algo", "async_nstep_q", "--env", "CartPole-v1",
                      "--total-env-steps", "2000"],
}  # fmt: skip

CHECK = r"""
import json, sys
import numpy as np
import hpcrl
from hpcrl.evaluation import policy_episode_returns

run_dir, episodes = sys.argv[1], int(sys.argv[2])
policy = hpcrl.load_policy(run_dir)
space = policy.observation_space
batch = np.stack([space.sample() for _ in range(7)])
actions = policy.act(batch)
one = policy.act(batch[0])
out = {"algo": policy.algo, "batch_shape": list(np.shape(actions)),
       "one_equals_batch": bool(np.all(one == actions[0])),
       "one_shape": list(np.shape(one))}
if policy.algo != "qlearning":  # what `evaluate` runs: the same episodes, the same seeds
    returns = policy_episode_returns(policy.env_id, {}, policy.act, np.arange(episodes), 0)
    out["mean_return"] = float(np.mean(returns))
try:
    policy.act(batch, deterministic=False)
    out["sampled"] = True
except hpcrl.errors.UserError as exc:
    out["sampled"] = str(exc)
try:
    policy.act(np.zeros((3, 99)))
except hpcrl.errors.UserError as exc:
    out["bad_shape"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tmp_path_factory):
    algo = request.param
    root = tmp_path_factory.mktemp(algo)
    run_dir, config = root / "run", root / "config.yaml"
    config.write_text("eval_episodes: 0\nrecord_trajectories: false\n")
    cmd = hpcrl_command(None, "train", str(config), "--run-dir", str(run_dir), *RUNS[algo])
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    config.unlink()  # the policy comes from the checkpoint alone
    return algo, run_dir


def test_load_policy_acts_as_evaluate_in_plain_python(trained):
    algo, run_dir = trained
    episodes = 3
    evaluated = subprocess.run(
        hpcrl_command(None, "evaluate", str(run_dir), "--episodes", str(episodes)),
        capture_output=True, text=True, env=subprocess_env(), timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    env = subprocess_env()
    for key in [k for k in env if k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))]:
        del env[key]  # a plain process, no launcher
    checked = subprocess.run(
        [sys.executable, "-c", CHECK, str(run_dir), str(episodes)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    out = json.loads(checked.stdout.strip().splitlines()[-1])
    assert out["algo"] == algo
    assert out["batch_shape"] == [7] and out["one_shape"] == [] and out["one_equals_batch"]
    if algo != "qlearning":
        want = json.loads(evaluated.stdout.strip().splitlines()[-1])["mean_return"]
        assert out["mean_return"] == want
    if algo in ("ppo", "a2c", "impala", "a3c"):
        assert out["sampled"] is True
    else:
        assert "no stochastic policy" in out["sampled"]
    assert "expected" in out["bad_shape"] and "(3, 99)" in out["bad_shape"]


def test_load_policy_bad_run_dir_and_checkpoint_are_one_line(tmp_path, trained):
    _, run_dir = trained
    import hpcrl
    from hpcrl.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        hpcrl.load_policy(tmp_path / "nowhere")
    with pytest.raises(UserError, match="expected latest, best or step-N"):
        hpcrl.load_policy(run_dir, checkpoint="newest")
    with pytest.raises(UserError, match="no .*step-7.h5"):
        hpcrl.load_policy(run_dir, checkpoint="step-7")
