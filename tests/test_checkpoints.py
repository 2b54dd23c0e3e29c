"""`hpcrl.storage.checkpoints`: atomic, checksummed step files and latest.h5."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from conftest import single_line
from hpcrl.errors import CheckpointError
from hpcrl.storage.checkpoints import (
    LATEST,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_stale_temporaries,
    write_checkpoint,
)


def some_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q_table": rng.normal(size=(16, 4)),
        "visits": rng.integers(0, 100, size=(16, 4)),
        "flags": rng.random(5) < 0.5,
    }


def test_checkpoint_round_trip(tmp_path):
    arrays = some_arrays()
    meta = {"algo": "qlearning", "env_steps": 100, "policy_version": 7, "config": {"a": [1, 2]}}
    path = write_checkpoint(tmp_path, 100, arrays, meta, keep=3)
    assert path == tmp_path / "step-100.h5"
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype
    assert loaded_meta == {"format_version": 1, **meta}


def test_latest_points_to_newest_and_keep_prunes(tmp_path):
    for env_steps in (100, 200, 300):
        write_checkpoint(
            tmp_path, env_steps, some_arrays(env_steps), {"env_steps": env_steps}, keep=2
        )
        assert os.readlink(tmp_path / LATEST) == f"step-{env_steps}.h5"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-200.h5", "step-300.h5"]
    assert not (tmp_path / "step-100.h5").exists()
    assert not list(tmp_path.glob("*.tmp.*"))
    arrays, meta, path = load_latest(tmp_path)
    assert path == (tmp_path / "step-300.h5").resolve()
    assert meta == {"format_version": 1, "env_steps": 300}
    np.testing.assert_array_equal(arrays["q_table"], some_arrays(300)["q_table"])


def test_list_checkpoints_sorts_numerically(tmp_path):
    for env_steps in (1000, 20, 300):
        write_checkpoint(tmp_path, env_steps, some_arrays(), {}, keep=10)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-20.h5",
        "step-300.h5",
        "step-1000.h5",
    ]


def test_load_latest_without_link_uses_newest_step(tmp_path):
    write_checkpoint(tmp_path, 5, some_arrays(5), {"n": 5}, keep=3)
    write_checkpoint(tmp_path, 40, some_arrays(40), {"n": 40}, keep=3)
    (tmp_path / LATEST).unlink()
    _, meta, path = load_latest(tmp_path)
    assert meta == {"format_version": 1, "n": 40}
    assert path.name == "step-40.h5"


def test_load_checkpoint_rejects_truncated_file(tmp_path):
    path = write_checkpoint(tmp_path, 1, some_arrays(), {"x": 1}, keep=1)
    raw = path.read_bytes()
    damaged = tmp_path / "truncated.h5"
    damaged.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(damaged)
    assert "truncated.h5" in single_line(exc)


def test_load_checkpoint_rejects_flipped_data_byte(tmp_path):
    arrays = some_arrays()
    path = write_checkpoint(tmp_path, 1, arrays, {"x": 1}, keep=1)
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(arrays["q_table"].tobytes())
    assert start >= 0  # the table is stored contiguously, so its bytes are in the file
    raw[start + 77] ^= 0x10
    damaged = tmp_path / "flipped.h5"
    damaged.write_bytes(bytes(raw))
    with h5py.File(damaged, "r") as f:  # still a readable HDF5 file: only the data changed
        assert not np.array_equal(f["q_table"][()], arrays["q_table"])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(damaged)
    assert "checksum" in single_line(exc)


def test_load_checkpoint_rejects_incomplete_file(tmp_path):
    path = tmp_path / "step-9.h5"
    with h5py.File(path, "w") as f:
        f["q_table"] = np.zeros((2, 2))
        f.attrs["meta"] = "{}"
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "incomplete" in single_line(exc)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "step-1.h5")
    assert "step-1.h5" in single_line(exc)


def test_load_latest_on_empty_dir(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_latest(tmp_path)
    assert "no checkpoint" in single_line(exc)


def test_remove_stale_temporaries(tmp_path):
    keep = write_checkpoint(tmp_path, 10, some_arrays(), {}, keep=3)
    stale = [tmp_path / "step-20.h5.tmp.1234", tmp_path / "latest.h5.tmp.99"]
    stale[0].write_bytes(b"half a checkpoint")
    os.symlink("step-20.h5", stale[1])  # a dangling link left mid-swap
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    for path in stale:
        assert not path.is_symlink() and not path.exists()
    assert keep.exists()
    assert (tmp_path / LATEST).is_symlink()
    assert remove_stale_temporaries(tmp_path) == []
