"""Acceptance of the asynchronous actor-learner layout (issue 5): IMPALA, A3C and async
n-step Q-learning learn CartPole-v1 under `mpirun -n 4`, a learner group of 2 keeps
bit-identical parameters, a slow actor does not slow the others, shutdown leaves no request
behind at 2, 4 and 8 ranks (and for every algorithm), the policy-lag bound drops stale
unrolls, and a SIGUSR1 stop resumes and finishes (IMPALA, A3C, async n-step Q)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO, hpcrl_command, run_hpcrl, train_until_interrupted
from hpcrl.config import DEFAULT_JOB, load_yaml

pytestmark = pytest.mark.e2e

CONFIG = str(REPO / "configs" / "cartpole-impala.yaml")
CONFIGS = {
    algo: str(REPO / "configs" / f"cartpole-{algo.replace('_', '-')}.yaml")
    for algo in ("impala", "a3c", "async_nstep_q")
}


def test_the_default_job_is_the_impala_config():
    """`python -m hpcrl` runs `hpcrl.config.DEFAULT_JOB`; configs/cartpole-impala.yaml,
    which documents those values, must say the same."""
    assert load_yaml(CONFIG) == DEFAULT_JOB


def _check(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # MPICH reports requests still pending on a communicator at MPI_Finalize.
    assert "pending" not in result.stderr, result.stderr[-4000:]


def _best_mean_of_20(returns: np.ndarray) -> float:
    """The best mean return over 20 consecutive training episodes (what hpcrl compares with
    the env's reward threshold, 475 for CartPole-v1)."""
    return float(np.convolve(returns, np.ones(20) / 20, mode="valid").max())


@pytest.mark.timeout(600)
def test_default_job_is_impala_and_learns_cartpole(tmp_path, cli_env):
    """The README's first command, `mpirun -n 4 python -m hpcrl` (no arguments): IMPALA on
    CartPole-v1 reaches 475, says so, and keeps the parameters of its best periodic greedy
    evaluation (>= 475) in checkpoints/best.h5, and halves its learning rate once solved
    (`solved_lr_decay`). The final evaluation is asserted only to be a policy: it held
    >= 475 in 9 of 10 launches measured at 4 ranks (benchmarks/default_job.py,
    benchmarks/RESULTS.md), so asserting 475 here would fail one CI run in ten."""
    result = subprocess.run(
        hpcrl_command(4), capture_output=True, text=True, timeout=600, env=cli_env, cwd=tmp_path
    )
    _check(result)
    assert "impala on CartPole-v1" in result.stdout, result.stdout[-2000:]
    assert "reached a mean return of" in result.stdout, result.stdout[-2000:]
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["episodes"] == DEFAULT_JOB["eval_episodes"], evaluation
    assert 9 <= evaluation["mean_return"] <= 500, evaluation
    # What the run reached is kept: the best periodic evaluation's parameters.
    assert evaluation["best_eval_mean_return"] >= 475, evaluation
    assert "best periodic evaluation" in result.stdout, result.stdout[-2000:]
    (run_h5,) = (tmp_path / "runs").glob("impala-CartPole-v1-*/run.h5")
    with h5py.File(run_h5, "r") as f:
        assert json.loads(f.attrs["config"]) == json.loads(f.attrs["config"]) | DEFAULT_JOB
        assert set(f["episodes/rank"][()].tolist()) == {1, 2, 3}
        assert f["metrics/policy_lag_max"][()].max() <= DEFAULT_JOB["max_policy_lag"]
        # Solved, then the learning rate was halved: below the linear anneal at the end.
        lr = f["metrics/learning_rate"][()]
        progress = f["metrics/env_steps"][()] / DEFAULT_JOB["total_env_steps"]
        anneal = DEFAULT_JOB["learning_rate"] * (1 - progress)
        assert (lr[-5:-1] < 0.6 * anneal[-5:-1]).all(), (lr, anneal)


LAUNCHES = 2  # learning tests: launches allowed to reach 475 (see the test's docstring)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    "algo,ranks,learners,batch,num_envs",
    [
        ("impala", 4, 2, 2, 4),
        ("a3c", 4, 1, 1, 8),
        ("async_nstep_q", 4, 1, 1, 8),
    ],  # fmt: skip
    ids=["impala-2-learners", "a3c", "async-nstep-q"],
)
def test_cartpole_learns_and_learners_agree(
    tmp_path, cli_env, algo, ranks, learners, batch, num_envs
):
    """The config's learner with 3 actors; for IMPALA a learner group of 2 with an actor
    each, one unroll per learner and update and 4 env copies per actor, so that an update
    learns from 256 steps as in the config (with 8 copies, 512 per update, the 2-learner
    run stalled near 200 in CI).

    An asynchronous launch is not repeatable (the order in which messages reach the
    learner differs), and a single launch reaches 475 with a measured frequency below 1
    (async n-step Q: 7 of 8, benchmarks/RESULTS.md). So a second launch is made when the
    first does not reach it; every launch must pass every other check. A config that
    reaches 475 in fewer than half its launches still fails here more often than not. A
    launch stops once it reached 475 (`stop_at_return`), and otherwise trains its whole
    budget."""
    bests = []
    for launch in range(LAUNCHES):
        run_dir = tmp_path / f"run{launch}"
        result = run_hpcrl(
            cli_env,
            ranks,
            "train",
            CONFIGS[algo],
            *("--run-dir", str(run_dir), "--set", f"learner_ranks={learners}"),
            *("--set", f"unrolls_per_update={batch}", "--set", f"num_envs={num_envs}"),
            *("--set", "eval_episodes=20", "--set", "stop_at_return=475"),
            *("--set", "log_interval_s=1"),
        )
        _check(result)
        with h5py.File(run_dir / "run.h5", "r") as f:
            assert f.attrs["status"] == "completed"
            total = int(f["metrics/env_steps"][-1])
            returns = f["episodes/return"][()]
            ranks_seen = set(f["episodes/rank"][()].tolist())
            digests = f.attrs["parameter_digests"]
            lag_max = f["metrics/policy_lag_max"][()]
            config = json.loads(f.attrs["config"])
        assert total <= config["total_env_steps"]
        assert ranks_seen == set(range(learners, ranks))  # only actors act
        assert len(digests) == learners and len(set(digests.tolist())) == 1, digests
        assert lag_max.max() <= config["max_policy_lag"]
        best = _best_mean_of_20(returns)
        if best >= 475:
            assert "reached a mean return of" in result.stdout, result.stdout[-2000:]
            assert "stopped early at" in result.stdout, result.stdout[-2000:]
            return
        assert total == config["total_env_steps"]  # no early stop without reaching it
        bests.append(best)
    pytest.fail(f"no launch reached 475; best means over 20 episodes: {np.round(bests, 1)}")


