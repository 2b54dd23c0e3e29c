"""Shared test set-up.

Under `--with-mpi` (run by `mpiexec -n 4 python -m pytest --with-mpi`), a test failing on
one rank would leave the others blocked in a collective: the report hook prints the failure
tagged with the rank and aborts the whole job instead. Each rank also gets its own temp
root. mpi4py is imported only under `--with-mpi`, so plain `pytest` needs no MPI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _with_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


def pytest_configure(config):
    if _with_mpi(config):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        root = tempfile.mkdtemp(prefix="hpcrl-mpi-") if comm.rank == 0 else None
        root = comm.bcast(root, root=0)
        config.option.basetemp = str(Path(root) / f"rank{comm.rank}")
        config._hpcrl_mpi_root = root


def pytest_unconfigure(config):
    root = getattr(config, "_hpcrl_mpi_root", None)
    if root:
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()
        if MPI.COMM_WORLD.rank == 0:
            shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _with_mpi(item.config):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.size > 1:
            text = "".join(
                f"[rank {comm.rank}] {line}\n" for line in str(report.longrepr).splitlines()
            )
            sys.stderr.write(f"[rank {comm.rank}] FAILED {item.nodeid}\n{text}")
            sys.stderr.flush()
            comm.Abort(1)


@pytest.fixture
def gpu_path(monkeypatch):
    """The config keys of the tabular GPU path (`device: cuda`, `hpcrl.table_torch`), and
    torch's CPU device in place of a GPU where torch sees none: the same code on another
    device."""
    import torch

    from hpcrl import models

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(models, "select_device", lambda *a, **k: torch.device("cpu"))
    return {"device": "cuda"}


@pytest.fixture
def mpi_tmp_path(tmp_path):
    """A directory shared by every rank of COMM_WORLD (rank 0's tmp_path, broadcast)."""
    from mpi4py import MPI

    return Path(MPI.COMM_WORLD.bcast(str(tmp_path), root=0))


def env_spaces(env_id: str = "CartPole-v1") -> tuple:
    """(observation_space, action_space) of a gymnasium env."""
    import gymnasium as gym

    env = gym.make(env_id)
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def tabular_fields() -> dict:
    """The trajectory fields of a run over Discrete spaces (FrozenLake's)."""
    import gymnasium as gym

    from hpcrl.storage.trajectories import space_fields

    return space_fields(gym.spaces.Discrete(16), gym.spaces.Discrete(4))


def hpcrl_command(n: int | None, *args: str) -> list[str]:
    """`mpiexec -n N python -m hpcrl ARGS` with the venv's launcher (n=None: no launcher)."""
    base = [sys.executable, "-m", "hpcrl", *args]
    if n is None:
        return base
    return [str(BIN / "mpiexec"), "-n", str(n), *base]


def run_hpcrl(cli_env, ranks: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI under `ranks` processes and capture its output."""
    return subprocess.run(
        hpcrl_command(ranks, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env,
    )


def train_until_interrupted(cli_env, ranks: int, *args: str, after_env_steps: int) -> None:
    """`train ARGS`, each acting rank's preemption flag set (as SIGUSR1 sets it) once it
    has taken `after_env_steps` env steps (`debug.preempt_after_env_steps`); it must
    checkpoint and exit 3. At a point in the run, not in time: a signal sent a second
    after the first progress line came after the end of a 20,000-step A2C run on a faster
    machine. (A signal from outside, through the launcher: tests/test_exact_resume_e2e.py,
    tests/test_resume_e2e.py.)"""
    inject = ("--set", f"debug.preempt_after_env_steps={after_env_steps}")
    done = run_hpcrl(cli_env, ranks, "train", *args, *inject, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr


def single_line(exc: pytest.ExceptionInfo) -> str:
    """The raised error's message, checked to be one non-empty line."""
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def subprocess_env(drop_slurm: bool = False) -> dict[str, str]:
    """Environment for CLI subprocesses: unbuffered, the venv first on PATH (`drop_slurm`:
    without SLURM_* variables, so /resumes rows say -1). Usable in module fixtures."""
    env = {k: v for k, v in os.environ.items() if not (drop_slurm and k.startswith("SLURM_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def cli_env():
    """Environment for subprocesses: quiet, unbuffered, venv first on PATH."""
    return subprocess_env()


# ------------------------------------------------------- process trees (Linux /proc)


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of `pid` and every process below it, parents before children."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(child)
    out, todo = {}, [pid]
    while todo:
        p = todo.pop(0)
        if p in stats:
            out[p] = stats[p][2]
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def kill_pids(pids) -> None:
    """SIGKILL each of these (our own) processes, leaves first."""
    for pid in reversed(list(pids)):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------- run directories


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run directory (symlinks such as checkpoints/latest.h5 kept as links)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def one_error_line(stdout: str, stderr: str, patterns: list[str], shown: str) -> str:
    """Exactly one non-empty stderr line, `hpcrl: error:` once at its start, every regex of
    `patterns` found in it, nothing on stdout (`shown`: the output, for the failure).
    Returns the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line\n{shown}"
    assert stderr.count("hpcrl: error:") == 1, shown
    assert lines[0].startswith("hpcrl: error:"), shown
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in the error\n{shown}"
    assert stdout.strip() == "", shown
    return lines[0]


def digest_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes (or 'link -> target', 'dir')} of everything under
    `root`: equal digests before and after a command prove it changed nothing there."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out
