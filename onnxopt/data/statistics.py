"""Streamed activation statistics for any pass: reducers over calibration batches.

A pass asks for statistics with reducers, each reading one or two tensors ("taps") of the
current model or of the reference model (the model as loaded, the teacher):

    ranges = TensorRange("conv1_out", histogram=True)
    moments = ChannelMoments("relu3_out", axis=1)
    gram = Gram("x", axis=-1, y=Tap("y", REFERENCE), y_axis=-1)   # XᵀX and XᵀY
    ctx.calibration.reduce(model, [ranges, moments, gram])        # one streamed run

Every reducer keeps a fixed-size running state (float64 sums, a histogram on a power-of-two
grid), so memory does not grow with the number of samples; ``merge(a, b)`` combines two
reducers of the same tensors computed on different batches and is associative, so the data
can be split across worker processes (``Calibration.workers``) or machines and the results
combined. The requests of one call, and the pending requests of the passes the manager
gathered before it, are served by one onnxruntime run over the data (one session per model
involved, both run on the same batch).

Results are cached by what they read. Statistics of the current model are dropped when a
pass changes it (``PassContext.invalidate``), those of the reference model never are.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, NamedTuple

import numpy as np
import onnx

from onnxopt.data.calibration import batch_count
from onnxopt.data.capture import Capture, capturable
from onnxopt.errors import CalibrationError

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
HISTOGRAM_BINS = 4096  # signed bins; divisible by 4 (see onnxopt/data/kernels.py)
CURRENT, REFERENCE = "current", "reference"


def _kernels():
    """onnxopt.data.kernels, imported on first use: minmax calibration never loads numba."""
    from onnxopt.data import kernels

    return kernels


class Tap(NamedTuple):
    """One tensor a reducer reads: its name and the model it is read from."""

    name: str
    model: str = CURRENT  # CURRENT (the model being optimized) or REFERENCE (as loaded)


def _tap(t: str | Tap) -> Tap:
    return t if isinstance(t, Tap) else Tap(t)


class Reducer:
    """A streamed statistic of the tensors in ``taps``: ``add`` one batch of each, ``merge``
    another reducer of the same kind and taps (associative), read the results."""

    kind: ClassVar[str] = ""
    taps: tuple[Tap, ...]

    def params(self) -> tuple:
        """Settings besides the taps that make two reducers different (part of ``key``)."""
        return ()

    @property
    def key(self) -> tuple:
        return (self.kind, self.taps, self.params())

    def covers(self, other: "Reducer") -> bool:
        """True when this reducer's results answer ``other``'s request too."""
        return self.key == other.key

    def empty(self) -> "Reducer":
        """A reducer of the same request with nothing added yet."""
        fresh = copy.copy(self)
        fresh._reset()
        return fresh

    def _reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, *values: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, other: "Reducer") -> "Reducer":  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_mergeable(self, other: "Reducer") -> None:
        if other.key != self.key:
            raise ValueError(f"cannot merge {other.key} into {self.key}")

    def _take(self, other: "Reducer", fields: tuple[str, ...]) -> "Reducer":
        """Become a copy of ``other``'s state (what merging into an empty reducer does)."""
        for name in fields:
            value = getattr(other, name)
            setattr(self, name, value.copy() if isinstance(value, np.ndarray) else value)
        return self


def merge(a: Reducer, b: Reducer) -> Reducer:
    """A new reducer holding the statistics of ``a`` and ``b`` (neither is changed)."""
    return copy.deepcopy(a).merge(b)


