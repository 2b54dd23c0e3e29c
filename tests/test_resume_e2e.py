"""End-to-end tests of checkpoint/resume: the real `python -m hpcrl train` under `mpiexec`.

(3) `kill -9` of the whole job at seeded random moments, each followed by
    `train --resume auto`: run.h5 stays readable and consistent after every kill, each
    restart continues from the newest step file, the finished run has the exact env-step
    total, one `/resumes` row per resume, and (allreduce) the same Q-table, episodes and
    trajectories, bit for bit, as an uninterrupted run with the same seed and world size
    (ps: actors flush their trajectories before each send, so a kill right after a
    checkpoint loses no row: `test_ps_kill_right_after_a_checkpoint_...`);
(4) a damaged newest checkpoint (truncated, or one byte flipped) is skipped with a warning,
    quarantined as `*.corrupt`, and the run continues from the previous one (`evaluate`
    falls back too); every checkpoint damaged: one error line and nothing touched;
(6) a run checkpointed on 4 ranks resumes on 2 in a new segment with an exact total;
(7) bad `--resume` input: one `hpcrl: error:` line, exit status 2 on every rank, no hang,
    the run directory unchanged;
    and SIGTERM as well as SIGUSR1 (also one that arrives before the first sync) end the
    run with a checkpoint, status `interrupted` and exit status 3 on every rank.

Per-rank exit statuses come from a tiny wrapper that calls `hpcrl.cli.main` (what
`python -m hpcrl` runs) and writes its return value to `rank-<k>` before exiting with it.

Run with `python -m pytest -q -m e2e tests/test_resume_e2e.py --timeout=300`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    copy_run,
    digest_tree,
    hpcrl_command,
    one_error_line,
)
from hpcrl.storage.checkpoints import _checksum
from jobs import TIMEOUT_S, Job, Result, job, open_h5, run, status, wrapped

pytestmark = pytest.mark.e2e

SEED = 11
STEP_FILE = re.compile(r"^step-(\d+)\.h5$")
STARTED = re.compile(r"^\[hpcrl\] (qlearning on |resuming )", re.MULTILINE)
FRESH = re.compile(r"^\[hpcrl\] qlearning on ", re.MULTILINE)
RESUMED = re.compile(
    r"^\[hpcrl\] resuming (?P<dir>\S+) from (?P<name>step-(?P<step>\d+)\.h5) at (?P<rest>.*)$",
    re.MULTILINE,
)
PROGRESS = re.compile(r"^\[hpcrl\] env_steps (?P<steps>[\d,]+)/", re.MULTILINE)
COMPLETED_IN = re.compile(r"^\[hpcrl\] completed in (?P<s>[\d.]+) s", re.MULTILINE)
EPISODE_KEYS = ("return", "length", "env_steps", "rank")
TRAJ_KEYS = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "env")

# --------------------------------------------------------------------------- run files


def config_args(budget: int, layout: str, *extra: str) -> list[str]:
    """The config of a test run, given again on every restart (as a job script would).
    Stepped by gymnasium's `SyncVectorEnv`: the kills and signals here are timed for its
    pace (the table stepper, `auto`'s pick for FrozenLake, ends these runs 5-10x sooner,
    before most of them land; `test_exact_resume_e2e.py` covers it)."""
    args = ["--total-env-steps", str(budget), "--seed", str(SEED)]
    for item in (f"layout={layout}", "eval_episodes=0", "vector_env=sync", *extra):
        args += ["--set", item]
    return args


def step_files(run_dir: Path) -> dict[int, Path]:
    """{env steps: path} of the intact-named step files."""
    out = {}
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if m := STEP_FILE.match(path.name):
                out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def read_run(run_dir: Path) -> dict:
    """The parts of run.h5 (and latest.h5) the tests compare."""
    out: dict = {}
    with open_h5(run_dir / "run.h5") as f:
        out["status"] = str(f.attrs["status"])
        out["episodes"] = {k: f["episodes"][k][()] for k in f["episodes"]}
        out["metrics_env_steps"] = f["metrics/env_steps"][()] if "env_steps" in f["metrics"] else []
        out["resumes"] = {k: f["resumes"][k][()] for k in f["resumes"]}
        if "trajectories" in f:
            out["traj"] = {k: f["trajectories"][k][()] for k in TRAJ_KEYS}
    latest = run_dir / "checkpoints" / "latest.h5"
    if latest.exists():
        with open_h5(latest) as f:
            out["q_table"] = f["q_table"][()]
    return out


def traj_file_rows(run_dir: Path) -> dict[int, int]:
    rows = {}
    for path in sorted((run_dir / "traj").glob("rank-*.h5")):
        with open_h5(path) as t:
            lengths = {len(t[k]) for k in TRAJ_KEYS}
        assert len(lengths) == 1, f"{path}: columns of different lengths {lengths}"
        rows[int(path.stem.split("-")[1])] = lengths.pop()
    return rows


def assert_traj_files_hold_checkpoint_rows(run_dir: Path) -> None:
    """After kill -9 with a checkpoint on disk: every traj file opens and each of its
    columns holds at least the rows the checkpoint counted for its rank (the files are
    flushed before every checkpoint). The columns may differ past those rows: a kill
    inside a chunk's write leaves some columns resized and not others (CI at 1515fd6:
    {40960, 30720}), and a resume cuts every column back to the checkpoint's rows
    (`TrajectoryWriter`)."""
    from hpcrl.storage.checkpoints import load_latest

    _, meta, _ = load_latest(run_dir / "checkpoints")
    counted = [int(rows) for rows in meta.get("traj_rows", [])]
    for path in sorted((run_dir / "traj").glob("rank-*.h5")):
        rank = int(path.stem.split("-")[1])
        with open_h5(path) as t:
            shortest = min(len(t[k]) for k in TRAJ_KEYS)
        if rank < len(counted):
            assert shortest >= counted[rank], f"{path}: {shortest} < {counted[rank]} rows"


def assert_consistent_after_kill(run_dir: Path) -> None:
    """After kill -9: run.h5 opens with plain h5py and its tables line up; once a
    checkpoint exists, the traj files hold its rows (flushed before every checkpoint; a
    file killed before its first flush is unreadable, and a restart without a checkpoint
    starts afresh anyway)."""
    with open_h5(run_dir / "run.h5") as f:
        # The processes die one at a time: rank 0 may see a peer go first (an MPI error)
        # and mark the run failed before its own SIGKILL lands. Either way it resumes.
        assert str(f.attrs["status"]) in ("running", "failed")
        lengths = {k: len(f["episodes"][k]) for k in f["episodes"]}
        assert set(lengths) == {"return", "length", "env_steps", "wall_time", "rank"}
        assert len(set(lengths.values())) == 1, f"/episodes columns differ: {lengths}"
        metrics = {k: len(f["metrics"][k]) for k in f["metrics"]}
        assert len(set(metrics.values())) <= 1, f"/metrics columns differ: {metrics}"
        for group in ("episodes", "metrics", "resumes"):
            for name in f[group]:
                f[group][name][()]
    latest = run_dir / "checkpoints" / "latest.h5"
    if step_files(run_dir):
        assert_traj_files_hold_checkpoint_rows(run_dir)
        # The link is swapped after its step file is in place and old files are deleted
        # after that: once made, it always names an existing step file. A kill between
        # the first step file's rename and the link's creation leaves no link at all;
        # `load_latest` then takes the newest step file.
        if not latest.is_symlink():
            assert len(step_files(run_dir)) == 1, "latest.h5 missing beside older step files"
            return
        assert latest.exists(), "latest.h5 dangles"
        assert latest.resolve().parent == (run_dir / "checkpoints").resolve()
        assert STEP_FILE.match(latest.resolve().name)


def assert_completed(run_dir: Path, budget: int, traj_gap_max: int = 0) -> dict:
    """A finished run: exact env-step total everywhere, consistent tables (the trajectory
    files may miss `traj_gap_max` rows at most: rows a kill lost, reported in a warning)."""
    data = read_run(run_dir)
    assert data["status"] == "completed"
    assert int(data["metrics_env_steps"][-1]) == budget
    assert np.all(np.diff(data["metrics_env_steps"]) >= 0)
    episodes = data["episodes"]
    assert len({len(v) for v in episodes.values()}) == 1
    assert len(episodes["return"]) > 0
    env_steps = episodes["env_steps"]
    assert np.all(np.diff(env_steps) >= 0), "/episodes/env_steps decreases"
    assert np.all((env_steps >= 1) & (env_steps <= budget))
    assert np.all(episodes["length"] >= 1)
    assert budget - traj_gap_max <= len(data["traj"]["obs"]) <= budget
    assert sum(traj_file_rows(run_dir).values()) == len(data["traj"]["obs"])
    if not traj_gap_max:
        assert len(data["traj"]["obs"]) == budget
    assert len({len(v) for v in data["resumes"].values()}) == 1
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp." in p.name] + [
        p.name for p in run_dir.rglob(".hpcrl-probe-*")
    ]
    assert not leftovers, f"temporary files left: {leftovers}"
    return data


def assert_one_error_line(result: Result, patterns: list[str], ranks: int = 2) -> str:
    """Exit status 2 from mpiexec and from every rank, exactly one non-empty stderr line,
    `hpcrl: error:` once, every regex in it, nothing on stdout."""
    assert result.rc == 2, result.show()
    assert result.ranks == dict.fromkeys(range(ranks), 2), result.show()
    return one_error_line(result.stdout, result.stderr, patterns, result.show())


def assert_interrupted(result: Result, run_dir: Path, sig: str, ranks: int) -> int:
    """Exit status 3 on every rank, status interrupted, the message; returns the env steps
    of the checkpoint it wrote (latest.h5)."""
    assert result.rc == 3, result.show()
    assert result.ranks == dict.fromkeys(range(ranks), 3), result.show()
    assert f"[hpcrl] {sig}: checkpointed and stopped; continue with: hpcrl train --resume " in (
        result.stdout
    ), result.show()
    assert "Traceback" not in result.stderr, result.show()
    assert status(run_dir) == "interrupted"
    latest = (run_dir / "checkpoints" / "latest.h5").resolve()
    steps = int(STEP_FILE.match(latest.name).group(1))
    assert latest.name == f"step-{max(step_files(run_dir))}.h5"
    with open_h5(run_dir / "run.h5") as f:
        assert int(f["metrics/env_steps"][-1]) == steps
    return steps


def flip_q_table_byte(path: Path) -> None:
    """Flip one byte inside the stored q_table values (only the checksum can tell)."""
    with h5py.File(path, "r") as f:
        offset = f["q_table"].id.get_offset()
        nbytes = f["q_table"].id.get_storage_size()
    assert offset is not None and nbytes > 16
    with open(path, "r+b") as g:
        g.seek(offset + nbytes // 2)
        byte = g.read(1)
        g.seek(offset + nbytes // 2)
        g.write(bytes([byte[0] ^ 0xFF]))


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def set_format_version(path: Path, version: int) -> None:
    """Rewrite a checkpoint's `meta` with another format_version and a matching checksum."""
    with h5py.File(path, "r+") as f:
        meta = json.loads(str(f.attrs["meta"]))
        meta["format_version"] = version
        meta_json = json.dumps(meta, sort_keys=True)
        arrays: dict[str, np.ndarray] = {}
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
        f.attrs["meta"] = meta_json
        f.attrs["checksum"] = _checksum(arrays, meta_json)


