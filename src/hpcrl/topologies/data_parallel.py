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
"""

from __future__ import annotations

import numpy as np

from hpcrl.algos.qlearning import QLearningLearner, QLearningPolicy
from hpcrl.comm.waits import allreduce_sum, gather_rows
from hpcrl.topologies.context import (
    EPISODE_COLUMNS,
    EpisodeRows,
    Reporter,
    RunContext,
    TrajectoryRecorder,
    link_trajectories,
    save_q_table,
    split_budget,
)


def run_allreduce(ctx: RunContext) -> np.ndarray:
    """Run the whole `allreduce` layout; returns the final Q-table (the same on every rank)."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    num_envs, sync_interval = cfg.run.num_envs, cfg.algo.sync_interval
    budgets = np.array(split_budget(cfg.run.total_env_steps, ctx.world_size), dtype=np.int64)
    budget = int(budgets[ctx.rank])
    vector_steps = max(1, -(-int(budgets.max()) // num_envs))  # the same on every rank

    def global_steps_after(t: int) -> int:
        """Env steps of all ranks after vector step t (ranks step in lockstep)."""
        return int(np.minimum(budgets, (t + 1) * num_envs).sum())

    rng, _ = ctx.rank_seeds()
    policy = QLearningPolicy(cfg.algo, rng)
    learner = QLearningLearner(cfg.algo, ctx.n_states, ctx.n_actions)
    q_table = learner.q_table
    q_sync = q_table.copy()
    size = q_table.size
    sync_buffer = np.zeros(2 * size + 1, dtype=np.float64)
    delta = sync_buffer[:size].reshape(q_table.shape)  # views into the one buffer
    visited = sync_buffer[size : 2 * size].reshape(q_table.shape)
    stepper = ctx.make_stepper()
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interval = cfg.run.checkpoint_interval_env_steps
    next_checkpoint = interval if interval > 0 else None
    syncs = 0
    env_steps = 0  # this rank's

    for t in range(vector_steps):
        n = min(num_envs, budget - env_steps)
        if n > 0:
            ctx.maybe_fail(env_steps)
            progress = env_steps / budget
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
            counted = batch.done_envs < n
            if counted.any():
                episodes.add(
                    batch.episode_returns[counted],
                    batch.episode_lengths[counted],
                    global_steps_after(t),
                    ctx.elapsed_s(),
                    ctx.rank,
                )
        last = t == vector_steps - 1
        if (t + 1) % sync_interval and not last:
            continue
        # --- sync: one Allreduce of [ΔQ | visited | log flag] ---
        np.subtract(q_table, q_sync, out=delta)
        sync_buffer[-1] = 1.0 if (reporter is not None and reporter.due()) else 0.0
        allreduce_sum(comm, sync_buffer, watchdog)
        q_sync += delta / np.maximum(visited, 1.0)
        q_table[:] = q_sync
        visited[:] = 0.0
        syncs += 1
        global_steps = global_steps_after(t)
        if sync_buffer[-1] > 0 or last:
            rows = gather_rows(comm, episodes.take().reshape(-1), 0, watchdog)
            if reporter is not None:
                rows = rows.reshape(-1, len(EPISODE_COLUMNS))
                # Stable sort by env steps: rank order, then env copy, within one step.
                reporter.add_episodes(rows[np.argsort(rows[:, 2], kind="stable")])
                reporter.log(
                    global_steps,
                    {
                        "syncs": syncs,
                        "exploration": policy.exploration_value(env_steps / max(budget, 1)),
                    },
                )
        if next_checkpoint is not None and global_steps >= next_checkpoint and not last:
            if ctx.rank == 0:
                save_q_table(ctx, q_table, global_steps, learner.learner_updates, syncs)
            next_checkpoint = (global_steps // interval + 1) * interval

    stepper.close()
    link_trajectories(ctx, recorder.close())
    if ctx.rank == 0:
        save_q_table(ctx, q_table, int(budgets.sum()), learner.learner_updates, syncs)
        reporter.close()
    return q_table
