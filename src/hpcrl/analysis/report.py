"""`python -m hpcrl analyse`: run directories -> learning curves, operational timelines,
scaling report and summary tables (one process, no MPI).

What it writes under `--out` (never into a run directory):

    summary.md, summary.csv            one row per experiment
    scaling.md, scaling.csv            experiments that differ only in world_size
    learning-curves-<env>.png          return vs env steps and vs training time
    timelines-<env>.png                env steps/s, learner updates/s, policy lag, ...
    scaling-<experiment>.png           env steps/s (ideal line), efficiency, time to threshold
    tb/<run>/events.out.tfevents.*     with --tensorboard
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcrl.analysis import stats
from hpcrl.analysis.runs import Experiment, Run, differing_labels, group_runs, read_runs
from hpcrl.errors import UserError
from hpcrl.storage.runfile import RUN_FILE

GRID_POINTS = 200
FINAL_EPISODES = 100  # a run's final return: the mean of its last 100 training episodes
FORMATS = ("png", "svg", "pdf")


@dataclass
class Curve:
    """One experiment's learning curve along one axis (`env_steps` or `wall_time`)."""

    label: str
    grid: np.ndarray  # (m,) float64 positions, from 0 to the longest run's end
    band: stats.Band  # mean over runs and 95% CI on `grid`
    runs: list[tuple[str, np.ndarray, np.ndarray]]  # (run directory, x (n,), smoothed (n,))


@dataclass
class TimelineSeries:
    """One run's `/metrics` series against training time, for the timeline panels."""

    experiment: str
    run: str
    wall_time: np.ndarray  # (rows,) seconds since the run started
    values: dict[str, object]  # panel key -> (rows,) array; "policy_lag" -> (mean, max)


@dataclass
class ScalingRow:
    """One world size of a scaling family (experiments equal but for world_size)."""

    world_size: int
    runs: int
    env_steps_per_s: float  # mean over runs
    speedup: float  # env_steps_per_s / that of the smallest world
    ideal_speedup: float  # world_size / the smallest world_size
    efficiency: float  # speedup / ideal_speedup
    reached: int  # runs whose 20-episode mean reached the threshold
    env_steps_to_threshold: float  # median over the runs that reached it (NaN: none)
    seconds_to_threshold: float


def reward_threshold(env_id: str) -> float | None:
    """The env's `spec.reward_threshold` (CartPole-v1: 475), None when it has none or
    the id is not registered here."""
    import gymnasium as gym

    try:
        return gym.spec(env_id).reward_threshold
    except Exception:  # noqa: BLE001 - an unknown or unimportable id just has none
        return None


def learning_curve(exp: Experiment, axis: str, points: int = GRID_POINTS) -> Curve:
    """Each run's 20-episode rolling mean return along `axis` ("env_steps" or
    "wall_time"), and their mean with a 95% bootstrap band on a common grid from 0 to
    the longest run's end. A run has no value before its first episode or after its last
    logged row."""
    per_run, ends = [], []
    for run in exp.runs:
        x = run.episodes[axis].astype(np.float64)
        order = np.argsort(x, kind="stable")
        x = x[order]
        y = stats.rolling_mean(run.episodes["return"][order])
        end = float(run.env_steps if axis == "env_steps" else run.wall_time_s)
        per_run.append((str(run.path), x, y))
        ends.append(max(end, float(x[-1]) if x.size else 0.0))
    grid = np.linspace(0.0, max(ends, default=0.0), points)
    samples = np.array(
        [stats.on_grid(x, y, grid, end) for (_, x, y), end in zip(per_run, ends, strict=True)]
    )
    return Curve(exp.label, grid, stats.mean_band(samples.reshape(len(per_run), points)), per_run)


