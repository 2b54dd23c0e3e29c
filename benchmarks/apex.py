"""Ape-X on replay ranks (issue 17, acceptance 2 and 4), measured from outside.

`learn`: `mpirun -n 4 python -m hpcrl train configs/cartpole-apex.yaml` (rank 0 learner,
rank 1 replay, ranks 2-3 actors) launched `--launches` times, seeds 0, 1, ...; per launch:
the env steps at which the 20-episode training mean first reached 475 (from run.h5's
`/episodes`), the best 20-episode mean, the final greedy evaluation, the learner's wait
fraction (the mean of `/metrics/learner_wait_frac` over the rows once replay held
`learning_starts` transitions), the policy lag, and the wall time.

`shards`: the same config with `replay_ranks: 2` at 4 ranks (rank 0 learner, ranks 1-2
replay, rank 3 actor): both shards' insert and sample counts, and the learner's wait
fraction once learning started.

`memory`: `replay_ranks: 2` at 4 ranks, `--capacity` transitions over the two shards and a
budget that fills them (learning starts only at the end, so the actors run free): each
replay rank's resident memory once full minus its resident memory just before allocating
the buffer, against the buffer's bytes
(`PrioritizedReplay.nbytes`: the transitions, their ids and the sum tree). The resident
memory is the largest logged while the shard was full, before the final checkpoint (whose
HDF5 write leaves a few MB of the library resident).

Usage: python benchmarks/apex.py [learn|shards|memory ...] [--launches 5]
           [--out benchmarks/apex.json]
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
CONFIG = REPO / "configs" / "cartpole-apex.yaml"


def _train(run_dir: Path, ranks: int, *sets: str, timeout: int = 1800) -> dict:
    command = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", "train"]
    command += [str(CONFIG), "--run-dir", str(run_dir)]
    for value in sets:
        command += ["--set", value]
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "final_eval": evaluation["mean_return"]}


def _metrics(run_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        group = f["metrics"]
        out: dict[str, np.ndarray] = {}
        group.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
        episodes = {name: f["episodes"][name][()] for name in ("return", "env_steps")}
    out["_returns"], out["_episode_steps"] = episodes["return"], episodes["env_steps"]
    return out


def _learning_rows(m: dict, learning_starts: int) -> np.ndarray:
    return m["replay/size"] >= learning_starts


def learn(launches: int, tmp: Path) -> list[dict]:
    rows = []
    for seed in range(launches):
        run_dir = tmp / f"learn-{seed}"
        out = _train(run_dir, 4, f"seed={seed}", "log_interval_s=2")
        m = _metrics(run_dir)
        means = np.convolve(m["_returns"], np.ones(20) / 20, mode="valid")
        hit = np.flatnonzero(means >= 475)
        learning = _learning_rows(m, 1000)
        out |= {
            "seed": seed,
            "reached_475_at": int(m["_episode_steps"][hit[0] + 19]) if hit.size else None,
            "best_mean_20": float(means.max()),
            "learner_wait_frac": float(np.nanmean(m["learner_wait_frac"][learning])),
            "policy_lag_mean": float(np.nanmean(m["policy_lag_mean"][learning])),
            "learner_updates": int(m["learner_updates"][-1]),
        }
        rows.append(out)
        print(json.dumps(out), flush=True)
    return rows


def shards(tmp: Path) -> dict:
    run_dir = tmp / "shards"
    out = _train(run_dir, 4, "replay_ranks=2", "log_interval_s=2")
    m = _metrics(run_dir)
    learning = _learning_rows(m, 1000)
    out |= {
        f"shard_{k}_{what}": int(m[f"replay/shard_{k}/{what}"][-1])
        for k in (0, 1)
        for what in ("inserted", "sampled")
    }
    out["learner_wait_frac"] = float(np.nanmean(m["learner_wait_frac"][learning]))
    out["learner_wait_frac_max"] = float(np.nanmax(m["learner_wait_frac"][learning]))
    out["best_mean_20"] = float(np.convolve(m["_returns"], np.ones(20) / 20, "valid").max())
    print(json.dumps(out), flush=True)
    return out


def memory(tmp: Path, capacity: int) -> dict:
    run_dir = tmp / "memory"
    steps = capacity + capacity // 10
    out = _train(
        run_dir,
        4,
        "replay_ranks=2",
        f"buffer_size={capacity}",
        f"learning_starts={capacity}",
        f"total_env_steps={steps}",
        "num_envs=32",
        "eval_episodes=2",
        "log_interval_s=2",
        # No checkpoint before the end: writing one copies the buffer (`state_dict`) and
        # leaves HDF5's memory resident, which is not the buffer's.
        "checkpoint_interval_s=0",
    )
    m = _metrics(run_dir)
    for k in (0, 1):
        name = f"replay/shard_{k}"
        # rows with the shard full, before the last (after the final checkpoint, whose
        # HDF5 write leaves the library's few MB resident): the largest RSS among them
        full = np.flatnonzero(m[f"{name}/size"][:-1] == capacity // 2)
        grown = m[f"{name}/rss_bytes"][full].max() - m[f"{name}/rss_start_bytes"][-1]
        buffer = m[f"{name}/buffer_bytes"][-1]
        out[f"shard_{k}"] = {
            "rows_full": int(full.size),
            "size": int(m[f"{name}/size"][-1]),
            "capacity": capacity // 2,
            "buffer_bytes": int(buffer),
            "bytes_per_transition": float(buffer / (capacity // 2)),
            "rss_growth_bytes": int(grown),
            "ratio": float(grown / buffer),
        }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["learn", "shards", "memory"])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "apex.json"))
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "learn" in args.parts:
            results["learn"] = learn(args.launches, Path(tmp))
            ok = sum(r["reached_475_at"] is not None for r in results["learn"])
            print(f"reached 475 within 100k env steps in {ok} of {args.launches} launches")
        if "shards" in args.parts:
            results["shards"] = shards(Path(tmp))
        if "memory" in args.parts:
            results["memory"] = memory(Path(tmp), args.capacity)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