@pytest.mark.parametrize(
    "algo,ranks",
    [("impala", 2), ("impala", 4), ("impala", 8), ("a3c", 4), ("async_nstep_q", 3)],
)
def test_shutdown_with_messages_in_flight_completes_every_request(tmp_path, cli_env, algo, ranks):
    """Short unrolls published after every update keep messages in flight both ways until
    the end; the run must end cleanly (no pending request at MPI_Finalize, no hang) and
    count exactly its budget."""
    run_dir = tmp_path / "run"
    result = run_hpcrl(
        cli_env,
        ranks,
        "train",
        CONFIGS[algo],
        *("--run-dir", str(run_dir), "--total-env-steps", "6001"),
        *("--set", "unroll_length=2", "--set", "num_envs=2", "--set", "unrolls_per_update=1"),
        *("--set", "eval_episodes=0", "--set", "watchdog_s=60"),
        timeout=300,
    )
    _check(result)
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f["metrics/env_steps"][-1]) == 6001
        assert int(f["trajectories/reward"].shape[0]) == 6001


def test_policy_lag_bound_drops_stale_unrolls(tmp_path, cli_env):
    """With `max_policy_lag=0` only unrolls made with the learner's current parameters are
    learned from; with 3 actors many arrive a version late, and they are dropped and
    counted."""
    run_dir = tmp_path / "run"
    result = run_hpcrl(
        cli_env,
        4,
        "train",
        CONFIG,
        *("--run-dir", str(run_dir), "--total-env-steps", "20000"),
        *("--set", "max_policy_lag=0", "--set", "unrolls_per_update=1", "--set", "eval_episodes=0"),
        timeout=300,
    )
    _check(result)
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f["metrics/policy_lag_max"][()].max() == 0
        assert f["metrics/unrolls_dropped_stale"][()].sum() > 0
        assert int(f["metrics/learner_updates"][-1]) > 0