def timeline_series(exp: Experiment) -> list[TimelineSeries]:
    """The timeline panels' data of every run in `exp` (`TIMELINE_PANELS` keys)."""
    out = []
    for run in exp.runs:
        m = run.metrics
        if "wall_time" not in m or not len(m["wall_time"]):
            continue
        values: dict[str, object] = {}
        if "env_steps_per_s" in m:
            values["env_steps_per_s"] = m["env_steps_per_s"]
        if "learner_updates_per_s" in m:
            values["learner_updates_per_s"] = m["learner_updates_per_s"]
        elif "learner_updates" in m:
            values["learner_updates_per_s"] = _rate(m["learner_updates"], m["wall_time"])
        if "policy_lag_mean" in m:
            values["policy_lag"] = (
                m["policy_lag_mean"],
                m.get("policy_lag_max", m["policy_lag_mean"]),
            )
        for key in ("actor_efficiency", "learner_wait_frac"):
            if key in m:
                values[key] = m[key]
        out.append(TimelineSeries(exp.label, str(run.path), m["wall_time"], values))
    return out


def _rate(counts: np.ndarray, wall_time: np.ndarray) -> np.ndarray:
    """Per-row rate of a cumulative counter: its increase over the time since the
    previous row (the first row: since the start)."""
    counts = np.asarray(counts, dtype=np.float64)
    wall = np.asarray(wall_time, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.diff(counts, prepend=0.0) / np.diff(wall, prepend=0.0)


def final_return(run: Run) -> float:
    """Mean return of the run's last `FINAL_EPISODES` training episodes (NaN: none)."""
    returns = run.episodes["return"][-FINAL_EPISODES:]
    return float(np.mean(returns)) if len(returns) else float("nan")


def time_to_threshold(run: Run, threshold: float | None) -> tuple[float, float]:
    """(env steps, training seconds) when the run's first 20-episode window reached
    `threshold` (NaN, NaN when it did not or there is no threshold)."""
    if threshold is None:
        return float("nan"), float("nan")
    hit = stats.threshold_crossing(run.episodes["return"], threshold)
    if hit is None:
        return float("nan"), float("nan")
    return float(run.episodes["env_steps"][hit]), float(run.episodes["wall_time"][hit])


def _metric_mean(runs: list[Run], key: str) -> float:
    """Mean over runs of each run's mean of a `/metrics` column (NaN: no run has it)."""
    means = [
        np.nanmean(r.metrics[key])
        for r in runs
        if key in r.metrics and np.isfinite(r.metrics[key]).any()
    ]
    return float(np.mean(means)) if means else float("nan")


def summary_rows(experiments: list[Experiment]) -> list[dict]:
    """One summary row per experiment (see the README's "Analyse" section)."""
    rows = []
    for exp in experiments:
        threshold = reward_threshold(exp.env_id)
        finals = np.array([final_return(r) for r in exp.runs])
        mean, low, high = stats.mean_ci(finals)
        reach = np.array([time_to_threshold(r, threshold) for r in exp.runs]).reshape(-1, 2)
        reached = np.isfinite(reach[:, 0])
        statuses: dict[str, int] = {}
        for run in exp.runs:
            statuses[run.status] = statuses.get(run.status, 0) + 1
        empty = sum(1 for r in exp.runs if not len(r.episodes["return"]))
        note = ""
        if empty == len(exp.runs):
            note = "no finished episode yet"
        elif empty:
            note = f"{empty} run(s) without a finished episode"
        is_async = any("policy_lag_mean" in r.metrics for r in exp.runs)
        rows.append(
            {
                "experiment": exp.label,
                "env_id": exp.env_id,
                "algo": exp.algo,
                "world_size": exp.world_size,
                "runs": len(exp.runs),
                "status": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
                "episodes": int(sum(len(r.episodes["return"]) for r in exp.runs)),
                "final_return_mean": mean,
                "final_return_ci_low": low,
                "final_return_ci_high": high,
                "final_return_iqm": stats.iqm(finals),
                "eval_return_mean": _nanmean([r.eval_mean_return for r in exp.runs]),
                "threshold": threshold if threshold is not None else float("nan"),
                "reached": f"{int(reached.sum())}/{len(exp.runs)}" if threshold is not None else "",
                "env_steps_to_threshold_median": _median(reach[reached, 0]),
                "seconds_to_threshold_median": _median(reach[reached, 1]),
                "env_steps_per_s": _nanmean([r.env_steps_per_s for r in exp.runs]),
                "policy_lag_mean": _metric_mean(exp.runs, "policy_lag_mean")
                if is_async
                else float("nan"),
                "actor_efficiency": _metric_mean(exp.runs, "actor_efficiency")
                if is_async
                else float("nan"),
                "note": note,
            }
        )
    return rows


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _median(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values)) if values.size else float("nan")


