"""The optimal-brain-surgeon column sweep behind GPTQ rounding and compensated pruning.

A layer's weight W [rows, cols] holds one output channel per row and, per column, what the
layer sums over (K of a MatMul; C/g·kh·kw of a Conv group, in its im2col patch order). With
H = XᵀX/n of the layer's inputs, the output error of a changed W̃ is
tr((W − W̃) H (W − W̃)ᵀ). The sweep visits one column at a time, replaces it by what a
``project`` function allows (the nearest codes of a grid for GPTQ; the kept entries of a
pruning mask), and pushes that column's error, weighted by the inverse Hessian, into the
columns not visited yet (the OBS update), so later columns absorb what earlier ones lost
(Frantar et al., GPTQ, ICLR'23, and SparseGPT, ICML'23; IST-DASLab/gptq). As there:

- columns are visited by decreasing diag(H) ("act-order"), the largest inputs first;
- a dead input (diag(H) = 0, never nonzero on the data) gets H_jj = 1: its column is
  projected as it is, its value does not matter to the output;
- H is damped by ``damp`` × mean(diag(H)) before the Cholesky factorization of H⁻¹, and
  the damping is raised (×10, up to 1) when the factorization still fails; the damping
  used is returned;
- updates are lazy, in blocks of ``block`` columns (the same result, less memory traffic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def output_error(delta: np.ndarray, h: np.ndarray) -> float:
    """tr(Δ H Δᵀ): mean squared output error of a weight change Δ [rows, cols] for inputs whose
    second moment is H."""
    return float(np.sum((delta @ h) * delta))


@dataclass
class Hessian:
    """What the sweep needs of H = XᵀX/n, computed once per layer (or group) and shared by
    every weight swept against it: the column order and the upper Cholesky factor of H⁻¹."""

    h: np.ndarray  # H as given (for the proxy error)
    order: np.ndarray  # columns in the order they are visited
    u: np.ndarray  # upper factor U of (H + λI)⁻¹ = UᵀU, rows and columns in ``order``
    damp: float  # λ as a fraction of mean(diag H) that made the factorization hold


def hessian(h: np.ndarray, damp: float = 0.01, act_order: bool = True) -> Hessian:
    """Prepare H for ``sweep`` (see the module docstring: dead inputs, act-order, damping)."""
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


def sweep(w: np.ndarray, h: Hessian, project: Callable[[np.ndarray, int], np.ndarray],
          block: int = 128) -> np.ndarray:
    """``w`` [rows, cols] with every column replaced by ``project(values, column)`` (column in
    the original order) and each replacement's error compensated in the columns after it."""
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    order, u = h.order, h.u
    w = w[:, order]
    out = np.zeros((rows, cols))
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].copy()
        err1 = np.zeros_like(w1)
        u1 = u[start:stop, start:stop]
        for i in range(stop - start):
            new = project(w1[:, i], int(order[start + i]))
            out[:, start + i] = new
            err = (w1[:, i] - new) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, stop:] -= err1 @ u[start:stop, stop:]
    result = np.empty_like(out)
    result[:, order] = out
    return result


def prune_compensated(w: np.ndarray, h: Hessian, keep: np.ndarray, block: int = 128) -> np.ndarray:
    """``w`` [rows, cols] with the entries ``keep`` drops set to zero and the others changed
    to make up for them on inputs of second moment ``h`` (SparseGPT with a given mask)."""
    keep = np.asarray(keep, dtype=bool)
    return sweep(w, h, lambda values, column: np.where(keep[:, column], values, 0.0), block)
