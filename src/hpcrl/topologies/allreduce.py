"""The `allreduce` layout: tabular Q-learning where every rank acts and learns on its own copy of
the table; every `sync_interval` vector steps the ranks `Allreduce` what they changed.

One sync is one `Allreduce` (sum) of a flat float64 buffer:

    [ ΔQ (n_states * n_actions) | visited (n_states * n_actions) | votes (`Vote`) ]

with ΔQ = Q_local - Q_sync and visited = 1 where this rank updated (s, a) since the last
sync (whether or not the value changed). Each entry then moves by the mean change of the
ranks that visited it,

    Q_sync <- Q_sync + ΣΔQ / max(1, Σ visited),

so an entry only one rank visited gets that rank's whole update and an entry every rank
visited is averaged rather than stepped N times. Every rank applies the same arithmetic to
the same reduced buffer, so all tables stay bit-identical. Finished episodes go to rank 0
(`Gatherv`) at log points, which rank 0 asks for through its `Vote.LOG` in the same
buffer. Everything is deterministic for a fixed seed and world size.

Two more votes ride in the same buffer: rank 0's "checkpoint now" (wall-time interval)
and every rank's "preemption signal received". Checkpoints by env steps need no flag
(every rank knows the global step count). A sync that decides to checkpoint gathers the
episodes, then every rank's RNG, env and counter state to rank 0, which writes one
checkpoint; on a preemption signal the ranks then stop together, so a resume from that
checkpoint continues bit-exactly (`topologies/segments.py`).

With `device: cuda` each rank's acting, stepping and updates run on a GPU of its node
(`hpcrl.table_torch.DeviceTabular`); at each sync its table and visited flags come to the
host for the same `Allreduce`, and the synced table goes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcrl.algos import make_learner
from hpcrl.comm.waits import allreduce_sum
from hpcrl.contracts import LoopResult
from hpcrl.topologies.checkpointing import (
    gather_rank_states,
    rank_state,
    restore_rank_state,
    save_checkpoint,
)
from hpcrl.topologies.collective_eval import TableGreedy
from hpcrl.topologies.recording import TrajectoryRecorder, link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter, flush_episodes, gather_and_log
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.segments import Lockstep
from hpcrl.topologies.sync_points import Vote
from hpcrl.topologies.tabular import TabularConfig, TabularTopology


@dataclass
class AllreduceConfig(TabularConfig):
    """Settings of the `allreduce` layout: `sync_interval` is the vector steps between two
    syncs of the tables."""


class Allreduce(TabularTopology):
    """Every rank acts and learns on its own copy of the table; copies averaged."""

    name = "allreduce"
    Config = AllreduceConfig
    on_gpu = True
    ROLES = "ranks 0-{last} each act and learn"

    def run(self, ctx: RunContext) -> LoopResult:
        q_table, interrupted = _run(ctx)
        return LoopResult(interrupted, TableGreedy(q_table))


TOPOLOGY = Allreduce


def _run(ctx: RunContext) -> tuple[np.ndarray, bool]:
    """The whole loop; returns the final Q-table (the same on every rank) and whether a
    preemption signal stopped it."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    num_envs, sync_interval = cfg.run.num_envs, cfg.topology.sync_interval
    segment = ctx.segment
    schedule = Lockstep(segment, num_envs, ctx.rank)
    budget, vector_steps = schedule.budget, schedule.vector_steps
    global_steps_after = schedule.global_steps_after

    rng, env_seed = ctx.rank_seeds()
    learner = make_learner(cfg, ctx.observation_space, ctx.action_space, ctx.world_size)
    policy = learner.behaviour_policy(rng)
    q_table = learner.q_table
    if ctx.resume is not None:
        q_table[:] = ctx.resume.shared()["q_table"]
    on_device = cfg.run.device != "cpu"
    stepper = _device_tabular(ctx, q_table, env_seed) if on_device else ctx.make_stepper()
    env_steps = 0  # this rank's, in this segment
    first_step, syncs = 0, 0
    if ctx.resume is not None:
        syncs = int(ctx.resume.meta.get("syncs", 0))
        learner.learner_updates = int(ctx.resume.meta["learner_updates"])
        state = ctx.resume.rank_state(ctx.rank)
        if state:
            env_steps, learner.learner_updates = restore_rank_state(
                state, rng, stepper, env_seed + 1
            )
            first_step = int(ctx.resume.meta["vector_step"]) + 1
    q_sync = q_table.copy()
    size = q_table.size
    sync_buffer = np.zeros(2 * size + len(Vote), dtype=np.float64)
    delta = sync_buffer[:size].reshape(q_table.shape)  # views into the one buffer
    visited = sync_buffer[size : 2 * size].reshape(q_table.shape)
    votes = sync_buffer[2 * size :]
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interrupted = False
    stamps: list[tuple[int, float]] = []  # on a device: each buffered step's (env steps, s)

    for t in range(first_step, vector_steps):
        n = min(num_envs, budget - env_steps)
        if n > 0 and on_device:
            ctx.maybe_fail(env_steps)
            progress = segment.progress(env_steps, budget)
            exploration = policy.exploration_value(progress)
            keep = recorder.writer is not None  # the transitions, to record them
            batch = stepper.step(learner.alpha(progress), exploration, n, keep)
            learner.learner_updates += 1
            if batch is not None:
                recorder.record(batch, n)
            env_steps += n
            stamps.append((global_steps_after(t), ctx.elapsed_s()))
            if stepper.buffer_full():
                _take_episodes(stepper, stamps, episodes, ctx.rank)
        elif n > 0:
            ctx.maybe_fail(env_steps)
            progress = segment.progress(env_steps, budget)
            actions = policy.select_actions(q_table, stepper.obs, progress)
            batch = stepper.step(actions)
            learner.update(
                batch.obs[:n],
                batch.actions[:n],
                batch.rewards[:n],
                batch.next_obs[:n],
                batch.terminated[:n],
                progress,
            )
            visited[batch.obs[:n], batch.actions[:n]] = 1.0
            recorder.record(batch, n)
            env_steps += n
            episodes.add_finished(batch, n, global_steps_after(t), ctx.elapsed_s(), ctx.rank)
        last = t == vector_steps - 1
        if (t + 1) % sync_interval and not last:
            continue
        # --- sync: one Allreduce of [ΔQ | visited | log, checkpoint, stop flags] ---
        if on_device:
            _take_episodes(stepper, stamps, episodes, ctx.rank)
            q_table[:] = stepper.table()
            visited[:] = stepper.take_visited()
        np.subtract(q_table, q_sync, out=delta)
        ctx.vote(votes, reporter, episodes.pending)
        allreduce_sum(comm, sync_buffer, watchdog)
        q_sync += delta / np.maximum(visited, 1.0)
        q_table[:] = q_sync
        if on_device:
            stepper.set_table(q_sync)
        visited[:] = 0.0
        syncs += 1
        global_steps = global_steps_after(t)
        interrupted = votes[Vote.STOP] > 0 and not last
        by_steps = ctx.clock.due_by_env_steps(global_steps)
        checkpoint = last or interrupted or by_steps or votes[Vote.CHECKPOINT] > 0
        if votes[Vote.LOG] > 0 or checkpoint:
            exploration = policy.exploration_value(segment.progress(env_steps, max(budget, 1)))
            gather_and_log(
                ctx, reporter, episodes, global_steps, {"syncs": syncs, "exploration": exploration}
            )
        else:
            flush_episodes(ctx, reporter, episodes, votes)
        if checkpoint:
            recorder.flush()
            # at the last step the budget is spent: no env copy's state (16 ms for
            # 8,192 table-stepped copies), nothing is left to step
            state = rank_state(
                rng, stepper, env_steps, learner.learner_updates, recorder.rows, not last
            )
            states = gather_rank_states(ctx, state)
            if ctx.rank == 0:
                save_checkpoint(
                    ctx,
                    {"q_table": q_table},
                    global_steps,
                    learner.learner_updates,
                    syncs,
                    {k: int(s["counters"][2]) for k, s in states.items()},
                    states,
                    {"vector_step": t, "syncs": syncs},
                )
            ctx.clock.written(global_steps)
        if interrupted:
            break

    stepper.close()
    link_trajectories(ctx, recorder.close())
    if reporter is not None:
        reporter.close()
    return q_table, interrupted


def _device_tabular(ctx: RunContext, q_table: np.ndarray, env_seed: int):
    """`device: cuda`: this rank's envs, table and updates on a GPU of its node
    (`hpcrl.table_torch.DeviceTabular`; `TabularTopology.check_env` checked the GPU)."""
    import torch
    from mpi4py import MPI

    from hpcrl import models
    from hpcrl.table_torch import DeviceTabular

    cfg = ctx.cfg
    torch.set_num_threads(cfg.run.torch_threads)
    local = ctx.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks of this node
    device = models.select_device(cfg.run.device, local.Get_rank())
    local.Free()
    return DeviceTabular(
        cfg.run.env_id,
        cfg.run.env_kwargs,
        cfg.run.num_envs,
        q_table,
        cfg.algo.gamma,
        cfg.algo.exploration,
        env_seed,
        device,
    )


def _take_episodes(stepper, stamps: list, episodes: EpisodeRows, rank: int) -> None:
    """A device's buffered finished episodes into `episodes`, each step's stamped with
    its env steps and wall time (`stamps`, emptied)."""
    for (returns, lengths), (env_steps, wall) in zip(stepper.take_episodes(), stamps, strict=True):
        episodes.add(returns, lengths, env_steps, wall, rank)
    stamps.clear()