def assert_same_as_reference(data: dict, ref: dict) -> None:
    """Bitwise: final Q-table, /episodes (all but wall_time) and every trajectory column."""
    assert np.any(ref["q_table"] != 0.0)
    assert data["q_table"].dtype == ref["q_table"].dtype
    assert np.array_equal(data["q_table"], ref["q_table"]), "final q_table differs"
    for key in EPISODE_KEYS:
        a, b = data["episodes"][key], ref["episodes"][key]
        assert a.dtype == b.dtype and np.array_equal(a, b), f"/episodes/{key} differs"
    for key in TRAJ_KEYS:
        assert np.array_equal(data["traj"][key], ref["traj"][key]), f"/trajectories/{key}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per (world size, config), computed on first use."""
    cache: dict = {}

    def get(n: int, args: list[str]) -> dict:
        key = (n, tuple(args))
        if key not in cache:
            root = tmp_path_factory.mktemp("reference")
            run_dir = root / "run"
            result = run(hpcrl_command(n, "train", "--run-dir", str(run_dir), *args), root / "logs")
            assert result.rc == 0 and COMPLETED_IN.search(result.stdout), result.show()
            data = read_run(run_dir)
            assert data["resumes"]["env_steps"].size == 0
            cache[key] = data
        return cache[key]

    return get


