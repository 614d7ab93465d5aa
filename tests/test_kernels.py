"""numba kernels against numpy references computed the slow way."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data import kernels
from onnxopt.data.statistics import TensorRange

BINS = 4096


def batches(seed=0, n=4, size=20000):
    r = np.random.default_rng(seed)
    # growing scale: later batches force the running histogram to double its range
    return [(r.standard_normal(size) * (1 + i)).astype(np.float32) for i in range(n)]


def test_finite_min_max_skips_nan_and_inf():
    x = np.array([np.nan, -3.0, np.inf, 2.5, -np.inf], np.float32)
    assert kernels.finite_min_max(x) == (-3.0, 2.5, 2)
    lo, hi, n = kernels.finite_min_max(np.array([np.nan], np.float32))
    assert n == 0 and np.isnan(lo) and np.isnan(hi)


def test_histogram_add_matches_numpy():
    x = batches()[0]
    hist = np.zeros(BINS)
    kernels.histogram_add(hist, x, 5.0)
    expected, _ = np.histogram(np.clip(x, -5.0, 5.0 - 1e-6), bins=BINS, range=(-5.0, 5.0))
    assert hist.sum() == x.size
    assert np.abs(hist - expected).sum() <= 4  # float rounding at a bin edge may move a value


def test_streamed_histogram_equals_histogram_of_all_data():
    stats = TensorRange("t")
    data = batches()
    for b in data:
        stats.add(b)
    hist, half = stats.histogram()
    everything = np.concatenate(data)
    assert half > np.abs(everything).max()
    expected, _ = np.histogram(everything, bins=BINS, range=(-half, half))
    assert hist.sum() == everything.size
    assert np.abs(hist - expected).sum() <= 8
    assert (stats.min, stats.max) == (everything.min(), everything.max())


def test_double_range_keeps_counts_and_zero_edge():
    hist = np.arange(8, dtype=np.float64)
    doubled = kernels.double_range(hist)
    assert doubled.sum() == hist.sum()
    # bins 2m, 2m+1 of [-R, R) become bin 2 + m of [-2R, 2R)
    assert list(doubled) == [0, 0, 1, 5, 9, 13, 0, 0]


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(p):
    stats = TensorRange("t")
    data = batches(1)
    for b in data:
        stats.add(b)
    everything = np.sort(np.concatenate(data).astype(np.float64))
    lo, hi = stats.range("percentile", percentile=p)
    width = 2 * stats.half_range / BINS

    def between_order_statistics(value, q):
        # a histogram knows each value only to its bin: the answer must lie within one bin
        # of the order statistics around rank q * n
        k = q * everything.size
        below = everything[max(int(np.floor(k)) - 1, 0)]
        above = everything[min(int(np.ceil(k)) + 1, everything.size - 1)]
        return below - width <= value <= above + width

    assert between_order_statistics(hi, p / 100)
    assert between_order_statistics(lo, 1 - p / 100)
    assert abs(hi - np.percentile(everything, p)) <= 4 * width


def slow_entropy_threshold(abs_hist, width, levels, max_clipped, stride=1):
    """TensorRT's KL calibration written plainly in numpy (same smoothing and grouping)."""
    def smooth(p, eps=1e-4):
        zeros = p == 0
        if zeros.all():
            return p
        return np.where(zeros, eps, p - eps * zeros.sum() / (~zeros).sum())

    last = np.nonzero(abs_hist)[0].max()
    stop = min(max(last + 1, levels), abs_hist.size)
    best, best_i = np.inf, stop
    for i in sorted(set(range(levels, stop + 1, stride)) | {stop}):
        if abs_hist[i:].sum() > max_clipped * abs_hist.sum():
            continue
        p = abs_hist[:i].copy()
        p[i - 1] += abs_hist[i:].sum()
        q = np.zeros(i)
        step = i // levels
        for g in range(levels):
            lo_, hi_ = g * step, (i if g == levels - 1 else (g + 1) * step)
            nz = p[lo_:hi_] != 0
            if nz.any():
                q[lo_:hi_][nz] = abs_hist[lo_:hi_].sum() / nz.sum()
        p, q = smooth(p / p.sum()), smooth(q / q.sum())
        mask = (p > 0) & (q > 0)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


def test_entropy_matches_slow_reference():
    r = np.random.default_rng(3)
    x = np.concatenate([r.laplace(size=50000), r.laplace(scale=8, size=50)]).astype(np.float32)
    abs_hist, _ = np.histogram(np.abs(x), bins=512, range=(0, np.abs(x).max() * 1.0001))
    width = np.abs(x).max() * 1.0001 / 512
    fast = kernels.entropy_threshold(abs_hist.astype(np.float64), width, 128, 1.0)
    assert fast == pytest.approx(slow_entropy_threshold(abs_hist.astype(np.float64), width, 128, 1.0))
    assert fast < np.abs(x).max()  # the rare large values are clipped
    guarded = kernels.entropy_threshold(abs_hist.astype(np.float64), width, 128, 1e-4)
    assert guarded == pytest.approx(slow_entropy_threshold(abs_hist.astype(np.float64), width, 128, 1e-4))
    assert np.mean(np.abs(x) > guarded) <= 1e-4
    strided = kernels.entropy_threshold(abs_hist.astype(np.float64), width, 128, 1.0, 3)
    assert strided == pytest.approx(slow_entropy_threshold(abs_hist.astype(np.float64), width, 128, 1.0, 3))


def test_entropy_does_not_clip_a_distribution_away_from_zero():
    # values in [0.13, 0.86]: without the guard KL picks a threshold below every value
    stats = TensorRange("t")
    stats.add(np.random.default_rng(6).uniform(0.13, 0.86, 20000).astype(np.float32))
    lo, hi = stats.range("entropy")
    assert hi > 0.85


def test_entropy_range_from_statistics_clips_outliers():
    stats = TensorRange("t")
    r = np.random.default_rng(4)
    stats.add(np.concatenate([r.laplace(size=100000), [60.0, -55.0]]).astype(np.float32))
    lo, hi = stats.range("entropy")
    assert -55.0 < lo < 0 < hi < 60.0


def exact_mse(x, lo, hi, qmin, qmax):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return float(np.mean((x - (q - zp) * scale) ** 2))


def test_mse_range_is_near_the_brute_force_optimum():
    r = np.random.default_rng(5)
    x = np.concatenate([np.abs(r.standard_normal(40000)), [25.0]]).astype(np.float64)
    stats = TensorRange("t")
    stats.add(x.astype(np.float32))
    lo, hi = stats.range("mse", qmin=0, qmax=255, symmetric=False)
    candidates = [exact_mse(x, a * x.min(), a * x.max(), 0, 255) for a in np.arange(1, 101) / 100]
    assert hi < x.max()  # the outlier is clipped
    assert exact_mse(x, lo, hi, 0, 255) <= 1.05 * min(candidates)


def test_zero_tensor_has_zero_range():
    stats = TensorRange("t")
    stats.add(np.zeros(10, np.float32))
    assert stats.range("percentile") == (0.0, 0.0)
    stats.add(np.array([1.0, 2.0], np.float32))  # first nonzero batch starts the histogram
    hist, _ = stats.histogram()
    assert hist.sum() == 12
