"""TensorBoard event files: a view of `/metrics` and the episode returns (run.h5 stays
the record).

Tags are the `/metrics` column names (`env_steps_per_s`, `losses/td`, ...) and
`episodes/return`; the step of every scalar is the global env-step count (`env_steps`).
An event's wall time is the run clock (training seconds since the run started, as in
run.h5), so TensorBoard's "relative" axis is training time. The `tensorboard` package is
imported only when a writer is made, so a run with `tensorboard: false` never imports it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hpcrl.storage import space

STEP_KEY = "env_steps"
EPISODE_TAG = "episodes/return"


class EventWriter:
    """Scalars to `<log_dir>/events.out.tfevents.*` with tensorboard's own writer
    (`tensorboard.summary.writer.event_file_writer.EventFileWriter`)."""

    def __init__(self, log_dir: str | Path):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        """One event holding every finite value of `values` at `step` (env steps) and
        `wall_time` (run-clock seconds)."""
        summary = self._summary(
            value=[
                self._summary.Value(tag=tag, simple_value=float(v))
                for tag, v in values.items()
                if v is not None and math.isfinite(float(v))
            ]
        )
        if summary.value:
            with space.guard(self._writer.get_logdir()):
                self._writer.add_event(
                    self._event(wall_time=float(wall_time), step=int(step), summary=summary)
                )

    def metrics_row(self, row: dict[str, float]) -> None:
        """A `/metrics` row: every column but `env_steps`, at step `env_steps` and the
        row's `wall_time`."""
        values = {k: v for k, v in row.items() if k != STEP_KEY}
        self.scalars(values, row[STEP_KEY], row["wall_time"])

    def episodes(self, returns: np.ndarray, env_steps: np.ndarray, wall_time: np.ndarray):
        """Episode returns (n,), each at the env steps (n,) and run-clock seconds (n,)
        when it ended."""
        for value, step, wall in zip(returns, env_steps, wall_time, strict=True):
            self.scalars({EPISODE_TAG: value}, int(step), float(wall))

    def flush(self) -> None:
        """Write the pending events to the event file.

        Raises:
            DiskFullError: the file system is full (`hpcrl.storage.space`).
        """
        with space.guard(self._writer.get_logdir()):
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_run_events(
    log_dir: str | Path, metrics: dict[str, np.ndarray], episodes: dict[str, np.ndarray]
) -> None:
    """Write a finished (or live) run's `/metrics` rows and episode returns as event files.

    Args:
        metrics: aligned `/metrics` columns (`storage.runfile.read_metrics`).
        episodes: `/episodes` columns (return, env_steps, wall_time, ...).
    """
    writer = EventWriter(log_dir)
    try:
        for i in range(len(metrics.get(STEP_KEY, ()))):
            writer.metrics_row({name: column[i] for name, column in metrics.items()})
        writer.episodes(episodes["return"], episodes["env_steps"], episodes["wall_time"])
    finally:
        writer.close()