# Several checkpoints, then SIGUSR1: the run the corruption and bad-input tests start from.
SMALL_BUDGET = 200_000
SMALL_ARGS = config_args(
    SMALL_BUDGET,
    "allreduce",
    "checkpoint_interval_env_steps=8192",
    "checkpoint_interval_s=0",
    "keep_checkpoints=4",
    "log_interval_s=0.5",
)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """allreduce on 2 ranks stopped by SIGUSR1 once 4 step files exist; copy before use."""
    root = tmp_path_factory.mktemp("interrupted")
    run_dir = root / "run"
    cmd = wrapped(2, root / "logs", "train", "--run-dir", str(run_dir), *SMALL_ARGS)
    with job(cmd, root / "logs") as j:
        j.wait_for(FRESH)
        deadline = time.monotonic() + TIMEOUT_S
        while len(step_files(run_dir)) < 4:
            assert j.proc.poll() is None, f"ended before 4 checkpoints\n{j.result().show()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        j.signal(signal.SIGUSR1)
        result = j.wait()
    steps = assert_interrupted(result, run_dir, "SIGUSR1", ranks=2)
    assert steps < SMALL_BUDGET
    assert len(step_files(run_dir)) == 4
    return run_dir


@pytest.fixture(scope="module")
def run_without_checkpoint(tmp_path_factory) -> Path:
    """A 2-rank run killed (-9) while training, before it wrote any checkpoint."""
    root = tmp_path_factory.mktemp("no-checkpoint")
    run_dir = root / "run"
    args = config_args(
        5_000_000,
        "allreduce",
        "checkpoint_interval_env_steps=0",
        "checkpoint_interval_s=0",
        "log_interval_s=0.2",
    )
    with job(hpcrl_command(2, "train", "--run-dir", str(run_dir), *args), root / "logs") as j:
        j.wait_for(PROGRESS)
        j.kill()
    assert status(run_dir) in ("running", "failed")  # killed one process at a time
    assert not step_files(run_dir)
    return run_dir


# ------------------------------------------------------------- (3) kill -9, resume auto


@dataclass(frozen=True)
class KillPlan:
    n: int
    layout: str
    budget: int
    kills: int
    log_interval_s: float  # also how often actors flush their trajectory files


KILL_PLANS = [
    KillPlan(n=2, layout="allreduce", budget=300_000, kills=10, log_interval_s=0.2),
    # ps actors flush their trajectories before every send, so rank 0 never counts a row
    # that is not on disk. A kill inside an HDF5 write can still leave a file unreadable
    # (HDF5 is not crash-consistent): it is set aside and the gap is reported, which is
    # the only loss tolerated below.
    KillPlan(n=3, layout="ps", budget=300_000, kills=3, log_interval_s=0.2),
]
GAP_WARNING = re.compile(
    r"^\[hpcrl\] warning \(rank \d+\): \S+ (?:lost its last|was unreadable after a kill; "
    r"set aside as \S+ with) (\d+) rows",
    re.MULTILINE,
)
KILL_REACH = 0.7  # the kill moments lie in the first 70% of the run ...
KILL_JITTER_S = 0.2  # ... each up to this long after its progress point (log interval)


