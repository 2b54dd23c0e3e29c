"""Acceptance 1 of the cluster-operations issue: a run interrupted by `SIGUSR1` at a random
moment and resumed with `--resume` ends bitwise identical to the same run uninterrupted
(`/episodes` columns, the final `q_table` (`sharded`: its shards), every trajectory row).

`/episodes/wall_time` is the one column left out: it is a clock reading, different between
any two runs. Layouts: `allreduce` on 4 ranks (deterministic for a fixed seed and world
size) and one process (the embedded parameter server).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import hpcrl_command

pytestmark = pytest.mark.e2e

COMPARED = ("return", "length", "env_steps", "rank")


def _train(n, run_dir, args, env, timeout=300):
    return subprocess.run(
        hpcrl_command(n, "train", "--run-dir", str(run_dir), *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _interrupt(n, run_dir, args, env, delay_s):
    """Start a run, send SIGUSR1 to the launcher `delay_s` after its start line."""
    proc = subprocess.Popen(
        hpcrl_command(n, "train", "--run-dir", str(run_dir), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[hpcrl] qlearning on"):
                break
        time.sleep(delay_s)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + out, err


def _contents(run_dir):
    with h5py.File(run_dir / "run.h5", "r") as f:
        status = str(f.attrs["status"])
        episodes = {k: f["episodes"][k][()] for k in COMPARED}
        trajectories = {
            k: f["trajectories"][k][()] for k in f["trajectories"] if k not in ("ranks", "rows")
        }
        resumes = len(f["resumes"]["env_steps"])
    latest = (run_dir / "checkpoints" / "latest.h5").resolve()
    with h5py.File(latest, "r") as f:
        shards = json.loads(f.attrs["meta"]).get("shards")
        q_table = f["q_table"][()] if shards is None else None
    if shards is not None:  # `sharded`: every rank's shard, in rank order
        q_table = []
        for k in range(shards):
            with h5py.File(latest.with_name(f"{latest.stem}.shard-{k}.h5"), "r") as f:
                q_table.append(f["q_shard"][()])
        q_table = np.concatenate(q_table)
    return status, episodes, trajectories, resumes, q_table


@pytest.mark.parametrize(
    "n, layout, steps, delay, extra",
    [
        (4, "allreduce", 600_000, (0.3, 4.0), ["--set", "vector_env=sync"]),
        (None, "ps", 300_000, (0.2, 2.5), ["--set", "vector_env=sync"]),
        (2, "allreduce", 2_400_000, (0.3, 1.5), ["--set", "vector_env=table"]),
        (4, "sharded", 1_200_000, (0.3, 2.0), []),
        (4, "async", 1_200_000, (0.3, 2.0), ["--set", "n_step=4"]),
    ],
    ids=[
        "allreduce-4-ranks",
        "one-process",
        "table-stepped-2-ranks",
        "sharded-4-ranks",
        "async-n-step-4-ranks",
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(
    tmp_path, cli_env, n, layout, steps, delay, extra
):
    args = [
        *extra,
        "--seed",
        "11",
        "--total-env-steps",
        str(steps),
        "--set",
        f"layout={layout}",
        "--set",
        "eval_episodes=0",
        "--set",
        "log_interval_s=0.5",
    ]
    reference = _train(n, tmp_path / "reference", args, cli_env)
    assert reference.returncode == 0, reference.stderr
    # The signal must land mid-run: within the reference run's own training time (a fast
    # machine trained allreduce-4-ranks in 3.4 s, under the 4.0 s bound; CI at 1515fd6).
    with h5py.File(tmp_path / "reference" / "run.h5", "r") as f:
        training_s = float(f.attrs["wall_time_s"])
    low, high = delay
    high = max(low, min(high, 0.6 * training_s))
    delay_s = random.Random(f"{layout}-{time.time()}").uniform(low, high)

    code, out, err = _interrupt(n, tmp_path / "resumed", args, cli_env, delay_s)
    assert code == 3, f"SIGUSR1 after {delay_s:.2f} s: exit {code}\n{out}\n{err}"
    assert "checkpointed and stopped" in out
    with h5py.File(tmp_path / "resumed" / "run.h5", "r") as f:
        assert str(f.attrs["status"]) == "interrupted"

    resumed = subprocess.run(
        hpcrl_command(n, "train", "--resume", str(tmp_path / "resumed")),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "exactly (every rank's state restored)" in resumed.stdout

    ref = _contents(tmp_path / "reference")
    got = _contents(tmp_path / "resumed")
    assert ref[0] == got[0] == "completed"
    assert got[3] == 1 and ref[3] == 0
    for name in COMPARED:
        assert np.array_equal(ref[1][name], got[1][name]), f"/episodes/{name} differs"
    assert ref[2].keys() == got[2].keys() and len(ref[2]["obs"]) == steps
    for name in ref[2]:
        assert np.array_equal(ref[2][name], got[2][name]), f"/trajectories/{name} differs"
    assert ref[4].tobytes() == got[4].tobytes(), "final q_table differs"


def _step_tables(run_dir) -> dict[str, np.ndarray]:
    """{step file name: its q_table} of every step file kept."""
    out = {}
    for path in sorted((run_dir / "checkpoints").glob("step-*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = f["q_table"][()]
    return out


def test_async_resumed_at_a_checkpoint_matches_every_later_checkpoint(tmp_path, cli_env):
    """`async` restores each rank's own table bit for bit. Its checkpoints held
    ΔQ = Q_local - Q_base, and Q_base + ΔQ does not always round back to Q_local: the
    resumed run's merged tables differed in the last bit from the next checkpoints on
    (found by the SIGUSR1 case above in CI, once; later updates usually wash it out, so
    the final table alone rarely shows it). A deterministic failure on rank 1 after 20,000
    of its env steps resumes from step-73728, where 16 entries did not round back."""
    args = [
        *("--seed", "11", "--total-env-steps", "160000"),
        *("--set", "layout=async", "--set", "n_step=4", "--set", "eval_episodes=0"),
        *("--set", "checkpoint_interval_env_steps=8192", "--set", "keep_checkpoints=100"),
        *("--set", "record_trajectories=false"),
    ]
    reference = _train(4, tmp_path / "reference", args, cli_env)
    assert reference.returncode == 0, reference.stderr
    fail = ["--set", "debug.fail_rank=1", "--set", "debug.fail_after_env_steps=20000"]
    failed = _train(4, tmp_path / "resumed", [*args, *fail], cli_env)
    assert failed.returncode != 0, failed.stdout
    resumed = subprocess.run(
        hpcrl_command(
            4, "train", "--resume", str(tmp_path / "resumed"), fail[0], "debug.fail_rank=-1"
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "from step-73728.h5" in resumed.stdout and "exactly" in resumed.stdout, resumed.stdout
    ref, got = _step_tables(tmp_path / "reference"), _step_tables(tmp_path / "resumed")
    later = [name for name in got if int(name[5:-3]) > 73728]
    assert len(later) >= 10 and set(later) <= set(ref)
    differ = [name for name in later if ref[name].tobytes() != got[name].tobytes()]
    assert not differ, differ


def test_a_run_killed_after_its_last_checkpoint_resumes_exactly_without_a_step(tmp_path, cli_env):
    """A run's last checkpoint holds no env copy's state (`BUDGET_SPENT` on every rank:
    nothing is left to step). A job killed after writing it, before its status said so
    (`running`), resumes from it, says so, takes no step and ends with the same table."""
    from hpcrl.envs import BUDGET_SPENT

    args = [
        *("--seed", "11", "--total-env-steps", "300000", "--set", "layout=sharded"),
        *("--set", "eval_episodes=0"),
    ]
    run_dir = tmp_path / "run"
    done = _train(2, run_dir, args, cli_env)
    assert done.returncode == 0, done.stderr
    before = _contents(run_dir)
    latest = (run_dir / "checkpoints" / "latest.h5").resolve()
    with h5py.File(latest, "r") as f:
        assert json.loads(f.attrs["meta"])["env_steps"] == 300_000
        flags = [int(f[f"ranks/{k}/env_captured"][0]) for k in range(2)]
        assert flags == [BUDGET_SPENT, BUDGET_SPENT]
        assert f["ranks/0/env_rng"].shape[1] == 0
    with h5py.File(run_dir / "run.h5", "r+") as f:
        f.attrs["status"] = "running"  # what a kill -9 at that moment leaves

    resumed = subprocess.run(
        hpcrl_command(2, "train", "--resume", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing is left to step" in resumed.stdout, resumed.stdout
    after = _contents(run_dir)
    assert after[0] == "completed" and after[3] == 1
    for name in COMPARED:
        assert np.array_equal(before[1][name], after[1][name]), f"/episodes/{name} differs"
    for name in before[2]:
        assert np.array_equal(before[2][name], after[2][name]), f"/trajectories/{name} differs"
    assert before[4].tobytes() == after[4].tobytes(), "final q_table differs"
