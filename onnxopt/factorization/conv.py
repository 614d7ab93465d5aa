"""Low-rank forms of a weight: the kernels of the smaller layers that replace it.

Every decomposition offers the same things, so the passes and the rank choice need not
know which one they hold: ``max_rank``, ``error(rank)`` (relative, from the spectrum,
whitened when input statistics were given), ``rank_for_energy``, ``params(rank)`` (weights
of the split form), ``weights(rank)`` (the new layers' weights, in order) and
``reconstruct(rank)`` (the weight the split form computes, in the original layout: what a
sensitivity measurement substitutes).

Dense (x W, W [..., K, N]): A [..., K, r] then B [..., r, N].

Conv W [M, C/g, kh, kw] (2-D, ``g`` groups):

* ``ChannelSVD``: per group, the [C/g·kh·kw, M/g] matrix of the kernel (rows in im2col
  order: channel, kernel row, kernel column) is factored; the first conv is kh×kw with the
  layer's strides, pads and dilations, C → r·g channels in g groups, the second 1×1,
  r·g → M in g groups. Whitened by the im2col patch covariance (per group block).
* ``SpatialSVD`` (g = 1): the [C·kh, M·kw] matrix W[n,c,i,j] → M[(c,i),(n,j)]; a kh×1 conv
  C → r (stride (sh, 1), pads top/bottom, dilation (dh, 1)) then a 1×kw conv r → M (stride
  (1, sw), pads left/right, dilation (1, dw)). Zero-padding the intermediate tensor equals
  zero-padding the input because the first conv has no bias, so every stride, pad and
  dilation is kept exactly. Whitened by the covariance of kh×1 patches (the left factor's
  input): exact for the kh direction, it ignores the correlation across kernel columns.
* ``Tucker2`` (g = 1): a 1×1 conv C → r1, a kh×kw core r1 → r2 (the layer's strides, pads,
  dilations), a 1×1 conv r2 → M; HOSVD initialization (leading singular vectors of the
  input- and output-mode unfoldings) refined by a few HOOI sweeps. The input mode is
  whitened by the channel covariance. One rank parameter: r1, with r2 = r1·M/C rounded.
  The relative error is that of the truncated HOSVD (the sweeps only lower it).
* ``Separable`` (g = 1): per input channel c, W[:, c] ([M, kh·kw]) has rank m: a depthwise
  kh×kw conv with multiplier m (C → C·m channels, the layer's strides, pads, dilations) then
  a 1×1 conv C·m → M. Each channel's block is whitened by that channel's patch covariance.
"""

from __future__ import annotations

import numpy as np

from onnxopt.factorization.svd import Factorization, whitening


class _Spectral:
    """Shared rank bookkeeping over one Factorization (``self.f``)."""

    f: Factorization

    @property
    def max_rank(self) -> int:
        return self.f.max_rank

    def error(self, rank: int) -> float:
        return self.f.error(rank)

    def errors(self) -> np.ndarray:
        return self.f.errors()

    def rank_for_energy(self, energy: float) -> int:
        return self.f.rank_for_energy(energy)


