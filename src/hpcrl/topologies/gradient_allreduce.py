"""Data-parallel loop for deep learners (DD-PPO, A2C, DQN): every rank steps its own vector
of envs and learns; every gradient step averages the gradients of all ranks with one flat
`Allreduce`, so every rank takes the identical optimizer step and the parameters stay
bit-identical (checked every `check_sync_every` updates).

Budget: while a full update (`batch_size` env steps, all ranks) still fits in the run's
budget, every rank collects a rollout and updates. A rollout is `batch_size / (world ×
num_envs)` vector steps, or fewer for a straggler cut short (DD-PPO's `sync_frac`,
`hpcrl.comm.straggler`); the env steps of each rollout are summed over the ranks, so every
rank knows the global count and takes the same decisions. What is left after the last
update (less than one update) is split over the ranks and taken without learning, so the
run ends exactly at its budget.

After each update one small `Allreduce` of flags decides, for all ranks together, whether
to log (rank 0's clock), checkpoint (env-step or wall-time interval) and stop (a preemption
signal on any rank). Checkpoints are taken only there, between rollouts, so they hold the
parameters, the optimizer state, every rank's RNG and env state, and the counters.
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcrl.comm.gradients import (
    FlatGradients,
    broadcast_parameters,
    check_parameters_in_sync,
    global_mean_std,
    parameters_digest,
)
from hpcrl.comm.straggler import StragglerCutoff
from hpcrl.comm.waits import allreduce_sum, gather_rows
from hpcrl.config import ALGOS
from hpcrl.models import select_device
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
    split_budget,
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

    def sum(self, buffer: np.ndarray) -> None:
        """Sum `buffer` over every rank, in place (one `Allreduce`)."""
        allreduce_sum(self.comm, buffer, self.watchdog_s)

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
    num_envs, world = cfg.run.num_envs, ctx.world_size
    torch.set_num_threads(cfg.run.torch_threads)
    ctx.probe_spaces()  # the trajectory fields
    segment = ctx.start_segment(world, range(world))
    total = segment.total_env_steps
    rng, env_seed = ctx.rank_seeds()
    torch.manual_seed(int(rng.integers(2**62)))  # this rank's sampling stream
    stepper = ctx.make_stepper()
    learner = make_learner(
        ctx,
        stepper.envs.single_observation_space,
        stepper.envs.single_action_space,
        int(rng.integers(2**62)),
    )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks of this node
    learner.to(select_device(cfg.run.device, local.Get_rank()))
    local.Free()
    rollout = learner.rollout_steps  # vector steps of a full rollout on each rank
    batch_size = rollout * num_envs * world  # env steps of a full update, all ranks

    env_steps, global_steps = 0, segment.start_env_steps  # this rank's (segment), all ranks'
    if ctx.resume is not None:
        learner.load_shared(ctx.resume.shared())
        learner.learner_updates = int(ctx.resume.meta["learner_updates"])
        state = ctx.resume.rank_state(ctx.rank)
        if state:  # the same segment continues: every rank's own state is in the checkpoint
            env_steps, _ = restore_rank_state(state, rng, stepper, env_seed + 1)
            learner.load_rank(state)
            global_steps = int(ctx.resume.meta["env_steps"])
    for module in _synced_modules(learner):  # identical start on every rank
        broadcast_parameters(comm, module, watchdog)
    dp = DataParallel(comm, learner.model, watchdog)
    cutoff = StragglerCutoff(comm, getattr(cfg.algo, "sync_frac", 1.0), rollout)
    loop = _Loop(ctx, learner, stepper, TrajectoryRecorder(ctx), EpisodeRows(), env_steps)
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interval = cfg.run.checkpoint_interval_env_steps
    next_checkpoint = (global_steps // interval + 1) * interval if interval > 0 else None
    flags = np.zeros(3, dtype=np.float64)
    counts = np.zeros(2, dtype=np.float64)  # env steps of this rollout, ranks cut short
    interrupted, cut_rollouts = False, 0
    check_every = getattr(cfg.algo, "check_sync_every", 0)

    while global_steps + batch_size <= total:  # a full update still fits in the budget
        steps = 0
        while steps < rollout:
            loop.step(num_envs, global_steps + steps * num_envs * world, total)
            steps += 1
            if steps < rollout and cutoff.should_stop(steps):
                break
        cutoff.finish()
        counts[:] = (steps * num_envs, float(steps < rollout))
        if cutoff.active:
            allreduce_sum(comm, counts, watchdog)
        else:
            counts *= world  # every rank took the full rollout
        global_steps += int(counts[0])
        cut_rollouts += int(counts[1])
        metrics = learner.update(dp, min(1.0, global_steps / total))
        if check_every and learner.learner_updates % check_every == 0:
            _check_in_sync(comm, learner, watchdog)
        flags[:] = ctx.sync_flags(reporter)
        allreduce_sum(comm, flags, watchdog)
        last_update = global_steps + batch_size > total
        interrupted = flags[_STOP] > 0 and not last_update
        by_steps = next_checkpoint is not None and global_steps >= next_checkpoint
        checkpoint = interrupted or by_steps or flags[_CHECKPOINT] > 0
        if flags[_LOG] > 0 or checkpoint:
            if cutoff.active:
                metrics["cut_rollouts"] = cut_rollouts
                cut_rollouts = 0
            _report(ctx, reporter, loop.episodes, global_steps, metrics, learner)
        if checkpoint:
            _checkpoint(ctx, learner, rng, loop, global_steps)
            if interval > 0:
                next_checkpoint = (global_steps // interval + 1) * interval
        if interrupted:
            break
    cutoff.close()

    if not interrupted:
        # The tail: what is left of the budget (less than one update), split over the ranks
        # and taken without learning, so the run ends exactly at its budget.
        shares = split_budget(total - global_steps, world)
        left = shares[ctx.rank]
        for k in range(-(-max(shares) // num_envs)):
            n = min(num_envs, left)
            if n > 0:
                after = global_steps + sum(min(s, (k + 1) * num_envs) for s in shares)
                loop.step(n, global_steps + sum(min(s, k * num_envs) for s in shares), total, after)
                left -= n
        global_steps = total
        _check_in_sync(comm, learner, watchdog)
        # Every rank's digest, for the record (tests and users can read them in run.h5).
        digests = gather_rows(
            comm, np.array([parameters_digest(learner.model)], dtype=np.int64), 0, watchdog
        )
        if ctx.rank == 0:
            ctx.run_file.set_attrs(parameter_digests=digests)
        _report(ctx, reporter, loop.episodes, global_steps, {}, learner)
        _checkpoint(ctx, learner, rng, loop, global_steps)
    loop.stepper.close()
    link_trajectories(ctx, loop.recorder.close())
    if reporter is not None:
        reporter.close()
    return LoopResult(None, interrupted, learner)


class _Loop:
    """One rank's acting half: steps the env copies with the learner's actions and records
    the transitions and finished episodes."""

    def __init__(self, ctx, learner, stepper, recorder, episodes, env_steps: int):
        self.ctx, self.learner, self.stepper = ctx, learner, stepper
        self.recorder, self.episodes = recorder, episodes
        self.env_steps = env_steps  # this rank's, in this segment
        debug = ctx.cfg.run.debug
        self.delay_s = debug.slow_step_s if ctx.rank == debug.slow_rank else 0.0

    def step(self, n: int, global_before: int, total: int, global_after: int | None = None):
        """One vector step of which the first `n` copies count (`n` < num_envs only at the
        very end of the budget). `global_before`/`global_after`: the run's env steps before
        and after this vector step, for the schedules and the episode rows (`after`
        defaults to `before` plus one vector step on every rank)."""
        ctx, learner = self.ctx, self.learner
        ctx.maybe_fail(self.env_steps)
        if self.delay_s:
            time.sleep(self.delay_s)  # test-only straggler (`debug.slow_rank`)
        if global_after is None:
            global_after = global_before + ctx.cfg.run.num_envs * ctx.world_size
        actions = learner.act(self.stepper.obs, global_before / total)
        batch = self.stepper.step(actions)
        learner.observe(batch.rewards, batch.terminated, batch.truncated, batch.next_obs)
        self.recorder.record(batch, n)
        self.env_steps += n
        self.episodes.add_finished(batch, n, min(global_after, total), ctx.elapsed_s(), ctx.rank)


def _synced_modules(learner) -> list[torch.nn.Module]:
    """The networks every rank holds identically: the model, and DQN's target network."""
    target = getattr(learner, "target", None)
    return [learner.model] if target is None else [learner.model, target]


