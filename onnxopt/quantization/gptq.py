"""GPTQ: round a layer's weights onto a fixed integer grid, compensating each rounding error.

W [rows, cols] holds one output channel per row and, per column, what the layer sums over
(K of a MatMul; C/g·kh·kw of a Conv group, in its im2col patch order). With H = XᵀX/n of
the layer's inputs, the output error of a rounded W̃ is tr((W − W̃) H (W − W̃)ᵀ). GPTQ
(Frantar et al., ICLR'23; IST-DASLab/gptq) rounds one column at a time and pushes that
column's error, weighted by the inverse Hessian, into the columns not rounded yet (the OBS
update), so later columns absorb what earlier ones lost. As there:

- columns are visited by decreasing diag(H) ("act-order"), the largest inputs first; the
  grid stays per row (or per row and column group) as the stored scales say, so the order
  needs no reordering of scales;
- a dead input (diag(H) = 0, never nonzero on the data) gets H_jj = 1 and its column is
  rounded as it is: its value does not matter to the output;
- H is damped by ``damp`` × mean(diag(H)) before the Cholesky factorization of H⁻¹, and
  the damping is raised (×10, up to 1) when the factorization still fails: the damping
  used is returned, as the reading notes advise;
- updates are lazy, in blocks of ``block`` columns (the same result, less memory traffic).

The grid (scale, zero point, code range) is given, not chosen: the quantization pass that
made the layer chose it, and a bias stored as int32 with scale = input scale × weight
scale stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Where W's codes live: W ≈ (q − zero) × scale with qmin <= q <= qmax, per row and per
    run of ``group`` columns (``group`` = cols: one scale per row; per-tensor: all rows equal)."""

    scale: np.ndarray  # [rows, groups] float64
    zero: np.ndarray  # [rows, groups] float64
    group: int
    qmin: int
    qmax: int

    def codes(self, w: np.ndarray, column: int | None = None) -> np.ndarray:
        """Nearest codes of ``w`` ([rows] of column ``column``, or the whole [rows, cols])."""
        if column is not None:
            g = column // self.group
            return np.clip(np.rint(w / self.scale[:, g]) + self.zero[:, g], self.qmin, self.qmax)
        scale, zero = self._expand(w.shape[1])
        return np.clip(np.rint(w / scale) + zero, self.qmin, self.qmax)

    def values(self, q: np.ndarray, column: int | None = None) -> np.ndarray:
        """The float weights of codes ``q`` (a column or the whole matrix)."""
        if column is not None:
            g = column // self.group
            return (q - self.zero[:, g]) * self.scale[:, g]
        scale, zero = self._expand(q.shape[1])
        return (q - zero) * scale

    def _expand(self, cols: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(cols) // self.group
        return self.scale[:, index], self.zero[:, index]


@dataclass
class Rounded:
    """GPTQ's result: the codes (original column order), their float values and what it cost."""

    codes: np.ndarray  # [rows, cols] int64
    weight: np.ndarray  # [rows, cols] float64 = grid.values(codes)
    damp: float  # the damping that made H positive definite (fraction of mean diag)
    proxy_error: float  # tr((W − W̃) H (W − W̃)ᵀ): the output error on the data per sample


def output_error(delta: np.ndarray, h: np.ndarray) -> float:
    """tr(Δ H Δᵀ): mean squared output error of a weight change Δ [rows, cols] for inputs whose
    second moment is H."""
    return float(np.sum((delta @ h) * delta))


@dataclass
class Hessian:
    """What GPTQ needs of H = XᵀX/n, computed once per layer (or group) and shared by every
    weight rounded against it: the column order and the upper Cholesky factor of H⁻¹."""

    h: np.ndarray  # H as given (for the proxy error)
    order: np.ndarray  # columns in the order they are rounded
    u: np.ndarray  # upper factor U of (H + λI)⁻¹ = UᵀU, rows and columns in ``order``
    damp: float  # λ as a fraction of mean(diag H) that made the factorization hold


def hessian(h: np.ndarray, damp: float = 0.01, act_order: bool = True) -> Hessian:
    """Prepare H for ``gptq`` (see the module docstring: dead inputs, act-order, damping)."""
    h = np.array(h, dtype=np.float64)
    original = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    h = h[np.ix_(order, order)]
    mean = float(np.mean(np.diag(h))) or 1.0
    eye = np.eye(h.shape[0])
    flip = slice(None, None, -1)
    while True:
        try:
            # With J the reversal, J H J = L Lᵀ gives H⁻¹ = RᵀR for the upper R = J L⁻¹ J:
            # one factorization and one triangular inverse.
            lower = np.linalg.cholesky((h + damp * mean * eye)[flip, flip])
            u = np.linalg.inv(lower)[flip, flip]
            if np.all(np.isfinite(u)):
                return Hessian(original, order, u, damp)
        except np.linalg.LinAlgError:
            pass
        if damp >= 1.0:
            raise np.linalg.LinAlgError("H is not positive definite even with damping 1")
        damp = min(1.0, max(damp, 1e-4) * 10)


def gptq(w: np.ndarray, h: Hessian, grid: Grid, block: int = 128) -> Rounded:
    """Round ``w`` [rows, cols] onto ``grid`` for inputs whose second moment ``h`` describes."""
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    original_w = w.copy()
    order, u = h.order, h.u
    w = w[:, order]
    q = np.zeros((rows, cols))
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].copy()
        err1 = np.zeros_like(w1)
        u1 = u[start:stop, start:stop]
        for i in range(stop - start):
            column = order[start + i]
            codes = grid.codes(w1[:, i], column)
            q[:, start + i] = codes
            err = (w1[:, i] - grid.values(codes, column)) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, stop:] -= err1 @ u[start:stop, stop:]
    codes = np.empty_like(q)
    codes[:, order] = q
    codes = codes.astype(np.int64)
    rounded = grid.values(codes.astype(np.float64))
    return Rounded(codes, rounded, h.damp, output_error(original_w - rounded, h.h))