class Dense(_Spectral):
    """x W ≈ (x A) B for W [..., K, N] (a stack shares one rank)."""

    kind = "dense"

    def __init__(self, weight: np.ndarray, covariance: np.ndarray | None = None, damp: float = 0.01):
        self.weight = np.asarray(weight, np.float64)
        self.f = Factorization(self.weight, covariance, damp)

    def params(self, rank: int) -> int:
        return self.f.slices * rank * (self.f.k + self.f.n)

    def weights(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return self.f.factors(rank)

    def reconstruct(self, rank: int) -> np.ndarray:
        a, b = self.f.factors(rank)
        return a @ b


def _group_patch_covariance(covariance: np.ndarray | None, groups: int, width: int) -> np.ndarray | None:
    """The per-group diagonal blocks [g, width, width] of a patch covariance over all groups."""
    if covariance is None:
        return None
    return np.stack([covariance[i * width:(i + 1) * width, i * width:(i + 1) * width] for i in range(groups)])


class ChannelSVD(_Spectral):
    kind = "channel"

    def __init__(self, kernel: np.ndarray, groups: int = 1, covariance: np.ndarray | None = None,
                 damp: float = 0.01):
        self.kernel = np.asarray(kernel, np.float64)
        m, cg, kh, kw = self.kernel.shape
        self.groups = g = int(groups)
        self.shape = (m, cg, kh, kw)
        # [g, Cg·kh·kw, M/g]: rows in im2col order, columns the group's output channels
        mats = self.kernel.reshape(g, m // g, cg * kh * kw).transpose(0, 2, 1)
        self.f = Factorization(mats, _group_patch_covariance(covariance, g, cg * kh * kw), damp)

    def params(self, rank: int) -> int:
        m, cg, kh, kw = self.shape
        return rank * self.groups * cg * kh * kw + m * rank

    def weights(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(first kh×kw kernel [r·g, C/g, kh, kw], second 1×1 kernel [M, r, 1, 1])."""
        m, cg, kh, kw = self.shape
        a, b = self.f.factors(rank)  # a [g, Cg·k², r], b [g, r, M/g]
        r = a.shape[-1]
        first = a.transpose(0, 2, 1).reshape(self.groups * r, cg, kh, kw)
        second = b.transpose(0, 2, 1).reshape(m, r, 1, 1)
        return first, second

    def reconstruct(self, rank: int) -> np.ndarray:
        m, cg, kh, kw = self.shape
        a, b = self.f.factors(rank)
        return (a @ b).transpose(0, 2, 1).reshape(m, cg, kh, kw)


class SpatialSVD(_Spectral):
    kind = "spatial"

    def __init__(self, kernel: np.ndarray, covariance: np.ndarray | None = None, damp: float = 0.01):
        """``covariance``: of the kh×1 patches of the input ([C·kh, C·kh]), or None."""
        self.kernel = np.asarray(kernel, np.float64)
        m, c, kh, kw = self.kernel.shape
        self.shape = (m, c, kh, kw)
        mat = self.kernel.transpose(1, 2, 0, 3).reshape(c * kh, m * kw)
        self.f = Factorization(mat, covariance, damp)

    def params(self, rank: int) -> int:
        m, c, kh, kw = self.shape
        return rank * c * kh + m * rank * kw

    def weights(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(kh×1 kernel [r, C, kh, 1], 1×kw kernel [M, r, 1, kw])."""
        m, c, kh, kw = self.shape
        a, b = self.f.factors(rank)  # a [C·kh, r], b [r, M·kw]
        r = a.shape[-1]
        first = a.T.reshape(r, c, kh, 1)
        second = b.reshape(r, m, kw).transpose(1, 0, 2)[:, :, None, :]
        return first, second

    def reconstruct(self, rank: int) -> np.ndarray:
        m, c, kh, kw = self.shape
        a, b = self.f.factors(rank)
        return (a @ b).reshape(c, kh, m, kw).transpose(2, 0, 1, 3)


class Tucker2:
    kind = "tucker2"

    def __init__(self, kernel: np.ndarray, covariance: np.ndarray | None = None, damp: float = 0.01,
                 sweeps: int = 2):
        """``covariance``: of the input channels ([C, C]), or None."""
        self.kernel = np.asarray(kernel, np.float64)
        m, c, kh, kw = self.kernel.shape
        self.shape = (m, c, kh, kw)
        self.sweeps = sweeps
        if covariance is not None:
            self._s, self._s_inv = whitening(covariance, damp)
        else:
            self._s = self._s_inv = np.eye(c)
        # the kernel with its input mode whitened: T[n, d, i, j] = Σ_c W[n,c,i,j] S[d, c], so
        # that each tap's error ΔW H ΔWᵀ is ‖ΔW Sᵀ‖² (SᵀS = H)
        self._t = np.einsum("ncij,dc->ndij", self.kernel, self._s)
        self._energy = float((self._t ** 2).sum())
        # HOSVD: leading singular vectors of the unfoldings, computed once
        self._u_in = np.linalg.svd(self._t.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0]
        self._u_out = np.linalg.svd(self._t.reshape(m, -1), full_matrices=False)[0]
        # per (r2, r1): the energy a truncated HOSVD keeps, from the core in the full bases
        core = np.einsum("ncij,nr,cs->rsij", self._t, self._u_out, self._u_in)
        self._kept = np.cumsum(np.cumsum((core ** 2).sum((2, 3)), 0), 1)
        self._cache: dict[int, tuple] = {}

    @property
    def max_rank(self) -> int:
        return self.shape[1]

    def out_rank(self, rank: int) -> int:
        m, c = self.shape[:2]
        return int(min(m, max(1, round(rank * m / c))))

    def _factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U_in [C, r1], core [r2, r1, kh, kw], U_out [M, r2]) of the whitened kernel."""
        if rank in self._cache:
            return self._cache[rank]
        m, c, kh, kw = self.shape
        r1, r2 = int(min(max(rank, 1), c)), self.out_rank(rank)
        u_in, u_out = self._u_in[:, :r1], self._u_out[:, :r2]
        t = self._t
        for _ in range(self.sweeps):  # HOOI: each mode's basis given the other's projection
            proj_out = np.einsum("ncij,nr->rcij", t, u_out)  # [r2, C, kh, kw]
            u_in = np.linalg.svd(proj_out.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0][:, :r1]
            proj_in = np.einsum("ncij,cr->nrij", t, u_in)  # [M, r1, kh, kw]
            u_out = np.linalg.svd(proj_in.reshape(m, -1), full_matrices=False)[0][:, :r2]
        core = np.einsum("ncij,nr,cs->rsij", t, u_out, u_in)
        self._cache = {rank: (u_in, core, u_out)}  # the last rank asked for only: cores can be large
        return u_in, core, u_out

    def error(self, rank: int) -> float:
        """Relative (whitened) error of the truncated HOSVD at ``rank``; the HOOI sweeps that
        make the weights only lower it."""
        if self._energy <= 0:
            return 0.0
        r1 = int(min(max(rank, 1), self.shape[1], self._kept.shape[1]))
        r2 = min(self.out_rank(rank), self._kept.shape[0])
        return float(max(0.0, 1.0 - self._kept[r2 - 1, r1 - 1] / self._energy))

    def errors(self) -> np.ndarray:
        return np.array([1.0] + [self.error(r) for r in range(1, self.max_rank + 1)])

    def rank_for_energy(self, energy: float) -> int:
        errors = self.errors()
        ok = np.nonzero(1.0 - errors[1:] >= energy - 1e-12)[0]
        return int(ok[0] + 1) if ok.size else self.max_rank

    def params(self, rank: int) -> int:
        m, c, kh, kw = self.shape
        r1, r2 = int(min(rank, c)), self.out_rank(rank)
        return c * r1 + r2 * r1 * kh * kw + m * r2

    def weights(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(1×1 [r1, C, 1, 1], core [r2, r1, kh, kw], 1×1 [M, r2, 1, 1])."""
        u_in, core, u_out = self._factors(rank)
        # W ≈ T' S⁻ᵀ: the first conv takes the input to the whitened basis, (S⁻¹ U_in)ᵀ
        first = (self._s_inv @ u_in).T  # [r1, C]
        return first[:, :, None, None], core, u_out[:, :, None, None]

    def reconstruct(self, rank: int) -> np.ndarray:
        first, core, last = self.weights(rank)
        return np.einsum("nr,rsij,sc->ncij", last[:, :, 0, 0], core, first[:, :, 0, 0])


class Separable(_Spectral):
    kind = "separable"

    def __init__(self, kernel: np.ndarray, covariance: np.ndarray | None = None, damp: float = 0.01):
        """``covariance``: of the full im2col patches ([C·kh·kw]²; each channel's diagonal
        block is used), or None."""
        self.kernel = np.asarray(kernel, np.float64)
        m, c, kh, kw = self.kernel.shape
        self.shape = (m, c, kh, kw)
        mats = self.kernel.reshape(m, c, kh * kw).transpose(1, 2, 0)  # [C, k², M]
        self.f = Factorization(mats, _group_patch_covariance(covariance, c, kh * kw), damp)

    def params(self, rank: int) -> int:
        m, c, kh, kw = self.shape
        return c * rank * kh * kw + m * c * rank

    def weights(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(depthwise [C·m, 1, kh, kw], pointwise [M, C·m, 1, 1]); channel c·m + t of the
        depthwise output is input channel c's t-th component."""
        m, c, kh, kw = self.shape
        a, b = self.f.factors(rank)  # a [C, k², r], b [C, r, M]
        r = a.shape[-1]
        depthwise = a.transpose(0, 2, 1).reshape(c * r, 1, kh, kw)
        pointwise = b.transpose(2, 0, 1).reshape(m, c * r, 1, 1)
        return depthwise, pointwise

    def reconstruct(self, rank: int) -> np.ndarray:
        m, c, kh, kw = self.shape
        a, b = self.f.factors(rank)
        return (a @ b).transpose(2, 0, 1).reshape(m, c, kh, kw)


def kernel_bias_correction(delta: np.ndarray, channel_mean: np.ndarray) -> np.ndarray:
    """[M]: what a Conv's bias must gain so that a constant input equal to ``channel_mean``
    ([C]) keeps its output when the kernel changes by ``delta`` ([M, C, kh, kw], g = 1 or
    expanded); zero-padded borders aside, the mean input's share of the truncation error."""
    m, cg = delta.shape[:2]
    c = channel_mean.shape[0]
    if cg != c:  # grouped: output channel n reads input channels of its own group
        g = c // cg
        mean = channel_mean.reshape(g, cg)[np.arange(m) // (m // g)]  # [M, Cg]
        return np.einsum("nc,ncij->n", mean, delta)
    return np.einsum("c,ncij->n", channel_mean, delta)