@pytest.mark.parametrize("plan", KILL_PLANS, ids=[p.layout for p in KILL_PLANS])
def test_kill_9_at_random_moments_then_resume_auto(tmp_path, reference, plan):
    """The moments are seeded: progress points (env steps, read from the progress lines)
    spread over the run, each plus a random delay. Defined by progress rather than wall
    time, they land alike on a busy or an idle machine and never after the end."""
    args = config_args(
        plan.budget,
        plan.layout,
        "checkpoint_interval_env_steps=20000",
        "checkpoint_interval_s=0",
        f"log_interval_s={plan.log_interval_s}",
    )
    rng = random.Random(f"hpcrl-resume-e2e-{plan.layout}")  # the same moments every time
    targets = sorted(rng.uniform(0, KILL_REACH * plan.budget) for _ in range(plan.kills))
    jitters = [rng.uniform(0, KILL_JITTER_S) for _ in range(plan.kills)]
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    cmd = hpcrl_command(plan.n, "train", "--resume", "auto", "--run-dir", str(run_dir), *args)
    resumed_from: list[int] = []  # checkpoint steps of the resumes since the last fresh start

    def start_and_check(j: Job) -> None:
        """The restart picked the newest step file present before it (or started fresh)."""
        match = j.wait_for(STARTED)
        if before:
            resumed = RESUMED.search(j.stdout())
            assert resumed, f"did not resume with {sorted(before)} present\n{j.stdout()}"
            assert int(resumed.group("step")) == max(before), j.stdout()
            assert Path(resumed.group("dir")) == run_dir
            how = "exactly" if plan.layout == "allreduce" else "in a new segment"
            assert how in resumed.group("rest"), j.stdout()
            resumed_from.append(max(before))
        else:
            assert match.group(1) == "qlearning on ", j.stdout()
            resumed_from.clear()

    for attempt, (target, jitter) in enumerate(zip(targets, jitters, strict=True)):
        before = step_files(run_dir)
        had_run = (run_dir / "run.h5").exists()
        with job(cmd, logs) as j:
            start_and_check(j)
            deadline = time.monotonic() + TIMEOUT_S
            steps = max(before, default=0)
            while steps < target:
                assert j.proc.poll() is None, f"kill {attempt}: ended\n{j.result().show()}"
                assert time.monotonic() < deadline, f"kill {attempt}: no progress to {target}"
                time.sleep(0.005)
                progress = PROGRESS.findall(j.stdout())
                steps = int(progress[-1].replace(",", "")) if progress else steps
            time.sleep(jitter)
            assert j.proc.poll() is None, f"kill {attempt}: ended\n{j.result().show()}"
            j.kill()
        delay = f"{jitter:.2f} s after env step {steps} (target {target:.0f})"
        if had_run and not before:
            assert "never wrote a checkpoint" in j.stderr(), j.stderr()
        try:
            assert_consistent_after_kill(run_dir)
        except (AssertionError, OSError) as exc:
            pytest.fail(
                f"after kill {attempt} ({delay}; step files "
                f"before it: {sorted(before)}; now {sorted(step_files(run_dir))}): {exc!r}"
            )

    before = step_files(run_dir)
    assert before, "no checkpoint after every kill"
    with job(cmd, logs) as j:
        start_and_check(j)
        result = j.wait()
    assert result.rc == 0, result.show()
    assert "warning" not in GAP_WARNING.sub("", result.stdout + result.stderr), result.show()
    # Trajectory rows lost to a kill inside an HDF5 write (reported; rare).
    lost = sum(int(m) for p in logs.glob("*.out") for m in GAP_WARNING.findall(p.read_text()))
    data = assert_completed(run_dir, plan.budget, traj_gap_max=lost)

    resumes = data["resumes"]
    assert resumes["env_steps"].tolist() == resumed_from
    assert resumes["world_size"].tolist() == [plan.n] * len(resumed_from)
    assert resumes["from_world_size"].tolist() == [plan.n] * len(resumed_from)
    assert resumes["exact"].tolist() == [int(plan.layout == "allreduce")] * len(resumed_from)
    assert resumes["slurm_restart_count"].tolist() == [-1] * len(resumed_from)
    assert resumes["slurm_job_id"].tolist() == [-1] * len(resumed_from)
    assert np.all(resumes["episodes_dropped"] >= 0)
    assert np.all(np.diff(resumes["wall_time"]) > 0)
    assert resumed_from, "the last attempt did not resume"

    if plan.layout == "allreduce":
        assert_same_as_reference(data, reference(plan.n, args))
        # Once completed, `--resume auto` says so, exits 0 and touches nothing.
        before_digest = digest_tree(run_dir)
        result = run(cmd, logs)
        assert result.rc == 0, result.show()
        assert result.stdout.strip() == (
            f"[hpcrl] {run_dir} already completed; nothing to resume"
        ), result.show()
        assert digest_tree(run_dir) == before_digest


