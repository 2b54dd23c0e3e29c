"""Observation normalization with running statistics merged over the ranks.

As Stable-Baselines3's `VecNormalize` (running mean and variance, `(obs − μ) / sqrt(σ² + ε)`
clipped to ±10, initial count 1e-4), except that the statistics change only between
rollouts and are pooled over every rank: during a rollout each rank normalizes with the same
frozen μ, σ² and sums its raw observations; at the update one `Allreduce` of
[count, Σx, Σx²] merges every rank's sums into μ, σ² with the parallel-variance formula
(Chan, Golub and LeVeque 1979; the same as SB3's `RunningMeanStd.update_from_moments`). So
all ranks always hold identical statistics, as they hold identical parameters.
"""

from __future__ import annotations

import numpy as np

CLIP = 10.0
EPSILON = 1e-8
INITIAL_COUNT = 1e-4


class ObservationNormalizer:
    """Running mean/variance of observations of shape `shape` (float64 statistics).

    Args:
        shape: one observation's shape, e.g. (8,) for LunarLander.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = INITIAL_COUNT
        size = int(np.prod(shape))
        self._sums = np.zeros(1 + 2 * size, dtype=np.float64)  # [n, Σx..., Σx²...]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """(N, *shape) observations normalized with the current statistics, float32."""
        z = (np.asarray(obs, dtype=np.float64) - self.mean) / np.sqrt(self.var + EPSILON)
        return np.clip(z, -CLIP, CLIP).astype(np.float32)

    def accumulate(self, obs: np.ndarray) -> None:
        """Add (N, *shape) raw observations to this rank's sums for the next merge."""
        x = np.asarray(obs, dtype=np.float64).reshape(len(obs), -1)
        size = x.shape[1]
        self._sums[0] += len(x)
        self._sums[1 : 1 + size] += x.sum(axis=0)
        self._sums[1 + size :] += np.square(x).sum(axis=0)

    def merge(self, allreduce_sum) -> None:
        """Collective: pool every rank's sums (`allreduce_sum(buffer)` sums a float64 array
        in place over the ranks) into the statistics, then clear the sums."""
        allreduce_sum(self._sums)
        n = self._sums[0]
        if n > 0:
            size = self.mean.size
            batch_mean = (self._sums[1 : 1 + size] / n).reshape(self.mean.shape)
            batch_var = np.maximum(
                (self._sums[1 + size :] / n).reshape(self.mean.shape) - batch_mean**2, 0.0
            )
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean = self.mean + delta * n / total
            self.var = m2 / total
            self.count = total
        self._sums[:] = 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        """The statistics for a checkpoint (the sums are empty between rollouts)."""
        return {
            "obs_rms/mean": self.mean.copy(),
            "obs_rms/var": self.var.copy(),
            "obs_rms/count": np.array(self.count, dtype=np.float64),
        }

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean = np.array(arrays["obs_rms/mean"], dtype=np.float64)
        self.var = np.array(arrays["obs_rms/var"], dtype=np.float64)
        self.count = float(arrays["obs_rms/count"])
