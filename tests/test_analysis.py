"""`analyse` and `load_runs` on synthetic run directories (issue 12): the plotted series
equal the HDF5 data, confidence intervals agree with scipy's bootstrap, speed-up and
efficiency come out of known rates, grouping, PNG sizes, bad input, and the format-1
fixture made by the code before format 2 (`tests/fixtures/runfile-v1-dqn`)."""

from __future__ import annotations

import json
import shutil
import struct

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from conftest import REPO, digest_tree
from hpcrl.analysis import load_runs, plots, report, stats
from hpcrl.analysis.runs import group_runs, read_runs
from hpcrl.cli import main
from hpcrl.errors import UserError
from hpcrl.storage.runfile import RunFile, read_metrics

FIXTURE = REPO / "tests" / "fixtures" / "runfile-v1-dqn"


def make_run(
    path,
    *,
    seed=0,
    world_size=1,
    env_id="CartPole-v1",
    algo="ppo",
    learning_rate=0.002,
    returns=(),
    rate=1000.0,
    status="completed",
    extra_config=None,
    metrics_extra=None,
):
    """A run directory whose episodes end every 100 env steps, one per `returns` entry,
    trained at `rate` env steps/s, with one /metrics row per episode."""
    path.mkdir(parents=True)
    config = {
        "algo": algo,
        "env_id": env_id,
        "seed": seed,
        "learning_rate": learning_rate,
        "log_interval_s": 5.0 + seed,  # a resumable key: never separates experiments
        "run_dir": str(path),
        "debug": {"fail_rank": -1},
    } | (extra_config or {})
    attrs = {
        "algo": algo,
        "env_id": env_id,
        "world_size": world_size,
        "layout": "allreduce",
        "config": json.dumps(config),
    }
    run = RunFile(path / "run.h5", attrs)
    n = len(returns)
    steps = 100 * np.arange(1, n + 1)
    run.append_episodes(
        **{
            "return": np.asarray(returns, dtype=np.float64),
            "length": np.full(n, 100),
            "env_steps": steps,
            "wall_time": steps / rate,
            "rank": np.zeros(n, dtype=np.int32),
        }
    )
    for i, s in enumerate(steps):
        row = {
            "env_steps": int(s),
            "wall_time": s / rate,
            "env_steps_per_s": rate,
            "episodes": i + 1,
            "mean_return_100": float(np.mean(returns[max(0, i - 99) : i + 1])),
        }
        row |= (metrics_extra or (lambda i: {}))(i)
        run.append_metrics(row)
    if n:
        run.set_attrs(wall_time_s=float(steps[-1] / rate), eval_mean_return=float(returns[-1]))
    if status != "running":
        run.set_status(status)
    run.close()
    return path


def trailing_mean(values, window=20):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def lines(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}


def test_learning_curve_lines_equal_the_episodes_written(tmp_path):
    """Each thin line is the run's env steps against a 20-episode trailing mean of its
    returns; the mean line is the mean over runs of each run's step function on the grid;
    CartPole's threshold line is at 475."""
    rng = np.random.default_rng(1)
    all_returns = [rng.uniform(0, 500, size=n).round(1) for n in (30, 45, 60)]
    for k, r in enumerate(all_returns):
        make_run(tmp_path / f"s{k}", seed=k, returns=r)
    [exp] = group_runs(read_runs([tmp_path]))
    curve = report.learning_curve(exp, "env_steps")
    fig = plots.learning_curves("CartPole-v1", {"env_steps": [curve]}, 475.0, (8, 3), 50)
    drawn = lines(fig)
    for k, r in enumerate(all_returns):
        line = drawn[f"run:{exp.label}:{tmp_path / f's{k}'}"]
        assert line.get_xdata().tolist() == (100 * np.arange(1, len(r) + 1)).tolist()
        assert np.allclose(line.get_ydata(), trailing_mean(list(r)))
    expected = []
    for g in curve.grid:
        values = []
        for r in all_returns:
            done = [x for x in range(len(r)) if 100 * (x + 1) <= g]
            if done and g <= 100 * len(r):
                values.append(trailing_mean(list(r))[done[-1]])
        expected.append(np.mean(values) if values else np.nan)
    mean = drawn[f"mean:{exp.label}"]
    shown = ~np.isnan(expected)
    assert np.allclose(mean.get_xdata(), curve.grid[shown])
    assert np.allclose(mean.get_ydata(), np.asarray(expected)[shown])
    assert drawn["threshold"].get_ydata()[0] == 475.0
    assert report.reward_threshold("Pendulum-v1") is None