def _finish_times(run_h5) -> dict[int, float]:
    """Wall time of each actor's last finished episode (≈ when it spent its budget)."""
    with h5py.File(run_h5, "r") as f:
        ranks = f["episodes/rank"][()]
        times = f["episodes/wall_time"][()]
    return {int(r): float(times[ranks == r].max()) for r in np.unique(ranks)}


def test_a_slow_actor_does_not_slow_the_others(tmp_path, cli_env):
    """Rank 3 sleeps 20 ms per vector step; ranks 1 and 2 must still spend their equal
    budgets at their own pace, long before rank 3."""
    args = ["--total-env-steps", "30000", "--set", "eval_episodes=0", "--set", "num_envs=8"]
    run_dir = tmp_path / "slow"
    _check(
        run_hpcrl(
            cli_env,
            4,
            "train",
            CONFIG,
            *("--run-dir", str(run_dir), *args),
            *("--set", "debug.slow_rank=3", "--set", "debug.slow_step_s=0.02"),
            timeout=300,
        )
    )
    done = _finish_times(run_dir / "run.h5")
    # 10,000 env steps / 8 copies = 1,250 vector steps x 20 ms: rank 3 needs >= 25 s.
    assert done[3] >= 25.0, done
    assert max(done[1], done[2]) < 0.5 * done[3], done


@pytest.mark.parametrize("algo", ["impala", "a3c", "async_nstep_q"])
def test_interrupted_run_resumes_and_finishes(tmp_path, cli_env, algo):
    """Stopped as by SIGUSR1 once each actor has taken 5,000 of its 20,000 env steps,
    resumed with the same world: it continues from the checkpoint (parameters, optimizer,
    counters), reports the unrolls it lost, and ends at exactly its budget."""
    run_dir = tmp_path / "run"
    args = (CONFIGS[algo], "--run-dir", str(run_dir), "--total-env-steps", "60000")
    train_until_interrupted(
        cli_env,
        4,
        *args,
        *("--set", "eval_episodes=0", "--set", "log_interval_s=0.5"),
        after_env_steps=5000,
    )
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "interrupted"
        stopped_at = int(f["metrics/env_steps"][-1])
    assert 0 < stopped_at < 60_000
    result = run_hpcrl(cli_env, 4, "train", "--resume", str(run_dir), timeout=300)
    _check(result)
    assert "unrolls received but not yet learned from at the checkpoint" in result.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f["metrics/env_steps"][-1]) == 60_000
        assert len(f["resumes/env_steps"]) == 1
        assert int(f["metrics/learner_updates"][-1]) > 0


def test_periodic_evaluation_keeps_the_best_checkpoint(tmp_path, cli_env):
    """`eval_interval`: rank 0 evaluates greedily every so many env steps, logs it, keeps
    the best parameters as checkpoints/best.h5 (never a resume point), which `evaluate
    --checkpoint best` reads; `train` prints both the final and the best evaluation."""
    run_dir = tmp_path / "run"
    result = run_hpcrl(
        cli_env,
        3,
        "train",
        CONFIG,
        *("--run-dir", str(run_dir), "--total-env-steps", "30000"),
        *("--set", "eval_interval=10000", "--set", "periodic_eval_episodes=3"),
        *("--set", "eval_episodes=5"),
        timeout=300,
    )
    _check(result)
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert "final greedy evaluation: mean return" in result.stdout
    assert "best periodic evaluation: mean return" in result.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        evals = f["metrics/eval/mean_return"][()]
        best = f["metrics/eval/best_mean_return"][()]
    done = evals[~np.isnan(evals)]
    assert done.size >= 3, evals  # at 10k, 20k and 30k env steps (more rows may be NaN)
    assert final["best_eval_mean_return"] == best[~np.isnan(best)][-1] == done.max()
    assert 10_000 <= final["best_eval_env_steps"] <= 30_000
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "best.h5").is_file()
    assert (checkpoints / "latest.h5").resolve().name == "step-30000.h5"
    best_run = run_hpcrl(
        cli_env, 2, "evaluate", str(run_dir), "--checkpoint", "best", "--episodes", "3"
    )
    assert best_run.returncode == 0, best_run.stderr[-2000:]
    again = json.loads(best_run.stdout.strip().splitlines()[-1])
    assert again["episodes"] == 3 and again["checkpoint"] == str(checkpoints / "best.h5")
    step = run_hpcrl(cli_env, 1, "evaluate", str(run_dir), "--checkpoint", "step-30000")
    assert step.returncode == 0, step.stderr[-2000:]
    picked = json.loads(step.stdout)["checkpoint"]  # the JSON alone on stdout
    assert picked == str(checkpoints / "step-30000.h5")
    missing = run_hpcrl(cli_env, 1, "evaluate", str(run_dir), "--checkpoint", "step-7")
    assert missing.returncode == 2
    assert "no " in missing.stderr and "step-30000.h5, best.h5" in missing.stderr


