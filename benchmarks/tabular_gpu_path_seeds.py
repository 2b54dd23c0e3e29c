"""Success rates over seeds of the tabular GPU path (`device: cuda`, layout `allreduce`,
`hpcrl.table_torch`) against the numpy path, on the `tests/test_policies.py` cases: the
greedy policy's exact value from the start over value iteration's, and how many seeds
reach the tests' bar (98% of V*, or within 2% for negative returns). Where torch sees no
GPU, torch's CPU device stands in for it (the same code and draws, another device).

    .venv/bin/python benchmarks/tabular_gpu_path_seeds.py [--seeds 10] [--num-envs 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_policies as cases  # noqa: E402
from hpcrl import models  # noqa: E402


def value_ratio(env_id: str, actions) -> float:
    p, r, done, start = cases.transition_model(env_id)
    v_star = cases.value_iteration(p, r, done, cases.GAMMA)[start]
    v_pi = cases.policy_value(p, r, done, cases.GAMMA, actions)[start]
    return v_pi / v_star if v_star > 0 else v_star / v_pi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--num-envs", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.cuda.is_available = lambda: True
        models.select_device = lambda *a, **k: torch.device("cpu")
        print("no GPU: torch's CPU device stands in for it")
    print("| env | path | seeds >= bar | min | ratios |\n|---|---|---|---|---|")
    for env_id, budget in cases.CASES:
        for device in ("cuda", "cpu"):
            ratios = []
            for seed in range(args.seeds):
                with tempfile.TemporaryDirectory() as tmp:
                    actions = cases.train_greedy_actions(
                        MPI.COMM_SELF,
                        Path(tmp),
                        env_id,
                        "allreduce",
                        budget,
                        num_envs=args.num_envs,
                        device=device,
                        seed=seed,
                    )
                ratios.append(value_ratio(env_id, actions))
            path = "GPU path" if device == "cuda" else "numpy"
            passed = sum(r >= 0.98 for r in ratios)
            print(
                f"| {env_id} | {path} | {passed}/{len(ratios)} | {min(ratios):.3f} | "
                + ", ".join(f"{r:.3f}" for r in ratios)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
