"""The default job at scale: `mpirun -n N python -m hpcrl`, exactly as a new user types it,
launched repeatedly at each world size (issue 14, acceptance 1 and 2).

Each launch runs in a fresh directory (the default job writes `runs/` under the working
directory, seed 0; launches differ by the order in which unrolls reach the learner) and is
measured from outside:

- reached: whether `train` printed that the 20-episode mean reached 475, and at how many
  env steps; the final greedy evaluation (100 episodes) and the best periodic evaluation;
- start-up: seconds from the launch to the first progress line on stdout (the first line
  is printed one log interval, 5 s, into training);
- peak memory: the largest sum of resident set sizes over the launcher's process tree,
  sampled every 0.2 s (shared pages are counted once per process: an upper bound);
- dropped: env steps in unrolls dropped as stale (`/metrics/env_steps_dropped_stale`) as a
  fraction of the run's env steps;
- wall: seconds from launch to exit.

Usage: python benchmarks/default_job.py [--ranks 4,16,64] [--launches 5]
           [--out benchmarks/default_job.json] [-- EXTRA TRAIN ARGS]
Prints a Markdown table for benchmarks/RESULTS.md and writes every launch as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tree_rss_kib(root: int) -> int:
    """Summed VmRSS (KiB) of `root` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                kib = next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kib
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def launch(ranks: int, extra: list[str], root: Path) -> dict:
    cwd = root / f"n{ranks}-{time.time_ns()}"
    cwd.mkdir()
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", *extra]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    first: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            if not first and "env_steps" in line:
                first.append(time.monotonic() - start)
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kib(proc.pid))
        time.sleep(0.2)
    reader.join()
    wall = time.monotonic() - start
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    reached = re.search(r"reached a mean return of ([\d.]+) .* at ([\d,]+) env steps", out)
    (run_h5,) = cwd.glob("runs/*/run.h5")
    with h5py.File(run_h5, "r") as f:
        m = f["metrics"]
        total = int(m["env_steps"][-1])
        stale = m["env_steps_dropped_stale"][()] if "env_steps_dropped_stale" in m else [0]
        dropped = float(np.nansum(stale)) / max(total, 1)
        training_s = float(f.attrs["wall_time_s"])
    return {
        "ranks": ranks,
        "reached": reached is not None,
        "reached_env_steps": int(reached.group(2).replace(",", "")) if reached else None,
        "final_eval": result["mean_return"],
        "best_eval": result.get("best_eval_mean_return"),
        "startup_s": round(first[0], 1) if first else None,
        "peak_rss_gb": round(peak / 2**20, 2),
        "dropped_frac": round(dropped, 5),
        "env_steps": total,
        "training_s": round(training_s, 1),
        "wall_s": round(wall, 1),
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| ranks | launches | reached 475 | final eval >= 475 | final evals | best evals "
        "| median env steps to 475 | start-up s (max) | peak GB (max) | dropped (max) "
        "| training s (median) | wall s (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ranks in sorted({r["ranks"] for r in runs}):
        rs = [r for r in runs if r["ranks"] == ranks]
        steps = [r["reached_env_steps"] for r in rs if r["reached"]]
        finals = ", ".join(f"{r['final_eval']:.0f}" for r in rs)
        bests = ", ".join(f"{r['best_eval']:.0f}" if r["best_eval"] else "-" for r in rs)
        median_steps = f"{int(np.median(steps)):,}" if steps else "-"
        lines.append(
            f"| {ranks} | {len(rs)} | {sum(r['reached'] for r in rs)} | "
            f"{sum(r['final_eval'] >= 475 for r in rs)} | {finals} | {bests} | "
            f"{median_steps} | {max(r['startup_s'] or 0 for r in rs):.1f} | "
            f"{max(r['peak_rss_gb'] for r in rs):.2f} | "
            f"{max(r['dropped_frac'] for r in rs):.2%} | "
            f"{np.median([r['training_s'] for r in rs]):.1f} | "
            f"{np.median([r['wall_s'] for r in rs]):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "default_job.json"))
    parser.add_argument("extra", nargs="*", help="after --: train arguments (default: none)")
    opts = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="hpcrl-default-") as tmp:
        for ranks in (int(n) for n in opts.ranks.split(",")):
            for _ in range(opts.launches):
                run = launch(ranks, opts.extra, Path(tmp))
                print(json.dumps(run), flush=True)
                runs.append(run)
    Path(opts.out).write_text(json.dumps({"extra": opts.extra, "runs": runs}, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
