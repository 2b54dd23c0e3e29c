"""End-to-end fault tests of issue 18: faults that used to end badly, each against the
real `python -m hpcrl train` under `mpiexec` (see `benchmarks/faults.py` for the table).

Run with `python -m pytest -q -m e2e tests/test_faults_e2e.py --timeout=300`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import hpcrl_command, subprocess_env
from hpcrl.storage import space
from hpcrl.storage.checkpoints import load_checkpoint
from jobs import job, run, status, wrapped

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TABULAR = ["--set", "layout=allreduce", "--seed", "3"]


def wait_for_file(path: Path, j, timeout: float = 120.0) -> None:
    """Poll until `path` exists; fail if the job ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert j.proc.poll() is None, f"the job ended before {path}\n{j.result().show()}"
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_during_the_final_evaluation_stops_it_and_a_resume_only_evaluates(tmp_path, sig):
    """Issue 18, case 4: a signal during the final evaluation was swallowed (the evaluation
    ran on, then exit 0; under SLURM's KillWait the job was SIGKILLed and left `running`).
    Now the evaluation stops within seconds, the run is `trained` (complete, not evaluated),
    every rank exits 3, and a resume runs only the evaluation."""
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    budget = 20_000
    args = ["--total-env-steps", str(budget), *TABULAR, "--set", "eval_episodes=3000000"]
    with job(wrapped(2, logs, "train", "--run-dir", str(run_dir), *args), logs) as j:
        wait_for_file(run_dir / "checkpoints" / f"step-{budget}.h5", j)
        time.sleep(0.5)  # into the evaluation (~10 min of episodes)
        signalled = time.monotonic()
        j.signal(sig)
        result = j.wait(timeout=60)
    assert time.monotonic() - signalled < 15, result.show()
    assert result.rc == 3 and result.ranks == {0: 3, 1: 3}, result.show()
    assert f"{sig.name} during the evaluation: training is complete" in result.stdout
    assert "Traceback" not in result.stderr, result.show()
    assert status(run_dir) == "trained"

    result = run(
        wrapped(2, logs, "train", "--resume", str(run_dir), "--set", "eval_episodes=40"), logs
    )
    assert result.rc == 0 and result.ranks == {0: 0, 1: 0}, result.show()
    assert "training is complete; running its final evaluation" in result.stdout, result.show()
    assert "over 40 episodes" in result.stdout, result.show()
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f.attrs["eval_episodes"]) == 40
        assert int(f["metrics/env_steps"][-1]) == budget
    again = run(wrapped(2, logs, "train", "--resume", str(run_dir)), logs)
    assert again.rc == 0 and "already completed" in again.stdout, again.show()


