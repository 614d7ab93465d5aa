"""GPTQ: round a layer's weights onto a fixed integer grid, compensating each rounding error.

GPTQ (Frantar et al., ICLR'23; IST-DASLab/gptq) is the OBS column sweep of
``onnxopt.data.obs`` with the nearest code of the grid as each column's projection. The grid
stays per row (or per row and column group) as the stored scales say, so the act-order
visit needs no reordering of scales.

The grid (scale, zero point, code range) is given, not chosen: the quantization pass that
made the layer chose it, and a bias stored as int32 with scale = input scale × weight
scale stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxopt.data.obs import Hessian, output_error, sweep


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


def gptq(w: np.ndarray, h: Hessian, grid: Grid, block: int = 128) -> Rounded:
    """Round ``w`` [rows, cols] onto ``grid`` for inputs whose second moment ``h`` describes."""
    original_w = np.array(w, dtype=np.float64)
    codes = np.zeros(original_w.shape)

    def nearest(values: np.ndarray, column: int) -> np.ndarray:
        codes[:, column] = grid.codes(values, column)
        return grid.values(codes[:, column], column)

    sweep(original_w, h, nearest, block)
    codes = codes.astype(np.int64)
    rounded = grid.values(codes.astype(np.float64))
    return Rounded(codes, rounded, h.damp, output_error(original_w - rounded, h.h))
