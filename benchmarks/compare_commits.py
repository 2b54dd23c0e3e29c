"""Training throughput of the working tree against an earlier commit, side by side.

For each case, the real CLI (`mpiexec -n K python -m hpcrl train ...`) runs alternately
from the working tree and from a checkout of `--base` (its `src/` first on PYTHONPATH), the
same number of times each, so machine noise falls on both alike. Rate = env steps / the
run's own training wall time (`wall_time_s` in run.h5: start barrier to the end of
training, no start-up, no evaluation). Prints a Markdown table with the median rate of each
side and their ratio (working tree / base).

    python benchmarks/compare_commits.py --base 0d716da [--repeats 3] [--cases ps-4,impala-4]

A checkout of the base commit is made with `git worktree add` in a temporary directory and
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = ["--set", "eval_episodes=0", "--set", "record_trajectories=false"]
TABULAR = ["--env", "FrozenLake8x8-v1", "--total-env-steps", "400000"]
# name: (ranks, train arguments after the config file or options)
CASES: dict[str, tuple[int, list[str]]] = {
    "ps-4": (4, [*TABULAR, "--set", "layout=ps"]),
    "allreduce-2": (2, [*TABULAR, "--set", "layout=allreduce"]),
    "ppo-2": (2, ["{configs}/cartpole-ppo.yaml", "--total-env-steps", "40960"]),
    "impala-4": (4, ["{configs}/cartpole-impala.yaml", "--total-env-steps", "100000"]),
}  # {configs}: each side's own configs/ (key names may differ between commits)


def rate(ranks: int, args: list[str], run_dir: Path, checkout: Path) -> float:
    """Env steps/s of one training run of the code in `checkout` (REPO: the working tree)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if checkout != REPO:
        env["PYTHONPATH"] = str(checkout / "src")
    args = [a.replace("{configs}", str(checkout / "configs")) for a in args]
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", "train"]
    cmd += [*args, *QUIET, "--run-dir", str(run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with h5py.File(run_dir / "run.h5", "r") as f:
        return int(f["metrics/env_steps"][-1]) / float(f.attrs["wall_time_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    opts = parser.parse_args()
    names = opts.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), opts.base],
            check=True,
            capture_output=True,
        )
        try:
            rows = []
            for name in names:
                ranks, args = CASES[name]
                now, then = [], []
                for i in range(opts.repeats):
                    now.append(rate(ranks, args, Path(tmp) / f"{name}-new-{i}", REPO))
                    then.append(rate(ranks, args, Path(tmp) / f"{name}-old-{i}", base))
                    print(f"{name} #{i}: {now[-1]:,.0f} (tree) {then[-1]:,.0f} (base)", flush=True)
                new, old = statistics.median(now), statistics.median(then)
                rows.append(f"| {name} | {ranks} | {new:,.0f} | {old:,.0f} | {new / old:.2f} |")
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    print(f"\n| case | ranks | env steps/s (tree) | env steps/s ({opts.base}) | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
