"""numba kernels for activation statistics: ranges, histograms, percentiles, entropy, MSE.

Calibration reduces each batch at once into a running histogram, so memory does not grow
with the number of samples. The histogram is signed, with ``B`` bins (B divisible by 4)
over [-R, R): bin k holds values in [-R + k*w, -R + (k+1)*w) with w = 2R/B, so zero is the
lower edge of bin B/2. When a batch holds a value beyond R, the range doubles and pairs of
bins merge (``double_range``): counts stay exact, resolution halves.

The range methods return (lo, hi) clipping ranges; scale and zero point are computed from
them elsewhere (onnxopt/quantization/scheme.py).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit



@njit(cache=True, nogil=True)
def finite_min_max(x):
    """(min, max, count) of the finite values of a flat float array (nan, nan, 0 if none)."""
    lo = np.inf
    hi = -np.inf
    n = 0
    for i in range(x.size):
        v = x[i]
        if math.isfinite(v):
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            n += 1
    if n == 0:
        return np.nan, np.nan, 0
    return lo, hi, n


@njit(cache=True, nogil=True)
def histogram_add(hist, x, half_range):
    """Add the finite values of flat ``x`` to ``hist`` (bins over [-half_range, half_range));
    values at or beyond the edges go to the end bins."""
    nbins = hist.size
    inv_width = nbins / (2.0 * half_range)
    for i in range(x.size):
        v = x[i]
        if not math.isfinite(v):
            continue
        k = int(math.floor((v + half_range) * inv_width))
        if k < 0:
            k = 0
        elif k >= nbins:
            k = nbins - 1
        hist[k] += 1


@njit(cache=True, nogil=True)
def double_range(hist):
    """The histogram of the same values over twice the range: bins 2m, 2m+1 merge into
    bin B/4 + m (B divisible by 4 keeps zero on a bin edge)."""
    nbins = hist.size
    out = np.zeros_like(hist)
    quarter = nbins // 4
    for m in range(nbins // 2):
        out[quarter + m] = hist[2 * m] + hist[2 * m + 1]
    return out


@njit(cache=True, nogil=True)
def fold_abs(hist):
    """The |x| histogram (B/2 bins over [0, R)) of a signed histogram over [-R, R)."""
    half = hist.size // 2
    out = np.zeros(half, dtype=np.float64)
    for j in range(half):
        out[j] = hist[half + j] + hist[half - 1 - j]
    return out


@njit(cache=True, nogil=True)
def _quantile(hist, half_range, q):
    """The value below which a fraction ``q`` of the counts lie (linear inside a bin)."""
    nbins = hist.size
    total = 0.0
    for k in range(nbins):
        total += hist[k]
    width = 2.0 * half_range / nbins
    target = q * total
    cum = 0.0
    for k in range(nbins):
        c = hist[k]
        if c > 0 and cum + c >= target:
            frac = (target - cum) / c
            return -half_range + (k + frac) * width
        cum += c
    return half_range


@njit(cache=True, nogil=True)
def percentile_range(hist, half_range, percentile):
    """(lo, hi) leaving (100 - percentile)% of the values outside on each side."""
    tail = (100.0 - percentile) / 100.0
    return _quantile(hist, half_range, tail), _quantile(hist, half_range, 1.0 - tail)


@njit(cache=True, nogil=True)
def kl_divergence_at(abs_hist, i, levels, p, q, eps=1e-4):
    """KL(P || Q) for clipping the |x| histogram at bin ``i`` and quantizing to ``levels``.

    P: the first i bins with every count beyond folded into bin i-1. Q: the first i bins
    merged into ``levels`` groups, each group's count spread evenly over the bins of the
    group where P is nonzero. Both are normalized and smoothed (a mass ``eps`` moved onto
    their zero bins, as MXNet and TensorRT do) so that KL stays finite. ``p`` and ``q`` are
    scratch buffers of at least ``i`` elements (no allocation per candidate).
    """
    outliers = 0.0
    for k in range(i, abs_hist.size):
        outliers += abs_hist[k]
    for k in range(i):
        p[k] = abs_hist[k]
        q[k] = 0.0
    p[i - 1] += outliers
    per_group = i // levels
    for g in range(levels):
        start = g * per_group
        stop = i if g == levels - 1 else start + per_group
        total = 0.0
        nonzero = 0
        for k in range(start, stop):
            total += abs_hist[k]
            if p[k] != 0:
                nonzero += 1
        if nonzero > 0:
            share = total / nonzero
            for k in range(start, stop):
                if p[k] != 0:
                    q[k] = share
    psum = 0.0
    qsum = 0.0
    pzeros = 0
    qzeros = 0
    for k in range(i):
        psum += p[k]
        qsum += q[k]
        if p[k] == 0:
            pzeros += 1
        if q[k] == 0:
            qzeros += 1
    if psum == 0 or qsum == 0:
        return np.inf
    pshift = eps * pzeros / (i - pzeros) if pzeros < i else 0.0
    qshift = eps * qzeros / (i - qzeros) if qzeros < i else 0.0
    kl = 0.0
    for k in range(i):
        pk = p[k] / psum
        pk = eps if pk == 0 else pk - pshift
        qk = q[k] / qsum
        qk = eps if qk == 0 else qk - qshift
        if pk > 0 and qk > 0:
            kl += pk * math.log(pk / qk)
    return kl


@njit(cache=True, nogil=True)
def entropy_threshold(abs_hist, bin_width, levels, max_clipped, stride=1):
    """TensorRT's calibration: the |x| threshold whose clipped, quantized distribution is
    closest in KL divergence to the original. Candidates run from ``levels`` bins to the
    last nonzero bin; returns the upper edge of the last kept bin (i * bin_width).

    Candidates that clip more than a fraction ``max_clipped`` of the values are skipped:
    for a tensor whose values sit away from zero (a hard-sigmoid in [0.13, 0.86]) a
    threshold below every value folds the whole histogram into one bin, which any Q
    matches exactly (KL = 0), and would clip everything. ``stride`` > 1 tries every
    stride-th candidate only (the last bin is always tried)."""
    nbins = abs_hist.size
    last = 0
    total = 0.0
    for k in range(nbins):
        total += abs_hist[k]
        if abs_hist[k] > 0:
            last = k
    stop = max(last + 1, levels)
    stop = min(stop, nbins)
    if stop <= levels:
        return stop * bin_width
    best = np.inf
    best_i = stop
    suffix = np.zeros(nbins + 1, dtype=np.float64)  # suffix[i] = count in bins i and beyond
    for k in range(nbins - 1, -1, -1):
        suffix[k] = suffix[k + 1] + abs_hist[k]
    p = np.empty(nbins, dtype=np.float64)
    q = np.empty(nbins, dtype=np.float64)
    i = levels
    while i <= stop:
        candidate = i
        i = i + stride if i < stop and i + stride <= stop else (stop if i < stop else stop + 1)
        if suffix[candidate] > max_clipped * total:
            continue
        kl = kl_divergence_at(abs_hist, candidate, levels, p, q)
        if kl < best:
            best = kl
            best_i = candidate
    return best_i * bin_width


@njit(cache=True, nogil=True)
def quantization_mse(hist, half_range, lo, hi, qmin, qmax, symmetric):
    """Expected squared error of quantize-dequantize over [lo, hi], with each bin's values
    taken at the bin's center (the histogram's view of the data)."""
    nbins = hist.size
    width = 2.0 * half_range / nbins
    if symmetric:
        absmax = max(-lo, hi)
        scale = absmax / qmax if absmax > 0 else 1.0
        zp = 0.0
    else:
        lo = min(lo, 0.0)
        hi = max(hi, 0.0)
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = min(max(round(qmin - lo / scale), qmin), qmax)
    err = 0.0
    total = 0.0
    for k in range(nbins):
        c = hist[k]
        if c == 0:
            continue
        v = -half_range + (k + 0.5) * width
        qv = round(v / scale) + zp
        if qv < qmin:
            qv = qmin
        elif qv > qmax:
            qv = qmax
        d = v - (qv - zp) * scale
        err += c * d * d
        total += c
    return err / total if total > 0 else 0.0


@njit(cache=True, nogil=True)
def mse_range(hist, half_range, lo, hi, qmin, qmax, symmetric, steps):
    """The range [a*lo, a*hi], a in (0, 1] on a grid of ``steps``, with the least
    quantization MSE; (lo, hi) is the observed min/max."""
    best = np.inf
    best_a = 1.0
    for s in range(1, steps + 1):
        a = s / steps
        err = quantization_mse(hist, half_range, a * lo, a * hi, qmin, qmax, symmetric)
        if err < best:
            best = err
            best_a = a
    return best_a * lo, best_a * hi