def scaling_families(experiments: list[Experiment]) -> list[tuple[str, list[ScalingRow]]]:
    """Experiments equal but for world_size, with at least two world sizes: one
    (name, rows by world size) per family. Rates are the mean over runs of each run's
    env steps / training seconds."""
    families: dict[tuple, list[Experiment]] = {}
    for exp in experiments:
        families.setdefault(exp.key, []).append(exp)
    scaled = [sorted(f, key=lambda e: e.world_size) for f in families.values() if len(f) > 1]
    names = differing_labels([f[0] for f in scaled], world_size=False)
    out = []
    for name, family in zip(names, scaled, strict=True):
        threshold = reward_threshold(family[0].env_id)
        ranks = np.array([e.world_size for e in family])
        rates = np.array([_nanmean([r.env_steps_per_s for r in e.runs]) for e in family])
        gain, efficiency = stats.speedup(ranks, rates)
        rows = []
        for i, exp in enumerate(family):
            reach = np.array([time_to_threshold(r, threshold) for r in exp.runs]).reshape(-1, 2)
            hit = np.isfinite(reach[:, 0])
            rows.append(
                ScalingRow(
                    world_size=int(ranks[i]),
                    runs=len(exp.runs),
                    env_steps_per_s=float(rates[i]),
                    speedup=float(gain[i]),
                    ideal_speedup=float(ranks[i] / ranks[0]),
                    efficiency=float(efficiency[i]),
                    reached=int(hit.sum()),
                    env_steps_to_threshold=_median(reach[hit, 0]),
                    seconds_to_threshold=_median(reach[hit, 1]),
                )
            )
        out.append((name, rows))
    return out


def slug(text: str) -> str:
    """A file-name-safe form of `text` (`ALE/Pong-v5` -> `ALE-Pong-v5`)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "runs"


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {str(out)!r} cannot be created: {exc.strerror}") from None


def _check_out_not_in_run_dir(out: Path) -> None:
    """Refuse an `--out` that is, or lies inside, any run directory (one holding run.h5),
    analysed or not."""
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / RUN_FILE).is_file():
            raise UserError(
                f"--out {str(out)!r} is inside run directory {str(folder)!r}: analyse "
                "never writes into a run directory; choose another --out"
            )


def _figsize(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"\s*([0-9.]+)\s*[xX]\s*([0-9.]+)\s*", text)
    try:
        size = (float(match.group(1)), float(match.group(2))) if match else None
    except ValueError:
        size = None
    if size is None or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT in inches, e.g. 10x4")
    return size


def add_parser(sub) -> None:
    """The `analyse` subcommand's arguments."""
    p = sub.add_parser(
        "analyse",
        help="learning curves, timelines, scaling and summary tables from run directories",
        description="Read run directories (completed, interrupted or still running) and "
        "write figures and tables to --out. Never needs MPI; never writes into a run.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, their run.h5, folders "
        "holding run directories (a sweep), or glob patterns",
    )
    p.add_argument("--out", default="report", help="output directory (default ./report)")
    p.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="KEY",
        help="group runs by this config key instead of 'every key but seed' (repeatable)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        default=[],
        help="figure format besides png (repeatable: svg, pdf)",
    )
    p.add_argument(
        "--figsize",
        type=_figsize,
        default=(11.0, 4.5),
        metavar="WxH",
        help="figure size in inches (default 11x4.5)",
    )
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100)")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write each run's /metrics and episode returns as TensorBoard event "
        "files under OUT/tb/<run>/",
    )