def test_timelines_plot_the_metrics_columns(tmp_path):
    """env steps/s is the /metrics column; learner updates/s is derived from
    `learner_updates` differences over wall-time differences when not logged."""
    make_run(
        tmp_path / "r",
        returns=[10.0] * 5,
        metrics_extra=lambda i: {"learner_updates": 3 * (i + 1) ** 2, "policy_lag_mean": 1.0 + i},
    )
    [exp] = group_runs(read_runs([tmp_path]))
    [series] = report.timeline_series(exp)
    fig = plots.timelines("CartPole-v1", [series], (8, 6), 50)
    drawn = lines(fig)
    prefix = f"{exp.label}:{tmp_path / 'r'}"
    with h5py.File(tmp_path / "r" / "run.h5") as f:
        rate = f["metrics/env_steps_per_s"][()]
        wall = f["metrics/wall_time"][()]
        updates = f["metrics/learner_updates"][()]
        lag = f["metrics/policy_lag_mean"][()]
    assert drawn[f"env_steps_per_s:{prefix}"].get_ydata().tolist() == rate.tolist()
    derived = [(updates[0] - 0) / (wall[0] - 0)] + [
        (updates[i] - updates[i - 1]) / (wall[i] - wall[i - 1]) for i in range(1, len(wall))
    ]
    assert np.allclose(drawn[f"learner_updates_per_s:{prefix}"].get_ydata(), derived)
    assert drawn[f"policy_lag:{prefix}:mean"].get_ydata().tolist() == lag.tolist()


def test_mean_band_agrees_with_scipy_bootstrap():
    """Per column, the interval is scipy's percentile bootstrap of the mean over the runs
    that have a value; one run gives no interval; IQM is the 25% trimmed mean."""
    rng = np.random.default_rng(7)
    samples = rng.normal(100, 20, size=(5, 4))
    samples[3:, 2] = np.nan  # 3 runs there
    samples[1:, 3] = np.nan  # 1 run there
    band = stats.mean_band(samples)
    for column, rows in ((0, slice(None)), (1, slice(None)), (2, slice(0, 3))):
        data = samples[rows, column]
        ref = scipy_stats.bootstrap(
            (data,),
            np.mean,
            n_resamples=stats.N_RESAMPLES,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(0),
        )
        assert band.mean[column] == pytest.approx(np.mean(data))
        assert band.low[column] == pytest.approx(ref.confidence_interval.low)
        assert band.high[column] == pytest.approx(ref.confidence_interval.high)
    assert band.runs.tolist() == [5, 5, 3, 1]
    assert np.isnan(band.low[3]) and band.mean[3] == samples[0, 3]
    mean, low, high = stats.mean_ci(samples[:, 0])
    assert (mean, low, high) == pytest.approx((band.mean[0], band.low[0], band.high[0]))
    values = rng.normal(size=9)
    assert stats.iqm(values) == pytest.approx(scipy_stats.trim_mean(values, 0.25))
    assert np.isnan(stats.iqm(values[:3]))


def test_threshold_crossing_and_rolling_mean_match_loops():
    """The first full 20-episode window with mean >= threshold, by brute force."""
    rng = np.random.default_rng(3)
    returns = np.cumsum(rng.uniform(0, 20, size=80))
    for threshold in (200.0, 600.0, 5000.0):
        expected = None
        for end in range(19, len(returns)):
            if np.mean(returns[end - 19 : end + 1]) >= threshold:
                expected = end
                break
        assert stats.threshold_crossing(returns, threshold) == expected
    assert np.allclose(stats.rolling_mean(returns), trailing_mean(list(returns)))
    assert stats.threshold_crossing(returns[:19], 0.0) is None