def _check_in_sync(comm, learner, watchdog_s: float) -> None:
    """Collective: the networks of `_synced_modules` are bit-identical on every rank (one
    small `Allreduce` each; raises `ParametersOutOfSync` naming the ranks)."""
    for module in _synced_modules(learner):
        check_parameters_in_sync(comm, module, watchdog_s)


def _report(ctx, reporter, episodes, global_steps, metrics, learner) -> None:
    """Collective: episodes and a metrics row (with the learner's losses) to run.h5."""
    extra = {"learner_updates": int(learner.learner_updates)}
    extra.update({k: float(v) for k, v in metrics.items()})
    gather_and_log(ctx, reporter, episodes, global_steps, extra)


def _checkpoint(ctx, learner, rng, loop: _Loop, global_steps: int) -> None:
    """Collective: every rank's state to rank 0, which writes one checkpoint."""
    loop.recorder.flush()
    state = rank_state(
        rng, loop.stepper, loop.env_steps, learner.learner_updates, loop.recorder.rows
    )
    state |= learner.rank_arrays()
    states = gather_rank_states(ctx, state)
    if ctx.rank != 0:
        return
    save_checkpoint(
        ctx,
        learner.shared_arrays(),
        global_steps,
        learner.learner_updates,
        learner.learner_updates,
        {k: int(s["counters"][2]) for k, s in states.items()},
        states,
    )
