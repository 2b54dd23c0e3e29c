"""Every algorithm's defaults train on 1, 2 and 4 ranks (issue 13): `train --algo X --env
CartPole-v1` with a small budget and nothing else set (tabular Q-learning on its default
FrozenLake8x8-v1, since CartPole's observations are not a table's states). Ape-X's defaults
are the paper's Atari values: learning starts at 50,000 transitions, here at 500, and it
needs a learner, a replay rank and an actor, so 3 ranks stand in for 2."""

from __future__ import annotations

import h5py
import pytest

from conftest import run_hpcrl
from hpcrl.algos import ALGOS

pytestmark = pytest.mark.e2e

# Enough env steps for a few updates of each algorithm's default batch.
BUDGET = {
    "ppo": 4096,
    "impala": 4096,
    "a3c": 2048,
    "async_q": 2048,
    "async_nstep_q": 2048,
    "apex": 2000,
}
EXTRA = {"apex": ["--set", "learning_starts=500"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_defaults_train(tmp_path, cli_env, algo, ranks):
    run_dir = tmp_path / "run"
    env = [] if algo == "qlearning" else ["--env", "CartPole-v1"]
    if algo == "apex" and ranks == 2:
        ranks = 3
    result = run_hpcrl(
        cli_env,
        ranks,
        "train",
        *("--algo", algo, *env, "--total-env-steps", str(BUDGET.get(algo, 1000))),
        *EXTRA.get(algo, []),
        *("--run-dir", str(run_dir), "--set", "eval_episodes=2"),
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "completed in" in result.stdout, result.stdout[-2000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f["metrics/env_steps"][-1]) == BUDGET.get(algo, 1000)
        assert int(f["metrics/learner_updates"][-1]) > 0  # it learned, not only acted
