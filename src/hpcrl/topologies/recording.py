"""Trajectory recording: each acting rank's `traj/rank-<k>.h5`, the files a smaller world
no longer writes (cut back to the checkpoint on a resume), and rank 0 joining them all
into `run.h5`'s `/trajectories` at the end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from hpcrl.comm.waits import gather_rows
from hpcrl.envs import StepBatch
from hpcrl.storage.trajectories import TrajectoryWriter

if TYPE_CHECKING:
    from hpcrl.topologies.run_context import RunContext


class TrajectoryRecorder:
    """An acting rank's `traj/rank-<k>.h5`, flushed every log interval (None-safe)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.writer = None
        if ctx.cfg.run.record_trajectories:
            path = ctx.run_dir / "traj" / f"rank-{ctx.rank}.h5"
            self.writer = TrajectoryWriter(path, ctx.traj_fields, resume_traj_rows(ctx, ctx.rank))
            if self.writer.set_aside is not None:
                print(
                    f"[hpcrl] warning (rank {ctx.rank}): {path} was unreadable after a kill; "
                    f"set aside as {self.writer.set_aside.name} with "
                    f"{self.writer.missing_rows} rows; a new file continues the trajectories",
                    flush=True,
                )
            elif self.writer.missing_rows:
                print(
                    f"[hpcrl] warning (rank {ctx.rank}): {path} lost its last "
                    f"{self.writer.missing_rows} rows before the checkpoint (killed before a "
                    "flush); its trajectories have a gap there",
                    flush=True,
                )
        self.env_index = np.arange(ctx.cfg.run.num_envs, dtype=np.int32)
        self.last_flush = time.perf_counter()

    def record(self, batch: StepBatch, n: int) -> None:
        """Record the first `n` env copies' transitions of one vector step."""
        if self.writer is None:
            return
        self.writer.append(
            obs=batch.obs[:n],
            action=batch.actions[:n],
            reward=batch.rewards[:n],
            next_obs=batch.next_obs[:n],
            terminated=batch.terminated[:n],
            truncated=batch.truncated[:n],
            env=self.env_index[:n],
        )
        if time.perf_counter() - self.last_flush >= self.ctx.cfg.run.log_interval_s:
            self.writer.flush()
            self.last_flush = time.perf_counter()

    @property
    def rows(self) -> int:
        return 0 if self.writer is None else self.writer.rows

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.last_flush = time.perf_counter()

    def close(self) -> int:
        """Close the file; returns the rows written (0 when not recording)."""
        if self.writer is None:
            return 0
        self.writer.close()
        return self.writer.rows


def resume_traj_rows(ctx: RunContext, rank: int) -> int | None:
    """Rows of `traj/rank-<rank>.h5` the resumed checkpoint accounts for (None: new file)."""
    if ctx.resume is None:
        return None
    rows = ctx.resume.meta.get("traj_rows", [])
    return int(rows[rank]) if rank < len(rows) else None


def trim_orphan_trajectories(ctx: RunContext) -> dict[int, int]:
    """Rank 0, on a resume: cut each trajectory file the checkpoint accounts for but no
    rank of this world writes back to the checkpoint's rows, and record the rows it
    really holds (fewer, with a warning, when a kill lost some or left it unreadable).

    Returns:
        {rank: rows} of the trajectory files no rank of this world writes.
    """
    orphans: dict[int, int] = {}
    if ctx.resume is None or not ctx.cfg.run.record_trajectories:
        return orphans
    for rank, rows in enumerate(ctx.resume.meta.get("traj_rows", [])):
        if rank in ctx.recording_ranks or rows == 0:
            continue
        path = ctx.run_dir / "traj" / f"rank-{rank}.h5"
        if not path.exists():
            print(f"[hpcrl] warning: {path} is missing; {rows} trajectory rows lost", flush=True)
            continue
        writer = TrajectoryWriter(path, ctx.traj_fields, int(rows))
        writer.close()
        if writer.missing_rows:
            aside = writer.set_aside
            aside = f" (unreadable: set aside as {aside.name})" if aside else ""
            print(
                f"[hpcrl] warning: {path} holds {writer.rows} of the {rows} rows the "
                f"checkpoint accounts for{aside}",
                flush=True,
            )
        if writer.rows:
            orphans[rank] = writer.rows
    return orphans


def link_trajectories(ctx: RunContext, rows_written: int) -> None:
    """Collective: rank 0 joins every rank's trajectory file into `/trajectories`."""
    rows = gather_rows(ctx.comm, np.array([rows_written], dtype=np.int64), 0, ctx.watchdog_s)
    if ctx.rank == 0 and ctx.cfg.run.record_trajectories:
        per_rank = {k: int(n) for k, n in enumerate(rows)}
        per_rank.update(ctx.orphan_traj)
        ctx.run_file.link_trajectories(per_rank, ctx.traj_fields)
