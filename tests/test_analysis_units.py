"""Unit checks of `python -m hpcrl analyse` and `hpcrl.analysis` on synthetic run
directories: plotted series against the HDF5 data, bootstrap intervals against scipy,
speed-up from known rates, grouping and naming, figure files, bad input, the format-1
fixture and its upgrade, the format-2 writer, `load_runs` tables and TensorBoard events."""

from __future__ import annotations

import json
import math
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
from hpcrl.storage.events import write_run_events
from hpcrl.storage.runfile import RunFile, read_metrics

FIXTURE = REPO / "tests" / "fixtures" / "runfile-v1-dqn"
AXES = ("env_steps", "wall_time")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(
    root,
    name,
    *,
    seed=0,
    world_size=1,
    env_id="CartPole-v1",
    algo="ppo",
    learning_rate=0.002,
    returns=(),
    episode_steps=100,
    rate=1000.0,
    row_steps=250,
    total_steps=None,
    status="completed",
    config_extra=None,
    extras=None,
    eval_return=None,
):
    """A run directory `root/name`: one episode every `episode_steps` env steps (returns
    as given), a /metrics row every `row_steps` up to `total_steps`, trained at `rate` env
    steps/s (so `wall_time_s` = total_steps / rate); `extras(k, env_steps)` adds keys to
    row k. Status "running" leaves the run without a final status or wall_time_s."""
    path = root / name
    path.mkdir(parents=True)
    config = {
        "algo": algo,
        "env_id": env_id,
        "seed": seed,
        "learning_rate": learning_rate,
        "log_interval_s": 5.0 + seed,
        "run_dir": str(path),
        "debug": {"fail_rank": -1},
    } | (config_extra or {})
    attrs = {
        "algo": algo,
        "env_id": env_id,
        "world_size": world_size,
        "layout": "data_parallel",
        "config": json.dumps(config),
    }
    returns = np.asarray(returns, dtype=np.float64)
    n = len(returns)
    steps = episode_steps * np.arange(1, n + 1)
    if total_steps is None:
        total_steps = max(int(steps[-1]) if n else 0, row_steps)
    writer = RunFile(path / "run.h5", attrs)
    writer.append_episodes(
        **{
            "return": returns,
            "length": np.full(n, episode_steps),
            "env_steps": steps,
            "wall_time": steps / rate,
            "rank": np.arange(n) % world_size,
        }
    )
    row_at = list(range(row_steps, total_steps + 1, row_steps))
    if not row_at or row_at[-1] != total_steps:
        row_at.append(total_steps)
    for k, s in enumerate(row_at):
        done = returns[steps <= s]
        row = {
            "env_steps": int(s),
            "wall_time": s / rate,
            "env_steps_per_s": rate * (1.0 + 0.1 * math.sin(k)),
            "episodes": len(done),
            "mean_return_100": float(np.mean(done[-100:])) if len(done) else math.nan,
        }
        row |= extras(k, s) if extras else {}
        writer.append_metrics(row)
    if status != "running":
        writer.set_attrs(wall_time_s=total_steps / rate)
        if eval_return is not None:
            writer.set_attrs(eval_mean_return=eval_return)
        writer.set_status(status)
    writer.close()
    return path


def trailing_mean(values, window=20):
    """Brute-force mean of the last `window` values at each index."""
    out = []
    for i in range(len(values)):
        chunk = [float(v) for v in values[max(0, i - window + 1) : i + 1]]
        out.append(sum(chunk) / len(chunk))
    return np.array(out)


def first_crossing(values, threshold, window=20):
    """Brute force: index ending the first full window whose mean is >= threshold."""
    for end in range(window - 1, len(values)):
        if sum(values[end - window + 1 : end + 1]) / window >= threshold:
            return end
    return None


def step_on_grid(x, y, grid, end):
    """Brute force: the last y at or before each grid point, NaN before x[0] / after end."""
    out = []
    for g in grid:
        value = math.nan
        if len(x) and x[0] <= g <= end:
            for xi, yi in zip(x, y, strict=True):
                if xi <= g:
                    value = yi
        out.append(value)
    return np.array(out)


def nan_mean_columns(rows):
    """Brute force: per-column mean of the non-NaN values (NaN where there are none)."""
    out = []
    for column in np.asarray(rows).T:
        present = [v for v in column if not math.isnan(v)]
        out.append(sum(present) / len(present) if present else math.nan)
    return np.array(out)


def lines_of(fig) -> dict:
    """{gid: Line2D} of every line in every panel of `fig`."""
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}