def rank_pid(j, rank: int, timeout: float = 60.0) -> int:
    """The pid of `rank` in job `j` (from its PMI_RANK), once that process has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j._track()
        for pid in j.live():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.05)
    pytest.fail(f"no rank {rank} in the job within {timeout} s")


IMPALA = ["configs/cartpole-impala.yaml", "--set", "eval_episodes=0", "--seed", "5"]
FAILING = {
    "allreduce": (2, ["--total-env-steps", "200000", *TABULAR], 1),
    "actor_learner": (4, [*IMPALA, "--total-env-steps", "200000"], 2),
}


@pytest.mark.parametrize("layout", list(FAILING))
def test_an_exception_off_rank_0_marks_the_run_failed_and_names_the_rank(tmp_path, layout):
    """Issue 18, case 3: after an exception on a rank other than 0, run.h5 still said
    `running` (only rank 0 wrote `failed`). Now the rank reports to rank 0 before the
    abort: rank 0 names it (host, pid), marks the run `failed` and keeps the error."""
    ranks, args, bad = FAILING[layout]
    run_dir = tmp_path / "run"
    fail = ["--set", f"debug.fail_rank={bad}", "--set", "debug.fail_after_env_steps=3000"]
    cmd = wrapped(ranks, tmp_path / "logs", "train", "--run-dir", str(run_dir), *args, *fail)
    started = time.monotonic()
    result = run(cmd, tmp_path / "logs", cwd=REPO)
    assert result.rc != 0, result.show()
    assert time.monotonic() - started < 60, result.show()
    with h5py.File(run_dir / "run.h5", "r") as f:
        pid = int(f.attrs["rank_pids"][bad])
        assert f.attrs["status"] == "failed", result.show()
        failure = str(f.attrs["failure"])
    named = f"rank {bad} ({socket.gethostname()}, pid {pid}) failed: RuntimeError: debug.fail_rank"
    assert named in failure
    assert f"hpcrl: error (rank 0): {named}" in result.stderr, result.show()
    info = subprocess.run(hpcrl_command(None, "info", str(run_dir)), capture_output=True, text=True)
    assert named in info.stdout, info


APEX = ["configs/cartpole-apex.yaml", "--set", "eval_episodes=0", "--set", "learning_starts=1000"]


@pytest.mark.parametrize(
    "args,actor",
    [([*IMPALA, "--total-env-steps", "60000"], 2), ([*APEX, "--total-env-steps", "10000"], 3)],
    ids=["actor_learner", "distributed_replay"],
)
def test_a_stopped_actor_is_named_by_the_watchdog(tmp_path, args, actor):
    """Issue 18, case 2: the watchdog named the rank that waited, not the one that stopped
    responding. An actor stopped by SIGSTOP is now named, with its host and pid. (Ape-X's
    learner trains on from the replay whatever the actors do: it spun forever before it
    watched the env steps too; found by benchmarks/faults.py.)"""
    run_dir = tmp_path / "run"
    args = [*args, "--set", "watchdog_s=8"]
    cmd = wrapped(4, tmp_path / "logs", "train", "--run-dir", str(run_dir), *args)
    with job(cmd, tmp_path / "logs", cwd=REPO) as j:
        pid = rank_pid(j, actor)
        j.wait_for(re.compile(r"^\[hpcrl\] env_steps ", re.MULTILINE))
        os.kill(pid, signal.SIGSTOP)
        result = j.wait(timeout=90)
    assert result.rc != 0, result.show()
    named = f"rank {actor} ({socket.gethostname()}, pid {pid}) is stopped"
    assert named in result.stderr, result.show()
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "failed"


def test_a_killed_job_is_stale_in_info_and_resumes_as_interrupted(tmp_path):
    """Issue 18, cases 2 and 3: `kill -9` of an IMPALA actor. MPICH's mpiexec kills the
    other ranks itself within milliseconds (no rank can speak), naming a PID of the job in
    its banner: run.h5's `rank_pids` maps it to a rank. `info` shows the run as stale instead
    of `running`, and a resume says why it continues and completes the exact budget."""
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    budget = 60_000
    args = [
        *IMPALA,
        "--total-env-steps",
        str(budget),
        "--set",
        "checkpoint_interval_env_steps=8000",
    ]
    with job(wrapped(4, logs, "train", "--run-dir", str(run_dir), *args), logs, cwd=REPO) as j:
        pid = rank_pid(j, 2)
        wait_for_file(run_dir / "checkpoints" / "latest.h5", j)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        result = j.wait(timeout=30)
    assert result.rc != 0 and time.monotonic() - killed < 10, result.show()
    with h5py.File(run_dir / "run.h5", "r") as f:
        pids = [int(p) for p in f.attrs["rank_pids"]]
        # Usually no rank can speak. When rank 0's census sees rank 2's process gone before
        # the launcher's kill arrives (CI, once), it marks the run failed and names rank 2.
        status = str(f.attrs["status"])
        failure = str(f.attrs.get("failure", ""))
    assert pids[2] == pid
    # The banner names a PID of the job, not always the killed one (CI: rank 1's for a
    # kill of rank 2); run.h5's rank_pids maps it to a rank.
    banner = re.search(r"PID (\d+) RUNNING AT", result.stdout + result.stderr)
    assert banner and int(banner.group(1)) in pids, result.show()
    info = subprocess.run(hpcrl_command(None, "info", str(run_dir)), capture_output=True, text=True)
    if status == "failed":
        assert "rank 2 (" in failure and "died" in failure, failure
        assert "status                failed" in info.stdout, info
        assert "rank 2 (" in info.stdout, info
    else:
        assert status == "running", status
        assert "running (stale: no live job holds it)" in info.stdout, info

    resumed = run(wrapped(4, logs, "train", "--resume", str(run_dir)), logs, cwd=REPO)
    assert resumed.rc == 0, resumed.show()
    if status == "running":
        assert "says running but no job holds it" in resumed.stderr, resumed.show()
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        assert int(f["metrics/env_steps"][-1]) == budget


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped with the reason elsewhere)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.parametrize(
    "ranks,trajectories,tensorboard",
    [(1, True, False), (2, True, False), (2, False, False), (2, False, True)],
    ids=["1-rank", "trajectories", "no-trajectories", "tensorboard"],
)
def test_a_full_disk_is_one_error_line_and_a_failed_run(
    tmp_path, small_disk, ranks, trajectories, tensorboard
):
    """Issue 18, case 1: a run filling its file system died with signal 11 after ~400
    lines of h5py traces and no `hpcrl:` line, and left `status` `running`. Now: one
    `hpcrl: error` line naming the file and what to free, a non-zero exit, status `failed`,
    and every step file left is intact (the one being written is removed)."""
    run_dir = small_disk / "run"
    args = ["--total-env-steps", "8000000", *TABULAR, "--set", "eval_episodes=0"]
    args += ["--set", f"record_trajectories={str(trajectories).lower()}"]
    args += ["--set", "checkpoint_interval_env_steps=200000"]
    args += ["--set", f"tensorboard={str(tensorboard).lower()}", "--set", "log_interval_s=0.1"]
    cmd = hpcrl_command(None if ranks == 1 else ranks, "train", "--run-dir", str(run_dir), *args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=subprocess_env())
    shown = (
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert result.returncode == 1, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hpcrl: error")]
    assert len(errors) == 1 and "no space left on device (ENOSPC) writing" in errors[0], shown
    assert str(run_dir) in errors[0], shown
    assert not any("Traceback" in line or "Segmentation" in line for line in lines), shown
    assert len(lines) <= 2, shown  # the error, and MPICH's one `Abort(1) on node 0` line
    assert status(run_dir) == "failed"
    steps = sorted((run_dir / "checkpoints").glob("step-*.h5*"))
    assert all(p.name.endswith(".h5") for p in steps), steps  # no temporary left
    for path in steps:
        load_checkpoint(path)


def test_a_disk_filled_by_run_h5_itself_leaves_it_readable_and_failed(tmp_path, small_disk):
    """Found by benchmarks/faults.py: A2C without trajectories filled its disk with run.h5's
    metric rows (no checkpoint in between), and the write that failed half-way left run.h5
    unopenable (`addr overflow ... eoa`). The run's space reserve, freed by the first full
    write, lets run.h5 write its metadata whole and say `failed`."""
    (small_disk / "filler").write_bytes(b"\0" * (2048 - 640) * 1024)  # 640 KiB left
    run_dir = small_disk / "run"
    args = ["configs/cartpole-a2c.yaml", "--total-env-steps", "3000000", "--set", "eval_episodes=0"]
    args += ["--set", "record_trajectories=false", "--set", "log_interval_s=0.01"]
    args += ["--set", "checkpoint_interval_s=0", "--set", "checkpoint_interval_env_steps=2000000"]
    cmd = hpcrl_command(2, "train", "--run-dir", str(run_dir), *args)
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=280, env=subprocess_env(), cwd=REPO
    )
    shown = f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert result.returncode == 1, shown
    assert f"no space left on device (ENOSPC) writing '{run_dir / 'run.h5'}'" in result.stderr
    assert status(run_dir) == "failed", shown  # opens: h5py raised OSError before the reserve
    assert not (run_dir / space.RESERVE_NAME).exists()
