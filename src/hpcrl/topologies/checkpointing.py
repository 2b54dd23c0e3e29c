"""Checkpoints: every rank's own state (RNGs, envs, counters), gathered to rank 0 in one
`Gatherv`, and rank 0 writing the whole checkpoint atomically (`storage/checkpoints.py`).

Checkpoint layout (every layout):

    q_table                      (n_states, n_actions) float64, a tabular learner's table
    params/..., optimizer/...    a deep learner's `shared_arrays()`
    ranks/<k>/<name>             rank k's own state when the checkpoint was collective:
                                 policy_rng (6,) uint64, counters (3,) int64 [env_steps,
                                 learner_updates, traj_rows], torch_rng (n,) uint8 (when the
                                 rank imported torch), the `EnvStepper.state_dict()` (with
                                 no env copy's state in a run's last checkpoint: its budget
                                 is spent) and the learner's `rank_arrays()`
    meta (JSON attribute)        identity (algo, env_id, layout, world_size, config),
                                 counters (env_steps, learner_updates, policy_version,
                                 vector_step, syncs), the segment, the rows of run.h5 and of
                                 every traj/rank-<k>.h5 the checkpoint accounts for, elapsed_s
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcrl.comm.waits import gather_rows
from hpcrl.envs import EnvStepper, space_to_json
from hpcrl.state import generator_state, set_generator_state, set_torch_rng_state, torch_rng_state
from hpcrl.storage.checkpoints import write_checkpoint

if TYPE_CHECKING:
    from hpcrl.topologies.run_context import RunContext


def rank_state(
    policy_rng: np.random.Generator,
    stepper: EnvStepper,
    env_steps: int,
    learner_updates: int,
    traj_rows: int,
    envs: bool = True,
) -> dict[str, np.ndarray]:
    """What one acting rank needs to continue exactly (see the module doc for the names);
    `envs` False at the end of the rank's budget: no env copy's state
    (`EnvStepper.state_dict`)."""
    state = stepper.state_dict(envs)
    state["policy_rng"] = generator_state(policy_rng)
    state["counters"] = np.array([env_steps, learner_updates, traj_rows], dtype=np.int64)
    torch_state = torch_rng_state()
    if torch_state is not None:
        state["torch_rng"] = torch_state
    return state


def restore_rank_state(
    state: dict[str, np.ndarray],
    policy_rng: np.random.Generator,
    stepper: EnvStepper,
    fallback_seed: int,
) -> tuple[int, int]:
    """Put `rank_state` output back; returns (env_steps, learner_updates)."""
    set_generator_state(policy_rng, state["policy_rng"])
    set_torch_rng_state(state.get("torch_rng"))
    stepper.load_state_dict(state, fallback_seed)
    return int(state["counters"][0]), int(state["counters"][1])


def gather_rank_states(
    ctx: RunContext, state: dict[str, np.ndarray] | None
) -> dict[int, dict[str, np.ndarray]] | None:
    """Collective: every rank's state dict on rank 0 (None elsewhere). Each dict travels
    as one `.npz` byte buffer (numpy's format, no pickles) in one `Gatherv`."""
    blob = np.zeros(0, dtype=np.uint8)
    if state is not None:
        out = io.BytesIO()
        np.savez(out, **state)
        blob = np.frombuffer(out.getvalue(), dtype=np.uint8)
    sizes = gather_rows(ctx.comm, np.array([blob.size], dtype=np.int64), 0, ctx.watchdog_s)
    data = gather_rows(ctx.comm, blob, 0, ctx.watchdog_s)
    if ctx.rank != 0:
        return None
    states, start = {}, 0
    for rank, size in enumerate(sizes):
        if size:
            with np.load(io.BytesIO(data[start : start + size].tobytes())) as npz:
                states[rank] = {name: npz[name] for name in npz.files}
        start += int(size)
    return states


def checkpoint_identity(ctx: RunContext, env_steps: int, learner_updates: int) -> dict:
    """The `meta` every checkpoint file carries (step files and `best.h5`): what run and
    policy it holds, enough for `Topology.checkpoint_policy` to rebuild it."""
    cfg = ctx.cfg
    return {
        "algo": cfg.run.algo,
        "env_id": cfg.run.env_id,
        "env_kwargs": cfg.run.env_kwargs,
        "layout": cfg.layout,
        "world_size": ctx.world_size,
        "env_steps": int(env_steps),
        "learner_updates": int(learner_updates),
        "config": cfg.to_dict(),
        # the env's spaces, so a policy loads without the env (`hpcrl.load_policy`)
        "observation_space": space_to_json(ctx.observation_space),
        "action_space": space_to_json(ctx.action_space),
    }


def save_checkpoint(
    ctx: RunContext,
    shared: dict[str, np.ndarray],
    env_steps: int,
    learner_updates: int,
    policy_version: int,
    traj_rows: dict[int, int],
    rank_states: dict[int, dict[str, np.ndarray]] | None = None,
    counters: dict | None = None,
) -> Path:
    """Rank 0: write a full checkpoint (see the module doc) after flushing run.h5, so the
    rows it accounts for are on disk before it is.

    Args:
        shared: the learner's arrays, the same for every rank (`q_table`, or a model's
            `params/...` and `optimizer/...`).
        traj_rows: {rank: rows of traj/rank-<k>.h5 up to this checkpoint} for the ranks
            of this world; orphan files of a larger earlier world are added here.
        rank_states: every rank's `rank_state` (collective checkpoints), or None.
        counters: more loop counters for `meta` (e.g. vector_step, syncs).
    """
    cfg = ctx.cfg
    run_file = ctx.run_file
    run_file.flush()
    rows = dict(ctx.orphan_traj)
    rows.update(traj_rows)
    meta = {
        **checkpoint_identity(ctx, env_steps, learner_updates),
        "policy_version": int(policy_version),
        "segment": ctx.segment.to_dict(),
        "episodes_rows": run_file.episode_rows,
        "metrics_rows": run_file.metric_rows,
        "traj_rows": [int(rows.get(k, 0)) for k in range(max(rows, default=-1) + 1)],
        "elapsed_s": ctx.elapsed_s(),
        "rank_states": rank_states is not None,
        **(counters or {}),
    }
    arrays = dict(shared)
    for rank, state in (rank_states or {}).items():
        for name, array in state.items():
            arrays[f"ranks/{rank}/{name}"] = array
    path = write_checkpoint(
        ctx.run_dir / "checkpoints", int(env_steps), arrays, meta, cfg.run.keep_checkpoints
    )
    return path
