"""Env steps/s of the table-stepped toy-text envs (`vector_env: table`, issue 16) against
gymnasium's `SyncVectorEnv` of the same copies and against the raw single-env loop, side
by side in one run (alternating rounds), reported as ratios.

    python benchmarks/table_stepping.py [--env FrozenLake8x8-v1] [--copies 32,1024]
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from hpcrl.table_vector import TableVectorEnv


def rate(step, reset, n_actions: int, copies: int, seconds: float) -> float:
    """Env steps/s of `step(actions)` with uniformly random actions, for `seconds`."""
    reset()
    actions = np.random.default_rng(0).integers(0, n_actions, (1024, copies))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for row in actions[:64]:
            step(row)
        steps += 64 * copies
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="FrozenLake8x8-v1")
    parser.add_argument("--copies", default="32,1024")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    single = gym.make(args.env)
    n = int(single.action_space.n)
    single.reset(seed=0)

    def single_step(row):
        _, _, terminated, truncated, _ = single.step(int(row[0]))
        if terminated or truncated:
            single.reset()

    out = {"env": args.env, "raw": [], "rows": []}
    for copies in [int(c) for c in args.copies.split(",")]:
        sync = SyncVectorEnv(
            [lambda: gym.make(args.env) for _ in range(copies)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        table = TableVectorEnv(args.env, {}, copies)
        row = {"copies": copies, "sync": [], "table": []}
        for _ in range(args.rounds):  # alternate, so the machine's load hits all alike
            out["raw"].append(rate(single_step, lambda: None, n, 1, args.seconds))
            for name, env in (("sync", sync), ("table", table)):
                reset = lambda env=env: env.reset(seed=0)  # noqa: E731
                row[name].append(rate(env.step, reset, n, copies, args.seconds))
        out["rows"].append(row)
        sync.close()
    raw = float(np.median(out["raw"]))
    print(f"{args.env}: raw single-env loop {raw:,.0f} env steps/s (median of {len(out['raw'])})")
    print("| copies | sync env steps/s | table env steps/s | table / sync | table / raw |")
    print("|---|---|---|---|---|")
    for row in out["rows"]:
        s, t = float(np.median(row["sync"])), float(np.median(row["table"]))
        print(f"| {row['copies']} | {s:,.0f} | {t:,.0f} | {t / s:.1f} | {t / raw:.1f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
