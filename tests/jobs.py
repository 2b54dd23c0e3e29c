"""Jobs of the real CLI for the end-to-end tests: `mpiexec -n N python -m hpcrl ...` in a
session of its own, watched while it runs (stdout patterns, signals, `kill -9` of every
process it started), with each rank's exit status, and the run file's status read back
while a just-killed rank's lock is released."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pytest

from conftest import BIN, descendants, proc_stat, subprocess_env

TIMEOUT_S = 180  # default bound on any one CLI call

# Calls `hpcrl.cli.main` like `python -m hpcrl` and records each rank's exit status.
RC_WRAPPER = """\
import os
import sys

from hpcrl.cli import main

code = 1
try:
    code = main(sys.argv[1:])
finally:
    rank = os.environ.get("PMI_RANK", "single")
    with open(os.path.join(os.environ["HPCRL_TEST_RC_DIR"], f"rank-{rank}"), "w") as f:
        f.write(str(code))
sys.exit(code)
"""


# --------------------------------------------------------------------------- processes


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    ranks: dict[int, int] = field(default_factory=dict)  # per-rank exit status (wrapper)

    def show(self) -> str:
        return (
            f"exit {self.rc}, ranks {self.ranks}\n--- stdout\n{self.stdout}\n"
            f"--- stderr\n{self.stderr}"
        )


class Job:
    """One `mpiexec` job in its own session, output to files (read while it runs)."""

    def __init__(self, cmd: list[str], logs: Path, cwd: Path | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        index = len(list(logs.glob("*.out")))
        self.out_path = logs / f"{index:03d}.out"
        self.err_path = logs / f"{index:03d}.err"
        self.rc_dir = logs / f"{index:03d}.rc"
        self.rc_dir.mkdir()
        env = subprocess_env(drop_slurm=True)
        env["HPCRL_TEST_RC_DIR"] = str(self.rc_dir)
        self.cmd = cmd
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True
            )
        # Every process seen in the job, with its start time: a pid the kernel hands to
        # someone else later is never signalled.
        self.known: dict[int, int] = descendants(self.proc.pid)

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def _track(self) -> None:
        if self.proc.poll() is None:
            self.known.update(descendants(self.proc.pid))

    def live(self) -> list[int]:
        """The job's processes still running (not gone, not zombies), parents first."""
        out = []
        for pid, start in self.known.items():
            stat = proc_stat(pid)
            if stat is not None and stat[2] == start and stat[1] != "Z":
                out.append(pid)
        return out

    def _wait_gone(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds  # ranks may outlive mpiexec by a few ms
        while self.live() and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_for(self, pattern: re.Pattern, timeout: float = TIMEOUT_S) -> re.Match:
        """Poll stdout until `pattern` matches; fail if the job ends first or times out."""
        deadline = time.monotonic() + timeout
        while True:
            self._track()
            match = pattern.search(self.stdout())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended before {pattern.pattern!r}\n{self.result().show()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {pattern.pattern!r} within {timeout} s\n{self.result().show()}")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        self._track()
        assert self.proc.poll() is None, f"the job already ended\n{self.result().show()}"
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 every process of the job at once, ranks first (they run in sessions of
        their own under hydra, so the process group alone does not reach them)."""
        running = self.proc.poll() is None
        self._track()
        for pid in reversed(self.live()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if running:  # mpiexec not reaped yet: its process group id is still ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._wait_gone(10)
        assert not self.live(), f"processes survived SIGKILL: {self.live()}"

    def wait(self, timeout: float = TIMEOUT_S) -> Result:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self._track()  # so that ranks outliving mpiexec are seen
            if time.monotonic() > deadline:
                self.kill()
                shown = self.result().show()
                pytest.fail(f"hang: {self.cmd} did not end within {timeout} s\n{shown}")
            time.sleep(0.05)
        self._wait_gone(10)
        assert not self.live(), f"processes outlived mpiexec: {self.live()}"
        return self.result()

    def result(self) -> Result:
        ranks = {}
        for path in self.rc_dir.iterdir():
            with contextlib.suppress(ValueError):
                ranks[int(path.name.split("-")[1])] = int(path.read_text())
        return Result(self.proc.returncode, self.stdout(), self.stderr(), ranks)

    def cleanup(self) -> None:
        if self.proc.poll() is None or self.live():
            self.kill()


@contextlib.contextmanager
def job(cmd: list[str], logs: Path, cwd: Path | None = None):
    """A `Job` that is killed (with every process it started) when the block ends."""
    j = Job(cmd, logs, cwd)
    try:
        yield j
    finally:
        j.cleanup()


def run(cmd: list[str], logs: Path, cwd: Path | None = None) -> Result:
    with job(cmd, logs, cwd) as j:
        return j.wait()


def wrapped(n: int, logs: Path, *args: str) -> list[str]:
    """`mpiexec -n N python <wrapper> ARGS`: `python -m hpcrl ARGS` plus per-rank statuses."""
    wrapper = logs / "rc_wrapper.py"
    if not wrapper.exists():
        logs.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(RC_WRAPPER)
    return [str(BIN / "mpiexec"), "-n", str(n), sys.executable, str(wrapper), *args]


def open_h5(path: Path) -> h5py.File:
    """Plain `h5py.File(path, "r")`, retried for a moment while a just-killed rank's
    file lock is being released."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def status(run_dir: Path) -> str:
    with open_h5(run_dir / "run.h5") as f:
        return str(f.attrs["status"])