# -- value ranges and histograms ---------------------------------------------------------------
class TensorRange(Reducer):
    """Running min/max of one tensor and (``histogram``) a signed histogram of its values.

    The histogram covers [-R, R) in ``bins`` bins with R a power of two (the smallest above
    the largest magnitude seen); a batch beyond R doubles R and merges pairs of bins, so
    counts stay exact. Because every R is a power of two, two histograms of the same tensor
    line up after doubling the smaller one: that is what makes ``merge`` exact.
    """

    kind = "range"

    def __init__(self, tensor: str | Tap, histogram: bool = True, bins: int = HISTOGRAM_BINS):
        self.taps = (_tap(tensor),)
        self.with_histogram = histogram
        self.bins = bins
        self._reset()

    def _reset(self) -> None:
        self.min, self.max, self.count = math.inf, -math.inf, 0
        self.half_range = 0.0  # 0 = no histogram started
        self.hist: np.ndarray | None = None
        self.pending_zeros = 0  # values seen while every value so far was 0 (no range yet)

    @property
    def name(self) -> str:
        return self.taps[0].name

    def params(self) -> tuple:
        return (self.bins,)

    def covers(self, other: Reducer) -> bool:
        return isinstance(other, TensorRange) and other.taps == self.taps and other.bins == self.bins \
            and (self.with_histogram or not other.with_histogram)

    def add(self, values: np.ndarray) -> None:
        flat = np.ascontiguousarray(values).reshape(-1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        if flat.size == 0:
            return
        lo, hi, n = float(flat.min()), float(flat.max()), flat.size  # SIMD fast path
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf somewhere: skip them
            lo, hi, n = _kernels().finite_min_max(flat)
        if n == 0:
            return
        self.min, self.max, self.count = min(self.min, lo), max(self.max, hi), self.count + n
        if not self.with_histogram:
            return
        absmax = max(-lo, hi)
        if self.hist is None:
            if absmax == 0:
                self.pending_zeros += n
                return
            self.hist = np.zeros(self.bins, dtype=np.float64)
            self.half_range = _power_of_two_above(absmax)
        self._grow(absmax)
        _kernels().histogram_add(self.hist, flat, self.half_range)

    def _grow(self, absmax: float) -> None:
        while absmax >= self.half_range:
            self.hist = _kernels().double_range(self.hist)
            self.half_range *= 2.0

    def merge(self, other: "TensorRange") -> "TensorRange":
        if other.taps != self.taps or other.bins != self.bins or other.with_histogram != self.with_histogram:
            raise ValueError(f"cannot merge {other.key} into {self.key}")
        self.min, self.max, self.count = min(self.min, other.min), max(self.max, other.max), \
            self.count + other.count
        self.pending_zeros += other.pending_zeros
        if other.hist is not None:
            if self.hist is None:
                self.hist, self.half_range = other.hist.copy(), other.half_range
            else:  # both ranges are powers of two: double the smaller until they agree
                mine, theirs = (self.hist, self.half_range), (other.hist, other.half_range)
                while mine[1] < theirs[1]:
                    mine = (_kernels().double_range(mine[0]), mine[1] * 2.0)
                while theirs[1] < mine[1]:
                    theirs = (_kernels().double_range(theirs[0]), theirs[1] * 2.0)
                self.hist, self.half_range = mine[0] + theirs[0], mine[1]
        return self

    def histogram(self) -> tuple[np.ndarray, float]:
        """(counts, half_range), with any all-zero batches seen before the first nonzero
        one counted in the bin that starts at zero."""
        if self.hist is None:
            hist = np.zeros(self.bins, dtype=np.float64)
            hist[self.bins // 2] = self.pending_zeros
            return hist, 1.0
        hist = self.hist
        if self.pending_zeros:
            hist = hist.copy()
            hist[self.bins // 2] += self.pending_zeros
        return hist, self.half_range

    def range(self, method: str = "minmax", percentile: float = 99.999, qmin: int = 0, qmax: int = 255,
              symmetric: bool = False, levels: int = 128, max_clipped: float = 1e-3) -> tuple[float, float]:
        """The clipping range (lo, hi) that ``method`` chooses for these values."""
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = float(self.min), float(self.max)
        if method == "minmax":
            return lo, hi
        if not self.with_histogram:
            raise ValueError(f"{self.name}: method '{method}' needs histograms (collected with minmax only)")
        hist, half = self.histogram()
        kernels = _kernels()
        if method == "percentile":
            plo, phi = kernels.percentile_range(hist, half, float(percentile))
            plo, phi = max(lo, plo), min(hi, phi)
            return min(plo, phi), phi
        if method == "entropy":
            abs_hist = kernels.fold_abs(hist)
            # at most ~512 candidate thresholds: a step of a few of 2048 bins changes the
            # range by under 0.2% and makes this 3-4x faster
            stride = max(1, -(-(abs_hist.size - int(levels)) // 512))
            threshold = kernels.entropy_threshold(abs_hist, half / abs_hist.size, int(levels), float(max_clipped),
                                                  stride)
            elo, ehi = max(lo, -threshold), min(hi, threshold)
            return min(elo, ehi), ehi
        if method == "mse":
            steps = 100
            return kernels.mse_range(hist, half, lo, hi, int(qmin), int(qmax), bool(symmetric), steps)
        raise ValueError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")


def _power_of_two_above(x: float) -> float:
    """The smallest power of two strictly above ``x`` (> 0)."""
    exponent = math.frexp(x)[1]  # x = m * 2**e with 0.5 <= m < 1, so x < 2**e
    return math.ldexp(1.0, exponent)


# -- per-channel moments ---------------------------------------------------------------------------
def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    """``values`` as a [rows, channels] float64 matrix, channels from ``axis``."""
    x = np.asarray(values)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    x = np.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)


class ChannelMoments(Reducer):
    """Per channel (along ``axis``) of one tensor: count, mean, variance, mean of |x|,
    largest |x|, min and max. Means and variances are combined with Chan's pairwise
    formulas, so merging batches (or reducers) in any order gives the same moments."""

    kind = "channel-moments"

    def __init__(self, tensor: str | Tap, axis: int = 1):
        self.taps = (_tap(tensor),)
        self.axis = axis
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.mean = self.m2 = self.abs_sum = self.abs_max = self.min = self.max = None

    def params(self) -> tuple:
        return (self.axis,)

    def add(self, values: np.ndarray) -> None:
        x = _rows(values, self.axis)
        if x.shape[0] == 0:
            return
        part = ChannelMoments(self.taps[0], self.axis)
        part.count = x.shape[0]
        part.mean = x.mean(0)
        part.m2 = ((x - part.mean) ** 2).sum(0)
        part.abs_sum = np.abs(x).sum(0)
        part.abs_max = np.abs(x).max(0)
        part.min, part.max = x.min(0), x.max(0)
        self.merge(part)

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        self._check_mergeable(other)
        if other.count == 0:
            return self
        if self.count == 0:
            return self._take(other, ("count", "mean", "m2", "abs_sum", "abs_max", "min", "max"))
        if other.mean.shape != self.mean.shape:
            raise CalibrationError(f"{self.taps[0].name}: {other.mean.size} channels in one batch, "
                                   f"{self.mean.size} in another")
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        self.count = n
        self.abs_sum = self.abs_sum + other.abs_sum
        self.abs_max = np.maximum(self.abs_max, other.abs_max)
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        return self

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)


# -- Gram matrices for least squares ---------------------------------------------------------------
@dataclass(frozen=True)
class Patches:
    """The im2col view of a Conv's input: each output position becomes a row of C·k·k values
    in the order of the Conv's weight (channel, then kernel rows, then columns).

    ``input_strides`` > 1 first spreads the input out with zeros between its pixels: the
    view of a transposed convolution, which is a Conv over that spread input with its kernel
    flipped and its channel axes swapped."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # begin..., end... as in ONNX
    dilations: tuple[int, ...] = (1, 1)
    input_strides: tuple[int, ...] = (1, 1)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """[N·H'·W', C·kh·kw] rows of a [N, C, H, W] (or [N, C, L]) input."""
        x = np.asarray(x)
        if any(s > 1 for s in self.input_strides):
            spread = np.zeros(x.shape[:2] + tuple((d - 1) * s + 1 for d, s in zip(x.shape[2:], self.input_strides)),
                              dtype=x.dtype)
            spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.input_strides)] = x
            x = spread
        one_d = x.ndim == 3
        if one_d:
            x = x[:, :, None, :]
        kernel = ((1,) + tuple(self.kernel_shape)) if one_d else tuple(self.kernel_shape)
        strides = ((1,) + tuple(self.strides)) if one_d else tuple(self.strides)
        dilations = ((1,) + tuple(self.dilations)) if one_d else tuple(self.dilations)
        pads = self.pads
        if one_d:
            pads = (0, pads[0], 0, pads[1])
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
        span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, H', W', kh, kw]
        n, c, ho, wo = windows.shape[:4]
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def conv_patches(node, kernel: tuple[int, ...] | None = None) -> Patches | None:
    """The im2col geometry a 1-D or 2-D Conv reads its input through (grouped or not: a
    group's columns are a run of the patch), ``kernel`` the weight's spatial shape when the
    node's own weight input has none; None for auto_pad SAME_* or a 3-D Conv."""
    if str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None
    if kernel is None:
        shape = node.inputs[1].shape
        kernel = tuple(shape[2:]) if shape is not None else ()
    kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", kernel))
    if len(kernel) not in (1, 2):
        return None
    n = len(kernel)
    return Patches(kernel, tuple(int(x) for x in node.attrs.get("strides", [1] * n)),
                   tuple(int(p) for p in node.attrs.get("pads", [0] * (2 * n))),
                   tuple(int(d) for d in node.attrs.get("dilations", [1] * n)))


class Gram(Reducer):
    """XᵀX of one tensor (and XᵀY with a second one), accumulated in float64 over batches.

    Rows of X: the tensor with its channel ``axis`` last, flattened (a MatMul input:
    axis=-1; a 1×1 Conv input: axis=1), or the im2col ``patches`` of a Conv input. Rows of
    Y likewise along ``y_axis``; X and Y must give the same number of rows per batch (a
    layer's input and its output, possibly of two models: student and teacher). Kept: count,
    XᵀX, Σx, and with Y: XᵀY, Σy, Σ‖y‖² (for the residual of a least-squares fit).

    ``y_scale`` multiplies Y's channel c by y_scale[c] before it is accumulated (a teacher
    tensor compared with a student tensor that carries it rescaled per channel).

    ``groups`` > 1 (a grouped or depthwise Conv) keeps only the diagonal blocks: group i's
    columns of X (the i-th run of columns/groups, in the patch order) against group i's
    columns of Y. XᵀX is then [groups, d, d] and XᵀY [groups, d, m]; ``block(i)`` is group
    i as an ungrouped Gram (what ``solve`` and ``residual`` work on). A depthwise Conv of
    960 channels keeps 960 blocks of 9×9 instead of one 8640×8640 matrix.
    """

    kind = "gram"

    def __init__(self, x: str | Tap, axis: int = -1, y: str | Tap | None = None, y_axis: int = -1,
                 patches: Patches | None = None, groups: int = 1, y_scale=None):
        self.taps = (_tap(x),) + ((_tap(y),) if y is not None else ())
        self.axis, self.y_axis, self.patches, self.groups = axis, y_axis, patches, int(groups)
        self.y_scale = None if y_scale is None else tuple(float(v) for v in np.ravel(y_scale))
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.xtx = self.sum_x = self.xty = self.sum_y = None
        self.y_sq = 0.0  # an array [groups] when grouped

    def params(self) -> tuple:
        return (self.axis, self.y_axis, self.patches) + ((self.groups,) if self.groups > 1 else ()) + \
            ((self.y_scale,) if self.y_scale is not None else ())

    def _x_rows(self, x: np.ndarray) -> np.ndarray:
        rows = self.patches.rows(x) if self.patches is not None else _rows(x, self.axis)
        return rows.astype(np.float64, copy=False)

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        part = self.empty()
        xr = self._x_rows(x)
        g = self.groups
        part.count, part.sum_x = xr.shape[0], xr.sum(0)
        if g > 1:
            xg = xr.reshape(xr.shape[0], g, -1)
            part.xtx = np.einsum("rgi,rgj->gij", xg, xg, optimize=True)
        else:
            part.xtx = xr.T @ xr
        if len(self.taps) > 1:
            yr = _rows(y, self.y_axis)
            if self.y_scale is not None:
                yr = yr * np.asarray(self.y_scale)
            if yr.shape[0] != xr.shape[0]:
                raise CalibrationError(f"Gram of '{self.taps[0].name}' and '{self.taps[1].name}': "
                                       f"{xr.shape[0]} rows of x but {yr.shape[0]} of y in one batch")
            part.sum_y = yr.sum(0)
            if g > 1:
                yg = yr.reshape(yr.shape[0], g, -1)
                part.xty = np.einsum("rgi,rgo->gio", xg, yg, optimize=True)
                part.y_sq = (yg * yg).sum((0, 2))
            else:
                part.xty, part.y_sq = xr.T @ yr, float((yr * yr).sum())
        self.merge(part)

    def merge(self, other: "Gram") -> "Gram":
        self._check_mergeable(other)
        if other.count == 0:
            return self
        if self.count == 0:
            return self._take(other, ("count", "y_sq", "xtx", "sum_x", "xty", "sum_y"))
        self.count += other.count
        self.xtx = self.xtx + other.xtx
        self.sum_x = self.sum_x + other.sum_x
        if other.xty is not None:
            self.xty, self.sum_y = self.xty + other.xty, self.sum_y + other.sum_y
            self.y_sq = self.y_sq + other.y_sq
        return self

    def block(self, i: int) -> "Gram":
        """Group ``i`` of a grouped Gram as an ungrouped one (``self`` when not grouped)."""
        if self.groups == 1:
            return self
        out = Gram(self.taps[0], self.axis, self.taps[1] if len(self.taps) > 1 else None, self.y_axis, self.patches,
                   y_scale=self.y_scale)
        d = self.xtx.shape[1]
        out.count, out.xtx, out.sum_x = self.count, self.xtx[i], self.sum_x[i * d:(i + 1) * d]
        if self.xty is not None:
            m = self.xty.shape[2]
            out.xty, out.sum_y, out.y_sq = self.xty[i], self.sum_y[i * m:(i + 1) * m], float(self.y_sq[i])
        return out

    @property
    def mean_x(self) -> np.ndarray:
        return self.sum_x / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        """E[x xᵀ] (uncentered second moment): what data-aware factorizations weigh by."""
        return self.xtx / max(self.count, 1)

    def solve(self, ridge: float = 1e-4, columns: np.ndarray | None = None,
              bias: bool = True, prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Least squares from the accumulated sums: (W, b) minimizing ‖X W + b − Y‖² +
        λ‖W − P‖², with λ = ``ridge`` × the mean diagonal of XᵀX (scale-free) and P the
        ``prior`` (zero by default; a layer's own weights keep a fit on few samples close to
        them). ``columns`` restricts X to those columns (the channels a pruned layer keeps);
        with ``bias`` the intercept is fitted too (the sums of x and y center the problem).
        W is [len(columns), D] float64, b is [D] or None. Needs an ungrouped Gram with Y."""
        if self.xty is None:
            raise ValueError("solve() needs a Gram of x and y")
        if self.groups > 1:
            raise ValueError("solve() works on one group: use block(i)")
        cols = np.arange(self.xtx.shape[0]) if columns is None else np.asarray(columns)
        n = max(self.count, 1)
        xtx = self.xtx[np.ix_(cols, cols)]
        xty = self.xty[cols]
        if bias:  # center: the fit of the deviations from the means, then b from the means
            mx, my = self.sum_x[cols] / n, self.sum_y / n
            xtx = xtx - n * np.outer(mx, mx)
            xty = xty - n * np.outer(mx, my)
        lam = ridge * max(float(np.mean(np.diag(xtx))), 1e-12)
        if prior is not None:
            xty = xty + lam * np.asarray(prior, np.float64)
        w = np.linalg.solve(xtx + lam * np.eye(len(cols)), xty)
        return w, (my - mx @ w) if bias else None

    def residual(self, w: np.ndarray, b: np.ndarray | None = None) -> float:
        """‖Y − (X W + b)‖² over the accumulated rows, from the sums alone (no data is read
        again): how well a candidate (W [d, m], b [m]) reproduces Y. Ungrouped, with Y."""
        if self.xty is None:
            raise ValueError("residual() needs a Gram of x and y")
        w = np.asarray(w, np.float64)
        total = float(self.y_sq) - 2.0 * float(np.sum(w * self.xty)) + float(np.sum(w * (self.xtx @ w)))
        if b is not None:
            b = np.asarray(b, np.float64)
            total += -2.0 * float(b @ self.sum_y) + 2.0 * float(b @ (self.sum_x @ w)) + self.count * float(b @ b)
        return max(total, 0.0)


# -- the calibration object passes see ------------------------------------------------------------
@dataclass
class Calibration:
    """Calibration data plus the statistics collected from it so far (``ctx.calibration``).

    ``source`` yields batches (onnxopt.data.calibration); ``reference`` is the model as
    loaded (``onnxopt.ir.model.Reference``, the teacher), read only by reducers that ask. ``providers`` and
    ``threads`` come from the target; ``workers`` > 1 splits the batches across that many
    processes (the source must be re-readable there: .npz files are; a Python reader object
    runs in this process).
    """

    source: Any
    reference: Any = None
    providers: list[str] | None = None
    threads: int = 0
    workers: int = 1
    progress: bool = False
    cache: dict[tuple, Reducer] = field(default_factory=dict)
    pending: list[Reducer] = field(default_factory=list)
    runs: int = 0  # streamed onnxruntime runs over the data so far
    batches: int = 0
    seconds: float = 0.0

    def request(self, reducers: Iterable[Reducer]) -> None:
        """Ask for statistics to be collected in the next streamed run."""
        self.pending.extend(reducers)

    def reduce(self, model, reducers: Iterable[Reducer]) -> list[Reducer]:
        """``reducers`` filled with statistics over the data (cached results where they
        exist); every pending request is collected in the same run. A reducer of a tensor
        that cannot be captured (inside a subgraph, or gone) comes back empty."""
        reducers = list(reducers)
        wanted = self.pending + reducers
        self.pending = []
        todo: dict[tuple, Reducer] = {}
        for r in wanted:
            if self._cached(r) is None and not any(t.covers(r) for t in todo.values()):
                todo = {k: t for k, t in todo.items() if not r.covers(t)}
                todo[r.key] = r.empty()
        if todo:
            for r in self._collect(model, list(todo.values())):
                self.cache = {k: c for k, c in self.cache.items() if not r.covers(c)}
                self.cache[r.key] = r
        out = []
        for r in reducers:
            found = self._cached(r)
            out.append(found if found is not None else r.empty())
        return out

    def _cached(self, r: Reducer) -> Reducer | None:
        hit = self.cache.get(r.key)
        if hit is not None and hit.covers(r):
            return hit
        return next((c for c in self.cache.values() if c.covers(r)), None)

    def statistics(self, model, tensors: Iterable[str], histogram: bool = True) -> dict[str, TensorRange]:
        """Ranges (and histograms) of ``tensors`` of the current model, by name."""
        names = list(tensors)
        filled = self.reduce(model, [TensorRange(n, histogram) for n in names])
        return {n: r for n, r in zip(names, filled) if r.count}

    def invalidate(self) -> None:
        """Forget statistics of the current model (it changed); the reference's stay."""
        self.cache = {k: r for k, r in self.cache.items() if all(t.model == REFERENCE for t in r.taps)}
        self.pending = []

    # -- collection ----------------------------------------------------------------------------
    def _protos(self, model, reducers: list[Reducer]) -> dict[str, tuple[onnx.ModelProto, list[str]]]:
        """For each model the reducers read: (proto, capturable names they need)."""
        needed: dict[str, list[str]] = {}
        for r in reducers:
            for t in r.taps:
                needed.setdefault(t.model, [])
                if t.name not in needed[t.model]:
                    needed[t.model].append(t.name)
        out = {}
        for which, names in needed.items():
            if which == REFERENCE:
                if self.reference is None:
                    raise CalibrationError("statistics of the reference model were asked for, but no "
                                           "reference model was given")
                proto = self.reference.proto
            else:
                proto = model if isinstance(model, onnx.ModelProto) else model.export()
            available = capturable(proto)
            missing = [n for n in names if n not in available]
            if missing:
                logger.debug("no statistics for %d tensor(s) of the %s model outside its main graph: %s",
                             len(missing), which, missing[:5])
            out[which] = (proto, [n for n in names if n in available])
        return out

    def _collect(self, model, reducers: list[Reducer]) -> list[Reducer]:
        protos = self._protos(model, reducers)
        live = [r for r in reducers if all(t.name in protos[t.model][1] for t in r.taps)]
        if not live:
            return reducers
        start = time.perf_counter()
        shards = self.workers if self.workers > 1 and _reopenable(self.source) else 1
        if shards > 1:
            # spawn, not fork: onnxruntime's thread pools do not survive a fork
            with ProcessPoolExecutor(max_workers=shards, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = list(pool.map(_reduce_shard, [(protos, live, self.source, i, shards, self.providers,
                                                       self.threads, False) for i in range(shards)]))
            results, batches = parts[0]
            for more, count in parts[1:]:
                results = [a.merge(b) for a, b in zip(results, more)]
                batches += count
        else:
            results, batches = _reduce_shard((protos, live, self.source, 0, 1, self.providers, self.threads,
                                              self.progress))
        if batches == 0:
            raise CalibrationError("calibration data holds no batches")
        self.runs += 1
        self.batches += batches
        self.seconds += time.perf_counter() - start
        logger.info("calibration: %d statistics over %d batches in %.1f s (%d process(es))",
                    len(live), batches, time.perf_counter() - start, shards)
        done = {id(r): f for r, f in zip(live, results)}
        return [done.get(id(r), r) for r in reducers]


def _reopenable(source) -> bool:
    """Whether ``source`` can be shipped to another process and read there again."""
    return bool(getattr(source, "reopenable", False))


def _reduce_shard(job) -> tuple[list[Reducer], int]:
    """Batches ``shard``, ``shard + shards``, … of the source through one capture session
    per model; returns the filled reducers and the number of batches read."""
    protos, reducers, source, shard, shards, providers, threads, progress = job
    captures = {which: Capture(proto, names, providers, threads, what=f"the {which} model")
                for which, (proto, names) in protos.items()}
    reducers = [r.empty() for r in reducers]
    from tqdm import tqdm

    batches = 0
    bar = tqdm(source, total=batch_count(source), desc="calibration", unit="batch",
               disable=not progress, leave=False)
    for index, batch in enumerate(bar):
        if index % shards != shard:
            continue
        values = {which: cap.run(batch, index) for which, cap in captures.items()}
        for r in reducers:
            r.add(*[values[t.model][t.name] for t in r.taps])
        del values
        batches += 1
    bar.close()
    return reducers, batches


def open_calibration(data: Any, model, reference=None, providers: list[str] | None = None,
                     threads: int = 0, progress: bool = False) -> Calibration:
    """A Calibration over ``data`` (see ``onnxopt.data.calibration.open_source``; a
    Calibration is returned as it is) for ``model`` (an onnxopt Model) whose ``reference``
    (``onnxopt.ir.model.Reference``) defaults to the model as it is now."""
    if isinstance(data, Calibration):
        return data
    from onnxopt.data.calibration import open_source
    from onnxopt.ir.model import Reference

    return Calibration(source=open_source(data, model),
                       reference=reference if reference is not None else Reference(model),
                       providers=providers, threads=threads, progress=progress)


def gather_requests(specs: list, index: int, model, ctx, progress: bool = False) -> None:
    """Pass manager hook, called before pass ``specs[index]`` runs: when it starts a block of
    consecutive calibrating passes, register the statistics requests of the block, so the
    first ``reduce`` collects them all in one streamed run. A block ends after a pass that
    does not preserve statistics: the passes after it must see the model it leaves."""
    from onnxopt.pipeline.context import STATISTICS
    from onnxopt.pipeline.registry import get_pass

    if ctx.calibration is None or specs[index].is_group or not get_pass(specs[index].name).needs_calibration:
        return
    if index > 0 and not specs[index - 1].is_group:  # groups hold no calibrating pass
        previous = get_pass(specs[index - 1].name)
        if previous.needs_calibration and STATISTICS in previous.preserves:
            return  # inside a block already gathered
    ctx.calibration.progress = progress
    for spec in specs[index:]:
        if spec.is_group:
            break
        cls = get_pass(spec.name)
        if not cls.needs_calibration:
            break
        ask = getattr(cls, "calibration_requests", None)
        if ask is not None:
            try:
                ctx.calibration.request(cls(**spec.options).calibration_requests(model, ctx) or ())
            except CalibrationError:
                raise
            except Exception as exc:  # the pass will ask again itself when it runs
                logger.debug("calibration_requests of %s failed: %s", spec.name, exc)
        if STATISTICS not in cls.preserves:
            break
