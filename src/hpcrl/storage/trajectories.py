"""Per-rank trajectory files `traj/rank-<k>.h5`: every transition an actor rank took.

Datasets `obs, action, reward, next_obs, terminated, truncated`, one row per env step,
time-major (vector step, then env copy), chunked and flushed at every log interval.
`run.h5` joins the rank files with virtual datasets, so no parallel HDF5 is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from hpcrl.storage import space
from hpcrl.storage.runfile import CHUNK_ROWS


class TrajectoryWriter:
    """Buffers transitions in memory and appends them to one rank's HDF5 file."""

    def __init__(
        self,
        path: str | Path,
        fields: dict[str, tuple[tuple[int, ...], type]],
        resume_rows: int | None = None,
    ):
        """
        Args:
            path: the file to create (`traj/rank-<k>.h5`).
            fields: {name: (row_shape, dtype)}, e.g. {"obs": ((), np.int64), ...}.
            resume_rows: continue an existing file after its first `resume_rows` rows (rows
                past them, written after the checkpoint, are cut); None: a new file.
                `missing_rows` counts rows the checkpoint expected but the file never got
                (a kill before its last flush); a file left unreadable by a kill is renamed
                `<name>.corrupt` and a new one started.
        """
        self.fields = fields
        path = Path(path)
        self.missing_rows = 0
        self.file = None
        self.set_aside: Path | None = None
        if resume_rows is not None and path.exists():
            try:
                self.file = h5py.File(path, "r+")
            except OSError:
                # Killed inside a write: HDF5 files are not crash-consistent. Keep the
                # damaged file for a post-mortem and start a new one (a gap, counted).
                self.set_aside = path.with_name(path.name + ".corrupt")
                os.replace(path, self.set_aside)
        if self.file is not None:
            have = min(self.file[name].shape[0] for name in fields)
            keep = min(have, resume_rows)
            self.missing_rows = resume_rows - keep
            for name in fields:
                self.file[name].resize(keep, axis=0)
            self.rows = keep
        else:
            with space.guard(path):
                self.file = h5py.File(path, "w")
                for name, (shape, dtype) in fields.items():
                    self.file.create_dataset(
                        name,
                        shape=(0, *shape),
                        maxshape=(None, *shape),
                        dtype=dtype,
                        chunks=(CHUNK_ROWS, *shape),
                    )
            self.rows = 0  # rows written or buffered
            self.missing_rows = resume_rows or 0
            self.file.flush()  # readable from the start, even if the rank is killed
        self.buffers = {
            name: np.empty((CHUNK_ROWS, *shape), dtype=dtype)
            for name, (shape, dtype) in fields.items()
        }
        self.buffered = 0

    def append(self, **columns: np.ndarray) -> None:
        """Append n rows: one array per field, each of shape (n, *row_shape).

        Raises:
            ValueError: the columns are not exactly the writer's fields.
        """
        if columns.keys() != self.fields.keys():
            raise ValueError(f"trajectory columns {sorted(columns)} != {sorted(self.fields)}")
        n = len(columns["obs"])
        done = 0
        while done < n:
            take = min(n - done, CHUNK_ROWS - self.buffered)
            for name, values in columns.items():
                self.buffers[name][self.buffered : self.buffered + take] = values[
                    done : done + take
                ]
            self.buffered += take
            done += take
            if self.buffered == CHUNK_ROWS:
                self._write()
        self.rows += n

    def _write(self) -> None:
        if self.buffered == 0:
            return
        with space.guard(self.file.filename):
            for name, buffer in self.buffers.items():
                dataset = self.file[name]
                start = dataset.shape[0]
                dataset.resize(start + self.buffered, axis=0)
                dataset[start:] = buffer[: self.buffered]
                del dataset  # closed here, where a full disk can still be raised
        self.buffered = 0

    def flush(self) -> None:
        """Write the buffered rows and flush the file.

        Raises:
            DiskFullError: the file system is full (`hpcrl.storage.space`).
        """
        self._write()
        with space.guard(self.file.filename):
            self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.flush()
            self.file.close()


def space_fields(observation_space, action_space) -> dict[str, tuple[tuple[int, ...], type]]:
    """Trajectory fields for any gymnasium spaces with array observations and actions
    (`Box` or `Discrete`), e.g. CartPole: obs (4,) float32, action () int64; a tabular run's
    Discrete spaces give obs and action () int64."""

    def row(space) -> tuple[tuple[int, ...], type]:
        if space.shape == () or space.shape is None:  # Discrete
            return (), np.int64
        return tuple(space.shape), np.dtype(space.dtype).type

    obs, action = row(observation_space), row(action_space)
    return {
        "obs": obs,
        "action": action,
        "reward": ((), np.float64),
        "next_obs": obs,
        "terminated": ((), np.bool_),
        "truncated": ((), np.bool_),
        "env": ((), np.int32),
    }
