"""Statistics over runs: smoothed returns, curves on a common grid, bootstrap confidence
intervals, the interquartile mean, threshold crossings and scaling figures.

Confidence intervals are percentile bootstrap intervals of the mean over runs
(`scipy.stats.bootstrap`), and aggregate scores use the interquartile mean where there
are at least 4 runs, as Agarwal et al. 2021 ("Deep RL at the Edge of the Statistical
Precipice", §4) recommend. numpy only at import: scipy is imported where it is used, so
`hpcrl.runner` can use `threshold_crossing` without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOLVED_WINDOW = 20  # training episodes averaged when checking the env's reward threshold
CONFIDENCE = 0.95
N_RESAMPLES = 2000
IQM_MIN_RUNS = 4


def rolling_mean(returns: np.ndarray, window: int = SOLVED_WINDOW) -> np.ndarray:
    """Mean of the last `window` values at each index (fewer at the start).

    Args:
        returns: (n,) episode returns in the order the episodes ended.

    Returns:
        (n,) float64: element i is mean(returns[max(0, i - window + 1) : i + 1]).
    """
    values = np.asarray(returns, dtype=np.float64)
    if values.size == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def threshold_crossing(
    returns: np.ndarray, threshold: float, window: int = SOLVED_WINDOW
) -> int | None:
    """The episode that completes the first `window` consecutive episodes whose mean
    return is >= `threshold` (what `train` prints as "reached"), or None.

    Args:
        returns: (n,) episode returns in the order the episodes ended.

    Returns:
        The index into `returns` of that window's last episode; None when no full window
        reaches the threshold (or there are fewer than `window` episodes).
    """
    values = np.asarray(returns, dtype=np.float64)
    if values.size < window:
        return None
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    hit = np.flatnonzero(means >= threshold)
    return int(hit[0]) + window - 1 if hit.size else None


def best_window_mean(returns: np.ndarray, window: int = SOLVED_WINDOW) -> float:
    """The highest mean over `window` consecutive returns (NaN with fewer episodes)."""
    values = np.asarray(returns, dtype=np.float64)
    if values.size < window:
        return float("nan")
    return float(np.convolve(values, np.ones(window) / window, mode="valid").max())


def on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray, x_end: float) -> np.ndarray:
    """A step function sampled on `grid`: the last `y` whose `x` is <= each grid point.

    Args:
        x: (n,) nondecreasing positions (env steps or seconds) of the values.
        y: (n,) values.
        grid: (m,) positions to sample.
        x_end: where the series ends (the run's last logged position); later grid points
            are NaN, as are those before `x[0]`.

    Returns:
        (m,) float64.
    """
    out = np.full(len(grid), np.nan)
    if len(x) == 0:
        return out
    index = np.searchsorted(np.asarray(x), grid, side="right") - 1
    valid = (index >= 0) & (grid <= x_end)
    out[valid] = np.asarray(y, dtype=np.float64)[index[valid]]
    return out


@dataclass
class Band:
    """The mean over runs and its confidence interval at each grid point."""

    mean: np.ndarray  # (m,) float64, NaN where no run has a value
    low: np.ndarray  # (m,) float64, NaN where fewer than 2 runs have a value
    high: np.ndarray
    runs: np.ndarray  # (m,) int64: how many runs have a value there


def mean_band(samples: np.ndarray, seed: int = 0) -> Band:
    """Mean over runs with a 95% percentile-bootstrap interval, per column.

    Args:
        samples: (n_runs, m) float64 with NaN where a run has no value; each column is
            bootstrapped over the runs that have one (`scipy.stats.bootstrap`, one call
            per set of such runs).

    Returns:
        The `Band`; the interval is NaN where fewer than 2 runs have a value.
    """
    from scipy import stats

    samples = np.atleast_2d(np.asarray(samples, dtype=np.float64))
    valid = ~np.isnan(samples)
    count = valid.sum(axis=0)
    mean = np.full(samples.shape[1], np.nan)
    low, high = mean.copy(), mean.copy()
    with np.errstate(invalid="ignore"):
        mean[count > 0] = np.nanmean(samples[:, count > 0], axis=0)
    patterns: dict[bytes, list[int]] = {}
    for column in np.flatnonzero(count >= 2):
        patterns.setdefault(valid[:, column].tobytes(), []).append(int(column))
    for columns in patterns.values():
        rows = valid[:, columns[0]]
        data = samples[np.ix_(rows, columns)]
        result = stats.bootstrap(
            (data,),
            np.mean,
            axis=0,
            vectorized=True,
            n_resamples=N_RESAMPLES,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low[columns] = result.confidence_interval.low
        high[columns] = result.confidence_interval.high
    return Band(mean, low, high, count)


def mean_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, CI low, CI high) of one sample, NaNs dropped (the interval is NaN with
    fewer than 2 values); see `mean_band`."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    band = mean_band(values.reshape(-1, 1), seed)
    return float(band.mean[0]), float(band.low[0]), float(band.high[0])


def iqm(values: np.ndarray) -> float:
    """Interquartile mean (the mean of the middle 50%, `scipy.stats.trim_mean` at 0.25),
    NaNs dropped; NaN with fewer than `IQM_MIN_RUNS` values."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size < IQM_MIN_RUNS:
        return float("nan")
    return float(stats.trim_mean(values, 0.25))


def speedup(world_sizes: np.ndarray, rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speed-up and parallel efficiency relative to the smallest world.

    Args:
        world_sizes: (k,) ranks of each point.
        rates: (k,) env steps/s at each.

    Returns:
        (speed-up (k,) = rate / rate at the smallest world, efficiency (k,) = speed-up /
        (world_size / smallest world_size)); the ideal speed-up is the rank ratio.
    """
    world_sizes = np.asarray(world_sizes, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    base = int(np.argmin(world_sizes))
    gain = rates / rates[base]
    return gain, gain / (world_sizes / world_sizes[base])
