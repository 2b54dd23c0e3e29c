"""Learned greedy policies against value iteration on the env's own transition table.

Each case is written once and run on one process (`COMM_SELF`, no launcher) and on four
ranks (`COMM_WORLD` under `mpiexec -n 4 python -m pytest --with-mpi`), for every tabular
layout, `async` also with n-step returns (`sharded`'s table is assembled from its shard
files by `hpcrl.load_policy`). The envs are stepped from their transition table
(`vector_env: table`, bit-identical to gymnasium's `SyncVectorEnv`,
`tests/test_table_vector.py`).
The greedy policy's exact value from the start state (a linear solve, not sampling) must be
>= 98% of the optimum, or within 2% of it when returns are negative.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from hpcrl.config import build_config

GAMMA = 0.99

# env id, budget (env steps, summed over ranks)
CASES = [
    ("FrozenLake-v1", 300_000),
    ("FrozenLake8x8-v1", 3_000_000),
    ("CliffWalking-v1", 300_000),
]
LAYOUTS = ["ps", "allreduce", "sharded", "async", "async-n-step"]
# `async` with n-step returns (Mnih et al. 2016, Algorithm S2, tabular)
LAYOUT_KEYS = {"async-n-step": {"layout": "async", "n_step": 4}}


def transition_model(env_id: str, **env_kwargs):
    """(P[s, a, s'], R[s, a], done[s, a, s'], start state) from `env.unwrapped.P`."""
    env = gym.make(env_id, **env_kwargs)
    n_s, n_a = env.observation_space.n, env.action_space.n
    p = np.zeros((n_s, n_a, n_s))
    r = np.zeros((n_s, n_a))
    done = np.zeros((n_s, n_a, n_s), dtype=bool)
    for s in range(n_s):
        for a in range(n_a):
            for prob, s2, reward, terminal in env.unwrapped.P[s][a]:
                p[s, a, s2] += prob
                r[s, a] += prob * reward
                done[s, a, s2] |= bool(terminal)
    start = int(env.reset(seed=0)[0])
    return p, r, done, start


def value_iteration(p, r, done, gamma, tol=1e-12):
    """V* from the Bellman optimality equation, no bootstrap into terminal transitions.
    The (S·A, S) transitions as a sparse matrix: FrozenLake has at most 3 successors
    per (s, a), and a dense product took 62 s on the 50x50 map (0.3 s sparse)."""
    from scipy import sparse

    n_states, n_actions = r.shape
    cont = sparse.csr_matrix((p * ~done).reshape(n_states * n_actions, n_states))
    v = np.zeros(n_states)
    while True:
        v_new = (r + gamma * (cont @ v).reshape(n_states, n_actions)).max(axis=1)
        if np.abs(v_new - v).max() < tol:
            return v_new
        v = v_new


def policy_value(p, r, done, gamma, policy):
    """Exact V^π of a deterministic policy: solve (I - γ P_π) v = r_π."""
    idx = np.arange(p.shape[0])
    p_pi = (p * ~done)[idx, policy]
    return np.linalg.solve(np.eye(len(idx)) - gamma * p_pi, r[idx, policy])


# `ps` on several ranks applies batches in arrival order, so its result depends on timing.
# FrozenLake8x8 has near-tied actions whose wrong choice costs more than the 2% margin
# alone or together: at (3, 7) Q* of "right" is 0.0056 above "down" and "down" costs 5.3%
# of V*(start); at (2, 7) the gap is 0.0013 and the cost 1.8%. At 6M steps, α_end 0.001
# and ε_end 0.05, seed 7 (the test's) ended at 98.20% on an idle machine, the (2, 7)
# choice wrong, and CI saw 94.7%, the (3, 7) choice wrong; a smaller α_end did not help.
# The non-greedy action of a state is tried in ε / 4 = 1.25% of its visits, too few to
# rank two values 0.006 apart: with ε_end 0.2 the learned gap at (3, 7) stayed within
# 0.0042-0.0086 (0.0008-0.0110 before). At 6M steps the (2, 7) choice was still a coin
# flip, and with another small error it failed 1 launch in 8 (97.9%) of
# `configs/frozenlake8x8-qlearning.yaml` on 4 ranks with these settings. At 12M steps 16
# of 16 launches passed, seeds 0-7 of the config and 1-8 of this function; the worst,
# 98.19%, chose wrong at (2, 7) and nowhere else (`benchmarks/RESULTS.md`). That near-tie
# is what keeps the margin thin. The one-process and `allreduce` and one-step `async`
# runs are deterministic for a seed and world size and keep the plain settings: seeds 0-9
# of this function's one-process run all >= 0.9917 (`allreduce` and `async` are the same
# there).
# α_end and ε_end of the remedies (`sharded`'s and `async` n-step's below)
FINE_8X8 = {"alpha_end": 0.001, "epsilon_end": 0.2}
PS_OVERRIDES = {"FrozenLake8x8-v1": {"total_env_steps": 12_000_000, **FINE_8X8}}
# `sharded` acts and bootstraps on the table as it was one round earlier. With the plain
# settings it missed on one seed in ten, on one process (seed 1: 0.9607) and on 4 ranks
# (seed 6: 0.9772); at 6M steps, α_end 0.001 and ε_end 0.2, seeds 0-9 all passed, on one
# process (worst 0.9820) and on 4 ranks (worst 0.9914) (`benchmarks/RESULTS.md`).
SHARDED_OVERRIDES = {"FrozenLake8x8-v1": {"total_env_steps": 6_000_000, **FINE_8X8}}
# n-step returns in slippery FrozenLake 8x8 vary more than one-step targets: at 3M steps
# and α_end 0.005, `async` with n_step 4 on 4 ranks ended at 97.9% of the optimum. It is
# deterministic; at 6M steps, α_end 0.001 and ε_end 0.2, seeds 7 and 1-5 on 4 ranks ended
# >= 99.95%.
N_STEP_OVERRIDES = {"FrozenLake8x8-v1": {"total_env_steps": 6_000_000, **FINE_8X8}}


def overrides(layout: str, env_id: str, ranks: int) -> dict:
    """The budget, α_end and ε_end a case needs beyond the plain ones (see above)."""
    if layout == "async-n-step":
        return N_STEP_OVERRIDES.get(env_id, {})
    if layout == "sharded":
        return SHARDED_OVERRIDES.get(env_id, {})
    if layout == "ps" and ranks > 1:
        return PS_OVERRIDES.get(env_id, {})
    return {}


def train_greedy_actions(comm, run_dir, env_id, layout, budget, **extra):
    from hpcrl import load_policy, runner
    from hpcrl.storage.checkpoints import load_latest

    values = {
        "env_id": env_id,
        "total_env_steps": budget,
        "layout": layout,
        **LAYOUT_KEYS.get(layout, {}),
        "gamma": GAMMA,
        "eval_episodes": 0,
        "record_trajectories": False,
        "log_interval_s": 60.0,
        "seed": 7,
        "vector_env": "table",
        **extra,
    }
    build_config(values)  # a bad case fails here, before any collective
    runner.train(comm, values, str(run_dir), overwrite=True)
    if comm.rank != 0:
        return None  # rank 0 writes the checkpoint
    _, meta, _ = load_latest(run_dir / "checkpoints")
    assert meta["env_steps"] == values["total_env_steps"]
    policy = load_policy(run_dir)  # argmax_a Q(s, a) per state, ties to the lowest action
    return policy.act(np.arange(policy.observation_space.n))


def check_against_optimum(env_id, actions, **env_kwargs):
    p, r, done, start = transition_model(env_id, **env_kwargs)
    v_star = value_iteration(p, r, done, GAMMA)[start]
    v_pi = policy_value(p, r, done, GAMMA, actions)[start]
    if v_star > 0:
        assert v_pi >= 0.98 * v_star, f"{env_id}: V^pi(start)={v_pi:.4f} < 98% of {v_star:.4f}"
    else:
        assert v_pi >= v_star * 1.02, (
            f"{env_id}: V^pi(start)={v_pi:.4f} not within 2% of {v_star:.4f}"
        )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("env_id,budget", CASES)
def test_one_process_learns_optimal_policy(tmp_path, env_id, budget, layout):
    from mpi4py import MPI

    extra = overrides(layout, env_id, 1)
    actions = train_greedy_actions(MPI.COMM_SELF, tmp_path, env_id, layout, budget, **extra)
    check_against_optimum(env_id, actions)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("env_id,budget", CASES)
def test_four_ranks_learn_optimal_policy(mpi_tmp_path, env_id, budget, layout):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    extra = overrides(layout, env_id, comm.size)
    actions = train_greedy_actions(comm, mpi_tmp_path, env_id, layout, budget, **extra)
    if comm.rank == 0:
        check_against_optimum(env_id, actions)
    comm.Barrier()


# A generated slippery 50x50 FrozenLake (issue 16, acceptance 3): V*(start) = 0.0134 at
# γ 0.99, the goal 98 cells away and slips sending one move in three sideways, so
# ε-greedy alone falls into a hole long before it finds the goal (never in 20M steps).
# Optimistic initial values explore instead: q_init 0.3 sits above V* everywhere
# but the last cells before the goal, so the copies head for what they have not tried.
# What limits the result is how fast the goal's value flows back 98 cells through
# one-step backups: at the end the far half of the map is underestimated, not over. The
# budget is what it takes; the greedy value from the start on this map, seed 7
# (`benchmarks/RESULTS.md`):
#   one process, 4,096 copies, 200M steps: 0.990 of V* (0.983 with 1,024 copies);
#   4 ranks x 1,024 copies, 200M steps: sharded 0.991;
#   `async` averages the ranks' changes to a pair, so 4 ranks that all visit it move it
#     as one does: 400M steps, one-step 0.996 and n_step 4 0.990.
# More copies per rank on 4 ranks is worse: 4 x 4,096 copies make 4x fewer updates of
# every pair (sharded at 160M steps: 0.17).
GENERATED_ENV = "hpcrl/FrozenLake-v0"
GENERATED_KWARGS = {"size": 50, "p": 0.9, "map_seed": 3, "max_episode_steps": 1000}
GENERATED_KEYS = {
    "q_init": 0.3,
    "alpha": 0.1,
    "alpha_end": 0.002,
    "epsilon_start": 0.1,
    "epsilon_end": 0.0,
    "epsilon_decay_fraction": 0.9,
}


def check_generated_map(actions) -> None:
    """The greedy actions against value iteration on gymnasium's FrozenLake of the same
    map (`hpcrl/FrozenLake-v0` has no `P`; it is the same MDP, tests/test_table_vector.py)."""
    from hpcrl.frozen_lake import generated_map

    kwargs = GENERATED_KWARGS
    desc = generated_map(kwargs["size"], kwargs["p"], kwargs["map_seed"])
    check_against_optimum("FrozenLake-v1", actions, desc=desc, is_slippery=True)


def test_one_process_sharded_learns_optimal_policy_on_generated_50x50_map(tmp_path):
    from mpi4py import MPI

    actions = train_greedy_actions(
        MPI.COMM_SELF,
        tmp_path,
        GENERATED_ENV,
        "sharded",
        200_000_000,
        env_kwargs=GENERATED_KWARGS,
        num_envs=4096,
        **GENERATED_KEYS,
    )
    check_generated_map(actions)


# `async`'s 400M steps trained for 239 s of CI's 240 s per-test limit (4 ranks, 2 cores),
# and the check after it took the test past it: these get 480 s.
@pytest.mark.timeout(480)
@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize(
    "layout,budget",
    [("sharded", 200_000_000), ("async", 400_000_000), ("async-n-step", 400_000_000)],
)
def test_four_ranks_learn_optimal_policy_on_generated_50x50_map(mpi_tmp_path, layout, budget):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    actions = train_greedy_actions(
        comm,
        mpi_tmp_path,
        GENERATED_ENV,
        layout,
        budget,
        env_kwargs=GENERATED_KWARGS,
        num_envs=1024,
        **GENERATED_KEYS,
    )
    if comm.rank == 0:
        check_generated_map(actions)
    comm.Barrier()


# The tabular GPU path (`device: cuda`, layout `allreduce`, `hpcrl.table_torch`): the same
# cases. Where torch sees no GPU (here), torch's CPU device stands in for it: the same
# code and draws, on another device. Its generator is not gymnasium's, so its runs
# differ from the CPU path's; on the 50x50 map, seed 7, one process, 4,096 copies, 200M
# steps: 0.99 of V* (`benchmarks/RESULTS.md`).


@pytest.mark.parametrize("env_id,budget", CASES)
def test_one_process_gpu_path_learns_optimal_policy(tmp_path, gpu_path, env_id, budget):
    from mpi4py import MPI

    actions = train_greedy_actions(
        MPI.COMM_SELF, tmp_path, env_id, "allreduce", budget, num_envs=256, **gpu_path
    )
    check_against_optimum(env_id, actions)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("env_id,budget", CASES)
def test_four_ranks_gpu_path_learn_optimal_policy(mpi_tmp_path, gpu_path, env_id, budget):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    actions = train_greedy_actions(
        comm, mpi_tmp_path, env_id, "allreduce", budget, num_envs=64, **gpu_path
    )
    if comm.rank == 0:
        check_against_optimum(env_id, actions)
    comm.Barrier()


def test_one_process_gpu_path_learns_optimal_policy_on_generated_50x50_map(tmp_path, gpu_path):
    from mpi4py import MPI

    actions = train_greedy_actions(
        MPI.COMM_SELF,
        tmp_path,
        GENERATED_ENV,
        "allreduce",
        200_000_000,
        env_kwargs=GENERATED_KWARGS,
        num_envs=4096,
        **GENERATED_KEYS,
        **gpu_path,
    )
    check_generated_map(actions)


def test_value_iteration_reference_is_right():
    """The reference itself: FrozenLake 4x4 slippery, γ=0.99, V*(0) ≈ 0.542 (known value),
    and a policy that always goes left never reaches the goal from the start."""
    p, r, done, start = transition_model("FrozenLake-v1")
    v = value_iteration(p, r, done, GAMMA)
    assert abs(v[start] - 0.5420) < 1e-3
    left = np.zeros(p.shape[0], dtype=np.int64)
    assert policy_value(p, r, done, GAMMA, left)[start] == pytest.approx(0.0, abs=1e-12)