def read_h5(path):
    """(episodes, metrics, attrs) of a run directory's run.h5, read with plain h5py."""
    with h5py.File(path / "run.h5", "r") as f:
        episodes = {k: f["episodes"][k][()] for k in f["episodes"]}
        metrics = {}
        f["metrics"].visititems(
            lambda n, o: metrics.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
        return episodes, metrics, dict(f.attrs)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the signature first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR"), path
    return width, height


def bootstrap_ci(values):
    """scipy's percentile bootstrap of the mean, as `stats` documents it."""
    result = scipy_stats.bootstrap(
        (np.asarray(values, dtype=np.float64),),
        np.mean,
        n_resamples=stats.N_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    return result.confidence_interval.low, result.confidence_interval.high


# 1. Plotted series equal the HDF5 data


def test_learning_curve_lines_equal_episodes_and_brute_force_means(tmp_path):
    """Each thin run line is the run's episodes (x) and a 20-episode trailing mean (y);
    the mean line is the NaN-mean over runs of their step functions on a 200-point grid
    from 0 to the longest run's end; a dashed threshold line sits at 475 for CartPole."""
    rng = np.random.default_rng(1)
    specs = {"r0": (60, 100, 1000.0, 6100), "r1": (45, 130, 700.0, 6000), "r2": (75, 80, 1500.0, 0)}
    for i, (name, (n, spe, rate, total)) in enumerate(specs.items()):
        make_run(
            tmp_path,
            name,
            seed=i,
            returns=rng.integers(10, 500, n),
            episode_steps=spe,
            rate=rate,
            row_steps=300,
            total_steps=total or None,
        )
    (exp,) = group_runs(read_runs([tmp_path]))
    assert len(exp.runs) == 3
    curves = {axis: [report.learning_curve(exp, axis)] for axis in AXES}
    threshold = report.reward_threshold("CartPole-v1")
    assert threshold == 475
    fig = plots.learning_curves("CartPole-v1", curves, threshold, (8, 3), 50)
    assert len(fig.axes) == 2
    for ax, axis in zip(fig.axes, AXES, strict=True):
        lines = {line.get_gid(): line for line in ax.get_lines()}
        samples, ends, xs = [], [], []
        for name in specs:
            episodes, metrics, attrs = read_h5(tmp_path / name)
            x = episodes[axis].astype(np.float64)
            y = trailing_mean(episodes["return"])
            line = lines[f"run:{exp.label}:{tmp_path / name}"]
            np.testing.assert_allclose(line.get_xdata(), x, rtol=1e-12)
            np.testing.assert_allclose(line.get_ydata(), y, rtol=1e-12)
            last = metrics["env_steps"][-1] if axis == "env_steps" else attrs["wall_time_s"]
            ends.append(max(float(last), float(x[-1])))
            xs.append((x, y))
        grid = np.linspace(0.0, max(ends), 200)
        for (x, y), end in zip(xs, ends, strict=True):
            samples.append(step_on_grid(x, y, grid, end))
        expected = nan_mean_columns(samples)
        shown = ~np.isnan(expected)
        assert 0 < shown.sum() < 200  # NaN before the first episode ends
        mean_line = lines[f"mean:{exp.label}"]
        np.testing.assert_allclose(mean_line.get_xdata(), grid[shown], rtol=1e-12)
        np.testing.assert_allclose(mean_line.get_ydata(), expected[shown], rtol=1e-12)
        np.testing.assert_array_equal(lines["threshold"].get_ydata(), [475, 475])
        assert len(lines) == 5  # 3 runs, the mean, the threshold


def test_learning_curves_without_reward_threshold_have_no_threshold_line(tmp_path):
    """Pendulum-v1 has no reward threshold: no `threshold` line, but the run and mean
    lines are there, the run line equal to the episodes' trailing mean."""
    returns = -np.linspace(1500, 200, 30)
    make_run(tmp_path, "pend", env_id="Pendulum-v1", returns=returns, episode_steps=200)
    (exp,) = group_runs(read_runs([tmp_path]))
    assert report.reward_threshold("Pendulum-v1") is None
    curves = {axis: [report.learning_curve(exp, axis)] for axis in AXES}
    fig = plots.learning_curves("Pendulum-v1", curves, None, (8, 3), 50)
    assert "threshold" not in lines_of(fig)
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}  # env_steps panel
    assert f"mean:{exp.label}" in lines
    run_line = lines[f"run:{exp.label}:{tmp_path / 'pend'}"]
    np.testing.assert_allclose(run_line.get_xdata(), 200 * np.arange(1, 31))
    np.testing.assert_allclose(run_line.get_ydata(), trailing_mean(returns))


def test_timelines_equal_metrics_columns_and_derived_update_rates(tmp_path):
    """The env-steps/s line is the /metrics column; learner updates/s is the column where
    one is logged, else the learner_updates increase over the wall_time increase per row
    (the first row: since 0)."""

    def counted(k, s):
        return {"learner_updates": 3 * k * k + 5 * k + 2}

    def direct(k, s):
        return {"learner_updates_per_s": 40.0 + k}

    make_run(tmp_path, "counted", seed=0, returns=[10.0] * 20, rate=900.0, extras=counted)
    make_run(tmp_path, "direct", seed=1, returns=[10.0] * 20, rate=1100.0, extras=direct)
    (exp,) = group_runs(read_runs([tmp_path]))
    series = report.timeline_series(exp)
    assert len(series) == 2
    fig = plots.timelines("CartPole-v1", series, (8, 4), 50)
    lines = lines_of(fig)
    for name in ("counted", "direct"):
        _, metrics, _ = read_h5(tmp_path / name)
        run = str(tmp_path / name)
        rate_line = lines[f"env_steps_per_s:{exp.label}:{run}"]
        np.testing.assert_array_equal(rate_line.get_xdata(), metrics["wall_time"])
        np.testing.assert_array_equal(rate_line.get_ydata(), metrics["env_steps_per_s"])
        updates_line = lines[f"learner_updates_per_s:{exp.label}:{run}"]
        np.testing.assert_array_equal(updates_line.get_xdata(), metrics["wall_time"])
        if name == "direct":
            expected = metrics["learner_updates_per_s"]
        else:
            counts, wall = metrics["learner_updates"], metrics["wall_time"]
            expected = []
            for i in range(len(counts)):
                before = (counts[i - 1], wall[i - 1]) if i else (0.0, 0.0)
                expected.append((counts[i] - before[0]) / (wall[i] - before[1]))
        np.testing.assert_allclose(updates_line.get_ydata(), expected, rtol=1e-12)


# 2. Statistics against scipy and loops


def test_mean_band_matches_scipy_bootstrap_over_the_runs_present():
    """Each column's mean is the mean over runs that have a value, its interval scipy's
    percentile bootstrap over those runs; one run: NaN interval; no run: NaN mean."""
    rng = np.random.default_rng(7)
    samples = rng.normal(100.0, 30.0, size=(6, 12))
    samples[4:, 3:6] = np.nan  # 4 runs present
    samples[[0, 2], 6:8] = np.nan  # another pattern of 4 runs
    samples[1:, 9] = np.nan  # one run
    samples[:, 10] = np.nan  # none
    band = stats.mean_band(samples)
    for column in range(samples.shape[1]):
        present = samples[:, column][~np.isnan(samples[:, column])]
        assert band.runs[column] == len(present)
        if not len(present):
            assert np.isnan(band.mean[column])
            assert np.isnan(band.low[column]) and np.isnan(band.high[column])
            continue
        assert band.mean[column] == pytest.approx(sum(present) / len(present), rel=1e-12)
        if len(present) == 1:
            assert np.isnan(band.low[column]) and np.isnan(band.high[column])
            continue
        low, high = bootstrap_ci(present)
        assert band.low[column] == pytest.approx(low, rel=1e-12)
        assert band.high[column] == pytest.approx(high, rel=1e-12)
        assert band.low[column] < band.mean[column] < band.high[column]


def test_mean_ci_matches_scipy_bootstrap_and_drops_nan():
    """`mean_ci` is (mean, scipy's percentile bootstrap interval) of the non-NaN values;
    with one value the interval is NaN, with none everything is NaN."""
    values = np.array([3.0, np.nan, 7.5, 1.0, 9.0, np.nan, 4.25])
    present = values[~np.isnan(values)]
    mean, low, high = stats.mean_ci(values)
    assert mean == pytest.approx(present.mean(), rel=1e-12)
    expected_low, expected_high = bootstrap_ci(present)
    assert low == pytest.approx(expected_low, rel=1e-12)
    assert high == pytest.approx(expected_high, rel=1e-12)
    one = stats.mean_ci(np.array([np.nan, 5.0]))
    assert one[0] == 5.0 and np.isnan(one[1]) and np.isnan(one[2])
    assert all(np.isnan(v) for v in stats.mean_ci(np.array([np.nan, np.nan])))


def test_iqm_is_scipy_trim_mean_and_nan_below_four_values():
    """`iqm` equals scipy.stats.trim_mean(x, 0.25) of the non-NaN values for 4..11 values,
    and is NaN with fewer than 4 (NaNs not counted)."""
    rng = np.random.default_rng(3)
    for n in range(4, 12):
        values = rng.normal(0.0, 10.0, n)
        with_nan = np.concatenate([values, [np.nan, np.nan]])
        expected = scipy_stats.trim_mean(values, 0.25)
        assert stats.iqm(with_nan) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(stats.iqm(np.array([1.0, 2.0, 3.0, np.nan, np.nan])))
    assert np.isnan(stats.iqm(np.array([])))


def test_threshold_crossing_and_rolling_mean_match_loops():
    """`threshold_crossing` is the end of the first 20-episode window whose mean reaches
    the threshold (also a window exactly at it), `rolling_mean` the trailing mean."""
    rng = np.random.default_rng(11)
    hits = 0
    for trial in range(300):
        n = int(rng.integers(0, 80))
        returns = rng.integers(400, 501, n).astype(np.float64)
        threshold = float(rng.choice([445.0, 450.0, 455.0, 460.0]))
        expected = first_crossing(list(returns), threshold)
        hits += expected is not None
        assert stats.threshold_crossing(returns, threshold) == expected, trial
        np.testing.assert_allclose(stats.rolling_mean(returns), trailing_mean(returns))
        np.testing.assert_allclose(stats.rolling_mean(returns, 7), trailing_mean(returns, 7))
    assert 50 < hits < 250  # both outcomes exercised
    exact = np.array([450.0, 500.0] * 10)  # mean exactly 475
    assert stats.threshold_crossing(exact, 475.0) == 19
    assert stats.threshold_crossing(exact[:19], 0.0) is None


# 3. Speed-up and efficiency


def make_scaling_runs(root):
    """World sizes 1, 2, 4 with 2 seeds each at 1000, 1800, 3000 env steps/s."""
    for world_size, rate in ((1, 1000.0), (2, 1800.0), (4, 3000.0)):
        for seed in (0, 1):
            total = 36000 * (1 + seed)
            make_run(
                root,
                f"w{world_size}-s{seed}",
                seed=seed,
                world_size=world_size,
                returns=np.full(30, 50.0 + seed),
                rate=rate,
                row_steps=9000,
                total_steps=total,
            )


def test_scaling_families_give_known_speedup_and_efficiency(tmp_path):
    """Runs at 1000, 1800 and 3000 env steps/s on 1, 2 and 4 ranks form one family with
    speed-up 1, 1.8, 3, ideal 1, 2, 4 and efficiency 1, 0.9, 0.75; `stats.speedup` is
    relative to the smallest world also when it is not first or not 1."""
    make_scaling_runs(tmp_path)
    experiments = group_runs(read_runs([tmp_path]))
    assert [e.world_size for e in experiments] == [1, 2, 4]
    ((name, rows),) = report.scaling_families(experiments)
    assert name == "ppo on CartPole-v1"
    assert [r.world_size for r in rows] == [1, 2, 4]
    assert [r.runs for r in rows] == [2, 2, 2]
    np.testing.assert_allclose([r.env_steps_per_s for r in rows], [1000, 1800, 3000])
    np.testing.assert_allclose([r.speedup for r in rows], [1.0, 1.8, 3.0])
    np.testing.assert_allclose([r.ideal_speedup for r in rows], [1, 2, 4])
    np.testing.assert_allclose([r.efficiency for r in rows], [1.0, 0.9, 0.75])
    assert [r.reached for r in rows] == [0, 0, 0]
    gain, efficiency = stats.speedup(np.array([4, 2, 8]), np.array([1800.0, 1000.0, 3000.0]))
    np.testing.assert_allclose(gain, [1.8, 1.0, 3.0])  # relative to the smallest world (2)
    np.testing.assert_allclose(efficiency, [0.9, 1.0, 0.75])
    assert all(np.isnan(r.env_steps_to_threshold) for r in rows)


def test_analyse_writes_scaling_csv_with_known_efficiency(tmp_path, capsys):
    """`analyse` writes scaling.csv with the same speed-up and efficiency, and a scaling
    figure; nothing in the run directories changes."""
    runs = tmp_path / "runs"
    make_scaling_runs(runs)
    before = digest_tree(runs)
    out = tmp_path / "report"
    assert main(["analyse", str(runs), "--out", str(out), "--dpi", "40"]) == 0
    assert digest_tree(runs) == before
    table = pd.read_csv(out / "scaling.csv")
    assert list(table["world_size"]) == [1, 2, 4]
    assert set(table["experiment"]) == {"ppo on CartPole-v1"}
    np.testing.assert_allclose(table["env_steps_per_s"], [1000, 1800, 3000])
    np.testing.assert_allclose(table["speedup"], [1.0, 1.8, 3.0])
    np.testing.assert_allclose(table["efficiency"], [1.0, 0.9, 0.75])
    assert (out / "scaling-ppo-on-CartPole-v1.png").is_file()
    assert "6 runs (6 completed) in 3 experiments" in capsys.readouterr().out


def test_scaling_family_names_do_not_carry_a_world_size(tmp_path):
    """Families starting at different world sizes are named by what differs between
    them only (`learning_rate=0.001`, `learning_rate=0.002`)."""
    for lr, world_size in ((0.001, 1), (0.001, 2), (0.002, 2), (0.002, 4)):
        make_run(
            tmp_path, f"{lr}-{world_size}", learning_rate=lr, world_size=world_size, returns=[1.0]
        )
    families = report.scaling_families(group_runs(read_runs([tmp_path])))
    assert [[r.world_size for r in rows] for _, rows in families] == [[1, 2], [2, 4]]
    assert [name for name, _ in families] == ["learning_rate=0.001", "learning_rate=0.002"]


# 4. Grouping and naming


def test_grouping_ignores_seed_and_resumable_keys_and_separates_the_rest(tmp_path):
    """Runs differing only in seed, log_interval_s, run_dir or debug.fail_rank are one
    experiment; env_id, algo, learning_rate and world_size each make another."""
    make_run(tmp_path, "base0", seed=0, returns=[1.0])
    make_run(tmp_path, "base1", seed=1, returns=[1.0], config_extra={"debug": {"fail_rank": 2}})
    make_run(tmp_path, "env", env_id="Acrobot-v1", returns=[1.0])
    make_run(tmp_path, "algo", algo="a2c", returns=[1.0])
    make_run(tmp_path, "lr", learning_rate=0.001, returns=[1.0])
    make_run(tmp_path, "world", world_size=2, returns=[1.0])
    experiments = group_runs(read_runs([tmp_path]))
    members = sorted(sorted(r.name for r in e.runs) for e in experiments)
    assert members == [["algo"], ["base0", "base1"], ["env"], ["lr"], ["world"]]
    labels = [e.label for e in experiments]
    assert len(set(labels)) == 5
    by_member = {e.runs[0].name: e.label for e in experiments}
    assert "env_id=Acrobot-v1" in by_member["env"]
    assert "algo=a2c" in by_member["algo"]
    assert "learning_rate=0.001" in by_member["lr"]
    assert by_member["world"].endswith("world_size=2")
    assert "seed" not in " ".join(labels) and "log_interval_s" not in " ".join(labels)


def test_labels_name_only_the_differing_keys(tmp_path):
    """Two learning rates are named `learning_rate=0.001` / `learning_rate=0.002` and
    nothing else; two world sizes `world_size=1` / `world_size=2`; one experiment is
    named `<algo> on <env_id>`."""
    lr = tmp_path / "lr"
    make_run(lr, "a", learning_rate=0.001, returns=[1.0])
    make_run(lr, "b", learning_rate=0.002, returns=[1.0])
    make_run(lr, "c", seed=3, learning_rate=0.002, returns=[1.0])
    labels = sorted(e.label for e in group_runs(read_runs([lr])))
    assert labels == ["learning_rate=0.001", "learning_rate=0.002"]
    ws = tmp_path / "ws"
    make_run(ws, "a", world_size=1, returns=[1.0])
    make_run(ws, "b", world_size=2, returns=[1.0])
    assert [e.label for e in group_runs(read_runs([ws]))] == ["world_size=1", "world_size=2"]
    assert [e.label for e in group_runs(read_runs([ws / "a"]))] == ["ppo on CartPole-v1"]


def test_group_by_a_key_and_unknown_key_suggests_the_nearest(tmp_path):
    """`by=["learning_rate"]` groups by that key only (env and algo differences merge);
    an unknown key raises UserError naming it with "did you mean 'learning_rate'"."""
    make_run(tmp_path, "a", learning_rate=0.001, returns=[1.0])
    make_run(tmp_path, "b", learning_rate=0.001, env_id="Acrobot-v1", returns=[1.0])
    make_run(tmp_path, "c", learning_rate=0.002, algo="a2c", returns=[1.0])
    runs = read_runs([tmp_path])
    experiments = group_runs(runs, by=["learning_rate"])
    assert [sorted(r.name for r in e.runs) for e in experiments] == [["a", "b"], ["c"]]
    assert [e.label for e in experiments] == ["learning_rate=0.001", "learning_rate=0.002"]
    assert len(group_runs(runs)) == 3
    with pytest.raises(UserError, match="did you mean 'learning_rate'") as info:
        group_runs(runs, by=["learning_rat"])
    assert "learning_rat" in str(info.value)


def test_experiments_differing_in_a_key_one_lacks_get_distinct_labels(tmp_path):
    """Two experiments, one with an extra config key, must not share a name."""
    make_run(tmp_path, "x", returns=[1.0], config_extra={"clip_range": 0.2})
    make_run(tmp_path, "y", returns=[1.0])
    experiments = group_runs(read_runs([tmp_path]))
    assert len(experiments) == 2
    assert len({e.label for e in experiments}) == 2


def test_close_float_values_get_distinct_labels(tmp_path):
    """Two learning rates that differ in the 8th digit make two differently named
    experiments."""
    make_run(tmp_path, "x", returns=[1.0], learning_rate=3e-4)
    make_run(tmp_path, "y", returns=[1.0], learning_rate=3.0000001e-4)
    experiments = group_runs(read_runs([tmp_path]))
    assert len(experiments) == 2
    assert len({e.label for e in experiments}) == 2


# 5. Figures and the summary table


def test_analyse_writes_pngs_of_the_requested_size_svgs_and_summary(tmp_path, capsys):
    """`--figsize 8x3 --dpi 50` gives 400x150 PNGs (timelines 1.4 times as tall), `--format
    svg` the same figures as SVG; summary.csv has one row per experiment with its runs,
    status counts, final return (mean over runs of last-100-episode means), runs that
    reached 475 as "k/n" and the medians of the env steps and seconds it took."""
    rng = np.random.default_rng(5)
    runs = tmp_path / "runs"
    plan = {  # name: (learning_rate, status, episode steps, rate, first episode at 500)
        "a0": (0.001, "completed", 100, 1000.0, 60),
        "a1": (0.001, "completed", 120, 800.0, 95),
        "b0": (0.002, "completed", 100, 1000.0, 100),
        "b1": (0.002, "interrupted", 90, 1200.0, None),
        "b2": (0.002, "completed", 110, 1000.0, None),
    }
    expected = {}
    for i, (name, (lr, status, spe, rate, solved_from)) in enumerate(plan.items()):
        returns = rng.integers(20, 300, 130).astype(np.float64)
        if solved_from is not None:
            returns[solved_from:] = 500.0
        make_run(
            runs,
            name,
            seed=i,
            learning_rate=lr,
            status=status,
            returns=returns,
            episode_steps=spe,
            rate=rate,
            row_steps=2000,
        )
        hit = first_crossing(list(returns), 475.0)
        steps = (hit + 1) * spe if hit is not None else math.nan
        expected[name] = (lr, sum(returns[-100:]) / 100, steps, steps / rate)
    out = tmp_path / "out"
    before = digest_tree(runs)
    argv = ["analyse", str(runs), "--out", str(out), "--figsize", "8x3", "--dpi", "50"]
    assert main([*argv, "--format", "svg"]) == 0
    assert digest_tree(runs) == before
    assert "5 runs (4 completed, 1 interrupted) in 2 experiments" in capsys.readouterr().out
    assert png_size(out / "learning-curves-CartPole-v1.png") == (400, 150)
    assert png_size(out / "timelines-CartPole-v1.png") == (400, 210)
    for stem in ("learning-curves-CartPole-v1", "timelines-CartPole-v1"):
        svg = (out / f"{stem}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg
    assert 'width="576pt"' in (out / "learning-curves-CartPole-v1.svg").read_text()
    table = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""])
    assert list(table["experiment"]) == ["learning_rate=0.001", "learning_rate=0.002"]
    rows = table.set_index("experiment")
    for lr, runs_n, status, reached in (
        (0.001, 2, "2 completed", "2/2"),
        (0.002, 3, "2 completed, 1 interrupted", "1/3"),
    ):
        row = rows.loc[f"learning_rate={lr:g}"]
        mine = [v for v in expected.values() if v[0] == lr]
        assert row["runs"] == runs_n
        assert row["status"] == status
        assert row["reached"] == reached
        assert row["episodes"] == 130 * runs_n
        assert row["final_return_mean"] == pytest.approx(np.mean([v[1] for v in mine]))
        reached_steps = [v[2] for v in mine if not math.isnan(v[2])]
        reached_seconds = [v[3] for v in mine if not math.isnan(v[3])]
        assert row["env_steps_to_threshold_median"] == pytest.approx(np.median(reached_steps))
        assert row["seconds_to_threshold_median"] == pytest.approx(np.median(reached_seconds))
        assert row["threshold"] == 475
    assert (out / "summary.md").read_text().count("learning_rate=0.00") == 2


