"""The `async` layout: asynchronous one-step and n-step tabular Q-learning (Mnih et al. 2016,
"Asynchronous Methods for Deep Reinforcement Learning", Algorithm 1 and the n-step
variant, Algorithm S2, in tabular form). Every rank holds a whole Q-table, acts on it, and
updates it on its own experience at once: every `n_step` vector steps (1: one-step
Q-learning) towards the n-step returns of that rollout,

    R_i = r_i + γ r_{i+1} + ... + γ^{k} max_a Q(s_{i+k+1}, a)   (no bootstrap past
    `terminated`; a bootstrap from the final observation past `truncated`),

computed by `hpcrl.returns.n_step_returns` on the rank's own table, each pair moved once
per rollout towards the mean of its returns (`TabularLearner.update_towards`). A return
is cut at an exploratory action (Watkins 1989; Sutton & Barto 2018, section 12.10): it
bootstraps with max_a Q(s, a) at the state where a non-greedy action was taken instead of
running through it, so the returns estimate Q* and not the values of the ε-greedy
behaviour (uncut, n-step Q-learning on CliffWalking learns the safe path, 28% below the
optimum). Mnih et al. do not cut; with n_step 1 the two are the same. The ranks
merge what they learned every `sync_interval` vector steps without blocking their acting:

    sync point j:   wait for merge j-1 (an `Iallreduce` started at sync point j-1, which
                    the rank overlapped with its last `sync_interval` vector steps) and
                    apply it; decide logs, checkpoints and a stop from the votes it
                    carried; start merge j: `Iallreduce` of [ΔQ | visited | votes], with
                    ΔQ = Q_local - Q_base the rank's changes since merge j-1 started.

Applying a merge: Q_base += ΣΔQ / max(1, Σ visited) (each entry moves by the mean change
of the ranks that updated it, as in `allreduce`), and Q_local moves by the same amount
less its own ΔQ, so the updates a rank made while the merge was in flight stay in its
table and go into the next merge. Every rank applies the same arithmetic to the same
reduced buffer at the same vector step, so the run is deterministic for a fixed seed and
world size even though the merges are overlapped; the tables agree exactly after the last,
blocking, merge. A preemption signal is acted on at the sync point after the one that
carried it. `sync_interval` must be a multiple of `n_step`, so a sync point never falls
inside a rollout; a checkpoint holds Q_base, and each rank's Q_local and visited flags.

Exploration: every rank follows the configured ε (or τ) schedule with its own random
stream; Mnih et al. also drew a different final ε per thread, which this layout does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpcrl.algos import make_learner
from hpcrl.algos.tabular import row_max, table_rows
from hpcrl.comm.waits import wait_all
from hpcrl.contracts import LoopResult
from hpcrl.errors import ConfigError
from hpcrl.returns import n_step_returns
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
class AsyncConfig(TabularConfig):
    """Settings of the `async` layout: `sync_interval` is the vector steps between two
    merges of the tables (a multiple of the algorithm's `n_step`)."""


class AsyncTabular(TabularTopology):
    """Every rank learns on its own table at once; tables merged by overlapped Iallreduce."""

    name = "async"
    Config = AsyncConfig
    ROLES = "ranks 0-{last} each act and learn on their own table, merged asynchronously"
    multi_step = True

    def check_env(self, env, world_size: int, shapes: dict) -> None:
        """Raises:
        UserError: as `TabularTopology.check_env`.
        ConfigError: `sync_interval` not a multiple of `n_step`."""
        super().check_env(env, world_size, shapes)
        n_step, sync_interval = self.cfg.algo.n_step, self.cfg.topology.sync_interval
        if sync_interval % n_step:
            raise ConfigError(
                f"config key 'sync_interval': got {sync_interval}, expected a multiple of "
                f"n_step={n_step} (layout async merges between two rollouts)"
            )

    def run(self, ctx: RunContext) -> LoopResult:
        q_table, interrupted = _run(ctx)
        return LoopResult(interrupted, TableGreedy(q_table))


TOPOLOGY = AsyncTabular


class _Merges:
    """The overlapped merges of one rank's table with the others' (see the module doc)."""

    def __init__(self, ctx: RunContext, q_local: np.ndarray, q_base: np.ndarray):
        self.ctx, self.q_local, self.q_base = ctx, q_local, q_base
        size = q_local.size
        self.send = np.zeros(2 * size + len(Vote), dtype=np.float64)
        self.received = np.zeros_like(self.send)
        self.visited = np.zeros(q_local.shape, dtype=bool)  # since the last merge started
        self.request = None

    def start(self, votes: np.ndarray) -> None:
        """Send [ΔQ | visited | votes] (non-blocking); the rank goes on acting."""
        size = self.q_local.size
        np.subtract(self.q_local, self.q_base, out=self.send[:size].reshape(self.q_local.shape))
        self.send[size : 2 * size] = self.visited.ravel()
        self.send[2 * size :] = votes
        self.visited[:] = False
        if self.ctx.world_size == 1:
            self.received[:] = self.send
        else:
            self.request = self.ctx.comm.Iallreduce(self.send, self.received, op=MPI.SUM)

    def finish(self) -> np.ndarray:
        """Wait for the merge in flight, apply it; returns the votes it carried."""
        if self.request is not None:
            wait_all([self.request], self.ctx.comm, "the table merge", self.ctx.watchdog_s)
            self.request = None
        size, shape = self.q_local.size, self.q_local.shape
        merged = self.received[:size] / np.maximum(self.received[size : 2 * size], 1.0)
        merged = merged.reshape(shape)
        self.q_local += merged - self.send[:size].reshape(shape)
        self.q_base += merged
        return self.received[2 * size :].copy()


class _Rollout:
    """The last `n_step` vector steps of one rank's copies, for the n-step returns."""

    def __init__(self, n_step: int, num_envs: int):
        shape = (n_step, num_envs)
        self.obs = np.zeros(shape, dtype=np.int64)
        self.actions = np.zeros(shape, dtype=np.int64)
        self.rewards = np.zeros(shape, dtype=np.float64)
        self.next_obs = np.zeros(shape, dtype=np.int64)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.greedy = np.zeros(shape, dtype=bool)  # the action was greedy when taken
        self.valid = np.zeros(n_step, dtype=np.int64)  # copies that count in each row
        self.rows = 0

    def add(self, batch, n: int, greedy: np.ndarray) -> None:
        i = self.rows
        self.obs[i], self.actions[i], self.rewards[i] = batch.obs, batch.actions, batch.rewards
        self.next_obs[i], self.terminated[i] = batch.next_obs, batch.terminated
        self.truncated[i] = batch.truncated
        self.greedy[i] = greedy
        self.valid[i] = n
        if n < len(batch.obs) and i > 0:  # copies past the budget: their episodes end here
            self.truncated[i - 1, n:] = True
        self.rows += 1

    def learn(self, learner, gamma: float, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Update `learner` towards the rollout's n-step returns; returns the (s, a) pairs
        updated."""
        rows = self.rows
        self.rows = 0
        next_obs = self.next_obs[:rows]
        next_values = row_max(table_rows(learner.q_table, next_obs.ravel())).reshape(next_obs.shape)
        # Watkins's cut: a return does not run through an exploratory action; it
        # bootstraps with max_a Q(s, a) at the state that action was taken in.
        cut = self.truncated[:rows].copy()
        cut[:-1] |= ~self.greedy[1:rows]
        returns = n_step_returns(
            self.rewards[:rows], next_values, self.terminated[:rows], cut, gamma
        )
        counted = np.arange(self.obs.shape[1])[None, :] < self.valid[:rows, None]
        obs, actions = self.obs[:rows][counted], self.actions[:rows][counted]
        learner.update_towards(obs, actions, returns[counted], np.ones(len(obs)), progress)
        return obs, actions


def _run(ctx: RunContext) -> tuple[np.ndarray, bool]:
    """The whole loop; returns the final Q-table (the same on every rank) and whether a
    preemption signal stopped it."""
    cfg = ctx.cfg
    num_envs, sync_interval = cfg.run.num_envs, cfg.topology.sync_interval
    segment = ctx.segment
    schedule = Lockstep(segment, num_envs, ctx.rank)
    budget, vector_steps = schedule.budget, schedule.vector_steps
    global_steps_after = schedule.global_steps_after

    rng, env_seed = ctx.rank_seeds()
    learner = make_learner(cfg, ctx.observation_space, ctx.action_space, ctx.world_size)
    policy = learner.behaviour_policy(rng)
    q_local = learner.q_table
    stepper = ctx.make_stepper()
    env_steps = 0  # this rank's, in this segment
    first_step, syncs = 0, 0
    q_base = q_local.copy()
    merges = _Merges(ctx, q_local, q_base)
    if ctx.resume is not None:
        q_base[:] = ctx.resume.shared()["q_table"]
        q_local[:] = q_base
        syncs = int(ctx.resume.meta.get("syncs", 0))
        learner.learner_updates = int(ctx.resume.meta["learner_updates"])
        state = ctx.resume.rank_state(ctx.rank)
        if state:
            env_steps, learner.learner_updates = restore_rank_state(
                state, rng, stepper, env_seed + 1
            )
            first_step = int(ctx.resume.meta["vector_step"]) + 1
            if "q_local" in state:
                q_local[:] = state["q_local"]
            else:  # a checkpoint before 2026-12-07: Q_base + ΔQ, which may round (see below)
                q_local += state["q_delta"]
            merges.visited[:] = state["visited"]
    rollout = _Rollout(learner.n_step, num_envs)
    votes = np.zeros(len(Vote), dtype=np.float64)
    merges.start(votes)  # merge 0 (or the one the checkpoint was taken before)
    recorder = TrajectoryRecorder(ctx)
    episodes = EpisodeRows()
    reporter = Reporter(ctx) if ctx.rank == 0 else None
    interrupted = False
    gamma = cfg.algo.gamma

    for t in range(first_step, vector_steps):
        n = min(num_envs, budget - env_steps)
        progress = segment.progress(env_steps, max(budget, 1))
        if n > 0:
            ctx.maybe_fail(env_steps)
            actions = policy.select_actions(q_local, stepper.obs, progress)
            rows = q_local[stepper.obs]
            greedy = rows[np.arange(num_envs), actions] == row_max(rows)
            batch = stepper.step(actions)
            rollout.add(batch, n, greedy)
            recorder.record(batch, n)
            env_steps += n
            episodes.add_finished(batch, n, global_steps_after(t), ctx.elapsed_s(), ctx.rank)
        last = t == vector_steps - 1
        if rollout.rows and (rollout.rows == learner.n_step or last):
            obs, acts = rollout.learn(learner, gamma, progress)
            merges.visited[obs, acts] = True
        if (t + 1) % sync_interval and not last:
            continue
        # --- sync point: apply the merge in flight, decide, start the next ---
        carried = merges.finish()
        if last:  # one more merge, waited for: every table ends the same
            merges.start(ctx.vote(votes, reporter, episodes.pending))
            carried = merges.finish()
        syncs += 1
        global_steps = global_steps_after(t)
        interrupted = carried[Vote.STOP] > 0 and not last
        by_steps = ctx.clock.due_by_env_steps(global_steps)
        checkpoint = last or interrupted or by_steps or carried[Vote.CHECKPOINT] > 0
        if carried[Vote.LOG] > 0 or checkpoint:
            exploration = policy.exploration_value(progress)
            gather_and_log(
                ctx, reporter, episodes, global_steps, {"syncs": syncs, "exploration": exploration}
            )
        else:
            flush_episodes(ctx, reporter, episodes, carried)
        if checkpoint:
            recorder.flush()
            # at the last step the budget is spent: no env copy's state (16 ms for
            # 8,192 table-stepped copies), nothing is left to step
            state = rank_state(
                rng, stepper, env_steps, learner.learner_updates, recorder.rows, not last
            )
            # The rank's own table, not ΔQ: Q_base + (Q_local - Q_base) need not round back
            # to Q_local (exact only when the two are within a factor of 2, Sterbenz), and a
            # resume that differed in the last bit ended with another table (CI, once).
            state.update(q_local=q_local.copy(), visited=merges.visited.copy())
            states = gather_rank_states(ctx, state)
            if ctx.rank == 0:
                save_checkpoint(
                    ctx,
                    {"q_table": q_base},
                    global_steps,
                    learner.learner_updates,
                    syncs,
                    {k: int(s["counters"][2]) for k, s in states.items()},
                    states,
                    {"vector_step": t, "syncs": syncs},
                )
            ctx.clock.written(global_steps)
        if interrupted or last:
            break
        merges.start(ctx.vote(votes, reporter, episodes.pending))

    stepper.close()
    link_trajectories(ctx, recorder.close())
    if reporter is not None:
        reporter.close()
    return q_base, interrupted