def test_speedup_and_efficiency_from_known_rates(tmp_path, capsys):
    """Runs at 1, 2 and 4 ranks with 1000, 1800 and 3000 env steps/s: speed-up 1, 1.8, 3
    and efficiency 1, 0.9, 0.75, in the table, scaling.csv and the figure's ideal line."""
    rates = {1: 1000.0, 2: 1800.0, 4: 3000.0}
    for ws, rate in rates.items():
        for seed in (0, 1):
            make_run(
                tmp_path / "runs" / f"w{ws}s{seed}",
                seed=seed,
                world_size=ws,
                rate=rate,
                returns=[500.0] * 25,
            )
    families = report.scaling_families(group_runs(read_runs([tmp_path / "runs"])))
    [(name, rows)] = families
    assert [r.world_size for r in rows] == [1, 2, 4]
    assert [r.speedup for r in rows] == pytest.approx([1.0, 1.8, 3.0])
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    assert [r.env_steps_to_threshold for r in rows] == [2000.0] * 3
    out = tmp_path / "report"
    assert main(["analyse", str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "scaling.csv")
    assert table["efficiency"].tolist() == pytest.approx([1.0, 0.9, 0.75])
    fig = plots.scaling(name, rows, (8, 3), 50)
    ideal = lines(fig)["ideal"]
    assert ideal.get_ydata().tolist() == pytest.approx([1000.0, 2000.0, 4000.0])


def test_grouping_separates_what_differs_and_names_it(tmp_path):
    """Seeds and resumable keys group together; env, algo, a hyperparameter and world
    size separate; names show only the differing keys; --by regroups; an unknown --by
    key is refused with the nearest key."""
    for seed in (0, 1, 2):
        make_run(tmp_path / f"base{seed}", seed=seed, returns=[1.0])
    make_run(tmp_path / "lr", learning_rate=0.001, returns=[1.0])
    make_run(tmp_path / "ws", world_size=2, returns=[1.0])
    runs = read_runs([tmp_path])
    experiments = group_runs(runs)
    sizes = sorted((e.label, len(e.runs)) for e in experiments)
    assert sizes == [
        ("learning_rate=0.001, world_size=1", 1),
        ("learning_rate=0.002, world_size=1", 3),
        ("learning_rate=0.002, world_size=2", 1),
    ]
    make_run(tmp_path / "other" / "env", env_id="Acrobot-v1", returns=[1.0])
    make_run(tmp_path / "other" / "algo", algo="a2c", returns=[1.0])
    labels = {e.label for e in group_runs(read_runs([tmp_path / "other", tmp_path / "base0"]))}
    assert len(labels) == 3
    by = group_runs(runs, by=["world_size"])
    assert sorted(len(e.runs) for e in by) == [1, 4]
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        group_runs(runs, by=["learning_rat"])


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_analyse_writes_pngs_of_the_requested_size_and_the_summary(tmp_path):
    """--figsize 8x3 at --dpi 50 gives 400 x 150 PNGs (and SVGs on request); summary.csv
    has one row per experiment with runs, status, the final return and threshold stats."""
    a = [100.0] * 10 + [480.0] * 30
    b = [100.0] * 30 + [490.0] * 30
    make_run(tmp_path / "runs" / "a", seed=0, returns=a)
    make_run(tmp_path / "runs" / "b", seed=1, returns=b, status="running")
    make_run(tmp_path / "runs" / "c", seed=0, learning_rate=0.5, returns=[])
    out = tmp_path / "out"
    args = ["analyse", str(tmp_path / "runs"), "--out", str(out)]
    assert main([*args, "--figsize", "8x3", "--dpi", "50", "--format", "svg", "--tensorboard"]) == 0
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["a", "b", "c"]
    assert list((out / "tb" / "a").glob("events.out.tfevents.*"))
    assert _png_size(out / "learning-curves-CartPole-v1.png") == (400, 150)
    assert (out / "learning-curves-CartPole-v1.svg").read_text().lstrip().startswith("<?xml")
    table = pd.read_csv(out / "summary.csv").set_index("experiment")
    row = table.loc["learning_rate=0.002"]
    assert row["runs"] == 2 and row["status"] == "1 completed, 1 running"
    assert row["final_return_mean"] == pytest.approx((np.mean(a[-100:]) + np.mean(b[-100:])) / 2)
    assert row["reached"] == "2/2"
    assert row["env_steps_to_threshold_median"] == pytest.approx(np.median([3000, 5000]))
    assert table.loc["learning_rate=0.5"]["note"] == "no finished episode yet"


def _bad(tmp_path, capsys, *args) -> str:
    before = digest_tree(tmp_path / "runs")
    assert main(["analyse", *args]) == 2
    assert digest_tree(tmp_path / "runs") == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpcrl: error:"), err
    return err[0]


def test_bad_input_is_one_line_and_touches_no_run(tmp_path, capsys):
    """Not a run directory, missing paths, empty globs, damaged run files, unknown --by
    keys and an --out that is a file or inside a run: exit 2, one line, runs unchanged."""
    run = make_run(tmp_path / "runs" / "good", returns=[1.0, 2.0])
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("x")
    out = str(tmp_path / "out")
    assert "is not a run directory" in _bad(tmp_path, capsys, str(tmp_path / "runs" / "empty"))
    assert "is a file" in _bad(tmp_path, capsys, str(tmp_path / "runs" / "notes.txt"))
    assert "does not exist" in _bad(tmp_path, capsys, str(tmp_path / "nowhere"))
    assert "matches no" in _bad(tmp_path, capsys, str(tmp_path / "runs" / "zz*"))
    assert "did you mean" in _bad(tmp_path, capsys, str(run), "--by", "learnin_rate", "--out", out)
    (tmp_path / "file").write_text("x")
    assert "is a file" in _bad(tmp_path, capsys, str(run), "--out", str(tmp_path / "file"))
    assert "inside run directory" in _bad(tmp_path, capsys, str(run), "--out", str(run / "rep"))
    half = tmp_path / "runs" / "half"
    half.mkdir()
    data = (run / "run.h5").read_bytes()
    (half / "run.h5").write_bytes(data[: len(data) // 2])
    assert "cannot be read" in _bad(tmp_path, capsys, str(half), "--out", out)
    (half / "run.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "cannot be read" in _bad(tmp_path, capsys, str(half), "--out", out)


def test_format_1_fixture_loads_and_upgrades_on_resume(tmp_path):
    """The old-layout DQN file: only full-length columns are read (the ragged ones are
    named); reopening a copy for a resume moves them aside and continues in format 2."""
    tables = load_runs([FIXTURE])
    names = set(tables.metrics["metric"])
    assert names == {"env_steps_per_s", "episodes", "learner_updates", "mean_return_100"}
    with h5py.File(FIXTURE / "run.h5") as f:
        columns, left_out = read_metrics(f)
        assert left_out == ["exploration", "learning_rate", "losses/td"]
        assert len(tables.episodes) == len(f["episodes/return"])
    assert main(["analyse", str(FIXTURE), "--out", str(tmp_path / "rep")]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    rows = len(columns["env_steps"])
    run = RunFile.reopen(copy / "run.h5", episodes_rows=80, metrics_rows=rows - 2)
    run.append_metrics({"env_steps": 4000, "episodes": 90, "learner_updates": 9, "brand_new": 1.5})
    run.close()
    with h5py.File(copy / "run.h5") as f:
        assert f.attrs["format_version"] == 2
        assert "losses/td" in f["metrics_unaligned"] and "losses" not in f["metrics"]
        lengths = set()
        f["metrics"].visititems(lambda n, o: lengths.add(len(o)) if hasattr(o, "shape") else 0)
        assert lengths == {rows - 1}
        assert np.isnan(f["metrics/brand_new"][0]) and f["metrics/brand_new"][-1] == 1.5
        assert np.isnan(f["metrics/wall_time"][-1])


def test_format_2_columns_line_up_and_say_their_units(tmp_path):
    """A key that appears late is NaN before; a key missing from a row is NaN there; an
    integer column cannot be skipped; datasets carry units and descriptions."""
    run = RunFile(tmp_path / "run.h5", {"algo": "x", "config": "{}"})
    run.append_metrics({"env_steps": 1, "episodes": 0, "a": 1.0})
    run.append_metrics({"env_steps": 2, "episodes": 1, "b/c": 2.0})
    with pytest.raises(ValueError, match="episodes"):
        run.append_metrics({"env_steps": 3, "a": 3.0})
    run.close()
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["metrics/a"][()].tolist()[0] == 1.0 and np.isnan(f["metrics/a"][1])
        assert np.isnan(f["metrics/b/c"][0]) and f["metrics/b/c"][1] == 2.0
        assert f["metrics/env_steps"].dtype == np.int64 and len(f["metrics/env_steps"]) == 2
        assert f["episodes/wall_time"].attrs["units"] == "s"
        assert "Unix time" in f["resumes/wall_time"].attrs["description"]
        assert "since the run started" in f["episodes/wall_time"].attrs["description"]


def test_load_runs_gives_long_tables_with_config_columns(tmp_path):
    """episodes: one row per episode; metrics: one row per defined value; both carry
    run, experiment, world_size and the config keys."""
    make_run(tmp_path / "a", returns=[1.0, 2.0, 3.0], metrics_extra=lambda i: {"x": i or np.nan})
    runs, episodes, metrics = load_runs(tmp_path)
    assert len(runs) == 1 and runs.loc[0, "status"] == "completed"
    assert episodes["return"].tolist() == [1.0, 2.0, 3.0]
    assert set(episodes["learning_rate"]) == {0.002} and set(episodes["world_size"]) == {1}
    x = metrics[metrics.metric == "x"]
    assert x["value"].tolist() == [1.0, 2.0] and x["env_steps"].tolist() == [200, 300]
    assert {"run", "experiment", "seed", "debug.fail_rank"} <= set(metrics.columns)


def test_tensorboard_events_read_back_equal_to_the_metrics(tmp_path):
    """write_run_events: TensorBoard's own reader gives each /metrics column (NaN rows
    skipped) at step env_steps, and every episode return."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hpcrl.storage.events import write_run_events

    make_run(tmp_path / "a", returns=[1.5, 2.5, 3.5], metrics_extra=lambda i: {"x": i or np.nan})
    [run] = read_runs([tmp_path / "a"])
    write_run_events(tmp_path / "tb", run.metrics, run.episodes)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    x = events.Scalars("x")
    assert [(e.step, e.value) for e in x] == [(200, 1.0), (300, 2.0)]
    rate = events.Scalars("env_steps_per_s")
    assert [e.value for e in rate] == run.metrics["env_steps_per_s"].astype(np.float32).tolist()
    assert [e.value for e in events.Scalars("episodes/return")] == [1.5, 2.5, 3.5]
