"""Unit tests of the pieces exact resume is built from: generator and env state capture,
segments, config conflicts, checkpoint fallback, and reopening run and trajectory files."""

from __future__ import annotations

import json
import os
import signal

import h5py
import numpy as np
import pytest

from conftest import tabular_fields
from hpcrl import preemption
from hpcrl.config import build_config, resume_conflicts
from hpcrl.envs import EnvStepper, capture_env_state, make_env, make_vector_env
from hpcrl.errors import CheckpointError, UserError
from hpcrl.state import generator_state, generator_state_before, set_generator_state
from hpcrl.storage.checkpoints import (
    CheckpointFormatError,
    list_checkpoints,
    load_checkpoint,
    load_newest_intact,
    quarantine,
    write_checkpoint,
)
from hpcrl.storage.runfile import RunFile, probe_writable
from hpcrl.storage.trajectories import TrajectoryWriter

CAPTURED_ENVS = [
    "FrozenLake8x8-v1",
    "CliffWalking-v1",
    "Taxi-v4",
    "CartPole-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Acrobot-v1",
    "Pendulum-v1",
    "ALE/Pong-v5",  # ale-py (dev extra): the emulator's cloneState bytes
]


def test_generator_state_round_trip_continues_the_stream():
    rng = np.random.default_rng(123)
    rng.random(7)
    rng.integers(0, 2**31, 3, dtype=np.uint32)  # leaves a buffered uint32
    state = generator_state(rng)
    assert state.dtype == np.uint64 and state.shape == (6,)
    expected = rng.random(5)
    other = np.random.default_rng(0)
    set_generator_state(other, state)
    assert np.array_equal(other.random(5), expected)


def test_generator_state_refuses_other_bit_generators():
    with pytest.raises(TypeError, match="MT19937"):
        generator_state(np.random.Generator(np.random.MT19937(0)))
    with pytest.raises(TypeError, match="MT19937"):
        generator_state_before(np.random.Generator(np.random.MT19937(0)), 1)


@pytest.mark.parametrize("draws", [1, 256, 10_000])
def test_generator_state_before_is_the_state_that_many_float64_draws_ago(draws):
    """What `TableVectorEnv.capture_state` stores: the state a block was drawn from."""
    rng = np.random.default_rng(5)
    rng.random(17)
    rng.integers(0, 2**31, 3, dtype=np.uint32)  # leaves a buffered uint32
    before = generator_state(rng)
    rng.random(draws)
    now = generator_state(rng)
    assert np.array_equal(generator_state_before(rng, draws), before)
    assert np.array_equal(generator_state(rng), now)  # rng itself unchanged
    assert not np.array_equal(generator_state_before(rng, draws - 1 or 2), before)


@pytest.mark.parametrize("env_id", CAPTURED_ENVS)
def test_env_state_restore_replays_the_same_transitions(env_id):
    source = EnvStepper(make_vector_env(env_id, {}, 3, vector_env="sync"), seed=7)
    target = EnvStepper(make_vector_env(env_id, {}, 3, vector_env="sync"), seed=999)
    space = source.envs.single_action_space
    rng = np.random.default_rng(1)

    def actions():
        space.seed(int(rng.integers(2**31)))
        return np.array([space.sample() for _ in range(3)])

    for _ in range(40):
        source.step(actions())
    assert target.load_state_dict(source.state_dict(), fallback_seed=0)
    for _ in range(250):  # crosses episode ends and autoresets
        a = actions()
        x, y = source.step(a), target.step(a)
        assert np.array_equal(x.next_obs, y.next_obs)
        assert np.array_equal(x.rewards, y.rewards)
        assert np.array_equal(x.terminated, y.terminated)
        assert np.array_equal(x.truncated, y.truncated)
        assert np.array_equal(x.episode_returns, y.episode_returns)
    source.close()
    target.close()


def test_env_with_unknown_wrapper_falls_back_to_restarting_episodes():
    env = make_env("FrozenLake-v1")
    wrapped = __import__("gymnasium").wrappers.RecordEpisodeStatistics(env)
    assert capture_env_state(wrapped) is None
    assert capture_env_state(make_env("Blackjack-v1")) is None  # not in the known list


def test_uncaptured_state_resets_with_the_fallback_seed():
    stepper = EnvStepper(make_vector_env("FrozenLake-v1", {}, 2, vector_env="sync"), seed=1)
    stepper.step(np.array([1, 2]))
    state = stepper.state_dict()
    state["env_captured"][:] = 0
    assert not stepper.load_state_dict(state, fallback_seed=5)
    assert np.all(stepper.lengths == 0) and np.all(stepper.returns == 0)


