"""Tabular Q-learning at scale: env steps/s, Q updates/s and memory per rank of every tabular
layout (`ps`, `allreduce`, `sharded`, `async`) at 1, 2 and 4 ranks, against the raw single-env
gymnasium loop of the same env on the same machine, in one run, as ratios (issue 16).

    .venv/bin/python benchmarks/tabular_scale.py [--env FrozenLake8x8-v1]
        [--steps 24000000] [--num-envs 8192] [--ranks 1 2 4] [--repeats 2] [--json OUT]
        [--set KEY=VALUE ...]

Every run is the real CLI (`mpiexec [-bind-to core] -n K python -m hpcrl train`, each rank
pinned to a core where there are cores enough) with the table-stepped
envs (`vector_env: auto` picks `table` for FrozenLake), `num_envs` copies per acting rank,
trajectory recording off (and, once per layout at one rank, on, for at most `RECORD_STEPS`
env steps: every transition is written, about 40 bytes each), no final evaluation.

- env steps/s: the budget over the run's own wall time (`wall_time_s` in run.h5: from
  the shared start barrier to the end of training, so interpreter start-up is not in it).
- Q updates/s per rank: transitions applied to the table per second, divided by the ranks
  that hold table entries (every rank, except `ps` on several ranks: rank 0 alone).
- peak memory per rank: each rank's maximum resident set (`ru_maxrss`, read at exit by
  a wrapper around `python -m hpcrl`), the largest of the ranks; and the Q-table bytes a
  rank holds (the whole table, or `sharded`'s shard).
- raw loop: `env.step(random action)`, `reset` on episode end, one process, no learning.

The raw loop and the runs alternate over `--repeats` rounds so the machine's load falls on
all alike; the median of the rounds is reported. "x own 1 rank" is the median over the
rounds of each round's ratio to that round's 1-rank run of the layout, taken minutes
apart at most, as this machine's speed drifts by up to 1.5x between rounds. Prints a
Markdown table for benchmarks/RESULTS.md, and writes every figure to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).parent))
from throughput import raw_rate  # noqa: E402

BIN = Path(sys.executable).parent
# The recording-on runs' budget at most: 24M transitions make a 1 GB traj/ file; the GPU
# machine's command (`benchmarks/device_check.sh`, 4 x 10^8 steps a run) would fill its disk.
RECORD_STEPS = 24_000_000
# `python -m hpcrl`, then this rank's peak resident set (KiB on Linux) on stderr.
WRAPPER = (
    "import atexit, resource, runpy, sys; "
    "atexit.register(lambda: sys.stderr.write(f'<maxrss_kib {resource.getrusage("
    "resource.RUSAGE_SELF).ru_maxrss}>\\n')); "
    "sys.argv = ['hpcrl', *sys.argv[1:]]; runpy.run_module('hpcrl', run_name='__main__')"
)


def run(
    env_id, steps, layout, ranks, num_envs, record, workdir: Path, env_kwargs=None, extra=()
) -> dict:
    run_dir = workdir / f"{layout}-{ranks}-{int(record)}-{len(json.dumps(env_kwargs))}"
    # Each rank pinned to a core, as a cluster launch pins them (`srun --cpu-bind`), where
    # the cores suffice: unpinned, 2 ranks here were 3% slower and varied more
    # (`benchmarks/RESULTS.md`). More ranks than cores run unpinned.
    bind = ["-bind-to", "core"] if ranks <= (os.cpu_count() or 1) else []
    cmd = [
        str(BIN / "mpiexec"),
        *bind,
        "-n",
        str(ranks),
        sys.executable,
        "-c",
        WRAPPER,
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
        f"num_envs={num_envs}",
        "--set",
        "sync_interval=4",
        "--set",
        "eval_episodes=0",
        "--set",
        f"record_trajectories={str(record).lower()}",
        "--set",
        "log_interval_s=1000",
        *(["--env-kwargs", json.dumps(env_kwargs)] if env_kwargs else []),
        *(arg for item in extra for arg in ("--set", item)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    with h5py.File(run_dir / "run.h5", "r") as f:
        wall = float(f.attrs["wall_time_s"])
    with h5py.File(run_dir / "checkpoints" / "latest.h5", "r") as f:
        meta = json.loads(f.attrs["meta"])
    n_states, n_actions = meta.get("shapes", {}).get("q_table") or f_shape(run_dir)
    holders = 1 if layout == "ps" and ranks > 1 else ranks
    table_bytes = n_states * n_actions * 8
    rank_bytes = -(-n_states // ranks) * n_actions * 8 if layout == "sharded" else table_bytes
    # one write per rank (ranks' stderr interleave in mpiexec's)
    rss = [int(v) for v in re.findall(r"<maxrss_kib (\d+)>", done.stderr)]
    return {
        "layout": layout,
        "ranks": ranks,
        "record": record,
        "env_steps_per_s": steps / wall,
        "q_updates_per_s_per_rank": steps / wall / holders,
        "peak_rss_mib": max(rss) / 1024 if rss else float("nan"),
        "table_bytes_per_rank": rank_bytes,
    }


def f_shape(run_dir: Path) -> tuple[int, int]:
    with h5py.File(run_dir / "checkpoints" / "latest.h5", "r") as f:
        return tuple(f["q_table"].shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="FrozenLake8x8-v1")
    parser.add_argument("--steps", type=int, default=24_000_000)
    parser.add_argument("--num-envs", type=int, default=8192)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layouts", nargs="+", default=["ps", "allreduce", "sharded", "async"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for every run, after the benchmark's own (e.g. sync_interval=64)",
    )
    parser.add_argument(
        "--million",
        action="store_true",
        help="instead: peak memory per rank of `sharded` on 4 ranks on a 1000 x 1000 map "
        "(10^6 states) with the cap at a quarter of the table, against an 8 x 8 map",
    )
    args = parser.parse_args()
    if args.million:
        million(args)
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"env {args.env}; {args.steps:,} env steps per run, {args.num_envs} copies per rank"
    )
    cases = [(layout, ranks, False) for layout in args.layouts for ranks in args.ranks]
    cases += [(layout, 1, True) for layout in args.layouts]
    raws, results = [], {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            raws.append(raw_rate(args.env, 300_000))
            for layout, ranks, record in cases:
                figures = run(
                    args.env,
                    min(args.steps, RECORD_STEPS) if record else args.steps,
                    layout,
                    ranks,
                    args.num_envs,
                    record,
                    Path(tmp),
                    extra=args.set,
                )
                results[layout, ranks, record].append(figures)
    raw = statistics.median(raws)
    print(f"raw single-env gymnasium loop: {raw:,.0f} env steps/s (median of {len(raws)})\n")
    print(
        "| layout | ranks | trajectories | env steps/s | x raw loop | x own 1 rank | "
        "Q updates/s per rank | peak RSS per rank | Q-table per rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for layout, ranks, record in cases:
        runs = results[layout, ranks, record]
        rate = statistics.median(r["env_steps_per_s"] for r in runs)
        ones = results[layout, 1, False]
        per_round = [
            r["env_steps_per_s"] / o["env_steps_per_s"] for r, o in zip(runs, ones, strict=True)
        ]
        row = {
            **runs[0],
            "env_steps_per_s": rate,
            "q_updates_per_s_per_rank": statistics.median(
                r["q_updates_per_s_per_rank"] for r in runs
            ),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "x_raw": rate / raw,
            "x_own_one_rank": statistics.median(per_round),
            "x_own_one_rank_per_round": per_round,
            "repeats": [r["env_steps_per_s"] for r in runs],
        }
        rows.append(row)
        print(
            f"| {layout} | {ranks} | {'on' if record else 'off'} | {rate:,.0f} | "
            f"{rate / raw:.1f} | {row['x_own_one_rank']:.2f} | "
            f"{row['q_updates_per_s_per_rank']:,.0f} | "
            f"{row['peak_rss_mib']:.0f} MiB | {row['table_bytes_per_rank']:,} B |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"env": args.env, "raw": raws, "rows": rows}, indent=1))


def million(args) -> None:
    """Acceptance 4 of issue 16: memory per rank of a table beyond one rank's cap."""
    cap = 10**6 * 4 * 8 // 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (8, 1000):
            kwargs = {"size": size, "p": 0.8, "map_seed": 3, "max_episode_steps": 2 * size}
            figures = run(
                "hpcrl/FrozenLake-v0",
                2_000_000,
                "sharded",
                4,
                1024,
                False,
                Path(tmp),
                kwargs,
                [f"max_table_bytes_per_rank={cap}"],
            )
            rows.append((size, figures))
    print(f"sharded on 4 ranks, max_table_bytes_per_rank={cap:,} (a quarter of 10^6 x 4 x 8 B)")
    print("| map | states | Q-table per rank | peak RSS per rank | env steps/s |")
    print("|---|---|---|---|---|")
    for size, f in rows:
        print(
            f"| {size} x {size} | {size * size:,} | {f['table_bytes_per_rank']:,} B | "
            f"{f['peak_rss_mib']:.0f} MiB | {f['env_steps_per_s']:,.0f} |"
        )
    extra = rows[1][1]["peak_rss_mib"] - rows[0][1]["peak_rss_mib"]
    print(f"\nthe 10^6-state map's extra peak memory per rank: {extra:.0f} MiB")


if __name__ == "__main__":
    main()
