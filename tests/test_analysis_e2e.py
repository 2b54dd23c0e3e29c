"""Acceptance of `analyse` and the run-file changes against real runs (issue 12): every
`/metrics` column of a PPO, DQN, IMPALA and tabular run has one row per log row,
`tensorboard: true` writes event files that TensorBoard's own reader reads back equal to
`/metrics` (and with the key off nothing is written or imported), and `analyse` on a run
that is training under `mpirun -n 2` marks it running without changing what it writes."""

from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO, hpcrl_command, run_hpcrl

pytestmark = pytest.mark.e2e


def _config(name: str) -> str:
    return str(REPO / "configs" / name)


# (ranks, train arguments): tiny budgets, a log row every 0.05 s so that keys such as the
# losses and the learning rate appear after the first rows (DQN learns only after 2500 of
# its 3000 env steps: its first rows come before any update, even on a loaded machine).
# Q-learning's budget is what lasts ~0.9 s on a 2-core VM: 40,000 steps took 0.2 s there
# and once made fewer than the 3 rows the test asks for.
RUNS = {
    "ppo": (2, [_config("cartpole-ppo.yaml"), "--total-env-steps", "4096"]),
    "dqn": (
        2,
        [
            _config("cartpole-dqn.yaml"),
            "--total-env-steps",
            "3000",
            "--set",
            "learning_starts=2500",
        ],
    ),
    "impala": (3, [_config("cartpole-impala.yaml"), "--total-env-steps", "6000"]),
    "qlearning": (
        2,
        [
            _config("frozenlake8x8-qlearning.yaml"),
            "--total-env-steps",
            "200000",
            "--set",
            "layout=ps",
        ],
    ),
}
QUICK = ["--set", "log_interval_s=0.05", "--set", "eval_episodes=0"]


def _train(cli_env, tmp_path, algo: str, *extra: str):
    ranks, args = RUNS[algo]
    run_dir = tmp_path / algo
    result = run_hpcrl(cli_env, ranks, "train", *args, *QUICK, *extra, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def _metric_columns(f: h5py.File) -> dict[str, np.ndarray]:
    found = {}
    f["metrics"].visititems(
        lambda name, obj: (
            found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    )
    return found


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", list(RUNS))
def test_every_metrics_column_has_one_row_per_log_row(tmp_path, cli_env, algo):
    """Format 2: each `/metrics` column is as long as `/metrics/env_steps`, keys that
    appear late hold NaN in the earlier rows, and every dataset says its units."""
    run_dir = _train(cli_env, tmp_path, algo)
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert int(f.attrs["format_version"]) == 2
        columns = _metric_columns(f)
        rows = len(columns["env_steps"])
        assert rows >= 3, rows
        assert {name: len(c) for name, c in columns.items()} == dict.fromkeys(columns, rows)
        assert "units" in f["metrics/env_steps"].attrs
        assert f["episodes/wall_time"].attrs["units"] == "s"
        late = [n for n, c in columns.items() if c.dtype.kind == "f" and np.isnan(c[0])]
        if algo == "dqn":
            # The learner's losses exist only once it has updated: NaN before, not shifted.
            assert late, sorted(columns)
            assert all(np.isfinite(columns[n][-2]) for n in late), late


def _scalars(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", ["impala", "ppo"])
def test_tensorboard_event_files_read_back_equal_to_metrics(tmp_path, cli_env, algo):
    """`tensorboard: true`: rank 0 writes `RUN_DIR/tb/`; TensorBoard's EventAccumulator
    reads every `/metrics` column back (step = env_steps, value = the float32 of the
    HDF5 value, rows where it is NaN absent) and one `episodes/return` per episode."""
    run_dir = _train(cli_env, tmp_path, algo, "--set", "tensorboard=true")
    scalars = _scalars(run_dir / "tb")
    with h5py.File(run_dir / "run.h5", "r") as f:
        columns = _metric_columns(f)
        episode_steps = f["episodes/env_steps"][()]
        returns = f["episodes/return"][()]
    steps = columns.pop("env_steps")
    assert set(scalars) == set(columns) | {"episodes/return"}
    for name, values in columns.items():
        defined = ~np.isnan(values.astype(np.float64))
        got = scalars[name]
        assert [e.step for e in got] == steps[defined].tolist(), name
        assert [e.value for e in got] == values[defined].astype(np.float32).tolist(), name
    episodes = scalars["episodes/return"]
    assert [e.step for e in episodes] == episode_steps.tolist()
    assert [e.value for e in episodes] == returns.astype(np.float32).tolist()


@pytest.mark.timeout(300)
def test_without_tensorboard_nothing_is_written_or_imported(tmp_path, cli_env):
    """With the key off (the default) a run writes no `tb/` and never imports the
    tensorboard package, nor pandas, scipy or matplotlib (analysis only)."""
    run_dir = tmp_path / "run"
    code = (
        "import sys\n"
        "from hpcrl.cli import main\n"
        f"rc = main(['train', {_config('cartpole-ppo.yaml')!r}, '--total-env-steps', '2048',"
        f" '--set', 'eval_episodes=0', '--run-dir', {str(run_dir)!r}])\n"
        "heavy = [m for m in ('tensorboard', 'pandas', 'scipy', 'matplotlib') if m in "
        "sys.modules]\n"
        "print('imported:', heavy)\n"
        "sys.exit(rc or (3 if heavy else 0))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=cli_env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "imported: []" in result.stdout
    assert (run_dir / "run.h5").exists() and not (run_dir / "tb").exists()


LIVE = [
    _config("cartpole-ppo.yaml"),
    "--total-env-steps",
    "40000",
    "--seed",
    "3",
    "--set",
    "log_interval_s=0.2",
    "--set",
    "eval_episodes=0",
]


@pytest.mark.timeout(600)
def test_analyse_reads_a_live_run_without_disturbing_it(tmp_path, cli_env):
    """`analyse` on a run training under `mpirun -n 2` works, says it is still running
    (and the summary's status column too), and the run then completes with the same
    `/episodes` (but wall time) as the same run left alone."""
    live_dir, quiet_dir, out = tmp_path / "live", tmp_path / "quiet", tmp_path / "report"
    proc = subprocess.Popen(
        hpcrl_command(2, "train", *LIVE, "--run-dir", str(live_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    for line in proc.stdout:  # it has logged a few rows
        if line.startswith("[hpcrl] env_steps"):
            break
    reads = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(reads) < 3 and time.monotonic() < deadline:
        target = out / f"read-{len(reads)}"
        reads.append(
            run_hpcrl(cli_env, None, "analyse", str(live_dir), "--out", str(target), timeout=120)
        )
    out_text, err_text = proc.communicate(timeout=300)
    assert proc.returncode == 0, out_text[-2000:] + err_text[-3000:]
    assert reads, "the run ended before analyse could read it"
    first = reads[0]
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert f"still running: {live_dir}" in first.stdout, first.stdout
    assert ",1 running," in (out / "read-0" / "summary.csv").read_text()

    quiet = run_hpcrl(cli_env, 2, "train", *LIVE, "--run-dir", str(quiet_dir))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    with h5py.File(live_dir / "run.h5", "r") as a, h5py.File(quiet_dir / "run.h5", "r") as b:
        assert a.attrs["status"] == "completed"
        for name in ("return", "length", "env_steps", "rank"):
            assert np.array_equal(a["episodes"][name][()], b["episodes"][name][()]), name
