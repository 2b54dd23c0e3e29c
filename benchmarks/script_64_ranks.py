"""A user's script: their own simulator, here CartPole behind an `env_fn` (not a registered
id), trained with `hpcrl.train` on N ranks (issue 15). The default job's settings, less its
env id and `solved_lr_decay` (an env_fn's registration has no reward threshold).

    mpirun -n 64 python benchmarks/script_64_ranks.py RUN_DIR TOTAL_ENV_STEPS
"""

import json
import sys
import time

import gymnasium as gym
from mpi4py import MPI

import hpcrl
from hpcrl.config import DEFAULT_JOB

t0 = time.perf_counter()


def make_sim(**kwargs):
    return gym.make("CartPole-v1", **kwargs)


job = {k: v for k, v in DEFAULT_JOB.items() if k != "env_id"}
out = hpcrl.train(
    job,
    env_fn=make_sim,
    run_dir=sys.argv[1],
    overwrite=True,
    total_env_steps=int(sys.argv[2]),
    eval_episodes=20,
    solved_lr_decay=1.0,
)
if MPI.COMM_WORLD.Get_rank() == 0:
    print(
        "RESULT",
        json.dumps(
            {"status": out.status, "result": out.result, "wall_s": time.perf_counter() - t0}
        ),
        flush=True,
    )
