"""Figures of `analyse`: learning curves, operational timelines and scaling (matplotlib,
no pyplot state: every figure is a `matplotlib.figure.Figure` saved with the Agg canvas).

Every line carries a `gid` naming what it shows (`mean:<experiment>`, `run:<experiment>:
<run directory>`, `threshold`, `ideal`, ...), so tests can read back the plotted series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hpcrl.analysis.report import Curve, ScalingRow, TimelineSeries

AXIS_LABELS = {
    "env_steps": "env steps (all acting ranks)",
    "wall_time": "training time (s)",
}
RETURN_LABEL = "training episode return\n(mean of the last 20 episodes)"
TIMELINE_PANELS = (
    ("env_steps_per_s", "env steps/s"),
    ("learner_updates_per_s", "learner updates/s"),
    ("policy_lag", "policy lag (updates):\nmean solid, max dashed"),
    ("actor_efficiency", "actor efficiency\n(fraction in env + inference)"),
    ("learner_wait_frac", "learner wait\n(fraction of time)"),
)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def learning_curves(
    env_id: str,
    curves: dict[str, list[Curve]],
    threshold: float | None,
    figsize: tuple[float, float],
    dpi: int,
) -> Figure:
    """Training return against env steps and against wall time, one panel each.

    Args:
        curves: {"env_steps": [...], "wall_time": [...]}: one `Curve` per experiment.
        threshold: the env's reward threshold (a dashed line), or None.
    """
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (axis, experiment_curves) in zip(axes, curves.items(), strict=True):
        for color, curve in zip(_colors(len(experiment_curves)), experiment_curves, strict=True):
            for run_name, x, y in curve.runs:
                ax.plot(x, y, color=color, lw=0.6, alpha=0.35, gid=f"run:{curve.label}:{run_name}")
            band = curve.band
            shown = ~np.isnan(band.mean)
            n = int(band.runs.max()) if band.runs.size else 0
            ax.plot(
                curve.grid[shown],
                band.mean[shown],
                color=color,
                lw=1.8,
                label=f"{curve.label} ({n} run{'s' if n != 1 else ''})",
                gid=f"mean:{curve.label}",
            )
            ranged = ~np.isnan(band.low)
            if ranged.any():
                ax.fill_between(
                    curve.grid,
                    band.low,
                    band.high,
                    where=ranged,
                    color=color,
                    alpha=0.2,
                    lw=0,
                    gid=f"band:{curve.label}",
                )
        if threshold is not None:
            ax.axhline(
                threshold,
                color="0.3",
                ls="--",
                lw=1,
                label=f"reward threshold {threshold:g}",
                gid="threshold",
            )
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel(RETURN_LABEL)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0])
    fig.suptitle(f"{env_id}: mean over runs, 95% bootstrap CI (thin lines: single runs)")
    return fig


def timelines(
    env_id: str,
    series: list[TimelineSeries],
    figsize: tuple[float, float],
    dpi: int,
) -> Figure:
    """Where the runs' time went: one panel per metric that any run logged, against
    training time, one line per run colored by experiment."""
    panels = [
        (key, label) for key, label in TIMELINE_PANELS if any(key in s.values for s in series)
    ]
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    labels = list(dict.fromkeys(s.experiment for s in series))
    color_of = dict(zip(labels, _colors(len(labels)), strict=True))
    for ax, (key, label) in zip(axes, panels, strict=False):
        seen = set()
        for s in series:
            if key not in s.values:
                continue
            legend = s.experiment if s.experiment not in seen else None
            seen.add(s.experiment)
            color = color_of[s.experiment]
            gid = f"{key}:{s.experiment}:{s.run}"
            if key == "policy_lag":
                mean, peak = s.values[key]
                ax.plot(s.wall_time, mean, color=color, lw=1, label=legend, gid=gid + ":mean")
                ax.plot(s.wall_time, peak, color=color, lw=0.8, ls="--", gid=gid + ":max")
            else:
                ax.plot(s.wall_time, s.values[key], color=color, lw=1, label=legend, gid=gid)
        ax.set_xlabel(AXIS_LABELS["wall_time"])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if panels:
        _legend_below(fig, axes[0])
    fig.suptitle(f"{env_id}: operational timelines (one line per run)")
    return fig


def scaling(
    title: str,
    rows: list[ScalingRow],
    figsize: tuple[float, float],
    dpi: int,
) -> Figure:
    """Env steps/s with the ideal line, parallel efficiency, and time and env steps to
    the reward threshold, each against ranks."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    rate_ax, eff_ax, reach_ax = fig.subplots(1, 3)
    ranks = np.array([r.world_size for r in rows], dtype=float)
    rates = np.array([r.env_steps_per_s for r in rows])
    rate_ax.plot(ranks, rates, "o-", label="measured", gid="env_steps_per_s")
    rate_ax.plot(ranks, rates[0] * ranks / ranks[0], "k--", lw=1, label="ideal", gid="ideal")
    rate_ax.set_ylabel("env steps/s (mean over runs)")
    rate_ax.legend(fontsize="small")
    eff_ax.plot(ranks, [r.efficiency for r in rows], "o-", gid="efficiency")
    eff_ax.axhline(1.0, color="k", ls="--", lw=1, gid="ideal_efficiency")
    base = int(ranks[0])
    eff_ax.set_ylabel(f"parallel efficiency (vs {base} rank{'s' if base > 1 else ''})")
    eff_ax.set_ylim(bottom=0)
    seconds = np.array([r.seconds_to_threshold for r in rows])
    steps = np.array([r.env_steps_to_threshold for r in rows])
    if np.isfinite(seconds).any():
        reach_ax.plot(ranks, seconds, "o-", color="C0", gid="seconds_to_threshold")
        reach_ax.set_ylabel("time to threshold (s, median)", color="C0")
        steps_ax = reach_ax.twinx()
        steps_ax.plot(ranks, steps, "s--", color="C1", gid="env_steps_to_threshold")
        steps_ax.set_ylabel("env steps to threshold (median)", color="C1")
    else:
        reach_ax.text(
            0.5,
            0.5,
            "no run reached\nthe reward threshold",
            ha="center",
            va="center",
            transform=reach_ax.transAxes,
        )
    for ax in (rate_ax, eff_ax, reach_ax):
        ax.set_xlabel("ranks (world_size)")
        ax.set_xticks(ranks)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: scaling")
    return fig


def _legend_below(fig: Figure, ax) -> None:
    """One legend under the panels, so long experiment names never squeeze them."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(4, len(labels)),
            fontsize="small",
            frameon=False,
        )


def save(fig: Figure, path_stem: Path, formats: list[str]) -> list[Path]:
    """Write `fig` as `<path_stem>.<fmt>` for each format; returns the paths."""
    written = []
    for fmt in formats:
        path = path_stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=fig.dpi)
        written.append(path)
    return written
