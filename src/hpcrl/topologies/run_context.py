"""The run context: everything a topology's loop needs besides its algorithm, complete
when built (`RunContext.create`, called by the runner once per run)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from hpcrl import preemption
from hpcrl.config import Config
from hpcrl.envs import EnvStepper, make_vector_env
from hpcrl.storage.runfile import RunFile
from hpcrl.storage.trajectories import space_fields
from hpcrl.topologies.recording import trim_orphan_trajectories
from hpcrl.topologies.segments import ResumePoint, Segment
from hpcrl.topologies.sync_points import CheckpointClock, Vote

if TYPE_CHECKING:
    from hpcrl.topologies.reporting import Reporter


@dataclass
class RunContext:
    """One rank's view of the run: its communicator, config, files, segment and clocks."""

    comm: MPI.Comm
    cfg: Config
    run_dir: Path
    observation_space: object  # the env's gymnasium spaces (from one probe env)
    action_space: object
    run_file: RunFile | None  # rank 0 only
    resume: ResumePoint | None
    signal_requested: Callable[[], bool]  # a preemption signal reached this rank
    segment: Segment
    recording_ranks: range  # ranks that write traj/rank-<k>.h5 in this world
    clock: CheckpointClock
    start_time: float  # perf_counter() at the run's start (earlier on a resume)
    traj_fields: dict = field(default_factory=dict)  # {name: (row shape, dtype)}
    orphan_traj: dict[int, int] = field(default_factory=dict)  # rank 0: see `create`
    reporter: Reporter | None = None  # rank 0, once the layout's loop has made it

    @classmethod
    def create(
        cls,
        comm: MPI.Comm,
        cfg: Config,
        run_dir: Path,
        spaces: tuple,
        run_file: RunFile | None,
        resume: ResumePoint | None,
        signal_requested: Callable[[], bool],
        acting_ranks: range,
        recording_ranks: range,
    ) -> RunContext:
        """The context of a run (or resume) whose layout acts on `acting_ranks` and records
        trajectories on `recording_ranks`. On a resume, rank 0 also cuts the trajectory
        files no rank of this world writes (a smaller world, or rank 0 of `ps`) back to the
        checkpoint and keeps linking them (`orphan_traj`)."""
        run = cfg.run
        done = int(resume.meta["env_steps"]) if resume is not None else 0
        elapsed = float(resume.meta.get("elapsed_s", 0.0)) if resume is not None else 0.0
        ctx = cls(
            comm=comm,
            cfg=cfg,
            run_dir=run_dir,
            observation_space=spaces[0],
            action_space=spaces[1],
            run_file=run_file,
            resume=resume,
            signal_requested=signal_requested,
            segment=Segment.of_run(run.total_env_steps, len(acting_ranks), resume),
            recording_ranks=recording_ranks,
            clock=CheckpointClock(
                run.checkpoint_interval_env_steps, run.checkpoint_interval_s, done
            ),
            start_time=time.perf_counter() - elapsed,
            traj_fields=space_fields(*spaces),
        )
        if ctx.rank == 0:
            ctx.orphan_traj = trim_orphan_trajectories(ctx)
        return ctx

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world_size(self) -> int:
        return self.comm.Get_size()

    @property
    def watchdog_s(self) -> float:
        return self.cfg.run.watchdog_s

    @property
    def n_states(self) -> int:
        """Tabular layouts: the size of the `Discrete` observation space."""
        return int(self.observation_space.n)

    @property
    def n_actions(self) -> int:
        """Tabular layouts: the size of the `Discrete` action space."""
        return int(self.action_space.n)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_time

    def rank_seeds(self) -> tuple[np.random.Generator, int]:
        """This rank's numpy generator and env seed. Each rank gets its own child of one
        `SeedSequence(seed)`, so actors explore with independent streams while the whole
        run still follows from the single base seed. A new segment (a resume that is not
        exact) draws from `SeedSequence([seed, segment])` instead."""
        index = self.segment.index
        entropy = self.cfg.run.seed if index == 0 else [self.cfg.run.seed, index]
        child = np.random.SeedSequence(entropy).spawn(self.world_size)[self.rank]
        policy_seq, env_seq = child.spawn(2)
        return np.random.default_rng(policy_seq), int(env_seq.generate_state(1)[0] >> 1)

    def stop_requested(self) -> bool:
        """Whether this rank asks the layout to stop early (the layout agrees on it with
        the other ranks and checkpoints): a preemption signal reached it, or (rank 0) the
        training episodes reached `stop_at_return` (`Reporter.solved`)."""
        return self.signal_requested() or (self.reporter is not None and self.reporter.solved)

    def vote(self, votes: np.ndarray, reporter, episodes: int = 0) -> np.ndarray:
        """Fill `votes` (a `Vote`-indexed buffer, to be summed over the ranks) with this
        rank's votes: rank 0 alone keeps the log and wall-time checkpoint clocks; any rank
        that received a preemption signal votes stop, and so does rank 0 once the run
        reached `stop_at_return`; `episodes` is how many finished episodes this rank holds
        (`EpisodeRows.pending`)."""
        votes[Vote.LOG] = 1.0 if reporter is not None and reporter.due() else 0.0
        votes[Vote.CHECKPOINT] = 1.0 if self.rank == 0 and self.clock.due_by_time() else 0.0
        votes[Vote.STOP] = 1.0 if self.stop_requested() else 0.0
        votes[Vote.EPISODES] = float(episodes)
        return votes

    def make_stepper(self) -> EnvStepper:
        run = self.cfg.run
        _, env_seed = self.rank_seeds()
        envs = make_vector_env(
            run.env_id,
            run.env_kwargs,
            run.num_envs,
            vector_env=run.vector_env,
            **run.env_options(),
        )
        return EnvStepper(envs, env_seed)

    def maybe_fail(self, env_steps: int) -> None:
        """Test-only fault injection: `debug.fail_rank` raises after
        `debug.fail_after_env_steps`; `debug.preempt_after_env_steps` sets this rank's
        preemption flag as SIGUSR1 would (`preemption.request`), in a fresh run only, so
        that a test interrupts a run at a point that does not depend on the machine's speed."""
        debug = self.cfg.run.debug
        if self.rank == debug.fail_rank and env_steps >= debug.fail_after_env_steps:
            raise RuntimeError(
                f"debug.fail_rank={debug.fail_rank}: injected failure after {env_steps} env steps"
            )
        after = debug.preempt_after_env_steps
        if after and self.resume is None and env_steps >= after and not preemption.requested():
            preemption.request()

    def slow_step_s(self) -> float:
        """Test-only straggler delay before each vector step of this rank (`debug.slow_rank`)."""
        debug = self.cfg.run.debug
        return debug.slow_step_s if self.rank == debug.slow_rank else 0.0
