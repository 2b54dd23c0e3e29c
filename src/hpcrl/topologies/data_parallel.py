"""The `data_parallel` layout for deep learners (DD-PPO, A2C, DQN): every rank steps its
own vector of envs and learns; every gradient step averages the gradients of all ranks with one flat
`Allreduce`, so every rank takes the identical optimizer step and the parameters stay
bit-identical (checked every `check_sync_every` updates).

Budget: while a full update (the learner's `rollout_steps` × `num_envs` × world env steps)
still fits in the run's budget, every rank collects a rollout and updates. A rollout is
`rollout_steps` vector steps, or fewer for a straggler cut short (DD-PPO's `sync_frac`,
`hpcrl.comm.straggler`); the env steps of each rollout are summed over the ranks, so every
rank knows the global count and takes the same decisions. What is left after the last
update (less than one update) is split over the ranks and taken without learning, so the
run ends exactly at its budget.

After each update one small `Allreduce` of votes (`Vote`) decides, for all ranks together, whether
to log (rank 0's clock), checkpoint (env-step or wall-time interval) and stop (a preemption
signal on any rank). Checkpoints are taken only there, between rollouts, so they hold the
parameters, the optimizer state, every rank's RNG and env state, and the counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from hpcrl.algos import make_learner
from hpcrl.comm.gradients import (
    FlatGradients,
    broadcast_parameters,
    check_parameters_in_sync,
    global_mean_std,
    parameters_digest,
)
from hpcrl.comm.straggler import StragglerCutoff
from hpcrl.comm.waits import allreduce_sum, gather_rows
from hpcrl.contracts import DataParallelLearner, LoopResult
from hpcrl.errors import ConfigError
from hpcrl.models import select_device
from hpcrl.topologies.checkpointing import (
    gather_rank_states,
    rank_state,
    restore_rank_state,
    save_checkpoint,
)
from hpcrl.topologies.collective_eval import LearnerGreedy
from hpcrl.topologies.deep import DeepTopology
from hpcrl.topologies.recording import TrajectoryRecorder, link_trajectories
from hpcrl.topologies.reporting import EpisodeRows, Reporter, flush_episodes, gather_and_log
from hpcrl.topologies.run_context import RunContext
from hpcrl.topologies.segments import split_budget
from hpcrl.topologies.sync_points import Vote, vote_buffer


@dataclass
class DataParallelConfig:
    """Settings of the `data_parallel` layout (an algorithm may change the defaults:
    PPO's `sync_frac` is DD-PPO's 0.6)."""

    # DD-PPO's preemption threshold (Wijmans et al. 2020, §3): once this fraction of the
    # ranks has a full rollout, the others stop collecting (after at least 25% of theirs);
    # 1 turns it off (lockstep: a run is then bit-reproducible for a seed and world size).
    sync_frac: float = 1.0
    check_sync_every: int = 100  # updates between parameter-consistency checks (0: never)

    def validate(self) -> None:
        if not 0.0 < self.sync_frac <= 1.0:
            raise ConfigError(
                f"config key 'sync_frac': got {self.sync_frac!r}, expected a fraction of the "
                "ranks in (0, 1]"
            )
        if self.check_sync_every < 0:
            raise ConfigError(
                f"config key 'check_sync_every': got {self.check_sync_every!r}, expected an "
                "integer >= 0"
            )


class GradientAllreduce(DeepTopology):
    """Every rank acts and learns; gradients averaged with one `Allreduce` per step."""

    name = "data_parallel"
    Config = DataParallelConfig
    ROLES = "ranks 0-{last} each act and learn, gradients averaged"

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Also raises ConfigError when the global batch does not split over the ranks, or
        the budget is smaller than one update's batch (the run would never learn)."""
        super().check_env(env, world_size, shapes)
        run = self.cfg.run
        first = self.cfg.algo.first_update_env_steps(world_size, run.num_envs)
        if run.total_env_steps < first:
            raise ConfigError(
                f"config key 'total_env_steps': got {run.total_env_steps}, expected at least "
                f"{first}: the first update comes after {first} env steps (one update's "
                f"batch over {world_size} ranks x {run.num_envs} env copies, after any "
                "learning_starts), so a smaller budget trains nothing"
            )

    def run(self, ctx: RunContext) -> LoopResult:
        """Every rank returns the learner (all hold the same parameters)."""
        learner, interrupted = _run(ctx)
        return LoopResult(interrupted, LearnerGreedy(learner))


TOPOLOGY = GradientAllreduce


class DataParallel:
    """What a data-parallel learner may ask of the other ranks (and nothing else)."""

    def __init__(self, comm, model: torch.nn.Module, watchdog_s: float):
        self.comm = comm
        self.watchdog_s = watchdog_s
        self.gradients = FlatGradients(list(model.parameters()))

    def average_gradients(self) -> None:
        """Every `p.grad` becomes its mean over the ranks (one `Allreduce`)."""
        self.gradients.average(self.comm, self.watchdog_s)

    def clip_gradients(self, max_norm: float) -> None:
        """Scale the averaged gradient to a global L2 norm of at most `max_norm`."""
        self.gradients.clip(max_norm)

    def sum(self, buffer: np.ndarray) -> None:
        """Sum `buffer` over every rank, in place (one `Allreduce`)."""
        allreduce_sum(self.comm, buffer, self.watchdog_s)

    def mean_std(self, values: np.ndarray) -> tuple[float, float]:
        """Mean and std of `values` pooled over every rank."""
        return global_mean_std(self.comm, values, self.watchdog_s)


