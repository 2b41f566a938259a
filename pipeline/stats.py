"""Bootstrap statistics over test videos: the mean of a per-video score and of a paired difference.

A leaf module (numpy only). Videos are the unit of resampling: each video gives one number (its score
averaged over the horizon), and an interval says how much the mean would move with other test videos
drawn from the same renderer. Paired differences resample the same videos for both methods, so the
variation between videos that both methods share cancels out.

`resample_indices` draws the resamples once; every method and difference of one report uses the same
draws (seeded), so the report is a pure function of the scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "resample_indices", "bootstrap_mean", "paired_difference"]


@dataclass(frozen=True)
class Interval:
    """A mean with its percentile bootstrap interval [lo, hi] at `level`, over `n` videos."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (a significant difference)."""
        return self.lo > 0.0 or self.hi < 0.0


def resample_indices(n: int, *, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap draws [resamples, n] of video indices (with replacement), from a seeded generator."""
    if n < 1:
        raise ValueError(f"bootstrap needs at least one video, got n={n}")
    if resamples < 1:
        raise ValueError(f"bootstrap needs at least one resample, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean(values, draws: np.ndarray, *, level: float = 0.95) -> Interval:
    """Mean of per-video `values` [n] and its percentile interval from `draws` [resamples, n].

    Non-finite values are refused: a NaN score means a broken prediction, never a value to average.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one number per video [n], got shape {x.shape}")
    if draws.ndim != 2 or draws.shape[1] != x.shape[0]:
        raise ValueError(f"draws {draws.shape} must be [resamples, n] with n = {x.shape[0]} videos")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values contain NaN or inf at videos {np.flatnonzero(~np.isfinite(x)).tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = x[draws].mean(axis=1)  # [resamples]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    mean = float(x.mean())
    # a constant sample resamples to exactly its mean; keep float noise from making lo > mean
    return Interval(mean=mean, lo=float(min(lo, mean)), hi=float(max(hi, mean)), n=int(x.shape[0]), level=level)


def paired_difference(a, b, draws: np.ndarray, *, level: float = 0.95) -> Interval:
    """Mean of a - b over the same videos, with its percentile interval (a, b: [n] per-video scores)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same videos: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, draws, level=level)
