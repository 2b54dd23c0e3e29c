"""Data-parallel loop for deep learners (DD-PPO, A2C, DQN): every rank steps its own vector
of envs and learns; every gradient step averages the gradients of all ranks with one flat
`Allreduce`, so every rank takes the identical optimizer step and the parameters stay
bit-identical (checked every `check_sync_every` updates).

Budget: the run's env steps are split over the ranks (`Segment`). The first
`U = (budget left) // batch_size` rollouts end in an update on every rank (the same vector
step everywhere, so the collectives inside `update` match); the steps after the last full
rollout are taken and recorded without an update, so the run ends exactly at its budget.

After each update one small `Allreduce` of flags decides, for all ranks together, whether
to log (rank 0's clock), checkpoint (env-step or wall-time interval) and stop (a preemption
signal on any rank). Checkpoints are taken only there, between rollouts, so they hold the
parameters, the optimizer state, every rank's RNG and env state, and the counters.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from hpcrl.comm.gradients import (
    FlatGradients,
    broadcast_parameters,
    check_parameters_in_sync,
    global_mean_std,
    parameters_digest,
)
from hpcrl.comm.waits import allreduce_sum, gather_rows
from hpcrl.config import ALGOS
from hpcrl.envs import make_env
from hpcrl.storage.trajectories import space_fields
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
    save_checkpoint,
)

_LOG, _CHECKPOINT, _STOP = range(3)


class DataParallel:
    """What a data-parallel learner may ask of the other ranks (and nothing else)."""

    def __init__(self, comm, model: torch.nn.Module, watchdog_s: float):
        self.comm = comm
        self.watchdog_s = watchdog_s
        self.gradients = FlatGradients(list(model.parameters()))

    def average_gradients(self) -> None:
        """Every `p.grad` becomes its mean over the ranks (one `Allreduce`)."""
        self.gradients.average(self.comm, self.watchdog_s)

    def mean_std(self, values: np.ndarray) -> tuple[float, float]:
        """Mean and std of `values` pooled over every rank."""
        return global_mean_std(self.comm, values, self.watchdog_s)


def make_learner(ctx: RunContext, observation_space, action_space, seed: int):
    """The algorithm module's learner for this rank (its class is named in `LEARNER`)."""
    module = importlib.import_module(ALGOS[ctx.cfg.run.algo])
    learner_cls = getattr(module, module.LEARNER)
    return learner_cls(
        ctx.cfg.algo, observation_space, action_space, ctx.cfg.run.num_envs, ctx.world_size, seed
    )