def test_run_without_finished_episode_is_reported_not_an_error(tmp_path, capsys):
    """A run still running with /metrics rows but no episode gives exit 0 and a summary
    row whose note says "no finished episode yet"; a mixed experiment counts such runs."""
    runs = tmp_path / "runs"
    make_run(runs / "empty", "live", status="running", returns=[], row_steps=500, total_steps=2000)
    make_run(runs / "mixed", "done", learning_rate=0.001, returns=[12.0] * 25)
    make_run(runs / "mixed", "none", seed=1, learning_rate=0.001, returns=[], total_steps=900)
    out = tmp_path / "out"
    assert main(["analyse", str(runs), "--out", str(out), "--dpi", "30"]) == 0
    assert "still running" in capsys.readouterr().out
    rows = pd.read_csv(out / "summary.csv").set_index("experiment")
    assert rows.loc["learning_rate=0.002", "note"] == "no finished episode yet"
    assert rows.loc["learning_rate=0.002", "episodes"] == 0
    assert rows.loc["learning_rate=0.001", "note"] == "1 run(s) without a finished episode"
    assert rows.loc["learning_rate=0.001", "final_return_mean"] == pytest.approx(12.0)


# 6. Bad input


BAD_INPUTS = {
    "empty folder": lambda t, good: [str(t / "empty")],
    "plain file": lambda t, good: [str(t / "notes.txt")],
    "nonexistent path": lambda t, good: [str(t / "nope")],
    "glob matching nothing": lambda t, good: [str(t / "nomatch-*")],
    "truncated run.h5": lambda t, good: [str(t / "truncated")],
    "random bytes run.h5": lambda t, good: [str(t / "random" / "run.h5")],
    "unknown --by": lambda t, good: [str(good), "--by", "learning_rat"],
    "--out an existing file": lambda t, good: [str(good), "--out", str(t / "notes.txt")],
    "--out inside a run": lambda t, good: [str(good), "--out", str(good / "report")],
    "--dpi 0": lambda t, good: [str(good), "--dpi", "0"],
    "--figsize 0x3": lambda t, good: [str(good), "--figsize", "0x3"],
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(tmp_path, capfd, case):
    """Each bad input exits with status 2 and exactly one stderr line starting
    "hpcrl: error:" (HDF5's own diagnostics included, via capfd); no run directory or
    other file changes and the default --out is not created."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a run\n")
    (tmp_path / "truncated").mkdir()
    data = (FIXTURE / "run.h5").read_bytes()
    (tmp_path / "truncated" / "run.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "random").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "random" / "run.h5").write_bytes(noise)
    good = make_run(tmp_path, "good", returns=[5.0] * 10)
    capfd.readouterr()
    before = digest_tree(tmp_path)
    argv = ["analyse", *BAD_INPUTS[case](tmp_path, good)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "report")]
    assert main(argv) == 2
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hpcrl: error:")
    if case == "unknown --by":
        assert "did you mean" in lines[0]
    assert digest_tree(tmp_path) == before


def test_out_inside_a_run_directory_not_analysed_is_refused(tmp_path, capsys):
    """`--out` inside run directory b while analysing only run a is refused (exit 2) and
    b is left unchanged: analyse never writes into any run directory."""
    a = make_run(tmp_path, "a", returns=[5.0] * 10)
    b = make_run(tmp_path, "b", seed=1, returns=[5.0] * 10)
    before = digest_tree(b)
    assert main(["analyse", str(a), "--out", str(b / "report"), "--dpi", "30"]) == 2
    assert digest_tree(b) == before


def test_one_run_named_twice_is_read_once(tmp_path, monkeypatch):
    """The same run directory given as an absolute and as a relative path is one run."""
    make_run(tmp_path, "a", returns=[5.0] * 10)
    monkeypatch.chdir(tmp_path)
    assert len(read_runs([str(tmp_path / "a"), "a"])) == 1


# 7. The format-1 fixture


def test_format_1_fixture_loads_with_only_full_length_columns(tmp_path, capsys):
    """`load_runs` on the format-1 DQN fixture keeps the 48-row columns and leaves out
    exploration (47), learning_rate and losses/td (46); `analyse` reads it, names them and
    leaves the fixture unchanged."""
    before = digest_tree(FIXTURE)
    runs, episodes, metrics = load_runs([str(FIXTURE)])
    assert len(runs) == 1 and runs.loc[0, "status"] == "completed"
    assert len(episodes) == 90
    assert set(metrics["metric"]) == {
        "env_steps_per_s",
        "episodes",
        "learner_updates",
        "mean_return_100",
    }
    assert metrics.groupby("metric").size().max() <= 48
    (run,) = read_runs([FIXTURE])
    assert run.metrics_left_out == ["exploration", "learning_rate", "losses/td"]
    assert {len(v) for v in run.metrics.values()} == {48}
    with h5py.File(FIXTURE / "run.h5", "r") as f:
        np.testing.assert_array_equal(run.metrics["env_steps"], f["metrics/env_steps"][()])
        np.testing.assert_array_equal(run.episodes["return"], f["episodes/return"][()])
    out = tmp_path / "out"
    assert main(["analyse", str(FIXTURE), "--out", str(out), "--dpi", "30"]) == 0
    printed = capsys.readouterr().out
    assert "left out (rows unknown): exploration, learning_rate, losses/td" in printed
    assert (out / "learning-curves-CartPole-v1.png").is_file()
    assert digest_tree(FIXTURE) == before


def test_reopen_upgrades_a_format_1_copy_to_format_2(tmp_path):
    """`RunFile.reopen` on a copy of the fixture writes format_version 2, moves the short
    columns (with their data) to /metrics_unaligned/, leaves every /metrics column 48 rows,
    and a later row with a new key keeps them aligned (NaN-backfilled)."""
    copy = tmp_path / "run.h5"
    shutil.copy(FIXTURE / "run.h5", copy)
    with h5py.File(copy, "r") as f:
        original = {n: f["metrics"][n][()] for n in ("exploration", "learning_rate", "losses/td")}
        last = {n: f["metrics"][n][-1] for n in ("env_steps", "episodes", "learner_updates")}
    writer = RunFile.reopen(copy, episodes_rows=90, metrics_rows=48)
    assert writer.episodes_dropped == 0
    writer.close()
    with h5py.File(copy, "r") as f:
        assert int(f.attrs["format_version"]) == 2
        assert f.attrs["status"] == "running"
        for name, values in original.items():
            np.testing.assert_array_equal(f["metrics_unaligned"][name][()], values)
            assert name not in f["metrics"]
        assert "losses" not in f["metrics"]
        metrics, left_out = read_metrics(f)
        assert left_out == []
        assert {len(v) for v in metrics.values()} == {48}
        assert f["metrics/env_steps"].attrs["units"] == "env steps"
    writer = RunFile.reopen(copy, episodes_rows=90, metrics_rows=48)
    writer.append_metrics(
        {
            "env_steps": int(last["env_steps"]) + 64,
            "wall_time": 4.0,
            "env_steps_per_s": 900.0,
            "episodes": int(last["episodes"]) + 1,
            "mean_return_100": 200.0,
            "learner_updates": int(last["learner_updates"]) + 8,
            "q_mean": 1.5,
        }
    )
    writer.close()
    with h5py.File(copy, "r") as f:
        metrics, left_out = read_metrics(f)
        lengths = {n: d.shape[0] for n, d in _datasets(f["metrics"]).items()}
    assert left_out == [] and set(lengths.values()) == {49}
    assert np.isnan(metrics["q_mean"][:48]).all() and metrics["q_mean"][48] == 1.5
    assert metrics["env_steps"][48] == last["env_steps"] + 64


def test_reopen_cuts_a_format_1_copy_to_the_checkpoint_rows(tmp_path):
    """Reopening a format-1 copy at fewer rows cuts episodes and every aligned column to
    those rows and counts the dropped episodes."""
    copy = tmp_path / "run.h5"
    shutil.copy(FIXTURE / "run.h5", copy)
    writer = RunFile.reopen(copy, episodes_rows=70, metrics_rows=40)
    assert writer.episodes_dropped == 20
    writer.close()
    with h5py.File(copy, "r") as f:
        assert {d.shape[0] for d in _datasets(f["episodes"]).values()} == {70}
        assert {d.shape[0] for d in _datasets(f["metrics"]).values()} == {40}
        assert f["metrics_unaligned/exploration"].shape == (47,)


def _datasets(group):
    """{relative name: dataset} under an h5py group, at any depth."""
    found = {}
    group.visititems(lambda n, o: found.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
    return found


# 8. The format-2 writer


def test_append_metrics_keeps_columns_aligned_and_describes_them(tmp_path):
    """Keys that appear late are NaN before, keys missing from a row get NaN, every
    /metrics column has one row per append; an integer key missing raises ValueError; every
    dataset carries units and description (episodes/wall_time in "s", resumes/wall_time
    described as Unix time)."""
    writer = RunFile(tmp_path / "run.h5", {"algo": "ppo", "config": "{}"})
    base = {"wall_time": 1.0, "env_steps_per_s": 10.0, "episodes": 0, "mean_return_100": 0.0}
    writer.append_metrics({"env_steps": 10} | base)
    writer.append_metrics({"env_steps": 20, "losses/td": 0.5} | base)
    writer.append_metrics({"env_steps": 30, "q_mean": 2.0} | base)
    writer.append_metrics({"env_steps": 40, "losses/td": 0.25, "q_mean": 3.0} | base)
    with pytest.raises(ValueError, match="episodes"):
        writer.append_metrics({"env_steps": 50, "wall_time": 2.0})
    writer.close()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        datasets = _datasets(f["metrics"])
        assert {d.shape[0] for d in datasets.values()} == {4}
        np.testing.assert_array_equal(f["metrics/losses/td"][()], [np.nan, 0.5, np.nan, 0.25])
        np.testing.assert_array_equal(f["metrics/q_mean"][()], [np.nan, np.nan, 2.0, 3.0])
        np.testing.assert_array_equal(f["metrics/env_steps"][()], [10, 20, 30, 40])
        assert f["metrics/env_steps"].dtype == np.int64
        assert int(f.attrs["format_version"]) == 2
        everything = _datasets(f)
        assert {"episodes/wall_time", "resumes/wall_time", "metrics/losses/td"} <= set(everything)
        for name, dataset in everything.items():
            assert "units" in dataset.attrs and dataset.attrs["description"], name
        assert f["episodes/wall_time"].attrs["units"] == "s"
        assert "Unix time" in f["resumes/wall_time"].attrs["description"]
        assert f["metrics/env_steps_per_s"].attrs["units"] == "env steps/s"
        assert "td" in f["metrics/losses/td"].attrs["description"]
        metrics, left_out = read_metrics(f)
    assert left_out == [] and set(metrics) == set(datasets)


# 9. load_runs tables


def test_load_runs_tables_equal_the_hdf5_data(tmp_path):
    """`load_runs` gives one runs row per run, one episodes row per episode with run,
    experiment, world_size and learning_rate, and a long metrics table of every non-NaN
    /metrics value (env_steps and wall_time as columns) equal to the HDF5 values."""

    def late(k, s):
        return {"q_mean": 0.5 * k} if k >= 2 else {}

    rng = np.random.default_rng(9)
    make_run(tmp_path, "a", learning_rate=0.001, returns=rng.normal(50, 5, 17), extras=late)
    make_run(tmp_path, "b", seed=1, world_size=2, returns=rng.normal(80, 5, 11), rate=2000.0)
    runs, episodes, metrics = load_runs(str(tmp_path))
    assert sorted(runs["run"]) == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert {"run", "experiment", "world_size", "learning_rate"} <= set(episodes.columns)
    assert len(episodes) == 17 + 11
    for name, lr, world_size in (("a", 0.001, 1), ("b", 0.002, 2)):
        ep_h5, metrics_h5, _ = read_h5(tmp_path / name)
        mine = episodes[episodes["run"] == str(tmp_path / name)]
        assert set(mine["learning_rate"]) == {lr} and set(mine["world_size"]) == {world_size}
        assert mine["experiment"].nunique() == 1
        for field in ("return", "length", "env_steps", "wall_time", "rank"):
            np.testing.assert_array_equal(mine[field].to_numpy(), ep_h5[field])
        long = metrics[metrics["run"] == str(tmp_path / name)]
        assert not long["value"].isna().any()
        assert set(long["learning_rate"]) == {lr}
        expected_rows = 0
        for column, values in metrics_h5.items():
            if column in ("env_steps", "wall_time"):
                continue
            got = long[long["metric"] == column].sort_values("row")
            present = np.flatnonzero(~np.isnan(values.astype(np.float64)))
            expected_rows += len(present)
            np.testing.assert_array_equal(got["row"].to_numpy(), present)
            np.testing.assert_array_equal(got["value"].to_numpy(), values[present])
            np.testing.assert_array_equal(got["env_steps"], metrics_h5["env_steps"][present])
        assert len(long) == expected_rows
    assert (metrics["metric"] == "q_mean").sum() == len(read_h5(tmp_path / "a")[1]["q_mean"]) - 2


# 10. TensorBoard events


def test_tensorboard_events_read_back_equal_to_metrics_and_returns(tmp_path):
    """Every /metrics column but env_steps is a tag with step = env_steps and value = the
    float32 of the HDF5 value (NaN rows skipped); episode returns are `episodes/return`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def extras(k, s):
        row = {"learner_updates": 7 * k, "losses/td": 1.0 / (k + 3)}
        return row | ({"q_mean": 0.1 * k} if k % 2 else {})

    returns = np.random.default_rng(2).normal(100.0, 20.0, 23)
    run_dir = make_run(tmp_path, "run", returns=returns, extras=extras)
    (run,) = read_runs([run_dir])
    log_dir = tmp_path / "tb"
    write_run_events(log_dir, run.metrics, run.episodes)
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    episodes_h5, metrics_h5, _ = read_h5(run_dir)
    tags = set(accumulator.Tags()["scalars"])
    assert tags == (set(metrics_h5) - {"env_steps"}) | {"episodes/return"}
    steps = metrics_h5["env_steps"]
    for column, values in metrics_h5.items():
        if column == "env_steps":
            continue
        present = ~np.isnan(values.astype(np.float64))
        events = accumulator.Scalars(column)
        assert [e.step for e in events] == steps[present].tolist(), column
        expected = values[present].astype(np.float32)
        np.testing.assert_array_equal(np.array([e.value for e in events], np.float32), expected)
    assert 0 < (~np.isnan(metrics_h5["q_mean"])).sum() < len(steps)
    events = accumulator.Scalars("episodes/return")
    assert [e.step for e in events] == episodes_h5["env_steps"].tolist()
    np.testing.assert_array_equal(
        np.array([e.value for e in events], np.float32), episodes_h5["return"].astype(np.float32)
    )
