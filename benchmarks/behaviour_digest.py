"""Fingerprints of every deterministic training case, to show a refactoring changed no
behaviour (issue 13, acceptance 1).

Each case is a fixed-seed run of the real CLI (`mpiexec -n N python -m hpcrl train ...`)
whose result does not depend on timing: tabular `allreduce` on 1 and 4 ranks, one-process
`ps`, PPO, A2C and DQN on 1 and 2 ranks, one-process IMPALA. From each run it records the
SHA-256 of `/episodes` (return, length, env_steps, rank; not wall_time), of the final
checkpoint's Q-table (tabular), the learners' `parameter_digests` (deep) and the greedy
evaluation's mean return.

Usage:
    python benchmarks/behaviour_digest.py --out before.json          # at the old commit
    python benchmarks/behaviour_digest.py --compare before.json      # at the new one
    [--cases ppo-1,ppo-2]                                            # a subset
`--compare` prints each case as same/DIFFERENT and exits 1 on any difference.
`benchmarks/behaviour_baseline.json` holds the fingerprints recorded at the commit named
in it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "configs"
QUICK = ["--set", "eval_episodes=10", "--set", "record_trajectories=false"]
# the tabular config with the settings the baseline was recorded at (the config's own
# changed on 2026-12-08: 256 copies, α_end 0.001, ε_end 0.2)
TABULAR = [
    str(CONFIGS / "frozenlake8x8-qlearning.yaml"),
    *("--total-env-steps", "60000", "--set", "num_envs=32"),
    *("--set", "alpha_end=0.005", "--set", "epsilon_end=0.05"),
]
CASES: dict[str, tuple[int, list[str]]] = {
    "qlearning-allreduce-1": (1, [*TABULAR, "--set", "layout=allreduce"]),
    "qlearning-allreduce-4": (4, [*TABULAR, "--set", "layout=allreduce"]),
    "qlearning-ps-1": (1, [*TABULAR, "--set", "layout=ps"]),
    **{
        f"{algo}-{ranks}": (ranks, [str(CONFIGS / f"cartpole-{algo}.yaml"), *budget])
        for algo, budget in (
            ("ppo", ["--total-env-steps", "8192"]),
            ("a2c", ["--total-env-steps", "8192"]),
            ("dqn", ["--total-env-steps", "3000", "--set", "learning_starts=1000"]),
        )
        for ranks in (1, 2)
    },
    "impala-1": (1, [str(CONFIGS / "cartpole-impala.yaml"), "--total-env-steps", "4096"]),
}


def _sha(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fingerprint(run_dir: Path) -> dict:
    """The behaviour of one finished run directory."""
    out: dict = {}
    with h5py.File(run_dir / "run.h5", "r") as f:
        episodes = f["episodes"]
        out["episodes"] = int(len(episodes["return"]))
        out["episodes_sha256"] = _sha(
            *(episodes[k][()] for k in ("return", "length")),
            *(episodes[k][()] for k in ("env_steps", "rank")),
        )
        if "parameter_digests" in f.attrs:
            out["parameter_digests"] = [int(d) for d in np.ravel(f.attrs["parameter_digests"])]
        if "eval_mean_return" in f.attrs:
            out["eval_mean_return"] = float(f.attrs["eval_mean_return"])
    latest = run_dir / "checkpoints" / "latest.h5"
    if latest.exists():
        with h5py.File(latest, "r") as f:
            if "q_table" in f:
                out["q_table_sha256"] = _sha(f["q_table"][()])
    return out


def run_case(name: str, workdir: Path) -> dict:
    ranks, args = CASES[name]
    run_dir = workdir / name
    command = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "hpcrl", "train"]
    result = subprocess.run(
        [*command, *args, "--seed", "7", *QUICK, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return fingerprint(run_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--out", help="write the fingerprints as JSON")
    parser.add_argument("--compare", help="compare with fingerprints written by --out")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: expected some of {sorted(CASES)}")
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hpcrl-digest-") as tmp:
        for name in names:
            results[name] = run_case(name, Path(tmp))
            print(f"{name}: {results[name]['episodes']} episodes", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"commit": commit, "cases": results}, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["cases"]
        differ = [n for n in names if before.get(n) != results[n]]
        for name in names:
            print(f"{name}: {'DIFFERENT' if name in differ else 'same'}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