def run_gradient_allreduce(ctx: RunContext) -> LoopResult:
    """Run the whole data-parallel layout on every rank; returns the learner in
    `LoopResult.learner` (every rank holds the same parameters)."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    num_envs = cfg.run.num_envs
    torch.set_num_threads(cfg.run.torch_threads)
    probe = make_env(cfg.run.env_id, cfg.run.env_kwargs)
    ctx.traj_fields = space_fields(probe.observation_space, probe.action_space)
    probe.close()
    segment = ctx.start_segment(ctx.world_size, range(ctx.world_size))
    budgets = np.array(segment.budgets(), dtype=np.int64)
    budget = int(budgets[ctx.rank])
    rng, env_seed = ctx.rank_seeds()
    torch.manual_seed(int(rng.integers(2**62)))  # this rank's sampling stream
    stepper = ctx.make_stepper()
    envs = stepper.envs
    learner = make_learner(
        ctx, envs.single_observation_space, envs.single_action_space, int(rng.integers(2**62))
    )
    rollout = learner.rollout_steps
    batch_size = rollout * num_envs * ctx.world_size
    updates_total = (segment.total_env_steps - segment.start_env_steps) // batch_size
    vector_steps = max(1, -(-int(budgets.max()) // num_envs))

    def global_steps_after(t: int) -> int:
        return segment.start_env_steps + int(np.minimum(budgets, (t + 1) * num_envs).sum())

    env_steps, first_step, updates_start = 0, 0, 0  # updates_start: before this segment
    if ctx.resume is not None:
        learner.load_shared(ctx.resume.shared())
        learner.learner_updates = int(ctx.resume.meta["learner_updates"])
        updates_start = learner.learner_updates
        state = ctx.resume.rank_state(ctx.rank)
        if state:
            env_steps, _ = restore_rank_state(state, rng, stepper, env_seed + 1)
            learner.load_rank(state)
            first_step = int(ctx.resume.meta["vector_step"]) + 1
            updates_start = int(ctx.resume.meta["segment_updates_start"])
    broadcast_parameters(comm, learner.model, watchdog)  # identical start on every rank
    dp = DataParallel(comm, learner.model, watchdog)
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interval = cfg.run.checkpoint_interval_env_steps
    start_steps = global_steps_after(first_step - 1) if first_step else segment.start_env_steps
    next_checkpoint = (start_steps // interval + 1) * interval if interval > 0 else None
    flags = np.zeros(3, dtype=np.float64)
    interrupted = False
    check_every = getattr(cfg.algo, "check_sync_every", 0)

    for t in range(first_step, vector_steps):
        n = min(num_envs, budget - env_steps)
        if n <= 0:
            continue  # only in the tail after the last update: no collective there
        ctx.maybe_fail(env_steps)
        actions = learner.act(stepper.obs, global_steps_after(t - 1) / segment.total_env_steps)
        batch = stepper.step(actions)
        learner.observe(batch.rewards, batch.terminated, batch.truncated, batch.next_obs)
        recorder.record(batch, n)
        env_steps += n
        episodes.add_finished(batch, n, global_steps_after(t), ctx.elapsed_s(), ctx.rank)
        if (t + 1) % rollout or learner.learner_updates - updates_start >= updates_total:
            continue
        progress = min(1.0, global_steps_after(t) / segment.total_env_steps)
        metrics = learner.update(dp, progress)
        if check_every and learner.learner_updates % check_every == 0:
            check_parameters_in_sync(comm, learner.model, watchdog)
        global_steps = global_steps_after(t)
        flags[:] = ctx.sync_flags(reporter)
        allreduce_sum(comm, flags, watchdog)
        last_update = learner.learner_updates - updates_start >= updates_total
        interrupted = flags[_STOP] > 0 and not last_update
        by_steps = next_checkpoint is not None and global_steps >= next_checkpoint
        checkpoint = interrupted or by_steps or flags[_CHECKPOINT] > 0
        if flags[_LOG] > 0 or checkpoint:
            _report(ctx, reporter, episodes, global_steps, metrics, learner)
        if checkpoint:
            _checkpoint(
                ctx, learner, rng, stepper, recorder, env_steps, global_steps, t, updates_start
            )
            if interval > 0:
                next_checkpoint = (global_steps // interval + 1) * interval
        if interrupted:
            break

    if not interrupted:
        check_parameters_in_sync(comm, learner.model, watchdog)
        # Every rank's digest, for the record (tests and users can read them in run.h5).
        digests = gather_rows(
            comm, np.array([parameters_digest(learner.model)], dtype=np.int64), 0, watchdog
        )
        if ctx.rank == 0:
            ctx.run_file.set_attrs(parameter_digests=digests)
        _report(ctx, reporter, episodes, global_steps_after(vector_steps - 1), {}, learner)
        _checkpoint(
            ctx,
            learner,
            rng,
            stepper,
            recorder,
            env_steps,
            global_steps_after(vector_steps - 1),
            vector_steps - 1,
            updates_start,
        )
    stepper.close()
    link_trajectories(ctx, recorder.close())
    if reporter is not None:
        reporter.close()
    return LoopResult(None, interrupted, learner)


def _report(ctx, reporter, episodes, global_steps, metrics, learner) -> None:
    """Collective: episodes and a metrics row (with the learner's losses) to run.h5."""
    extra = {"learner_updates": int(learner.learner_updates)}
    extra.update({k: float(v) for k, v in metrics.items()})
    gather_and_log(ctx, reporter, episodes, global_steps, extra)


def _checkpoint(
    ctx, learner, rng, stepper, recorder, env_steps, global_steps, t, updates_start
) -> None:
    """Collective: every rank's state to rank 0, which writes one checkpoint."""
    recorder.flush()
    state = rank_state(rng, stepper, env_steps, learner.learner_updates, recorder.rows)
    state |= learner.rank_arrays()
    states = gather_rank_states(ctx, state)
    if ctx.rank != 0:
        return
    shared = learner.shared_arrays()
    save_checkpoint(
        ctx,
        shared,
        global_steps,
        learner.learner_updates,
        learner.learner_updates,
        {k: int(s["counters"][2]) for k, s in states.items()},
        states,
        {"vector_step": t, "segment_updates_start": updates_start},
    )
