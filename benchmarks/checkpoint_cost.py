"""What exact resume costs: time per full-state checkpoint and time to resume.

Runs the real CLI (`mpiexec -n N python -m hpcrl train`) on FrozenLake8x8-v1 with the
`allreduce` layout (every checkpoint gathers every rank's RNG, env and counter state to
rank 0, which writes and fsyncs one file) and with one process (`ps`, embedded):

- per-checkpoint cost = (wall time with a checkpoint every K env steps - wall time with
  none) / number of extra checkpoints, from the `[hpcrl] completed in ... s` line
  (training time, without start-up or evaluation);
- resume start-up = seconds from launching `train --resume` to its first progress line,
  next to the same for a fresh start.

Usage: python benchmarks/checkpoint_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMPLETED = re.compile(r"completed in ([\d.]+) s")
BUDGET = 1_000_000
EVERY = 20_000  # env steps between checkpoints in the "with checkpoints" runs


def command(n, *args):
    base = [sys.executable, "-m", "hpcrl", "train", *args]
    return base if n is None else [str(BIN / "mpiexec"), "-n", str(n), *base]


def train_seconds(n, layout, run_dir, every):
    args = ["--total-env-steps", str(BUDGET), "--run-dir", str(run_dir), "--seed", "1"]
    for item in (
        f"layout={layout}",
        "eval_episodes=0",
        "checkpoint_interval_s=0",
        f"checkpoint_interval_env_steps={every}",
        "keep_checkpoints=3",
    ):
        args += ["--set", item]
    out = subprocess.run(command(n, *args), capture_output=True, text=True, check=True).stdout
    return float(COMPLETED.search(out).group(1))


def startup_seconds(cmd):
    """Seconds from launch to the first progress line."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("[hpcrl] env_steps"):
            break
    seconds = time.perf_counter() - start
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    return seconds, proc.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hpcrl-ckpt-bench-"))
    try:
        print("| world | layout | checkpoints | train s (min of repeats) | s per checkpoint |")
        print("|---|---|---|---|---|")
        for n, layout in ((4, "allreduce"), (None, "ps")):
            base = min(train_seconds(n, layout, root / f"b{n}{i}", 0) for i in range(opts.repeats))
            timed = min(
                train_seconds(n, layout, root / f"c{n}{i}", EVERY) for i in range(opts.repeats)
            )
            count = BUDGET // EVERY - 1
            world = n or 1
            print(f"| {world} | {layout} | none | {base:.2f} | |")
            print(
                f"| {world} | {layout} | {count} extra | {timed:.2f} | "
                f"{(timed - base) / count * 1e3:.1f} ms |"
            )
        print()
        print("| world | start-up to first progress line | fresh s | resume s |")
        print("|---|---|---|---|")
        for n in (4, None):
            fresh, resumed = [], []
            for i in range(opts.repeats):
                run_dir = root / f"s{n}{i}"
                args = ["--total-env-steps", "50000000", "--run-dir", str(run_dir)]
                args += ["--set", "log_interval_s=0.2", "--set", "layout=allreduce"]
                seconds, code = startup_seconds(command(n, *args))
                assert code == 3, code
                fresh.append(seconds)
                seconds, code = startup_seconds(command(n, "--resume", str(run_dir)))
                assert code == 3, code
                resumed.append(seconds)
            print(f"| {n or 1} | allreduce | {min(fresh):.2f} | {min(resumed):.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