def test_numpy_actors_never_import_torch(tmp_path, cli_env):
    """IMPALA's MLP actors act with `hpcrl.numpy_policy` on the published parameters: no
    actor rank imports torch (the learner does), and the run still learns and evaluates."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        "from hpcrl.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "from mpi4py import MPI\n"
        "print(f'PROBE rank={MPI.COMM_WORLD.rank} torch={\"torch\" in sys.modules} rc={rc}')\n"
    )
    from conftest import BIN

    result = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "3", sys.executable, str(script), "train", CONFIG]
        + ["--run-dir", str(tmp_path / "run"), "--total-env-steps", "20000"]
        + ["--set", "eval_episodes=6"],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    _check(result)
    # The launcher forwards each rank's stdout in its own chunks, which can interleave
    # (one CI run got "PROBE rank=2 ...PROBE rank=1 ...\n\n"), so match the records, not lines.
    probes = sorted(re.findall(r"PROBE rank=\d+ torch=\w+ rc=-?\d+", result.stdout))
    assert probes == [
        "PROBE rank=0 torch=True rc=0",
        "PROBE rank=1 torch=False rc=0",
        "PROBE rank=2 torch=False rc=0",
    ], result.stdout[-2000:]


@pytest.mark.timeout(900)
def test_default_job_learns_on_16_ranks_without_dropping_env_steps(tmp_path, cli_env):
    """The default job (`configs/cartpole-impala.yaml`, equal to it) on 16 ranks of this
    machine's cores: 15 actors against one learner. Flow control makes the actors wait
    instead of the learner dropping their unrolls, so the run reaches 475 with (almost)
    every env step learned from; it stops there (`stop_at_return`)."""
    early = ["--set", "stop_at_return=475", "--set", "log_interval_s=1"]
    result = subprocess.run(
        hpcrl_command(16, "train", CONFIG, *early),
        capture_output=True,
        text=True,
        timeout=900,
        env=cli_env,
        cwd=tmp_path,
    )
    _check(result)
    assert "reached a mean return of" in result.stdout, result.stdout[-3000:]
    assert "stopped early at" in result.stdout, result.stdout[-3000:]
    (run_h5,) = (tmp_path / "runs").glob("impala-CartPole-v1-*/run.h5")
    with h5py.File(run_h5, "r") as f:
        m = f["metrics"]
        total = int(m["env_steps"][-1])
        dropped = float(np.nansum(m["env_steps_dropped_stale"][()]))
        assert total <= DEFAULT_JOB["total_env_steps"]
        assert set(f["episodes/rank"][()].tolist()) == set(range(1, 16))
    assert dropped < 0.01 * total, (dropped, total)


def test_eval_interval_is_refused_where_the_layout_has_no_periodic_evaluation(tmp_path, cli_env):
    run_dir = tmp_path / "run"
    result = run_hpcrl(
        cli_env,
        2,
        "train",
        *("--algo", "qlearning", "--run-dir", str(run_dir), "--set", "eval_interval=1000"),
        timeout=120,
    )
    assert result.returncode == 2
    line = "config key 'eval_interval': got 1000, expected 0: layout"
    assert line in result.stderr and "does not evaluate during training" in result.stderr
    assert not run_dir.exists()
