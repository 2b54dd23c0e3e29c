"""Vector env backends side by side: env steps/s of `vector_env: sync` and `native`
(gymnasium's numpy CartPoleVectorEnv, `hpcrl.native_vector`) on CartPole-v1, through
hpcrl's `EnvStepper` (episode bookkeeping included, as an actor or a rollout steps them).

For each number of copies, the backends take turns `--repeats` times (each turn steps
`--steps` env steps with random actions drawn beforehand) and the best turn counts, so
machine noise hits both alike. Ratio = native / sync.

Usage: python benchmarks/vector_envs.py [--copies 1,4,8,16,64,256] [--steps 100000]
           [--repeats 3] [--out benchmarks/vector_envs.json]
Prints a Markdown table for benchmarks/RESULTS.md and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hpcrl.envs import EnvStepper, make_vector_env

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("sync", "native")


def rate(backend: str, copies: int, steps: int) -> float:
    """Env steps/s of `copies` CartPole-v1 copies in `backend` through an `EnvStepper`."""
    stepper = EnvStepper(make_vector_env("CartPole-v1", {}, copies, vector_env=backend), seed=0)
    vector_steps = max(steps // copies, 1)
    actions = np.random.default_rng(0).integers(2, size=(vector_steps, copies))
    start = time.perf_counter()
    for t in range(vector_steps):
        stepper.step(actions[t])
    elapsed = time.perf_counter() - start
    stepper.close()
    return vector_steps * copies / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", default="1,4,8,16,64,256")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "vector_envs.json"))
    opts = parser.parse_args()
    rows = []
    for copies in (int(c) for c in opts.copies.split(",")):
        best = {b: 0.0 for b in BACKENDS}
        for _ in range(opts.repeats):
            for backend in BACKENDS:
                best[backend] = max(best[backend], rate(backend, copies, opts.steps))
        rows.append({"copies": copies, **{f"{b}_steps_per_s": round(best[b]) for b in BACKENDS}})
        print(json.dumps(rows[-1]), flush=True)
    Path(opts.out).write_text(json.dumps(rows, indent=1))
    print("\n| copies | sync env steps/s | native env steps/s | native / sync |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = r["native_steps_per_s"] / r["sync_steps_per_s"]
        print(
            f"| {r['copies']} | {r['sync_steps_per_s']:,} | {r['native_steps_per_s']:,} | "
            f"{ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
