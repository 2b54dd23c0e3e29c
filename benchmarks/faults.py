"""The fault table of issue 18: every fault a cluster run meets, against the real CLI.

For each layout (`tabular`: qlearning `allreduce` on FrozenLake8x8, 2 ranks;
`data_parallel`: A2C on CartPole, 2 ranks; `actor_learner`: IMPALA on CartPole, 4 ranks;
`distributed_replay`: Ape-X on CartPole, 4 ranks; `ps`, `sharded` and `async` (n_step 4):
qlearning on FrozenLake8x8, 2 ranks) and each case, one row:

- `exit`: the launcher's exit status; `exit_s`: seconds from the fault to its exit (from
  the launch for `exception`, `disk-full*` and `two-jobs`, whose fault comes from within);
- `survivors`: processes of the job still alive 2 s after the launcher exited;
- `readable` and `status`: run.h5 opened and its `status` attribute;
- `resumed`: `train --resume` (repeated while it exits 3, at most 5 times) ended with
  the exact env-step budget in `/metrics/env_steps` and status `completed`;
- `identical`: for the deterministic layouts (`tabular`, `data_parallel`, `sharded`), the
  resumed run's episodes and final checkpoint arrays equal an uninterrupted run's, bit for
  bit.

Cases: `exception` (debug.fail_rank on the last rank), `actor-kill9` and `learner-kill9`
(`kill -9` of the last rank and of rank 0), `sigstop` (the last rank stopped, watchdog
8 s), `sigusr1` and `sigterm` during training (after the first checkpoint), `sigterm-eval`
and `sigusr1-eval` (during the final evaluation), `truncated` and `bitflip` (the newest
checkpoint of an interrupted run damaged before the resume), `disk-full` and
`disk-full-notraj` (a 2 MiB tmpfs with 512 KiB free, root only), `two-jobs` (a second job
on a live run directory), and `job-kill9` (`kill -9` of every process at a random moment,
then `--resume auto`, repeated `--kills` times with different moments).

Usage: python benchmarks/faults.py [--layouts tabular,actor_learner] [--kills 20]
           [--cases exception,sigstop] [--out benchmarks/faults.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hpcrl.storage.runfile import run_dir_held

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "configs"

LAYOUTS = {
    # name: (ranks, args, budget, deterministic)
    "tabular": (
        2,
        ["--set", "layout=allreduce", "--set", "vector_env=sync", "--seed", "11"],
        400_000,
        True,
    ),
    "data_parallel": (2, [str(CONFIGS / "cartpole-a2c.yaml"), "--seed", "3"], 60_000, True),
    "actor_learner": (4, [str(CONFIGS / "cartpole-impala.yaml"), "--seed", "3"], 30_000, False),
    "distributed_replay": (
        4,
        [str(CONFIGS / "cartpole-apex.yaml"), "--seed", "3", "--set", "learning_starts=1000"],
        12_000,
        False,
    ),
    "ps": (
        2,
        ["--set", "layout=ps", "--set", "vector_env=sync", "--seed", "11"],
        400_000,
        False,
    ),
    "sharded": (2, ["--set", "layout=sharded", "--seed", "11"], 400_000, True),
    "async": (
        2,
        ["--set", "layout=async", "--set", "n_step=4", "--seed", "11"],
        400_000,
        False,
    ),
}
FREE_KIB = 512  # disk-full cases: free space left on the 2 MiB tmpfs
CASES = [
    "exception",
    "actor-kill9",
    "learner-kill9",
    "sigstop",
    "sigusr1",
    "sigterm",
    "sigterm-eval",
    "sigusr1-eval",
    "truncated",
    "bitflip",
    "disk-full",
    "disk-full-notraj",
    "two-jobs",
    "job-kill9",
]


def common_args(layout: str, budget: int | None = None) -> list[str]:
    _, args, default_budget, _ = LAYOUTS[layout]
    budget = budget or default_budget
    return [
        *args,
        "--total-env-steps",
        str(budget),
        "--set",
        "eval_episodes=0",
        "--set",
        f"checkpoint_interval_env_steps={budget // 8}",
        "--set",
        "log_interval_s=0.5",
    ]


class Job:
    """One launcher in its own session; its processes tracked while it runs."""

    def __init__(self, ranks: int, args: list[str], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.out")))
        self.out, self.err = logs / f"{n:03d}.out", logs / f"{n:03d}.err"
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", *args]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        self.pids: set[int] = set()

    def track(self) -> None:
        self.pids |= set(_descendants(self.proc.pid))

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.track()
            for pid in self.pids:
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"PMI_RANK={rank}".encode() in env:
                    return pid
            time.sleep(0.05)
        raise RuntimeError(f"rank {rank} never started\n{self.err.read_text()[-2000:]}")

    def wait_for_file(self, path: Path, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.track()
            if path.exists():
                return True
            time.sleep(0.02)
        return path.exists()

    def wait(self, timeout: float = 300) -> tuple[int | None, float]:
        """(exit status, seconds) of the launcher; None after `timeout` (then killed)."""
        t0 = time.monotonic()
        while self.proc.poll() is None:
            self.track()
            if time.monotonic() - t0 > timeout:
                self.kill()
                return None, timeout
            time.sleep(0.02)
        return self.proc.returncode, time.monotonic() - t0

    def survivors(self) -> int:
        time.sleep(2.0)
        return sum(1 for pid in self.pids if _alive(pid))

    def kill(self) -> None:
        self.track()
        for pid in [self.proc.pid, *self.pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"


def run_state(run_dir: Path) -> tuple[bool, str]:
    """(readable, status as `hpcrl info` shows it: a `running` run nobody holds is stale)."""
    try:
        with h5py.File(run_dir / "run.h5", "r") as f:
            status = str(f.attrs.get("status", "?"))
    except (OSError, FileNotFoundError):
        return False, "unreadable"
    if status == "running" and run_dir_held(run_dir) is False:
        status = "running (stale)"
    return True, status


def resume(layout: str, run_dir: Path, logs: Path, *extra: str) -> bool:
    """`train --resume auto` with the run's config, as the job scripts restart a run (a
    run killed before its first checkpoint starts again), until it ends other than 3;
    whether it completed the budget."""
    ranks, _, budget, _ = LAYOUTS[layout]
    args = ["train", "--resume", "auto", "--run-dir", str(run_dir), *common_args(layout)]
    for _ in range(5):
        job = Job(ranks, [*args, *extra], logs)
        code, _ = job.wait(600)
        if code != 3:
            break
    if code != 0:
        return False
    with h5py.File(run_dir / "run.h5", "r") as f:
        steps = int(f["metrics/env_steps"][-1]) if len(f["metrics/env_steps"]) else -1
        return str(f.attrs["status"]) == "completed" and steps == budget


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(run_dir / "run.h5", "r") as f:
        for name in ("return", "length", "env_steps"):
            out[f"episodes/{name}"] = f["episodes"][name][()]
    with h5py.File(run_dir / "checkpoints" / "latest.h5", "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()])
                if isinstance(obj, h5py.Dataset) and not name.startswith("ranks/")
                else None
            )
        )
    return out


def identical(a: Path, b: Path) -> bool:
    x, y = final_arrays(a), final_arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def damage(run_dir: Path, how: str) -> None:
    latest = (run_dir / "checkpoints" / "latest.h5").resolve()
    if how == "truncated":
        os.truncate(latest, latest.stat().st_size // 2)
        return
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))


def one_case(layout: str, case: str, tmp: Path, reference: Path | None) -> dict:
    ranks, _, budget, deterministic = LAYOUTS[layout]
    run_dir, logs = tmp / f"{layout}-{case}" / "run", tmp / f"{layout}-{case}" / "logs"
    args = ["train", "--run-dir", str(run_dir), *common_args(layout)]
    row: dict = {"layout": layout, "case": case}
    resume_extra: list[str] = []
    mount = None
    if case.startswith("disk-full"):
        if os.geteuid() != 0:
            return row | {"skipped": "needs root for a small tmpfs"}
        mount = tmp / f"{layout}-{case}" / "disk"
        mount.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
        # Leave FREE_KIB for the run, so that it fills up in minutes even without
        # trajectories (run.h5 grows by ~3 KB/s at 100 rows/s).
        (mount / "filler").write_bytes(b"\0" * (2048 - FREE_KIB) * 1024)
        run_dir = mount / "run"
        args = ["train", "--run-dir", str(run_dir), *common_args(layout, budget * 50)]
        if case == "disk-full-notraj":  # run.h5's rows fill it: many of them
            args += ["--set", "record_trajectories=false", "--set", "log_interval_s=0.01"]
        else:
            args += ["--set", "record_trajectories=true"]
    if case == "exception":
        args += ["--set", f"debug.fail_rank={ranks - 1}"]
        args += ["--set", f"debug.fail_after_env_steps={budget // (3 * ranks)}"]
        resume_extra = ["--set", "debug.fail_rank=-1"]
    if case == "sigstop":
        args += ["--set", "watchdog_s=8"]
    if case.endswith("-eval"):
        args += ["--set", "eval_episodes=1000000"]
        resume_extra = ["--set", "eval_episodes=10"]
    job = Job(ranks, args, logs)
    fault_at = None
    first = run_dir / "checkpoints" / "latest.h5"
    if case in ("actor-kill9", "learner-kill9", "sigstop"):
        pid = job.rank_pid(0 if case == "learner-kill9" else ranks - 1)
        job.wait_for_file(first)
        os.kill(pid, signal.SIGSTOP if case == "sigstop" else signal.SIGKILL)
        fault_at = time.monotonic()
    elif case in ("sigusr1", "sigterm", "truncated", "bitflip"):
        job.wait_for_file(first)
        time.sleep(0.3)
        job.proc.send_signal(signal.SIGTERM if case == "sigterm" else signal.SIGUSR1)
        fault_at = time.monotonic()
    elif case.endswith("-eval"):
        job.wait_for_file(run_dir / "checkpoints" / f"step-{budget}.h5")
        time.sleep(0.5)
        job.proc.send_signal(signal.SIGTERM if case == "sigterm-eval" else signal.SIGUSR1)
        fault_at = time.monotonic()
    elif case == "two-jobs":
        job.wait_for_file(first)
        second = Job(ranks, args[:1] + ["--resume", str(run_dir)], logs)
        code2, _ = second.wait(120)
        row["second_exit"] = code2
        row["second_error"] = second.err.read_text().strip().splitlines()[-1:]
    code, seconds = job.wait(600)
    row.update(
        exit=code, exit_s=round(seconds if fault_at is None else time.monotonic() - fault_at, 2)
    )
    row["survivors"] = job.survivors()
    row["readable"], row["status"] = run_state(run_dir)
    row["error_lines"] = sum(
        1 for line in job.err.read_text().splitlines() if "hpcrl: error" in line
    )
    if case in ("truncated", "bitflip"):
        damage(run_dir, case)
    if mount is not None:
        row["resumed"] = "n/a (disk full)"
        subprocess.run(["umount", "-l", str(mount)])
        return row
    row["resumed"] = resume(layout, run_dir, logs, *resume_extra)
    if deterministic and reference is not None and row["resumed"] is True:
        row["identical"] = identical(run_dir, reference)
    return row


def job_kills(layout: str, kills: int, tmp: Path, reference: Path | None) -> list[dict]:
    """`kill -9` of every process of the job at a random moment, then `--resume auto`."""
    ranks, _, _, deterministic = LAYOUTS[layout]
    rng = random.Random(f"faults-{layout}")
    rows = []
    for k in range(kills):
        run_dir, logs = tmp / f"{layout}-kill-{k}" / "run", tmp / f"{layout}-kill-{k}" / "logs"
        args = ["train", "--resume", "auto", "--run-dir", str(run_dir), *common_args(layout)]
        job = Job(ranks, args, logs)
        job.wait_for_file(run_dir / "run.h5")
        time.sleep(rng.uniform(0.5, 6.0))
        ended_before = job.proc.poll() is not None
        job.kill()
        row = {"layout": layout, "case": f"job-kill9 #{k}", "killed": not ended_before}
        row["survivors"] = job.survivors()
        row["readable"], row["status"] = run_state(run_dir)
        row["resumed"] = resume(layout, run_dir, logs)
        if deterministic and reference is not None and row["resumed"]:
            row["identical"] = identical(run_dir, reference)
        rows.append(row)
    return rows


def reference_run(layout: str, tmp: Path) -> Path:
    ranks = LAYOUTS[layout][0]
    run_dir = tmp / f"{layout}-reference" / "run"
    job = Job(ranks, ["train", "--run-dir", str(run_dir), *common_args(layout)], run_dir.parent)
    code, _ = job.wait(900)
    if code != 0:
        raise SystemExit(f"{layout}: the reference run failed ({code})")
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "faults.json"))
    args = parser.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="hpcrl-faults-"))
    try:
        for layout in args.layouts.split(","):
            reference = reference_run(layout, tmp) if LAYOUTS[layout][3] else None
            for case in args.cases.split(","):
                if case == "job-kill9":
                    rows += job_kills(layout, args.kills, tmp, reference)
                    continue
                rows.append(one_case(layout, case, tmp, reference))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    keys = ["layout", "case", "exit", "exit_s", "survivors", "readable", "status", "resumed"]
    keys += ["identical", "error_lines"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, row.get("skipped", ""))) for k in keys) + " |")
    hangs = sum(1 for r in rows if "exit" in r and r["exit"] is None)
    survivors = sum(r.get("survivors", 0) for r in rows)
    unreadable = sum(1 for r in rows if r.get("readable") is False)
    unresumable = sum(1 for r in rows if r.get("resumed") is False)
    different = sum(1 for r in rows if r.get("identical") is False)
    print(
        f"\n{len(rows)} rows: {hangs} hangs, {survivors} survivors, {unreadable} unreadable "
        f"run files, {unresumable} unresumable runs, {different} resumed runs not identical"
    )


if __name__ == "__main__":
    main()