@pytest.mark.parametrize("backend", ["sync", "table"])
def test_a_spent_budgets_state_holds_no_env_copy_and_loads_as_a_reset(backend):
    """`state_dict(envs=False)` (a run's last checkpoint): the episode counters but no env
    copy's state, flagged `BUDGET_SPENT`; loading it resets the copies (nothing was left
    to step, so nothing is lost)."""
    from hpcrl.envs import BUDGET_SPENT

    envs = make_vector_env("FrozenLake-v1", {}, 3, vector_env=backend)
    stepper = EnvStepper(envs, seed=1)
    stepper.step(np.array([1, 2, 1]))
    state = stepper.state_dict(envs=False)
    assert int(state["env_captured"][0]) == BUDGET_SPENT
    assert state["env_rng"].shape == (3, 0) and state["env_state"].shape == (3, 0)
    np.testing.assert_array_equal(state["episode_length"], stepper.lengths)
    assert stepper.state_dict()["env_rng"].shape == (3, 6)  # the default captures
    assert not stepper.load_state_dict(state, fallback_seed=5)
    assert np.all(stepper.lengths == 0) and np.all(stepper.returns == 0)


def test_segment_progress_and_budgets():
    from hpcrl.topologies.segments import Segment

    first = Segment(0, 0, 1000, 4)
    assert first.budgets() == [250, 250, 250, 250]
    assert first.progress(125, 250) == 0.5
    later = Segment(1, 600, 1000, 3)
    assert later.budgets() == [134, 133, 133] and sum(later.budgets()) == 400
    assert later.progress(0, 134) == pytest.approx(0.6)
    assert later.progress(134, 134) == pytest.approx(1.0)


def test_resume_conflicts_name_the_keys_that_may_not_change():
    base = build_config({"layout": "allreduce"})
    old = base.to_dict()
    same = build_config({**base.flat(), "log_interval_s": 1.0, "keep_checkpoints": 9})
    assert resume_conflicts(old, same) == []
    changed = build_config({**base.flat(), "alpha": 0.5, "env_id": "CliffWalking-v1"})
    found = resume_conflicts(old, changed)
    assert len(found) == 2
    assert any(f.startswith("alpha 0.5 (checkpoint: 0.1)") for f in found)
    assert any(f.startswith("env_id 'CliffWalking-v1'") for f in found)


def _arrays(value):
    return {"q_table": np.full((3, 2), float(value)), "ranks/1/policy_rng": np.arange(6)}


def test_checkpoint_nested_arrays_round_trip(tmp_path):
    path = write_checkpoint(tmp_path, 10, _arrays(1), {"env_steps": 10}, keep=3)
    arrays, meta = load_checkpoint(path)
    assert set(arrays) == {"q_table", "ranks/1/policy_rng"}
    assert meta["format_version"] == 1


def test_newest_intact_skips_damaged_checkpoints(tmp_path):
    for steps in (10, 20, 30):
        write_checkpoint(tmp_path, steps, _arrays(steps), {"env_steps": steps}, keep=5)
    newest = tmp_path / "step-30.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    arrays, meta, path, skipped = load_newest_intact(tmp_path)
    assert path.name == "step-20.h5" and meta["env_steps"] == 20
    assert [p.name for p, _ in skipped] == ["step-30.h5"]
    quarantine([p for p, _ in skipped])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10.h5", "step-20.h5"]
    assert (tmp_path / "step-30.h5.corrupt").exists()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    for steps in (10, 20):
        path = write_checkpoint(tmp_path, steps, _arrays(steps), {}, keep=5)
        path.write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        load_newest_intact(tmp_path)
    assert "\n" not in str(info.value)


def test_newer_format_version_is_refused_without_fallback(tmp_path):
    from hpcrl.storage import checkpoints

    write_checkpoint(tmp_path, 10, _arrays(10), {}, keep=5)
    path = write_checkpoint(tmp_path, 20, _arrays(20), {}, keep=5)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["format_version"] = 99
        text = json.dumps(meta, sort_keys=True)
        f.attrs["meta"] = text
        f.attrs["checksum"] = checkpoints._checksum(_arrays(20), text)
    with pytest.raises(CheckpointFormatError, match="format version 99"):
        load_newest_intact(tmp_path)


def test_run_file_reopen_cuts_rows_after_the_checkpoint(tmp_path):
    run = RunFile(tmp_path / "run.h5", {"algo": "x"})
    columns = {
        "return": np.arange(5.0),
        "length": np.arange(5),
        "env_steps": np.arange(5),
        "wall_time": np.zeros(5),
        "rank": np.zeros(5, np.int32),
    }
    run.append_episodes(**columns)
    for i in range(4):
        run.append_metrics({"env_steps": i, "rate": 1.0})
    run.close()
    again = RunFile.reopen(tmp_path / "run.h5", episodes_rows=3, metrics_rows=2)
    assert again.episodes_dropped == 2 and again.episode_rows == 3 and again.metric_rows == 2
    row = {
        "wall_time": 1.0,
        "env_steps": 3,
        "world_size": 2,
        "from_world_size": 4,
        "slurm_restart_count": 1,
        "slurm_job_id": 7,
        "episodes_dropped": 2,
        "exact": 0,
    }
    again.append_resume(**row)
    again.close()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert list(f["episodes/return"][()]) == [0.0, 1.0, 2.0]
        assert f.attrs["status"] == "running"
        assert f["resumes/world_size"][()].tolist() == [2]


