"""Data-parallel loop for tabular Q-learning: every rank acts and learns on its own copy of
the table; every `sync_interval` vector steps the ranks `Allreduce` what they changed.

One sync is one `Allreduce` (sum) of a flat float64 buffer:

    [ ΔQ (n_states * n_actions) | visited (n_states * n_actions) | log flag ]

with ΔQ = Q_local - Q_sync and visited = 1 where this rank updated (s, a) since the last
sync (whether or not the value changed). Each entry then moves by the mean change of the
ranks that visited it,

    Q_sync <- Q_sync + ΣΔQ / max(1, Σ visited),

so an entry only one rank visited gets that rank's whole update and an entry every rank
visited is averaged rather than stepped N times. Every rank applies the same arithmetic to
the same reduced buffer, so all tables stay bit-identical. Finished episodes go to rank 0
(`Gatherv`) at log points, which rank 0 asks for through the flag in the same buffer.
Everything is deterministic for a fixed seed and world size.

Two more flags ride in the same buffer: rank 0's "checkpoint now" (wall-time interval)
and every rank's "preemption signal received". Checkpoints by env steps need no flag
(every rank knows the global step count). A sync that decides to checkpoint gathers the
episodes, then every rank's RNG, env and counter state to rank 0, which writes one
checkpoint; on a preemption signal the ranks then stop together, so a resume from that
checkpoint continues bit-exactly (`Segment`, `ResumePoint` in `context.py`).
"""

from __future__ import annotations

import numpy as np

from hpcrl.algos.qlearning import QLearningLearner, QLearningPolicy
from hpcrl.comm.waits import allreduce_sum
from hpcrl.topologies.context import (
    EpisodeRows,
    LoopResult,
    Reporter,
    RunContext,
    TrajectoryRecorder,
    gather_and_log,
    gather_rank_states,
    link_trajectories,
    rank_state,
    restore_rank_state,
    save_q_table,
)

# Flags at the end of the sync buffer (summed over ranks).
_LOG, _CHECKPOINT, _STOP = -3, -2, -1


def run_allreduce(ctx: RunContext) -> LoopResult:
    """Run the whole `allreduce` layout; returns the final Q-table (the same on every rank)
    and whether a preemption signal stopped it."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    num_envs, sync_interval = cfg.run.num_envs, cfg.algo.sync_interval
    segment = ctx.start_segment(ctx.world_size, range(ctx.world_size))
    budgets = np.array(segment.budgets(), dtype=np.int64)
    budget = int(budgets[ctx.rank])
    vector_steps = max(1, -(-int(budgets.max()) // num_envs))  # the same on every rank

    def global_steps_after(t: int) -> int:
        """Env steps of all ranks after vector step t (ranks step in lockstep)."""
        return segment.start_env_steps + int(np.minimum(budgets, (t + 1) * num_envs).sum())

    rng, env_seed = ctx.rank_seeds()
    policy = QLearningPolicy(cfg.algo, rng)
    learner = QLearningLearner(cfg.algo, ctx.n_states, ctx.n_actions)
    q_table = learner.q_table
    stepper = ctx.make_stepper()
    env_steps = 0  # this rank's, in this segment
    first_step, syncs = 0, 0
    if ctx.resume is not None:
        q_table[:] = ctx.resume.shared()["q_table"]
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
    sync_buffer = np.zeros(2 * size + 3, dtype=np.float64)
    delta = sync_buffer[:size].reshape(q_table.shape)  # views into the one buffer
    visited = sync_buffer[size : 2 * size].reshape(q_table.shape)
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interval = cfg.run.checkpoint_interval_env_steps
    start_steps = global_steps_after(first_step - 1) if first_step else segment.start_env_steps
    next_checkpoint = (start_steps // interval + 1) * interval if interval > 0 else None
    interrupted = False

    for t in range(first_step, vector_steps):
        n = min(num_envs, budget - env_steps)
        if n > 0:
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
        np.subtract(q_table, q_sync, out=delta)
        sync_buffer[_LOG:] = ctx.sync_flags(reporter)
        allreduce_sum(comm, sync_buffer, watchdog)
        q_sync += delta / np.maximum(visited, 1.0)
        q_table[:] = q_sync
        visited[:] = 0.0
        syncs += 1
        global_steps = global_steps_after(t)
        interrupted = sync_buffer[_STOP] > 0 and not last
        by_steps = next_checkpoint is not None and global_steps >= next_checkpoint
        checkpoint = last or interrupted or by_steps or sync_buffer[_CHECKPOINT] > 0
        if sync_buffer[_LOG] > 0 or checkpoint:
            exploration = policy.exploration_value(segment.progress(env_steps, max(budget, 1)))
            gather_and_log(
                ctx, reporter, episodes, global_steps, {"syncs": syncs, "exploration": exploration}
            )
        if checkpoint:
            recorder.flush()
            state = rank_state(rng, stepper, env_steps, learner.learner_updates, recorder.rows)
            states = gather_rank_states(ctx, state)
            if ctx.rank == 0:
                save_q_table(
                    ctx,
                    q_table,
                    global_steps,
                    learner.learner_updates,
                    syncs,
                    {k: int(s["counters"][2]) for k, s in states.items()},
                    states,
                    {"vector_step": t, "syncs": syncs},
                )
            if interval > 0:
                next_checkpoint = (global_steps // interval + 1) * interval
        if interrupted:
            break

    stepper.close()
    link_trajectories(ctx, recorder.close())
    if reporter is not None:
        reporter.close()
    return LoopResult(q_table, interrupted)
