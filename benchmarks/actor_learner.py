"""Throughput and actor efficiency of the asynchronous actor-learner layout (IMPALA).

For each world size, runs the real CLI (`mpiexec -n N python -m hpcrl train
configs/cartpole-impala.yaml`, no evaluation, no trajectories) and reads run.h5:

- env steps/s: the run's env steps / its training wall time (`wall_time_s`);
- actor efficiency: per actor, (env stepping + policy inference time) / wall time, from the
  `actor_<rank>/env_frac` and `inference_frac` metrics, averaged over the log rows of the
  second half of the run and over the actors (the goal of issue 5: >= 0.9 while ranks <=
  cores);
- the learner's wait fraction and the mean policy lag.

Next to it, the raw stepping rate of the same vector env (the config's `num_envs`
CartPole-v1 copies in a gymnasium `SyncVectorEnv`, random actions, one process): the
ceiling of one actor. "ratio to raw" is the job's rate over it; "per actor / raw" divides
by the actors too (on 2 cores, 3 actors and a learner share what one process would get);
"per actor CPU-s / raw" divides each actor's env steps by its CPU seconds instead of wall
seconds (`actor_<rank>/cpu_frac`): what one of its cores yields, without the time it
waits for the learner (flow control) or for a core.

Usage: python benchmarks/actor_learner.py [--ranks 2,4] [--budget 200000]
           [--algo impala] [--out benchmarks/actor_learner.json] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def raw_vector_env_rate(num_envs: int, vector_env: str = "sync", steps: int = 40_000) -> float:
    """Env steps/s of `num_envs` CartPole-v1 copies in the `vector_env` backend, stepped
    with random actions drawn beforehand."""
    from hpcrl.envs import make_vector_env

    envs = make_vector_env("CartPole-v1", {}, num_envs, vector_env=vector_env)
    envs.reset(seed=0)
    vector_steps = steps // num_envs
    actions = np.random.default_rng(0).integers(2, size=(vector_steps, num_envs))
    start = time.perf_counter()
    for t in range(vector_steps):
        envs.step(actions[t])
    rate = vector_steps * num_envs / (time.perf_counter() - start)
    envs.close()
    return rate


def run_one(algo: str, ranks: int, budget: int, root: Path, extra: list[str]) -> dict:
    run_dir = root / f"{algo}-n{ranks}"
    cmd = [
        str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", "train",
        str(REPO / "configs" / f"cartpole-{algo.replace('_', '-')}.yaml"),
        "--run-dir", str(run_dir), "--total-env-steps", str(budget),
        "--set", "eval_episodes=0", "--set", "eval_interval=0", "--set", "solved_lr_decay=1.0",
        "--set", "record_trajectories=false",
        "--set", "log_interval_s=1", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with h5py.File(run_dir / "run.h5", "r") as f:
        m = f["metrics"]
        rows = len(m["env_steps"])
        late = slice(rows // 2, rows)
        actors = sorted(k for k in m if k.startswith("actor_") and k[6:].isdigit())
        efficiency = [
            float(np.nanmean(m[a]["env_frac"][late] + m[a]["inference_frac"][late])) for a in actors
        ]
        return {
            "algo": algo,
            "ranks": ranks,
            "env_steps": int(m["env_steps"][-1]),
            "wall_s": round(float(f.attrs["wall_time_s"]), 2),
            "env_steps_per_s": round(int(m["env_steps"][-1]) / float(f.attrs["wall_time_s"])),
            "actor_efficiency": round(float(np.mean(efficiency)), 3),
            "actor_efficiency_each": [round(e, 3) for e in efficiency],
            "env_frac": round(
                float(np.mean([np.nanmean(m[a]["env_frac"][late]) for a in actors])), 3
            ),
            "send_wait_frac": round(
                float(np.mean([np.nanmean(m[a]["send_wait_frac"][late]) for a in actors])), 3
            ),
            "actor_cpu_frac": round(
                float(np.mean([np.nanmean(m[a]["cpu_frac"][late]) for a in actors])), 3
            ),
            "learner_wait_frac": round(float(np.nanmean(m["learner_wait_frac"][late])), 3),
            "policy_lag_mean": round(float(np.nanmean(m["policy_lag_mean"][late])), 2),
            "learner_updates": int(m["learner_updates"][-1]),
        }


def table(raw: float, results: list[dict], num_envs: int, vector_env: str) -> str:
    lines = [
        f"Raw vector env ({num_envs} CartPole-v1 copies, {vector_env}, random actions, "
        "1 process): "
        f"{raw:,.0f} env steps/s",
        "",
        "| algo | ranks | actors | env steps/s | ratio to raw | per actor / raw "
        "| per actor CPU-s / raw | actor efficiency (each) | env frac | send wait "
        "| learner wait | policy lag |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        each = ", ".join(f"{e:.2f}" for e in r["actor_efficiency_each"])
        per_actor = r["env_steps_per_s"] / (r["ranks"] - 1) / raw
        per_cpu = per_actor / max(r["actor_cpu_frac"], 1e-9)
        lines.append(
            f"| {r['algo']} | {r['ranks']} | {r['ranks'] - 1} | {r['env_steps_per_s']:,} | "
            f"{r['env_steps_per_s'] / raw:.2f} | {per_actor:.2f} | {per_cpu:.2f} | "
            f"{r['actor_efficiency']:.2f} ({each}) | "
            f"{r['env_frac']:.2f} | {r['send_wait_frac']:.3f} | {r['learner_wait_frac']:.2f} | "
            f"{r['policy_lag_mean']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--budget", type=int, default=200_000)
    parser.add_argument("--algo", default="impala")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "actor_learner.json"))
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for train")
    opts = parser.parse_args()
    from hpcrl.config import load_yaml

    config = REPO / "configs" / f"cartpole-{opts.algo.replace('_', '-')}.yaml"
    overrides = dict(kv.split("=", 1) for kv in opts.set)
    defaults = load_yaml(config)
    num_envs = int(overrides.get("num_envs", defaults.get("num_envs", 8)))
    vector_env = overrides.get("vector_env", defaults.get("vector_env", "sync"))
    raw = raw_vector_env_rate(num_envs, vector_env)
    results = []
    with tempfile.TemporaryDirectory(prefix="hpcrl-al-") as tmp:
        for ranks in (int(n) for n in opts.ranks.split(",")):
            extra = [arg for kv in opts.set for arg in ("--set", kv)]
            result = run_one(opts.algo, ranks, opts.budget, Path(tmp), extra)
            print(json.dumps(result), flush=True)
            results.append(result)
    record = {"raw_env_steps_per_s": raw, "vector_env": vector_env, "runs": results}
    Path(opts.out).write_text(json.dumps(record, indent=1))
    print(table(raw, results, num_envs, vector_env))


if __name__ == "__main__":
    main()
