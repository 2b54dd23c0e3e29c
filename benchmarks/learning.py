"""Sample efficiency and time to solve CartPole-v1 for the data-parallel learners, and how
reliably the asynchronous actor-learner configs (IMPALA, A3C, async n-step Q) learn it.

For each algorithm (PPO, A2C, DQN), world size (1, 2, 4 ranks) and seed, runs the real CLI
(`mpiexec -n N python -m hpcrl train configs/cartpole-<algo>.yaml --seed S`) and reads
run.h5: the env steps (summed over ranks) and the wall time (`episodes/wall_time`, seconds
since the start of training) at which the mean return of the last 20 episodes first
reaches 475, and the mean return of the final 20 episodes.

The global batch is the config's at every world size; `num_envs` per rank is
`global_envs / world_size` (PPO 8, A2C 8, DQN 4), so the global batch, the rollout length,
DQN's update schedule and the hyperparameters are the same at 1, 2 and 4 ranks.
Sample efficiency at N ranks = median steps to 475 at 1 rank / median at N ranks.

The asynchronous algorithms (`impala`, `a3c`, `async_nstep_q`) run their config as it is
(`num_envs` per actor, one learner) and keep its greedy evaluation, recorded as
`eval_return`: their runs differ from launch to launch even with one seed (the order in
which unrolls reach the learner), so repeated runs measure how reliably they learn.

Usage: python benchmarks/learning.py [--algos ppo,a2c,dqn | impala,a3c,async_nstep_q]
           [--ranks 1,2,4 (async: 4)] [--seeds 5]
           [--first-seed 1 (> 1: add to the runs already in --out; other algos' are kept)]
           [--budget ENV_STEPS (default: the config's)] [--out benchmarks/learning.json]
Prints a Markdown table for benchmarks/RESULTS.md and writes every run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GLOBAL_ENVS = {"ppo": 8, "a2c": 8, "dqn": 4}  # env copies over all ranks
ASYNC = ("impala", "a3c", "async_nstep_q")  # the config's num_envs per actor, evaluated
TARGET = 475.0
WINDOW = 20


def run_one(algo: str, ranks: int, seed: int, budget: int, root: Path) -> dict:
    run_dir = root / f"{algo}-n{ranks}-s{seed}"
    config = REPO / "configs" / f"cartpole-{algo.replace('_', '-')}.yaml"
    cmd = [sys.executable, "-m", "hpcrl", "train", str(config), "--run-dir", str(run_dir)]
    cmd += ["--seed", str(seed)]
    num_envs = None
    if algo not in ASYNC:
        num_envs = GLOBAL_ENVS[algo] // ranks
        cmd += ["--set", f"num_envs={num_envs}", "--set", "eval_episodes=0"]
    if budget:
        cmd += ["--total-env-steps", str(budget)]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with h5py.File(run_dir / "run.h5", "r") as f:
        returns = f["episodes/return"][()]
        env_steps = f["episodes/env_steps"][()]
        wall = f["episodes/wall_time"][()]
        eval_return = f.attrs.get("eval_mean_return")
    windows = np.convolve(returns, np.ones(WINDOW) / WINDOW, mode="valid")
    hit = np.flatnonzero(windows >= TARGET)
    end = int(hit[0]) + WINDOW - 1 if hit.size else None
    return {
        "algo": algo,
        "ranks": ranks,
        "seed": seed,
        "num_envs": num_envs,
        "steps_to_475": int(env_steps[end]) if end is not None else None,
        "seconds_to_475": round(float(wall[end]), 1) if end is not None else None,
        "final_return_20": round(float(returns[-WINDOW:].mean()), 1),
        "eval_return": None if eval_return is None else round(float(eval_return), 1),
        "run_seconds": round(time.monotonic() - started, 1),
    }


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(results: list[dict]) -> str:
    lines = [
        "| algo | ranks | solved (of seeds) | median env steps to 475 | median s to 475 "
        "| median final return (20 ep.) | greedy eval >= 475 | sample efficiency vs 1 rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo in dict.fromkeys(r["algo"] for r in results):
        base = median_or_none(
            [r["steps_to_475"] for r in results if r["algo"] == algo and r["ranks"] == 1]
        )
        for ranks in sorted({r["ranks"] for r in results if r["algo"] == algo}):
            rows = [r for r in results if r["algo"] == algo and r["ranks"] == ranks]
            steps = median_or_none([r["steps_to_475"] for r in rows])
            secs = median_or_none([r["seconds_to_475"] for r in rows])
            final = statistics.median(r["final_return_20"] for r in rows)
            solved = sum(r["steps_to_475"] is not None for r in rows)
            eff = f"{base / steps:.2f}" if base and steps else "-"
            evals = [r["eval_return"] for r in rows if r.get("eval_return") is not None]
            good = f"{sum(e >= TARGET for e in evals)}/{len(evals)}" if evals else "-"
            lines.append(
                f"| {algo} | {ranks} | {solved}/{len(rows)} | "
                f"{f'{steps:,.0f}' if steps else 'not reached'} | "
                f"{f'{secs:.0f}' if secs else '-'} | {final:.0f} | {good} | {eff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="ppo,a2c,dqn")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--budget", type=int, default=0, help="env steps; 0: the config's")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "learning.json"))
    opts = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="hpcrl-learning-") as tmp:
        for algo in opts.algos.split(","):
            for ranks in (int(n) for n in opts.ranks.split(",")):
                for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
                    result = run_one(algo, ranks, seed, opts.budget, Path(tmp))
                    print(json.dumps(result), flush=True)
                    results.append(result)
    out = Path(opts.out)
    if out.exists():  # keep the other algorithms' runs (and with --first-seed > 1 all)
        algos = opts.algos.split(",")
        kept = [
            r for r in json.loads(out.read_text()) if opts.first_seed > 1 or r["algo"] not in algos
        ]
        results = kept + results
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
