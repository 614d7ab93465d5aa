"""Truncated SVD of a weight, plain or whitened by the layer's input statistics.

A layer computes y = x W with W [K, N]. Its rank-r replacement is x A B with A [K, r] and
B [r, N], the singular values split evenly between them (A = U√σ, B = √σVᵀ), so neither
factor holds all the scale.

Plain SVD minimizes ‖W − AB‖. What matters is the layer's output error ‖X(W − AB)‖ over
the inputs it sees; with H = E[x xᵀ] (``Gram.covariance()``) that is ‖S(W − AB)‖ for any S
with SᵀS = H. So, as SVD-LLM does, factor S W instead and undo S on the left factor: the
truncation error is then exactly the tail of S W's spectrum (the error that matters), and
with plain SVD (S = I) the tail of W's. S is the transposed Cholesky factor of H in
float64, with H damped by ``damp`` × its mean diagonal first: never an undamped inverse
(inputs that are always zero, or a calibration set with fewer rows than K, leave H
singular), and the damping keeps some of plain SVD's care for directions the calibration
data did not visit.

With a centered H (the covariance around the input mean μ) the truncation minimizes the
error of the fluctuations only; the mean's share, μ(W − AB), is constant and goes into the
layer's bias (``bias_correction``). That frees the rank from spending itself on a large
mean, which transformer activations have.

A stack of weights [..., K, N] (a batched MatMul, the groups of a Conv, the input
channels of a separable approximation) is factored slice by slice at one common rank;
each slice may have its own H ([..., K, K]) or share one ([K, K]).
"""

from __future__ import annotations

import numpy as np


def whitening(covariance: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) with SᵀS = H + λI, λ = ``damp`` × the mean diagonal of H (per slice of a
    stack): S is the transposed Cholesky factor (SVD-LLM's whitening), so ‖X ΔW‖ = ‖S ΔW‖.
    An all-zero H gives the identity (nothing to weigh by). When rounding leaves the damped
    H not positive definite, the damping grows tenfold until it is."""
    h = np.asarray(covariance, dtype=np.float64)
    h = (h + np.swapaxes(h, -1, -2)) / 2
    k = h.shape[-1]
    scale = np.trace(h, axis1=-2, axis2=-1) / k
    zero = ~(scale > 0)
    scale = np.where(zero, 1.0, scale)
    eye = np.eye(k)
    h = np.where(zero[..., None, None], eye, h)
    lam = max(float(damp), 1e-10)
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + (lam * scale)[..., None, None] * eye)
            break
        except np.linalg.LinAlgError:
            lam *= 10.0
    else:  # pragma: no cover - a covariance with NaNs
        raise np.linalg.LinAlgError("the input statistics are not a covariance (NaN or inf)")
    s = np.swapaxes(lower, -1, -2)
    return s, np.linalg.inv(s)


GRAM_SVD_FROM = 1024  # a smaller side from which the SVD goes through the Gram matrix


def svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, σ, Vᵀ), thin, σ descending. Up to a smaller side of ``GRAM_SVD_FROM`` LAPACK's
    divide and conquer; above, the eigenvectors of the smaller Gram matrix (AᵀA = V σ² Vᵀ,
    U = A V / σ): one matrix product and an n×n eigendecomposition instead of an SVD of the
    whole matrix, several times faster for a 25088×4096 classifier. It loses the relative
    accuracy of singular values below √ε·σ_max, far below anything a truncation keeps."""
    k, n = a.shape[-2:]
    if min(k, n) < GRAM_SVD_FROM:
        return np.linalg.svd(a, full_matrices=False)
    if k < n:
        v, sigma, ut = svd(np.swapaxes(a, -1, -2))
        return np.swapaxes(ut, -1, -2), sigma, np.swapaxes(v, -1, -2)
    values, vectors = np.linalg.eigh(np.swapaxes(a, -1, -2) @ a)
    values, vectors = values[..., ::-1], vectors[..., ::-1]
    sigma = np.sqrt(np.maximum(values, 0.0))
    safe = np.where(sigma > sigma[..., :1] * 1e-12, sigma, np.inf)
    u = (a @ vectors) / safe[..., None, :]
    return u, sigma, np.swapaxes(vectors, -1, -2)


class Factorization:
    """The SVD of (S) W, ready to give the factors at any rank.

    ``weight``: [..., K, N]. ``covariance``: None (plain SVD), [K, K] or [..., K, K] (the
    input's E[x xᵀ], or its covariance when the mean is handled by the bias).
    """

    def __init__(self, weight: np.ndarray, covariance: np.ndarray | None = None, damp: float = 0.01):
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim < 2:
            raise ValueError(f"a weight to factor needs 2 dims at least, not {w.shape}")
        self.weight = w
        self.whitened = covariance is not None
        if self.whitened:
            self._s, self._s_inv = whitening(covariance, damp)
            target = self._s @ w
        else:
            self._s = self._s_inv = None
            target = w
        u, sigma, vt = svd(target)
        self._u, self.sigma, self._vt = u, sigma, vt  # sigma: [..., min(K, N)], descending
        energy = (sigma ** 2).reshape(-1, sigma.shape[-1]).sum(0)  # summed over the stack
        self._cumulative = np.concatenate([[0.0], np.cumsum(energy)])
        self.total_energy = float(self._cumulative[-1])

    @property
    def k(self) -> int:
        return self.weight.shape[-2]

    @property
    def n(self) -> int:
        return self.weight.shape[-1]

    @property
    def max_rank(self) -> int:
        return self.sigma.shape[-1]

    @property
    def slices(self) -> int:
        """How many matrices are factored (1, or the product of the stack dims)."""
        return int(np.prod(self.weight.shape[:-2], dtype=np.int64))

    def error(self, rank: int) -> float:
        """Relative truncation error at ``rank``: the dropped share of the (whitened) energy,
        ‖S(W − AB)‖² / ‖SW‖² (0 at full rank, 1 at rank 0)."""
        rank = int(min(max(rank, 0), self.max_rank))
        if self.total_energy <= 0:
            return 0.0
        return float(1.0 - self._cumulative[rank] / self.total_energy)

    def errors(self) -> np.ndarray:
        """``error(r)`` for r = 0 … max_rank."""
        if self.total_energy <= 0:
            return np.zeros(self.max_rank + 1)
        return np.clip(1.0 - self._cumulative / self.total_energy, 0.0, 1.0)

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank that keeps at least ``energy`` (0 … 1) of the (whitened) energy."""
        if self.total_energy <= 0:
            return 0
        kept = self._cumulative[1:] / self.total_energy
        return int(min(np.searchsorted(kept, energy - 1e-12) + 1, self.max_rank))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [..., K, r], B [..., r, N]) in float64 with A B the best rank-r approximation of
        W in the (whitened) norm; √σ on each side."""
        r = int(min(max(rank, 1), self.max_rank))
        root = np.sqrt(self.sigma[..., :r])
        a = self._u[..., :, :r] * root[..., None, :]
        if self.whitened:
            a = self._s_inv @ a
        b = root[..., :, None] * self._vt[..., :r, :]
        return a, b


def bias_correction(weight: np.ndarray, a: np.ndarray, b: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """μ (W − A B): what the layer's bias must gain so that the mean input's output is kept
    exactly ([..., N] for a mean [..., K] or [K])."""
    delta = np.asarray(weight, np.float64) - a @ b
    return np.einsum("...k,...kn->...n", np.asarray(mean, np.float64), delta)
