"""Env steps/s of tabular Q-learning (`ps`, `allreduce`) at 1, 2 and 4 ranks, against a raw
single-process stepping loop of the same env on the same machine.

    .venv/bin/python benchmarks/throughput.py [--env FrozenLake8x8-v1] [--steps 1000000]

Each layout and world size runs the real CLI (`mpiexec -n K python -m hpcrl train`), with
the default config (trajectories recorded), and the rate is env steps / the run's own wall
time (`wall_time_s` in run.h5, from the shared start barrier to the end of training, so
interpreter start-up and the final evaluation are not counted). The raw loop is
`env.step(random action)` with `reset` on episode end, one process, no learning; the
vector-env loop is the same over the gymnasium `SyncVectorEnv` the actors step.
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

BIN = Path(sys.executable).parent


def raw_rate(env_id: str, steps: int, seed: int = 0) -> float:
    """Steps/s of a bare gymnasium loop: random actions, reset on episode end."""
    env = gym.make(env_id)
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, env.action_space.n, steps)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def vector_env_rate(env_id: str, steps: int, num_envs: int = 32, seed: int = 0) -> float:
    """Steps/s of the gymnasium `SyncVectorEnv` hpcrl's actors use, random actions, no
    learning: the ceiling one acting rank can reach."""
    from hpcrl.envs import make_vector_env

    envs = make_vector_env(env_id, {}, num_envs)
    envs.reset(seed=seed)
    n_actions = envs.single_action_space.n
    actions = np.random.default_rng(seed).integers(0, n_actions, (steps // num_envs, num_envs))
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    return actions.size / (time.perf_counter() - start)


def hpcrl_rate(env_id: str, steps: int, layout: str, ranks: int, workdir: Path) -> float:
    run_dir = workdir / f"{layout}-{ranks}"
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "hpcrl",
        "train",
        "--env",
        env_id,
        "--total-env-steps",
        str(steps),
        "--run-dir",
        str(run_dir),
        "--overwrite",
        "--set",
        f"layout={layout}",
        "--set",
        "eval_episodes=0",
        "--set",
        "log_interval_s=1000",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    with h5py.File(run_dir / "run.h5", "r") as f:
        return steps / float(f.attrs["wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="FrozenLake8x8-v1")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    raw = raw_rate(args.env, min(args.steps, 300_000))
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores; env {args.env}; {args.steps:,} steps per run"
    )
    vec = vector_env_rate(args.env, min(args.steps, 300_000))
    print(f"raw single-process loop: {raw:,.0f} steps/s")
    print(f"gymnasium SyncVectorEnv of 32, one process, no learning: {vec:,.0f} steps/s\n")
    print("| layout | ranks | env steps/s | ratio to raw | ratio to vector env |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("ps", "allreduce"):
            for ranks in args.ranks:
                rate = hpcrl_rate(args.env, args.steps, layout, ranks, Path(tmp))
                print(
                    f"| {layout} | {ranks} | {rate:,.0f} | {rate / raw:.2f} | {rate / vec:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