def run(args: argparse.Namespace) -> int:
    """`python -m hpcrl analyse`: returns the exit status.

    Raises:
        UserError: bad paths, unreadable run files, unknown --by key, --out a file.
    """
    if args.dpi <= 0:
        raise UserError(f"--dpi {args.dpi}: expected a positive integer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file: expected a directory to write into")
    _check_out_not_in_run_dir(out)
    runs = read_runs(args.paths)
    experiments = group_runs(runs, args.by or None)
    _prepare_out(out)
    written = write_report(experiments, out, ["png", *args.formats], args.figsize, args.dpi)
    if args.tensorboard:
        from hpcrl.storage.events import write_run_events

        names: dict[str, int] = {}
        for run in runs:
            count = names[run.name] = names.get(run.name, 0) + 1
            target = out / "tb" / (run.name if count == 1 else f"{run.name}-{count}")
            write_run_events(target, run.metrics, run.episodes)
            written.append(target)
    _print_summary(runs, experiments, written)
    return 0


def write_report(
    experiments: list[Experiment],
    out: Path,
    formats: list[str],
    figsize: tuple[float, float],
    dpi: int,
) -> list[Path]:
    """Every table and figure of `analyse` for `experiments`, under `out`."""
    import pandas as pd

    from hpcrl.analysis import plots

    written: list[Path] = []
    table = pd.DataFrame(summary_rows(experiments))
    written += _write_table(table, out / "summary")
    by_env: dict[str, list[Experiment]] = {}
    for exp in experiments:
        by_env.setdefault(exp.env_id, []).append(exp)
    for env_id, exps in by_env.items():
        for exp, label in zip(exps, differing_labels(exps), strict=True):
            exp.label = label  # within one env's figure, name by what differs there
        curves = {
            axis: [learning_curve(e, axis) for e in exps] for axis in ("env_steps", "wall_time")
        }
        fig = plots.learning_curves(env_id, curves, reward_threshold(env_id), figsize, dpi)
        written += plots.save(fig, out / f"learning-curves-{slug(env_id)}", formats)
        series = [s for e in exps for s in timeline_series(e)]
        if series:
            fig = plots.timelines(env_id, series, (figsize[0], figsize[1] * 1.4), dpi)
            written += plots.save(fig, out / f"timelines-{slug(env_id)}", formats)
    families = scaling_families(experiments)
    if families:
        rows = [{"experiment": name} | vars(r) for name, family in families for r in family]
        written += _write_table(pd.DataFrame(rows), out / "scaling")
        for name, family in families:
            fig = plots.scaling(name, family, figsize, dpi)
            written += plots.save(fig, out / f"scaling-{slug(name)}", formats)
    return written


def _write_table(table, stem: Path) -> list[Path]:
    """Every column to CSV; to Markdown only the columns with a value in some row."""
    table.to_csv(stem.with_suffix(".csv"), index=False)
    shown = table.loc[:, [c for c in table if table[c].replace("", np.nan).notna().any()]]
    stem.with_suffix(".md").write_text(shown.to_markdown(index=False, floatfmt=".5g") + "\n")
    return [stem.with_suffix(".md"), stem.with_suffix(".csv")]


def _print_summary(runs: list[Run], experiments: list[Experiment], written: list[Path]) -> None:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"[hpcrl] analyse: {len(runs)} runs ({status}) in {len(experiments)} experiments")
    for run in runs:
        if run.running:
            print(
                f"[hpcrl]   still running: {run.path} (read up to its last flush, "
                f"{run.modified_s_ago:.0f} s ago; {run.env_steps:,} env steps)"
            )
        if run.metrics_left_out:
            print(
                f"[hpcrl]   {run.path}: format-1 /metrics columns left out (rows unknown): "
                + ", ".join(run.metrics_left_out)
            )
    for path in written:
        print(f"[hpcrl]   wrote {path}")
    sys.stdout.flush()
