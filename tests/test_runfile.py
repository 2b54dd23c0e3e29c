"""`hpcrl.storage.runfile` and `hpcrl.storage.trajectories`: run.h5, traj files, run
directories."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import single_line, tabular_fields
from hpcrl.errors import UserError
from hpcrl.storage.runfile import RUN_FILE, RunFile, prepare_run_dir, read_status
from hpcrl.storage.trajectories import CHUNK_ROWS, TrajectoryWriter


def write_rank_trajectories(path: Path, first_obs: int, chunks: list[int]) -> dict:
    """Write `sum(chunks)` rows in appends of the given sizes; returns the columns written."""
    n = sum(chunks)
    rng = np.random.default_rng(first_obs)
    columns = {
        "obs": np.arange(first_obs, first_obs + n, dtype=np.int64),
        "action": rng.integers(0, 4, n),
        "reward": rng.normal(size=n),
        "next_obs": np.arange(first_obs + 1, first_obs + n + 1, dtype=np.int64),
        "terminated": rng.random(n) < 0.1,
        "truncated": rng.random(n) < 0.05,
        "env": rng.integers(0, 8, n).astype(np.int32),
    }
    writer = TrajectoryWriter(path, tabular_fields())
    done = 0
    for size in chunks:
        writer.append(**{k: v[done : done + size] for k, v in columns.items()})
        done += size
        if done == chunks[0]:
            writer.flush()
    assert writer.rows == n
    writer.close()
    return columns


def episode_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "return": rng.normal(size=n),
        "length": rng.integers(1, 100, n),
        "env_steps": np.sort(rng.integers(0, 10_000, n)),
        "wall_time": np.sort(rng.random(n) * 10),
        "rank": rng.integers(0, 4, n).astype(np.int32),
    }


def test_run_file_with_trajectories(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False)
    assert (run_dir / "traj").is_dir() and (run_dir / "checkpoints").is_dir()

    run = RunFile(
        run_dir / RUN_FILE,
        {"algo": "qlearning", "env_id": "FrozenLake-v1", "world_size": 3, "config": "{}"},
    )
    assert read_status(run_dir) == "running"
    batches = [episode_rows(3, 0), episode_rows(2, 1)]
    for batch in batches:
        run.append_episodes(**batch)
    run.append_episodes(**episode_rows(0, 2))
    run.append_metrics({"env_steps": 100, "perf/env_steps_per_s": 12.5})
    run.append_metrics({"env_steps": 250, "perf/env_steps_per_s": 30.0})

    rank0 = write_rank_trajectories(
        run_dir / "traj" / "rank-0.h5", 0, [1000, 3000, 1000, 97]
    )  # crosses CHUNK_ROWS
    rank1 = write_rank_trajectories(run_dir / "traj" / "rank-1.h5", 100_000, [300])
    assert len(rank0["obs"]) > CHUNK_ROWS
    rows = {0: len(rank0["obs"]), 1: len(rank1["obs"]), 2: 0}
    run.link_trajectories({0: 10, 1: 10}, tabular_fields())  # an earlier flush, replaced
    run.link_trajectories(rows, tabular_fields())
    run.set_status("completed")
    run.close()

    with h5py.File(run_dir / RUN_FILE, "r") as f:
        assert f.attrs["status"] == "completed"
        assert f.attrs["algo"] == "qlearning" and f.attrs["world_size"] == 3
        assert "hpcrl_version" in f.attrs
        for name in batches[0]:
            expected = np.concatenate([b[name] for b in batches])
            np.testing.assert_array_equal(f["episodes"][name][()], expected, err_msg=name)
        np.testing.assert_array_equal(f["metrics/env_steps"][()], [100, 250])
        np.testing.assert_array_equal(f["metrics/perf/env_steps_per_s"][()], [12.5, 30.0])
        traj = f["trajectories"]
        np.testing.assert_array_equal(traj["ranks"][()], [0, 1])
        np.testing.assert_array_equal(traj["rows"][()], [rows[0], rows[1]])
        for name in tabular_fields():
            assert traj[name].is_virtual
            assert traj[name].shape == (rows[0] + rows[1],)
            expected = np.concatenate([rank0[name], rank1[name]])
            np.testing.assert_array_equal(traj[name][()], expected, err_msg=name)
    assert read_status(run_dir) == "completed"

    moved = tmp_path / "moved"  # relative source paths: the directory can move
    run_dir.rename(moved)
    with h5py.File(moved / RUN_FILE, "r") as f:
        np.testing.assert_array_equal(f["trajectories/obs"][-300:], rank1["obs"])


def test_run_file_rejects_bad_columns_and_status(tmp_path):
    run = RunFile(tmp_path / RUN_FILE, {})
    try:
        rows = episode_rows(2, 0)
        del rows["rank"]
        with pytest.raises(ValueError):
            run.append_episodes(**rows)
        with pytest.raises(ValueError):
            run.set_status("done")
    finally:
        run.close()


def test_prepare_run_dir_refuses_then_overwrites(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, overwrite=False)
    RunFile(run_dir / RUN_FILE, {}).close()
    (run_dir / "traj" / "rank-0.h5").write_bytes(b"old")
    (run_dir / "checkpoints" / "step-1.h5").write_bytes(b"old")
    (run_dir / "notes.txt").write_text("keep me")

    with pytest.raises(UserError) as exc:
        prepare_run_dir(run_dir, overwrite=False)
    assert "--overwrite" in single_line(exc)
    assert (run_dir / RUN_FILE).exists()

    prepare_run_dir(run_dir, overwrite=True)
    assert not (run_dir / RUN_FILE).exists()
    assert list((run_dir / "traj").iterdir()) == []
    assert list((run_dir / "checkpoints").iterdir()) == []
    assert (run_dir / "notes.txt").read_text() == "keep me"
    assert read_status(run_dir) is None


def test_prepare_run_dir_refuses_a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("")
    with pytest.raises(UserError) as exc:
        prepare_run_dir(path, overwrite=True)
    assert "not a directory" in single_line(exc)


def test_prepare_run_dir_refuses_leftover_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-100.h5").write_bytes(b"someone else's")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_run_dir(tmp_path, overwrite=False)
    assert (tmp_path / "checkpoints" / "step-100.h5").exists()
    prepare_run_dir(tmp_path, overwrite=True)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_prepare_run_dir_unusable_path_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be used"):
        prepare_run_dir(tmp_path / "file" / "run", overwrite=False)


def test_run_file_is_never_created_over_an_existing_one(tmp_path):
    RunFile(tmp_path / RUN_FILE, {"algo": "qlearning"}).close()
    with pytest.raises(FileExistsError):
        RunFile(tmp_path / RUN_FILE, {"algo": "qlearning"})


def test_trajectory_writer_rejects_missing_columns(tmp_path):
    writer = TrajectoryWriter(tmp_path / "t.h5", tabular_fields())
    with pytest.raises(ValueError, match="env"):
        writer.append(obs=np.zeros(2, dtype=np.int64))
    writer.close()
