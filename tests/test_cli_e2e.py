"""End-to-end tests: the real `python -m hpcrl` CLI launched under `mpiexec` as subprocesses.

(A) failure injection ends the whole job quickly with the failing rank's traceback;
(B) bad input gives one error line, exit status 2, no hang and no damage to an existing run;
(C) a finished run's HDF5 files are complete and consistent, `info` and `evaluate` work;
(D) `kill -9` of the whole job leaves readable files and a loadable checkpoint.

Run with `python -m pytest -q -m e2e tests/test_cli_e2e.py --timeout=300`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    alive,
    copy_run,
    descendants,
    digest_tree,
    hpcrl_command,
    kill_pids,
    one_error_line,
    subprocess_env,
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 120  # no single CLI call here needs more than a few seconds


# --------------------------------------------------------------------------- helpers


def _live_processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not alive(int(entry)):
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def _assert_no_orphans(marker: str, wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while (left := _live_processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes still running after the job ended: {left}"


def run_cli(cmd: list[str], env: dict[str, str], timeout: float = TIMEOUT_S):
    """Run `cmd` in its own session; on timeout kill every process of it and fail.

    Returns:
        (CompletedProcess, wall seconds).
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_pids(descendants(proc.pid))
        out, err = proc.communicate()
        pytest.fail(f"hang: {cmd} did not end within {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    wall = time.monotonic() - start
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall


def _show(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _status(run_dir: Path) -> str:
    # A rank killed a moment ago may still hold the HDF5 file lock for a few ms while the
    # kernel tears it down (its /proc entry already looks gone): retry briefly.
    deadline = time.monotonic() + 5
    while True:
        try:
            with h5py.File(run_dir / "run.h5", "r") as f:
                return str(f.attrs["status"])
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _assert_one_error_line(
    result: subprocess.CompletedProcess, patterns: list[str], code: int = 2
) -> str:
    """Exit status `code`, then `conftest.one_error_line`. Returns the line."""
    assert result.returncode == code, _show(result)
    return one_error_line(result.stdout, result.stderr, patterns, _show(result))


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def _train(n: int | None, run_dir: Path, *args: str, steps: int = 2000) -> tuple:
    cmd = hpcrl_command(
        n,
        "train",
        "--run-dir",
        str(run_dir),
        "--total-env-steps",
        str(steps),
        "--set",
        "eval_episodes=0",
        *args,
    )
    return run_cli(cmd, subprocess_env())


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory) -> Path:
    """A tiny completed run (FrozenLake8x8, -n 2, ps, 2000 env steps); copy before use."""
    run_dir = tmp_path_factory.mktemp("completed") / "run"
    result, _ = _train(2, run_dir)
    assert result.returncode == 0, _show(result)
    assert _status(run_dir) == "completed"
    return run_dir


# ------------------------------------------------------------- (A) failure injection


@pytest.mark.parametrize(
    ("layout", "fail_rank", "fail_after"),
    [
        ("ps", 2, 0),
        ("allreduce", 2, 0),
        ("ps", 0, 0),
        ("ps", 2, 5000),
        ("allreduce", 2, 5000),
        ("ps", 0, 5000),
    ],
    ids=[
        "ps-rank2",
        "allreduce-rank2",
        "ps-rank0",
        "ps-rank2-midrun",
        "allreduce-rank2-midrun",
        "ps-rank0-midrun",
    ],
)
def test_injected_failure_ends_the_job_with_the_traceback(
    tmp_path, cli_env, layout, fail_rank, fail_after
):
    run_dir = tmp_path / "run"
    # A budget this size takes well over 30 s on this machine: only the failure ends it early.
    cmd = hpcrl_command(
        4,
        "train",
        "--run-dir",
        str(run_dir),
        "--total-env-steps",
        "5000000",
        "--set",
        "eval_episodes=0",
        "--set",
        f"layout={layout}",
        "--set",
        f"debug.fail_rank={fail_rank}",
        "--set",
        f"debug.fail_after_env_steps={fail_after}",
    )
    result, wall = run_cli(cmd, cli_env, timeout=90)
    assert result.returncode != 0, _show(result)
    assert wall < 30, f"the job took {wall:.1f} s to end after the failure\n{_show(result)}"

    tag = f"[rank {fail_rank}]"
    stderr_lines = result.stderr.splitlines()
    assert f"{tag} Traceback (most recent call last):" in stderr_lines, _show(result)
    summary = [line for line in stderr_lines if line.startswith("hpcrl: error (rank 0): ")]
    failure = [line for line in stderr_lines if "injected failure" in line and line not in summary]
    assert failure, _show(result)
    assert all(line.startswith(tag) for line in failure), _show(result)
    if fail_rank != 0:  # the failing rank reported to rank 0, which names it (issue 18)
        assert len(summary) == 1, _show(result)
        assert re.match(
            rf"hpcrl: error \(rank 0\): rank {fail_rank} \(.+, pid \d+\) failed: "
            r"RuntimeError: debug.fail_rank",
            summary[0],
        ), _show(result)
    others = [
        line
        for line in stderr_lines
        if line.endswith("Traceback (most recent call last):") and not line.startswith(tag)
    ]
    assert not others, f"tracebacks of ranks that did not fail\n{_show(result)}"

    match = re.search(r"injected failure after (\d+) env steps", result.stderr)
    assert match, _show(result)
    steps = int(match.group(1))
    if fail_after == 0:
        assert steps == 0
    else:
        # Rank 0 (ps learner) sees env steps one actor batch (sync_interval x num_envs =
        # 64 x 32 rows) at a time, three actors at once; acting ranks see every vector step.
        slack = 3 * 64 * 32 if (layout, fail_rank) == ("ps", 0) else 1000
        assert fail_after <= steps < fail_after + slack, _show(result)

    # Every rank is gone within moments (the ranks may outlive mpiexec by a few ms).
    _assert_no_orphans(str(run_dir))
    # run.h5 was created and is readable and says failed: rank 0 marks it so for its own
    # failure and, from the report, for another rank's (issue 18).
    assert _status(run_dir) == "failed"


# ------------------------------------------------------------------- (B) bad input

BAD_TRAIN_CASES = [
    # (id, n, extra args, regexes that the one error line must contain)
    ("unknown-env", 2, ["--env", "NoSuchEnv-v0"], [r"'NoSuchEnv-v0'"]),
    ("non-discrete-env", 2, ["--env", "CartPole-v1"], [r"CartPole-v1", r"\bBox\b"]),
    ("unknown-algo", None, ["--algo", "nosuch"], [r"'nosuch'", r"qlearning"]),
    ("unknown-layout", 2, ["--set", "layout=ring"], [r"layout", r"'ring'"]),
    ("unknown-key", 2, ["--set", "alpah=0.1"], [r"'alpah'", r"did you mean 'alpha'"]),
    ("wrong-type", None, ["--set", "alpha=abc"], [r"'alpha'", r"'abc'"]),
    ("negative-budget", 2, ["--total-env-steps", "-5"], [r"total_env_steps", r"-5\b"]),
    ("alpha-zero", 2, ["--set", "alpha=0"], [r"'alpha'", r"got 0(\.0)?\b"]),
    ("alpha-too-big", 2, ["--set", "alpha=1.5"], [r"'alpha'", r"got 1\.5\b"]),
    ("gamma-too-big", 2, ["--set", "gamma=1.2"], [r"'gamma'", r"got 1\.2\b"]),
    (
        "tau-zero",
        2,
        ["--set", "exploration=boltzmann", "--set", "tau_start=0"],
        [r"'tau_start'", r"got 0(\.0)?\b"],
    ),
    ("unknown-env-kwarg", 2, ["--env-kwargs", '{"no_such_kwarg": 1}'], [r"no_such_kwarg"]),
    ("env-kwargs-not-json", None, ["--env-kwargs", "{bad"], [r"--env-kwargs", r"\{bad"]),
    ("num-envs-zero", 2, ["--set", "num_envs=0"], [r"'num_envs'", r"got 0\b"]),
    # Deep learners: a global batch that does not split over the ranks, a wrong action space.
    (
        "ppo-batch-does-not-split",
        3,
        ["--algo", "ppo", "--env", "CartPole-v1", "--set", "env_steps_per_update=512"],
        [r"env_steps_per_update 512", r"3 ranks", r"num_envs"],
    ),
    (
        "a2c-batch-does-not-split",
        3,
        ["--algo", "a2c", "--env", "CartPole-v1", "--set", "env_steps_per_update=40"],
        [r"env_steps_per_update 40", r"3 ranks"],
    ),
    (
        "dqn-train-frequency-does-not-split",
        3,
        ["--algo", "dqn", "--env", "CartPole-v1", "--set", "train_frequency=256"],
        [r"train_frequency 256", r"3 ranks"],
    ),
    ("dqn-box-actions", 2, ["--algo", "dqn", "--env", "Pendulum-v1"], [r"dqn", r"Discrete"]),
    ("a2c-unknown-optimizer", 2, ["--algo", "a2c", "--set", "optimizer=sgd"], [r"'sgd'"]),
    # Raw 210 x 160 RGB Atari frames: no model reads them; the error names the fix.
    (
        "atari-without-preprocessing",
        2,
        ["--algo", "ppo", "--env", "ALE/Pong-v5", "--set", "atari_preprocessing=false"],
        [r"210, 160, 3", r"AtariPreprocessing"],
    ),
    ("frame-stack-zero", 2, ["--set", "frame_stack=0"], [r"'frame_stack'", r"got 0\b"]),
    ("unknown-vector-env", 2, ["--set", "vector_env=threads"], [r"'vector_env'", r"'threads'"]),
    (
        "table-stepping-without-a-table",
        2,
        ["--algo", "ppo", "--env", "CartPole-v1", "--set", "vector_env=table"],
        [r"'CartPole-v1' has no transition table P"],
    ),
    (
        "normalize-obs-on-images",
        2,
        ["--algo", "ppo", "--env", "ALE/Pong-v5", "--set", "normalize_obs=true"],
        [r"normalize_obs", r"float Box"],
    ),
    (
        "sync-frac-zero",
        2,
        ["--algo", "ppo", "--env", "CartPole-v1", "--set", "sync_frac=0"],
        [r"'sync_frac'", r"got 0(\.0)?\b"],
    ),
    ("tabular-on-cuda", 2, ["--device", "cuda"], [r"'cuda'", r"tabular", r"allreduce"]),
    # the tabular GPU path (layout allreduce) on a node where torch sees no GPU, and with
    # envs it cannot step from their table
    (
        "tabular-gpu-path-without-a-gpu",
        2,
        ["--device", "cuda", "--set", "layout=allreduce"],
        [r"'cuda'", r"no CUDA GPU", r"tabular GPU path"],
    ),
    (
        "tabular-gpu-path-with-sync-envs",
        2,
        ["--device", "cuda", "--set", "layout=allreduce", "--set", "vector_env=sync"],
        [r"vector_env 'sync'", r"auto or table"],
    ),
    # IMPALA (actor-learner): a learner group that leaves no actor, empty unrolls or
    # batches, a negative policy-lag bound, a space its model cannot read.
    (
        "impala-learners-fill-the-world",
        2,
        ["--algo", "impala", "--env", "CartPole-v1", "--set", "learner_ranks=2"],
        [r"'learner_ranks'", r"got 2\b", r"world size 2"],
    ),
    (
        "impala-unroll-zero",
        2,
        ["--algo", "impala", "--env", "CartPole-v1", "--set", "unroll_length=0"],
        [r"'unroll_length'", r"got 0\b"],
    ),
    (
        "impala-batch-zero",
        2,
        ["--algo", "impala", "--env", "CartPole-v1", "--set", "unrolls_per_update=0"],
        [r"'unrolls_per_update'", r"got 0\b"],
    ),
    (
        "impala-negative-lag-bound",
        2,
        ["--algo", "impala", "--env", "CartPole-v1", "--set", "max_policy_lag=-1"],
        [r"'max_policy_lag'", r"got -1\b"],
    ),
    (
        "impala-tuple-observations",
        2,
        ["--algo", "impala", "--env", "Blackjack-v1"],
        [r"Tuple\(Discrete\(32\)", r"Box or Discrete"],
    ),
    # A budget (2000 env steps) smaller than one update's batch would train nothing.
    (
        "ppo-budget-below-one-update",
        None,
        ["--algo", "ppo", "--env", "CartPole-v1"],
        [r"'total_env_steps'", r"got 2000\b", r"at least 2048\b"],
    ),
    (
        "dqn-budget-before-learning-starts",
        2,
        ["--algo", "dqn", "--env", "CartPole-v1", "--set", "learning_starts=2000"],
        [r"'total_env_steps'", r"got 2000\b", r"at least 2004\b", r"learning_starts"],
    ),
    (
        "impala-budget-below-one-update",
        2,
        ["--algo", "impala", "--env", "CartPole-v1", "--set", "unroll_length=100"],
        [r"'total_env_steps'", r"got 2000\b", r"unroll_length 100"],
    ),
]


@pytest.mark.parametrize(
    ("n", "args", "patterns"), [c[1:] for c in BAD_TRAIN_CASES], ids=[c[0] for c in BAD_TRAIN_CASES]
)
def test_bad_train_input_leaves_an_existing_run_alone(tmp_path, completed_run, n, args, patterns):
    """Even with --overwrite, bad input fails before the existing run is touched."""
    if "no CUDA GPU" in patterns:
        import torch

        if torch.cuda.is_available():
            pytest.skip("torch sees a GPU here, so the GPU path runs")
    run_dir = copy_run(completed_run, tmp_path / "run")
    before = digest_tree(run_dir)
    result, _ = _train(n, run_dir, "--overwrite", *args)
    _assert_one_error_line(result, patterns)
    assert digest_tree(run_dir) == before
    assert _status(run_dir) == "completed"


@pytest.mark.parametrize(
    ("n", "args", "patterns"),
    [
        (2, ["--env", "NoSuchEnv-v0"], [r"NoSuchEnv-v0"]),
        (None, ["--set", "gamma=1.2"], [r"'gamma'", r"1\.2"]),
        (2, ["--set", "layout=ring"], [r"'ring'"]),
    ],
    ids=["unknown-env", "gamma", "layout"],
)
def test_bad_train_input_creates_no_run_directory(tmp_path, n, args, patterns):
    run_dir = tmp_path / "fresh"
    result, _ = _train(n, run_dir, *args)
    _assert_one_error_line(result, patterns)
    assert not run_dir.exists()


@pytest.mark.parametrize("status", ["completed", "interrupted"])
def test_resume_with_another_algo_is_one_line(tmp_path, completed_run, status):
    """`--resume RUN --algo other`: not a misleading unknown key, nor a silent no-op on a
    completed run; the run is left as it was. (Another layout is a resume conflict,
    `test_resume_e2e.py`.)"""
    run_dir = copy_run(completed_run, tmp_path / "run")
    if status != "completed":
        with h5py.File(run_dir / "run.h5", "r+") as f:
            f.attrs["status"] = status
    before = digest_tree(run_dir)
    cmd = hpcrl_command(None, "train", "--resume", str(run_dir), "--algo", "ppo")
    result, _ = run_cli(cmd, subprocess_env())
    _assert_one_error_line(result, [r"a run of algo 'qlearning', not 'ppo'", r"--run-dir"])
    assert digest_tree(run_dir) == before


def test_bad_yaml_names_its_line_and_column(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("algo: ppo\nenv_id: CartPole-v1\n  learning_rate: 3e-4\n")
    result, _ = run_cli(hpcrl_command(2, "train", str(config)), subprocess_env())
    _assert_one_error_line(result, [r"bad\.yaml' is not valid YAML: line 3, column 16"])


def test_bad_env_kwargs_value_is_a_user_error(tmp_path):
    run_dir = tmp_path / "fresh"
    result, _ = _train(
        2, run_dir, "--env", "FrozenLake-v1", "--env-kwargs", '{"map_name": "nosuch"}'
    )
    _assert_one_error_line(result, [r"nosuch"])
    assert not run_dir.exists()


def test_bad_option_syntax_exits_2_printed_once(tmp_path):
    run_dir = tmp_path / "fresh"
    cmd = hpcrl_command(2, "train", "--run-dir", str(run_dir), "--total-env-steps", "abc")
    result, _ = run_cli(cmd, subprocess_env())
    assert result.returncode == 2, _show(result)
    assert result.stderr.count("invalid int value: 'abc'") == 1, _show(result)
    _assert_one_error_line(result, [r"--total-env-steps", r"'abc'"])
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("n", [2, None], ids=["n2", "no-launcher"])
def test_run_dir_with_a_completed_run_is_refused_without_overwrite(tmp_path, completed_run, n):
    run_dir = copy_run(completed_run, tmp_path / "run")
    run_h5_hash = _sha256(run_dir / "run.h5")
    before = digest_tree(run_dir)

    result, _ = _train(n, run_dir, "--total-env-steps", "3000")
    _assert_one_error_line(result, [re.escape(str(run_dir)), r"--overwrite", r"completed"])
    assert _sha256(run_dir / "run.h5") == run_h5_hash
    assert digest_tree(run_dir) == before
    assert _status(run_dir) == "completed"

    result, _ = _train(n, run_dir, "--overwrite", "--total-env-steps", "3000")
    assert result.returncode == 0, _show(result)
    assert _status(run_dir) == "completed"
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f["metrics/env_steps"][-1]) == 3000
        assert json.loads(f.attrs["config"])["total_env_steps"] == 3000
        assert int(f.attrs["world_size"]) == (1 if n is None else n)


def _corrupt_data(path: Path) -> None:
    """Overwrite bytes inside the q_table data (the checksum must catch it)."""
    with h5py.File(path, "r") as f:
        offset = f["q_table"].id.get_offset()
    assert offset is not None
    with open(path, "r+b") as g:
        g.seek(offset + 100)
        g.write(b"\x13" * 64)


def _corrupt_middle(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as g:
        g.seek(size // 2)
        g.write(b"\xff" * 256)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("n", "damage"),
    [
        (2, _corrupt_data),
        (2, _corrupt_middle),
        (None, _truncate),
        (2, _truncate),
    ],
    ids=["data-bytes", "middle-bytes", "truncated-no-launcher", "truncated"],
)
def test_evaluate_refuses_a_corrupt_checkpoint(tmp_path, completed_run, n, damage):
    run_dir = copy_run(completed_run, tmp_path / "run")
    target = (run_dir / "checkpoints" / "latest.h5").resolve()
    assert re.fullmatch(r"step-\d+\.h5", target.name), target
    damage(target)
    before = digest_tree(run_dir)
    result, _ = run_cli(
        hpcrl_command(n, "evaluate", str(run_dir), "--episodes", "10"), subprocess_env()
    )
    _assert_one_error_line(result, [r"checkpoint", re.escape(target.name)])
    assert digest_tree(run_dir) == before


def test_evaluate_refuses_a_file_as_run_dir(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"not a run directory")
    result, _ = run_cli(hpcrl_command(None, "evaluate", str(path)), subprocess_env())
    _assert_one_error_line(result, [r"run\.h5' is a file: expected the directory"])


def test_evaluate_refuses_a_missing_run_dir(tmp_path):
    missing = tmp_path / "no-such-run"
    result, _ = run_cli(hpcrl_command(2, "evaluate", str(missing)), subprocess_env())
    _assert_one_error_line(result, [re.escape(str(missing))])
    assert not missing.exists()


@pytest.mark.parametrize("n", [2, None], ids=["n2", "no-launcher"])
def test_evaluate_refuses_a_run_dir_without_checkpoint(tmp_path, completed_run, n):
    run_dir = copy_run(completed_run, tmp_path / "run")
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()
    result, _ = run_cli(hpcrl_command(n, "evaluate", str(run_dir)), subprocess_env())
    _assert_one_error_line(result, [r"no checkpoint", re.escape(str(run_dir))])


def test_evaluate_refuses_zero_episodes(tmp_path, completed_run):
    result, _ = run_cli(
        hpcrl_command(2, "evaluate", str(completed_run), "--episodes", "0"), subprocess_env()
    )
    _assert_one_error_line(result, [r"--episodes 0\b"])


def test_evaluate_refuses_a_negative_seed(tmp_path, completed_run):
    cmd = hpcrl_command(2, "evaluate", str(completed_run), "--seed", "-1")
    result, _ = run_cli(cmd, subprocess_env())
    _assert_one_error_line(result, [r"--seed -1\b"])


def test_info_refuses_a_missing_run_dir(tmp_path):
    missing = tmp_path / "no-such-run"
    result, _ = run_cli(hpcrl_command(None, "info", str(missing)), subprocess_env())
    _assert_one_error_line(result, [re.escape(str(missing))])


# --------------------------------------------------------- (C) a successful run's files

BUDGET = 20_001  # not a multiple of the ranks or of num_envs: the split must still be exact
EVAL_EPISODES = 20


@pytest.fixture(
    scope="module",
    params=[(2, "ps"), (2, "allreduce"), (4, "ps"), (4, "allreduce"), (None, "ps")],
    ids=["n2-ps", "n2-allreduce", "n4-ps", "n4-allreduce", "n1-ps"],
)
def trained(request, tmp_path_factory) -> dict:
    n, layout = request.param
    run_dir = tmp_path_factory.mktemp(f"trained-{n}-{layout}") / "run"
    cmd = hpcrl_command(
        n,
        "train",
        "--env",
        "FrozenLake-v1",
        "--run-dir",
        str(run_dir),
        "--total-env-steps",
        str(BUDGET),
        "--set",
        f"layout={layout}",
        "--set",
        f"eval_episodes={EVAL_EPISODES}",
        "--set",
        "log_interval_s=0.05",
    )
    result, _ = run_cli(cmd, subprocess_env())
    assert result.returncode == 0, _show(result)
    return {
        "n": n,
        "world": 1 if n is None else n,
        "layout": layout,
        "dir": run_dir,
        "result": result,
    }


def test_train_prints_final_json(trained):
    final = _last_json(trained["result"].stdout)
    assert set(final) >= {"mean_return", "std_return", "episodes"}
    assert final["episodes"] == EVAL_EPISODES
    assert 0.0 <= final["mean_return"] <= 1.0  # FrozenLake returns are 0 or 1
    assert final["std_return"] >= 0.0
    with h5py.File(trained["dir"] / "run.h5", "r") as f:
        assert float(f.attrs["eval_mean_return"]) == final["mean_return"]


def test_run_h5_attributes_and_tables(trained):
    from hpcrl import __version__

    with h5py.File(trained["dir"] / "run.h5", "r") as f:
        attrs = f.attrs
        assert str(attrs["hpcrl_version"]) == __version__
        assert str(attrs["algo"]) == "qlearning"
        assert str(attrs["env_id"]) == "FrozenLake-v1"
        assert int(attrs["world_size"]) == trained["world"]
        assert str(attrs["status"]) == "completed"
        config = json.loads(attrs["config"])
        assert config["layout"] == trained["layout"]
        assert config["total_env_steps"] == BUDGET
        assert config["env_id"] == "FrozenLake-v1"

        episodes = f["episodes"]
        assert set(episodes) == {"return", "length", "env_steps", "wall_time", "rank"}
        lengths = {name: len(episodes[name]) for name in episodes}
        assert len(set(lengths.values())) == 1, lengths
        assert lengths["return"] > 0
        acting = (
            set(range(1, trained["world"]))
            if trained["layout"] == "ps" and trained["world"] > 1
            else set(range(trained["world"]))
        )
        assert set(episodes["rank"][:].tolist()) <= acting
        assert np.all(episodes["length"][:] >= 1)
        env_steps = episodes["env_steps"][:]
        assert np.all((env_steps >= 1) & (env_steps <= BUDGET))

        metrics = f["metrics"]
        assert int(metrics["env_steps"][-1]) == BUDGET
        assert np.all(np.diff(metrics["env_steps"][:]) >= 0)
        assert int(metrics["episodes"][-1]) == lengths["return"]


def _rank_files(run_dir: Path) -> dict[int, Path]:
    files = {}
    for path in (run_dir / "traj").iterdir():
        match = re.fullmatch(r"rank-(\d+)\.h5", path.name)
        assert match, f"unexpected file {path}"
        files[int(match.group(1))] = path
    return files


def test_trajectories_match_the_budget_and_the_episodes(trained):
    run_dir, world = trained["dir"], trained["world"]
    files = _rank_files(run_dir)
    if trained["layout"] == "ps" and world > 1:
        assert sorted(files) == list(range(1, world))  # the learner writes no trajectories
    else:
        assert sorted(files) == list(range(world))

    with h5py.File(run_dir / "run.h5", "r") as f:
        episode_ranks = f["episodes/rank"][:]
        episode_lengths = f["episodes/length"][:]
        episode_returns = f["episodes/return"][:]
        vds_obs = f["trajectories/obs"][:]
        vds_ranks = f["trajectories/ranks"][:].tolist()

    total_rows = segments = segment_steps = 0
    concatenated = []
    for rank in sorted(files):
        with h5py.File(files[rank], "r") as t:
            columns = {name: t[name][:] for name in t}
        assert set(columns) >= {
            "obs",
            "action",
            "reward",
            "next_obs",
            "terminated",
            "truncated",
            "env",
        }
        rows = len(columns["obs"])
        assert all(len(c) == rows for c in columns.values()), files[rank]
        total_rows += rows
        if rows:
            concatenated.append(columns["obs"])
        done = columns["terminated"] | columns["truncated"]
        rank_lengths, rank_returns = [], []
        for env in np.unique(columns["env"]):
            idx = np.flatnonzero(columns["env"] == env)
            ends = np.flatnonzero(done[idx])
            starts = np.concatenate([[0], ends[:-1] + 1])
            rank_lengths += (ends - starts + 1).tolist()
            rewards = columns["reward"][idx]
            pairs = zip(starts, ends, strict=True)
            rank_returns += [float(rewards[s : e + 1].sum()) for s, e in pairs]
        segments += len(rank_lengths)
        segment_steps += sum(rank_lengths)
        # Per rank: the finished episodes in its file are exactly its /episodes rows.
        mine = episode_ranks == rank
        assert sorted(rank_lengths) == sorted(episode_lengths[mine].tolist()), rank
        assert sorted(rank_returns) == sorted(episode_returns[mine].tolist()), rank

    assert total_rows == BUDGET
    assert len(vds_obs) == BUDGET
    assert vds_ranks == [r for r in sorted(files) if r in vds_ranks]
    np.testing.assert_array_equal(vds_obs, np.concatenate(concatenated))
    assert segments == len(episode_lengths)
    assert segment_steps == int(episode_lengths.sum())


def test_info_prints_a_summary(trained):
    result, _ = run_cli(hpcrl_command(None, "info", str(trained["dir"])), subprocess_env())
    assert result.returncode == 0, _show(result)
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert fields["algo"].strip() == "qlearning"
    assert fields["env_id"].strip() == "FrozenLake-v1"
    assert fields["status"].strip() == "completed"
    assert fields["layout"].strip() == trained["layout"]
    assert int(fields["world_size"]) == trained["world"]
    assert int(fields["env_steps"]) == BUDGET


def test_evaluate_is_deterministic_across_calls_and_world_sizes(trained):
    from hpcrl.evaluation import greedy_episode_returns
    from hpcrl.storage.checkpoints import load_latest

    args = ("evaluate", str(trained["dir"]), "--episodes", "50", "--seed", "3")
    outputs = []
    for n in (None, None, 2):
        result, _ = run_cli(hpcrl_command(n, *args), subprocess_env())
        assert result.returncode == 0, _show(result)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, _show(result)
        outputs.append(lines[0])
    assert outputs[0] == outputs[1], "evaluate is not deterministic"
    assert outputs[2] == outputs[0], "evaluate under -n 2 differs from one process"
    out = json.loads(outputs[0])
    assert out["episodes"] == 50

    # The same numbers computed here from the checkpoint.
    arrays, meta, _ = load_latest(trained["dir"] / "checkpoints")
    assert meta["env_steps"] == BUDGET
    returns = greedy_episode_returns(
        "FrozenLake-v1", {}, arrays["q_table"], np.arange(50, dtype=np.int64), 3
    )
    assert out["mean_return"] == pytest.approx(float(np.mean(returns)), abs=1e-12)
    assert out["std_return"] == pytest.approx(float(np.std(returns)), abs=1e-12)


# --------------------------------------------------------------- (D) kill -9 mid-run


def _metrics_rows(run_h5: Path) -> int:
    """Rows of /metrics/env_steps in a file another process is writing (0 when unreadable)."""
    try:
        with h5py.File(run_h5, "r", locking=False) as f:
            return len(f["metrics/env_steps"]) if "env_steps" in f["metrics"] else 0
    except Exception:  # noqa: BLE001 - a file mid-write may not read cleanly yet
        return 0


def _lock_holders(path: Path) -> list[str]:
    """Processes that have `path` open (from /proc), for a failure message."""
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.path.realpath(fd) == str(path.resolve()) for fd in fd_dir.iterdir()):
                cmdline = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                holders.append(f"{fd_dir.parent.name}: {cmdline.decode(errors='replace')}")
        except OSError:
            continue
    return holders


def _open_after_kill(path: Path, wait_s: float = 10.0) -> h5py.File:
    """Open with default HDF5 locking. Once seen (rarely, on a loaded machine) to find the
    file still locked right after every process of the job was reaped: retry a few
    seconds and, if it stays locked, fail naming whoever still has it open."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{path} still locked {wait_s:g} s after the kill; open by: "
                    f"{_lock_holders(path)}"
                )
            time.sleep(0.2)


def test_kill_9_leaves_readable_files_and_a_loadable_checkpoint(tmp_path):
    from hpcrl.storage.checkpoints import load_checkpoint

    run_dir = tmp_path / "run"
    cmd = hpcrl_command(
        4,
        "train",
        "--run-dir",
        str(run_dir),
        "--total-env-steps",
        "5000000",
        "--set",
        "log_interval_s=0.5",
        "--set",
        "checkpoint_interval_env_steps=100000",
        "--set",
        "eval_episodes=0",
    )
    with open(tmp_path / "stdout", "w") as log_out, open(tmp_path / "stderr", "w") as log_err:
        proc = subprocess.Popen(
            cmd, env=subprocess_env(), stdout=log_out, stderr=log_err, start_new_session=True
        )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        latest = run_dir / "checkpoints" / "latest.h5"
        while not (latest.exists() and _metrics_rows(run_dir / "run.h5") >= 2):
            assert proc.poll() is None, (
                f"the job ended by itself (exit {proc.returncode}) before the kill\n"
                f"{(tmp_path / 'stderr').read_text()}"
            )
            assert time.monotonic() < deadline, "no checkpoint and 2 metric rows after 90 s"
            time.sleep(0.05)
        # kill -9 every process of the job at once: launcher, proxy and all ranks (the
        # ranks run in sessions of their own, so the process group alone is not enough).
        pids = descendants(proc.pid)
        assert len(pids) >= 6, f"expected mpiexec, a proxy and 4 ranks, found {pids}"
        kill_pids(pids)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        end = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "processes survived SIGKILL"
    finally:
        kill_pids(pids or descendants(proc.pid))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
    _assert_no_orphans(str(run_dir))
    assert proc.returncode == -signal.SIGKILL

    with _open_after_kill(run_dir / "run.h5") as f:  # plain h5py, default locking
        # Killed one process at a time: rank 0 may see a peer die first and mark the run
        # failed just before its own SIGKILL.
        assert str(f.attrs["status"]) in ("running", "failed")
        steps = f["metrics/env_steps"][:]
        assert len(steps) >= 2
        assert 0 < steps[-1] < 5_000_000
        for group in ("episodes", "metrics"):
            for name in f[group]:
                f[group][name][:]
    for rank in (1, 2, 3):
        with h5py.File(run_dir / "traj" / f"rank-{rank}.h5", "r") as t:
            assert set(t) >= {"obs", "action", "reward", "next_obs", "terminated", "truncated"}
            for name in t:
                t[name][:]
    assert not (run_dir / "traj" / "rank-0.h5").exists()

    target = (run_dir / "checkpoints" / "latest.h5").resolve()
    arrays, meta = load_checkpoint(target)  # verifies `complete` and the checksum
    assert target.name == f"step-{meta['env_steps']}.h5"
    assert 100_000 <= meta["env_steps"] < 5_000_000
    assert arrays["q_table"].shape == (64, 4)
    assert np.all(np.isfinite(arrays["q_table"]))

    result, _ = run_cli(
        hpcrl_command(2, "evaluate", str(run_dir), "--episodes", "20"), subprocess_env()
    )
    assert result.returncode == 0, _show(result)
    assert _last_json(result.stdout)["episodes"] == 20

    result, _ = run_cli(hpcrl_command(None, "info", str(run_dir)), subprocess_env())
    assert result.returncode == 0, _show(result)
    # what run.h5 says (above): rank 0 may have seen a peer die and written `failed`
    # before its own SIGKILL landed (CI at f747a50)
    # nobody holds a killed run: `info` says so (issue 18)
    stale = r"^status\s+(running \(stale: no live job holds it\)|failed)$"
    assert re.search(stale, result.stdout, re.MULTILINE), _show(result)


def test_allreduce_is_deterministic_for_a_fixed_seed_and_world_size(tmp_path):
    """Two `allreduce` runs with the same seed on 2 ranks end with bitwise-identical Q-tables
    and /episodes (all but wall_time): the ground exact resume will stand on."""
    import h5py
    import numpy as np

    tables, episodes = [], []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        cmd = hpcrl_command(
            2,
            "train",
            "--env",
            "FrozenLake-v1",
            "--total-env-steps",
            "50000",
            "--run-dir",
            str(run_dir),
            "--set",
            "layout=allreduce",
            "--set",
            "eval_episodes=0",
        )
        result, _ = run_cli(cmd, subprocess_env())
        assert result.returncode == 0, _show(result)
        with h5py.File(run_dir / "checkpoints" / "latest.h5", "r") as f:
            tables.append(f["q_table"][()])
        with h5py.File(run_dir / "run.h5", "r") as f:
            episodes.append(
                {k: f["episodes"][k][()] for k in ("return", "length", "env_steps", "rank")}
            )
    assert np.any(tables[0] != 0.0)
    assert np.array_equal(tables[0], tables[1])
    assert len(episodes[0]["return"]) > 100
    for key in episodes[0]:
        assert np.array_equal(episodes[0][key], episodes[1][key]), key


@pytest.mark.parametrize(
    ("env_id", "module", "extra"),
    [
        ("ALE/Pong-v5", "ale_py", "atari"),
        ("ALE/Pong-v5", "cv2", "atari"),  # AtariPreprocessing resizes with opencv
        ("LunarLander-v3", "Box2D", "box2d"),
    ],
    ids=["ale-py", "opencv", "box2d"],
)
def test_missing_extra_is_named_in_one_error_line(tmp_path, env_id, module, extra):
    """An env whose optional dependency is missing (simulated: a module of that name first
    on the path that fails to import) fails on every rank with one line naming the extra."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{module}.py").write_text(f"raise ImportError('simulated: no {module}')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    run_dir = tmp_path / "fresh"
    cmd = hpcrl_command(
        2,
        "train",
        "--algo",
        "ppo",
        "--env",
        env_id,
        "--run-dir",
        str(run_dir),
        "--total-env-steps",
        "2000",
        "--set",
        "eval_episodes=0",
    )
    result, _ = run_cli(cmd, env)
    _assert_one_error_line(result, [re.escape(repr(env_id)), re.escape(f"'hpcrl[{extra}]'")])
    assert not run_dir.exists()


def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path):
    """`--device cuda` where torch sees no GPU: one line on every rank, exit 2, no run dir."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    run_dir = tmp_path / "fresh"
    result, _ = _train(2, run_dir, "--algo", "ppo", "--env", "CartPole-v1", "--device", "cuda")
    _assert_one_error_line(result, [r"device 'cuda'", r"no CUDA GPU", r"--device cpu"])
    assert not run_dir.exists()