def _run(ctx: RunContext) -> tuple[DataParallelLearner, bool]:
    """The whole loop on every rank; returns the learner and whether a preemption signal
    stopped the run."""
    comm, cfg, watchdog = ctx.comm, ctx.cfg, ctx.watchdog_s
    num_envs, world = cfg.run.num_envs, ctx.world_size
    torch.set_num_threads(cfg.run.torch_threads)
    segment = ctx.segment
    total = segment.total_env_steps
    rng, env_seed = ctx.rank_seeds()
    torch.manual_seed(int(rng.integers(2**62)))  # this rank's sampling stream
    stepper = ctx.make_stepper()
    learner = make_learner(
        cfg, ctx.observation_space, ctx.action_space, world, int(rng.integers(2**62))
    )
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks of this node
    learner.to(select_device(cfg.run.device, local.Get_rank()))
    local.Free()
    rollout = learner.rollout_steps  # vector steps of a full rollout on each rank
    update_env_steps = rollout * num_envs * world  # env steps of a full update, all ranks

    env_steps, global_steps = 0, segment.start_env_steps  # this rank's (segment), all ranks'
    if ctx.resume is not None:
        learner.load_shared(ctx.resume.shared())
        learner.learner_updates = int(ctx.resume.meta["learner_updates"])
        state = ctx.resume.rank_state(ctx.rank)
        if state:  # the same segment continues: every rank's own state is in the checkpoint
            env_steps, _ = restore_rank_state(state, rng, stepper, env_seed + 1)
            learner.load_rank(state)
            global_steps = int(ctx.resume.meta["env_steps"])
    for module in learner.synced_modules():  # identical start on every rank
        broadcast_parameters(comm, module, watchdog)
    dp = DataParallel(comm, learner.model, watchdog)
    cutoff = StragglerCutoff(comm, cfg.topology.sync_frac, rollout)
    loop = _Loop(ctx, learner, stepper, TrajectoryRecorder(ctx), EpisodeRows(), env_steps)
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    votes = vote_buffer()
    counts = np.zeros(2, dtype=np.float64)  # env steps of this rollout, ranks cut short
    interrupted, cut_rollouts = False, 0
    check_every = cfg.topology.check_sync_every

    while global_steps + update_env_steps <= total:  # a full update still fits in the budget
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
        allreduce_sum(comm, ctx.vote(votes, reporter, loop.episodes.pending), watchdog)
        last_update = global_steps + update_env_steps > total
        interrupted = votes[Vote.STOP] > 0 and not last_update
        by_steps = ctx.clock.due_by_env_steps(global_steps)
        checkpoint = interrupted or by_steps or votes[Vote.CHECKPOINT] > 0
        if votes[Vote.LOG] > 0 or checkpoint:
            if cutoff.active:
                metrics["cut_rollouts"] = cut_rollouts
                cut_rollouts = 0
            _report(ctx, reporter, loop.episodes, global_steps, metrics, learner)
        else:
            flush_episodes(ctx, reporter, loop.episodes, votes)
        if checkpoint:
            _checkpoint(ctx, learner, rng, loop, global_steps)
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
    # Every rank's digest, for the record (tests and users can read them in run.h5); also
    # when the run stops early (a signal, or `stop_at_return`).
    digests = gather_rows(
        comm, np.array([parameters_digest(learner.model)], dtype=np.int64), 0, watchdog
    )
    if ctx.rank == 0:
        ctx.run_file.set_attrs(parameter_digests=digests)
    if not interrupted:
        _report(ctx, reporter, loop.episodes, global_steps, {}, learner)
        _checkpoint(ctx, learner, rng, loop, global_steps, envs=False)  # budget spent
    loop.stepper.close()
    link_trajectories(ctx, loop.recorder.close())
    if reporter is not None:
        reporter.close()
    return learner, interrupted


class _Loop:
    """One rank's acting half: steps the env copies with the learner's actions and records
    the transitions and finished episodes."""

    def __init__(self, ctx, learner, stepper, recorder, episodes, env_steps: int):
        self.ctx, self.learner, self.stepper = ctx, learner, stepper
        self.recorder, self.episodes = recorder, episodes
        self.env_steps = env_steps  # this rank's, in this segment
        self.delay_s = ctx.slow_step_s()

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


def _check_in_sync(comm, learner, watchdog_s: float) -> None:
    """Collective: the networks of `synced_modules()` are bit-identical on every rank (one
    small `Allreduce` each; raises `ParametersOutOfSync` naming the ranks)."""
    for module in learner.synced_modules():
        check_parameters_in_sync(comm, module, watchdog_s)


def _report(ctx, reporter, episodes, global_steps, metrics, learner) -> None:
    """Collective: episodes and a metrics row (with the learner's losses) to run.h5."""
    extra = {"learner_updates": int(learner.learner_updates)}
    extra.update({k: float(v) for k, v in metrics.items()})
    gather_and_log(ctx, reporter, episodes, global_steps, extra)


def _checkpoint(ctx, learner, rng, loop: _Loop, global_steps: int, envs: bool = True) -> None:
    """Collective: every rank's state to rank 0, which writes one checkpoint (without the
    env copies' states when `envs` is False: the budget is spent)."""
    loop.recorder.flush()
    state = rank_state(
        rng, loop.stepper, loop.env_steps, learner.learner_updates, loop.recorder.rows, envs
    )
    state |= learner.rank_arrays()
    states = gather_rank_states(ctx, state)
    if ctx.rank == 0:
        save_checkpoint(
            ctx,
            learner.shared_arrays(),
            global_steps,
            learner.learner_updates,
            learner.learner_updates,
            {k: int(s["counters"][2]) for k, s in states.items()},
            states,
        )
    ctx.clock.written(global_steps)
