"""End-to-end fault tests of issue 18: faults that used to end badly, each against the
real `python -m hpcrl train` under `mpiexec` (see `benchmarks/faults.py` for the table).

Run with `python -m pytest -q -m e2e tests/test_faults_e2e.py --timeout=300`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import h5py
import pytest

from jobs import job, run, status, wrapped

pytestmark = pytest.mark.e2e

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