def test_ps_kill_right_after_a_checkpoint_keeps_every_trajectory_row(tmp_path):
    budget = 300_000
    args = config_args(
        budget,
        "ps",
        "checkpoint_interval_env_steps=20000",
        "checkpoint_interval_s=0",
        "log_interval_s=30",  # the actors' first flush comes long after the kill
    )
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    cmd = hpcrl_command(3, "train", "--resume", "auto", "--run-dir", str(run_dir), *args)
    with job(cmd, logs) as j:
        j.wait_for(FRESH)
        deadline = time.monotonic() + TIMEOUT_S
        while not step_files(run_dir):
            assert j.proc.poll() is None, j.result().show()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        j.kill()
    (first,) = step_files(run_dir)
    result = run(cmd, logs)
    assert f"from step-{first}.h5" in result.stdout, result.show()
    assert result.rc == 0, result.show()
    assert "warning" not in result.stdout + result.stderr, result.show()
    assert_completed(run_dir, budget)


# ------------------------------------------------------------- (4) damaged checkpoints


@pytest.mark.parametrize("damage", [truncate_half, flip_q_table_byte], ids=["truncated", "flip"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(
    tmp_path, interrupted_run, reference, damage
):
    run_dir = copy_run(interrupted_run, tmp_path / "run")
    steps = step_files(run_dir)
    newest, previous = list(steps)[-1], list(steps)[-2]
    damage(steps[newest])
    with open_h5(run_dir / "run.h5") as f:
        rows_before = len(f["episodes/return"])
    with open_h5(steps[previous]) as f:
        previous_meta = json.loads(str(f.attrs["meta"]))

    result = run(hpcrl_command(2, "train", "--resume", str(run_dir)), tmp_path / "logs")
    assert result.rc == 0, result.show()
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.show()
    assert f"step-{newest}.h5" in warnings[0], result.show()
    assert re.search(r"checksum|cannot be read|incomplete", warnings[0]), result.show()
    resumed = RESUMED.search(result.stdout)
    assert resumed and resumed.group("name") == f"step-{previous}.h5", result.show()
    assert "exactly" in resumed.group("rest")
    # Quarantined, out of the rotation; the rest of the rotation goes on as usual.
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / f"step-{newest}.h5.corrupt").is_file()
    assert newest not in step_files(run_dir)

    data = assert_completed(run_dir, SMALL_BUDGET)
    resumes = data["resumes"]
    assert resumes["env_steps"].tolist() == [previous]
    assert resumes["exact"].tolist() == [1]
    assert resumes["world_size"].tolist() == [2]
    assert resumes["from_world_size"].tolist() == [2]
    assert resumes["episodes_dropped"].tolist() == [rows_before - previous_meta["episodes_rows"]]
    assert resumes["episodes_dropped"][0] > 0
    # Bit for bit what an uninterrupted run computes: nothing of the damaged file leaked in.
    assert_same_as_reference(data, reference(2, SMALL_ARGS))


@pytest.mark.parametrize("how", ["resume", "auto"])
def test_every_checkpoint_damaged_is_one_error_and_touches_nothing(tmp_path, interrupted_run, how):
    run_dir = copy_run(interrupted_run, tmp_path / "run")
    steps = step_files(run_dir)
    for i, path in enumerate(steps.values()):
        (truncate_half if i % 2 else flip_q_table_byte)(path)
    before = digest_tree(run_dir)
    resume = ["--resume", str(run_dir)] if how == "resume" else ["--resume", "auto"]
    args = [*resume, "--run-dir", str(run_dir)] if how == "auto" else resume
    result = run(wrapped(2, tmp_path / "logs", "train", *args), tmp_path / "logs")
    names = [re.escape(path.name) for path in steps.values()]
    assert_one_error_line(result, [r"no intact checkpoint", *names])
    assert digest_tree(run_dir) == before
    assert status(run_dir) == "interrupted"


def test_evaluate_falls_back_to_the_previous_checkpoint(tmp_path, interrupted_run):
    from hpcrl.evaluation import greedy_episode_returns

    run_dir = copy_run(interrupted_run, tmp_path / "run")
    steps = step_files(run_dir)
    newest, previous = list(steps)[-1], list(steps)[-2]
    truncate_half(steps[newest])
    before = digest_tree(run_dir)
    cmd = hpcrl_command(2, "evaluate", str(run_dir), "--episodes", "20", "--seed", "5")
    result = run(cmd, tmp_path / "logs")
    assert result.rc == 0, result.show()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "warning" in lines[0], result.show()
    assert f"step-{newest}.h5" in lines[0] and f"using step-{previous}.h5" in lines[0]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with open_h5(steps[previous]) as f:
        q_table = f["q_table"][()]
    returns = greedy_episode_returns("FrozenLake8x8-v1", {}, q_table, np.arange(20), 5)
    assert out == {
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "episodes": 20,
        "checkpoint": str(steps[previous].absolute()),  # the file it fell back to
    }
    assert digest_tree(run_dir) == before  # evaluate reads; it quarantines nothing


# ------------------------------------------------------------- (6) another world size


@pytest.mark.parametrize("layout", ["allreduce", "ps"])
def test_checkpoint_on_4_ranks_resumes_on_2(tmp_path, layout):
    budget = 400_000
    args = config_args(budget, layout, "checkpoint_interval_s=0", "log_interval_s=0.2")
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    with job(wrapped(4, logs, "train", "--run-dir", str(run_dir), *args), logs) as j:
        j.wait_for(PROGRESS)
        time.sleep(random.Random(f"4to2-{layout}").uniform(0.0, 0.3))
        j.signal(signal.SIGUSR1)
        result = j.wait()
    steps = assert_interrupted(result, run_dir, "SIGUSR1", ranks=4)
    assert 0 < steps < budget
    assert list(step_files(run_dir)) == [steps]  # no interval checkpoints: the signal's one
    with open_h5(run_dir / "checkpoints" / "latest.h5") as f:
        assert json.loads(str(f.attrs["meta"]))["world_size"] == 4

    result = run(wrapped(2, logs, "train", "--resume", str(run_dir)), logs)
    assert result.rc == 0, result.show()
    assert result.ranks == {0: 0, 1: 0}, result.show()
    resumed = RESUMED.search(result.stdout)
    assert resumed and int(resumed.group("step")) == steps, result.show()
    assert "(the world size changed: was 4 ranks, now 2;" in resumed.group("rest")
    assert "warning" not in result.stdout + result.stderr, result.show()

    data = assert_completed(run_dir, budget)
    resumes = data["resumes"]
    assert resumes["world_size"].tolist() == [2]
    assert resumes["from_world_size"].tolist() == [4]
    assert resumes["exact"].tolist() == [0]
    assert resumes["env_steps"].tolist() == [steps]
    # The files of ranks this world no longer has stay linked, cut at the checkpoint.
    acting_before = [1, 2, 3] if layout == "ps" else [0, 1, 2, 3]
    assert sorted(traj_file_rows(run_dir)) == acting_before
    ranks_after = set(data["episodes"]["rank"][data["episodes"]["env_steps"] > steps].tolist())
    assert ranks_after <= ({1} if layout == "ps" else {0, 1})


# ------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_3_and_resumes_exactly(tmp_path, reference, sig):
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    with job(wrapped(2, logs, "train", "--run-dir", str(run_dir), *SMALL_ARGS), logs) as j:
        j.wait_for(FRESH)
        time.sleep(random.Random(f"signal-{sig.name}").uniform(0.2, 0.8))
        j.signal(sig)
        result = j.wait()
    steps = assert_interrupted(result, run_dir, sig.name, ranks=2)
    assert 0 < steps < SMALL_BUDGET

    result = run(wrapped(2, logs, "train", "--resume", str(run_dir)), logs)
    assert result.rc == 0 and result.ranks == {0: 0, 1: 0}, result.show()
    resumed = RESUMED.search(result.stdout)
    assert resumed and int(resumed.group("step")) == steps, result.show()
    data = assert_completed(run_dir, SMALL_BUDGET)
    assert data["resumes"]["exact"].tolist() == [1]
    assert_same_as_reference(data, reference(2, SMALL_ARGS))


def test_signal_before_the_first_sync(tmp_path, reference):
    """SIGUSR1 the moment the start line appears, long before the first sync (1000 vector
    steps = 64,000 env steps on 2 ranks): the first sync stops the run with a checkpoint."""
    budget = 140_000
    args = config_args(
        budget,
        "allreduce",
        "sync_interval=1000",
        "checkpoint_interval_env_steps=0",
        "checkpoint_interval_s=0",
        "log_interval_s=0.2",
    )
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    with job(wrapped(2, logs, "train", "--run-dir", str(run_dir), *args), logs) as j:
        j.wait_for(FRESH)
        j.signal(signal.SIGUSR1)
        result = j.wait()
    steps = assert_interrupted(result, run_dir, "SIGUSR1", ranks=2)
    assert steps == 64_000
    assert list(step_files(run_dir)) == [64_000]

    result = run(wrapped(2, logs, "train", "--resume", "auto", "--run-dir", str(run_dir)), logs)
    assert result.rc == 0, result.show()
    resumed = RESUMED.search(result.stdout)
    assert resumed and resumed.group("name") == "step-64000.h5", result.show()
    data = assert_completed(run_dir, budget)
    assert_same_as_reference(data, reference(2, args))


@pytest.mark.parametrize("launcher", [None, 2], ids=["one-process", "mpiexec-2"])
def test_signals_after_the_run_ended_change_nothing(tmp_path, cli_env, launcher):
    """SIGUSR1 sent every 2 ms from the "completed" line until the job exits: the run is
    on disk, so a late request is ignored and the job still exits 0. Python's own
    finalization would otherwise put back the default action, death by signal 10 (a
    job array would see a completed run fail)."""
    args = ["--total-env-steps", "20000", "--set", "eval_episodes=0", "--set", "vector_env=table"]
    proc = subprocess.Popen(
        hpcrl_command(launcher, "train", "--run-dir", str(tmp_path / "run"), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "completed in" in line:
                break
        assert "completed in" in seen[-1], "".join(seen)
        sent = 0
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
                sent += 1
            time.sleep(0.002)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent > 0
    # MPICH's mpiexec forwards each signal to its proxies over a socket; one that arrives
    # while they close can fail that write and make mpiexec itself exit 255 (seen once, in
    # a local CI run: "HYDU_sock_write ... Bad file descriptor"). The ranks exited 0 then;
    # a rank killed by the signal shows as "BAD TERMINATION" instead.
    launcher_race = proc.returncode == 255 and "HYDU_sock_write" in err
    assert proc.returncode == 0 or (launcher_race and "BAD TERMINATION" not in err), (
        f"exit {proc.returncode} after {sent} late SIGUSR1\n{err}"
    )
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert str(f.attrs["status"]) == "completed"


# ------------------------------------------------------------- (7) bad --resume input


@contextlib.contextmanager
def read_only_mount(path: Path):
    """`path` bind-mounted read-only onto itself (root ignores permission bits); skips the
    test where this machine cannot mount."""

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    try:
        bound = sh("mount", "--bind", str(path), str(path))
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        remount = sh("mount", "-o", "remount,ro,bind", str(path))
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        try:
            (path / ".write-test").touch()
        except OSError:
            pass
        else:
            (path / ".write-test").unlink()
            pytest.skip("a read-only bind mount is still writable here")
        yield
    finally:
        if sh("umount", str(path)).returncode != 0:
            sh("umount", "-l", str(path))


def _conflict_keys(line: str, newest: int) -> set[str]:
    match = re.search(r"conflicts with checkpoint (step-\d+\.h5): (.*); drop those settings", line)
    assert match, line
    assert match.group(1) == f"step-{newest}.h5"
    return set(re.findall(r"(?:^|, )([\w.]+) ", match.group(2)))


BAD_RESUME_CASES = [
    # (id, what the run directory holds, extra args, regexes, conflicting keys or None)
    ("no-run", "empty", [], [r"holds no run", r"nothing to resume"], None),
    ("missing-dir", "missing", [], [r"holds no run", r"nothing to resume"], None),
    (
        "no-checkpoint",
        "no-checkpoint",
        [],
        [r"a run \(status (running|failed)\) but no checkpoint", r"nothing to resume"],
        None,
    ),
    ("alpha", "interrupted", ["--set", "alpha=0.5"], [r"alpha 0\.5"], {"alpha"}),
    ("env", "interrupted", ["--env", "CliffWalking-v1"], [r"CliffWalking-v1"], {"env_id"}),
    ("layout", "interrupted", ["--set", "layout=ps"], [r"layout 'ps'"], {"layout"}),
    (
        "two-keys",
        "interrupted",
        ["--seed", "3", "--set", "gamma=0.9"],
        [r"seed 3", r"gamma 0\.9"],
        {"seed", "gamma"},
    ),
    ("overwrite", "interrupted", ["--overwrite"], [r"--resume and --overwrite contradict"], None),
    ("newer-format", "newer-format", [], [r"format version 99", r"upgrade hpcrl"], None),
    ("read-only", "read-only", [], [r"not writable", r"[Rr]ead-only file system"], None),
]


@pytest.mark.parametrize(
    ("holds", "extra", "patterns", "keys"),
    [c[1:] for c in BAD_RESUME_CASES],
    ids=[c[0] for c in BAD_RESUME_CASES],
)
def test_bad_resume_is_one_error_line_and_touches_nothing(
    tmp_path, request, holds, extra, patterns, keys
):
    run_dir = tmp_path / "run"
    if holds == "empty":
        run_dir.mkdir()
    elif holds == "no-checkpoint":
        copy_run(request.getfixturevalue("run_without_checkpoint"), run_dir)
    elif holds != "missing":
        copy_run(request.getfixturevalue("interrupted_run"), run_dir)
    newest = max(step_files(run_dir), default=None)
    if holds == "newer-format":
        from hpcrl.storage.checkpoints import CheckpointFormatError, load_checkpoint

        path = step_files(run_dir)[newest]
        set_format_version(path, 99)
        with pytest.raises(CheckpointFormatError):  # the checksum matches: only the version
            load_checkpoint(path)
        patterns = [*patterns, re.escape(path.name)]
    before = digest_tree(run_dir) if run_dir.exists() else None
    cmd = wrapped(2, tmp_path / "logs", "train", "--resume", str(run_dir), *extra)
    with read_only_mount(run_dir) if holds == "read-only" else contextlib.nullcontext():
        result = run(cmd, tmp_path / "logs")
        names_dir = [] if "--overwrite" in extra else [re.escape(f"'{run_dir}")]
        line = assert_one_error_line(result, [*names_dir, *patterns])
        after = digest_tree(run_dir) if run_dir.exists() else None
    assert after == before
    if keys is not None:
        assert _conflict_keys(line, newest) == keys, line
    if holds in ("interrupted", "newer-format", "read-only"):
        assert status(run_dir) == "interrupted"


def test_resume_auto_needs_a_run_dir(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run(wrapped(2, tmp_path / "logs", "train", "--resume", "auto"), tmp_path / "logs", cwd)
    assert_one_error_line(result, [r"--resume auto needs --run-dir"])
    assert list(cwd.iterdir()) == []


def test_resume_and_run_dir_must_agree(tmp_path, interrupted_run):
    run_dir = copy_run(interrupted_run, tmp_path / "run")
    other = tmp_path / "other"
    before = digest_tree(run_dir)
    cmd = wrapped(2, tmp_path / "logs", "train", "--resume", str(run_dir), "--run-dir", str(other))
    result = run(cmd, tmp_path / "logs")
    assert_one_error_line(result, [r"name different directories", re.escape(str(other))])
    assert digest_tree(run_dir) == before
    assert not other.exists()


def test_resume_auto_starts_a_run_without_checkpoint_afresh(tmp_path, run_without_checkpoint):
    run_dir = copy_run(run_without_checkpoint, tmp_path / "run")
    budget = 20_000
    args = config_args(budget, "allreduce", "log_interval_s=0.5")
    cmd = wrapped(2, tmp_path / "logs", "train", "--resume", "auto", "--run-dir", str(run_dir))
    result = run([*cmd, *args], tmp_path / "logs")
    assert result.rc == 0 and result.ranks == {0: 0, 1: 0}, result.show()
    assert FRESH.search(result.stdout) and not RESUMED.search(result.stdout), result.show()
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, result.show()
    assert "warning" in warnings[0] and "never wrote a checkpoint" in warnings[0]
    assert "starting it again from the beginning" in warnings[0]
    data = assert_completed(run_dir, budget)
    assert data["resumes"]["env_steps"].size == 0
    with open_h5(run_dir / "run.h5") as f:
        assert json.loads(f.attrs["config"])["total_env_steps"] == budget


# ------------------------------------------------- findings of the review (regressions)


def test_a_second_job_cannot_resume_or_overwrite_a_live_run(tmp_path):
    """While a run is being written (its directory locked, run.h5 open for writing), a
    second `--resume auto` or `--overwrite` on the same directory is refused and the live
    run goes on untouched; stopped with SIGUSR1, it then resumes and completes (at once:
    `stop_at_return` 0, which any FrozenLake return reaches, instead of the rest of a
    budget that had to outlast the two refused launches)."""
    budget = 3_000_000
    run_dir = tmp_path / "live"
    logs = tmp_path / "logs"
    args = config_args(budget, "allreduce", "checkpoint_interval_s=0", "log_interval_s=0.2")
    with job(hpcrl_command(2, "train", "--run-dir", str(run_dir), *args), logs) as live:
        live.wait_for(PROGRESS)  # training, before its first checkpoint
        before = sorted(p.name for p in run_dir.rglob("*"))
        small = config_args(2000, "allreduce")
        for extra in (["--resume", "auto"], ["--overwrite"]):
            result = run(wrapped(2, logs, "train", "--run-dir", str(run_dir), *small, *extra), logs)
            assert_one_error_line(result, [r"in use by another running hpcrl job"])
        assert sorted(p.name for p in run_dir.rglob("*")) == before
        live.signal(signal.SIGUSR1)
        result = live.wait()
    assert result.rc == 3, result.show()
    assert status(run_dir) == "interrupted"
    resume = ["--resume", "auto", *args, "--set", "stop_at_return=0"]
    result = run(hpcrl_command(2, "train", "--run-dir", str(run_dir), *resume), logs)
    assert result.rc == 0, result.show()
    assert "[hpcrl] stopped early at " in result.stdout, result.show()
    assert status(run_dir) == "completed"


def test_ps_one_process_checkpoint_resumed_on_4_ranks_keeps_rank_0_trajectories(tmp_path):
    """Rank 0 writes trajectories as a one-process run but not as the 4-rank parameter
    server: its file stays linked, cut back to the checkpoint."""
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    budget = 40_000
    args = config_args(budget, "ps", "checkpoint_interval_env_steps=10000", "num_envs=4")
    failing = ["--set", "debug.fail_rank=0", "--set", "debug.fail_after_env_steps=25000"]
    result = run(hpcrl_command(None, "train", "--run-dir", str(run_dir), *args, *failing), logs)
    assert result.rc == 1 and "injected failure" in result.stderr, result.show()
    checkpoint = max(step_files(run_dir))
    assert checkpoint >= 20_000
    result = run(
        hpcrl_command(4, "train", "--resume", str(run_dir), "--set", "debug.fail_rank=-1"),
        logs,
    )
    assert result.rc == 0, result.show()
    data = assert_completed(run_dir, budget)
    with open_h5(run_dir / "run.h5") as f:
        ranks = f["trajectories/ranks"][()].tolist()
        rows = dict(zip(ranks, f["trajectories/rows"][()].tolist(), strict=True))
    assert rows[0] == checkpoint and set(ranks) == {0, 1, 2, 3}
    assert len(data["traj"]["obs"]) == budget


def test_unreadable_orphan_trajectory_file_leaves_trajectories_readable(tmp_path):
    """A rank file of a larger earlier world that a kill left unreadable is set aside with
    a warning; `/trajectories` links what is really there and reads back whole."""
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    budget = 200_000
    args = config_args(budget, "allreduce", "checkpoint_interval_env_steps=40000")
    failing = ["--set", "debug.fail_rank=1", "--set", "debug.fail_after_env_steps=25000"]
    result = run(hpcrl_command(4, "train", "--run-dir", str(run_dir), *args, *failing), logs)
    assert result.rc != 0 and step_files(run_dir), result.show()
    orphan = run_dir / "traj" / "rank-3.h5"
    os.truncate(orphan, 3000)
    result = run(
        hpcrl_command(2, "train", "--resume", str(run_dir), "--set", "debug.fail_rank=-1"),
        logs,
    )
    assert result.rc == 0, result.show()
    assert "rank-3.h5 holds 0 of the" in result.stdout, result.show()
    assert (run_dir / "traj" / "rank-3.h5.corrupt").exists()
    with open_h5(run_dir / "run.h5") as f:
        obs = f["trajectories/obs"][()]  # raised before: rows the file no longer had
        rows = f["trajectories/rows"][()]
        assert len(obs) == int(rows.sum()) < budget
        assert int(f["metrics/env_steps"][-1]) == budget