def test_run_file_reopen_refuses_a_file_with_fewer_rows(tmp_path):
    RunFile(tmp_path / "run.h5", {}).close()
    with pytest.raises(UserError, match="does not belong to this checkpoint"):
        RunFile.reopen(tmp_path / "run.h5", episodes_rows=10, metrics_rows=0)


def test_trajectory_writer_resume_cuts_and_counts_missing_rows(tmp_path):
    fields = tabular_fields()
    rows = {name: np.zeros(10, dtype=dtype) for name, (_, dtype) in fields.items()}
    writer = TrajectoryWriter(tmp_path / "t.h5", fields)
    writer.append(**rows)
    writer.close()
    again = TrajectoryWriter(tmp_path / "t.h5", fields, resume_rows=6)
    assert again.rows == 6 and again.missing_rows == 0
    again.append(**rows)
    again.close()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert len(f["obs"]) == 16
    short = TrajectoryWriter(tmp_path / "t.h5", fields, resume_rows=20)
    assert short.rows == 16 and short.missing_rows == 4
    short.close()


def test_probe_writable_reports_a_missing_permission(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(UserError, match="not writable: Permission denied"):
        probe_writable(tmp_path)


def test_signals_set_the_preemption_flag():
    preemption.clear()
    previous = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    try:
        preemption.install()
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() and preemption.signal_name() == "SIGUSR1"
    finally:
        preemption.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_trajectory_writer_sets_an_unreadable_file_aside(tmp_path):
    path = tmp_path / "rank-1.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a file killed mid-write
    writer = TrajectoryWriter(path, tabular_fields(), resume_rows=5)
    assert writer.set_aside == tmp_path / "rank-1.h5.corrupt" and writer.set_aside.exists()
    assert writer.rows == 0 and writer.missing_rows == 5
    writer.close()
    with h5py.File(path, "r") as f:
        assert len(f["obs"]) == 0


def test_new_trajectory_file_is_readable_before_any_row(tmp_path):
    path = tmp_path / "rank-0.h5"
    writer = TrajectoryWriter(path, tabular_fields())
    on_disk = tmp_path / "copy.h5"  # the bytes a kill -9 would leave: never closed
    on_disk.write_bytes(path.read_bytes())
    with h5py.File(on_disk, "r") as f:
        assert set(f) == set(tabular_fields())
    writer.close()


def _resume_point(tmp_path, captured: dict[int, int], **meta):
    """A ResumePoint whose checkpoint holds `ranks/<k>/env_captured` per `captured`."""
    from hpcrl.topologies.segments import ResumePoint

    arrays = {f"ranks/{k}/env_captured": np.array([flag], np.int8) for k, flag in captured.items()}
    meta = {"world_size": 4, "rank_states": True, "config": {"layout": "allreduce"}} | meta
    tmp_path.mkdir(exist_ok=True)
    path = write_checkpoint(tmp_path, 100, arrays, meta, keep=3)
    return ResumePoint(path, meta, exact=True)


def test_resume_line_names_the_true_reason_it_is_not_bit_exact(tmp_path):
    """Issue 18, case 5: an IMPALA resume on the same world size said "was 4 ranks, now 4";
    the line now names the reason: an asynchronous layout, another world size or device,
    or env copies whose state was not captured."""
    from hpcrl.envs import BUDGET_SPENT, COPIES_CAPTURED, NOT_CAPTURED
    from hpcrl.runner import resume_how

    cfg = build_config({"algo": "qlearning", "env_id": "FrozenLake-v1", "layout": "allreduce"})
    exact = _resume_point(tmp_path, {k: COPIES_CAPTURED for k in range(4)})
    assert resume_how(exact, cfg, 4) == "exactly (every rank's state restored)"
    assert "the world size changed: was 4 ranks, now 2" in resume_how(exact, cfg, 2)
    impala = _resume_point(
        tmp_path / "a", {}, rank_states=False, config={"layout": "actor_learner"}
    )
    how = resume_how(impala, cfg, 4)
    assert "layout actor_learner is asynchronous" in how and "was 4 ranks" not in how
    cuda = _resume_point(tmp_path / "b", {0: COPIES_CAPTURED}, config={"device": "cuda"})
    assert "device cuda then, cpu now" in resume_how(cuda, cfg, 4)
    lost = _resume_point(tmp_path / "c", {0: COPIES_CAPTURED, 1: NOT_CAPTURED, 3: NOT_CAPTURED})
    how = resume_how(lost, cfg, 4)
    assert "could not be captured on rank 1, 3" in how and "not bit-exact" in how
    spent = _resume_point(tmp_path / "d", {k: BUDGET_SPENT for k in range(4)})
    assert "nothing is left to step" in resume_how(spent, cfg, 4)
