"""Choosing ranks: per layer (by energy), rounded to a hardware multiple, or for all layers
at once under a budget of parameters or MACs.

Each layer offers options: keep it as it is (error 0, its full cost) or split it at some
rank (a relative error from its spectrum, a smaller cost). ``allocate`` picks one option
per layer so that the summed cost stays within the budget and the summed relative error
is smallest: a greedy allocation of singular values across layers from their spectra, done
as AIMET's common threshold, i.e. a Lagrangian search: for a price λ every layer takes the
option minimizing error + λ·cost, λ is bisected until the total fits, and what budget is
left is spent greedily on the upgrades that remove the most error per unit of cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Option:
    """One way to build a layer: ``rank`` (None = unsplit), its ``cost`` and relative ``error``."""

    rank: Any
    cost: float
    error: float


@dataclass
class Allocation:
    choices: list[int]  # index of the chosen option, per layer
    cost: float
    budget: float
    met: bool  # the budget was reachable with the options given

    def chosen(self, layers: Sequence[Sequence[Option]]) -> list[Option]:
        return [options[i] for options, i in zip(layers, self.choices)]


def round_rank(rank: float, multiple: int = 1, limit: int | None = None) -> int:
    """``rank`` rounded up to a multiple of ``multiple`` (at least one multiple), and at most
    ``limit`` when given (a rank cannot exceed the matrix's)."""
    multiple = max(int(multiple), 1)
    r = max(multiple, int(math.ceil(rank / multiple - 1e-9)) * multiple)
    return min(r, limit) if limit is not None else r


def ranks_below(limit: int, multiple: int = 1, count: int = 64) -> list[int]:
    """Candidate ranks up to ``limit``: every multiple of ``multiple``, thinned to about
    ``count`` values spread evenly (a budget search does not need every rank of a 4096-wide
    layer)."""
    multiple = max(int(multiple), 1)
    ranks = list(range(multiple, int(limit) + 1, multiple))
    if len(ranks) > count:
        step = math.ceil(len(ranks) / count)
        ranks = ranks[::step] + ([ranks[-1]] if (len(ranks) - 1) % step else [])
    return ranks


def _choose(costs: list[np.ndarray], errors: list[np.ndarray], price: float) -> list[int]:
    # ties go to the cheaper option (the options are sorted by cost)
    return [int(np.argmin(e + price * c)) for c, e in zip(costs, errors)]


def allocate(layers: Sequence[Sequence[Option]], budget: float) -> Allocation:
    """One option per layer with total cost ≤ ``budget`` and the least summed error.

    Each layer's options must include its unsplit form. When even the cheapest option of
    every layer exceeds the budget, those are chosen and ``met`` is False.
    """
    order = [sorted(range(len(opts)), key=lambda i: (opts[i].cost, opts[i].error)) for opts in layers]
    costs = [np.array([layers[li][i].cost for i in o], dtype=np.float64) for li, o in enumerate(order)]
    errors = [np.array([layers[li][i].error for i in o], dtype=np.float64) for li, o in enumerate(order)]
    total_full = sum(float(c.max()) for c in costs) or 1.0

    def total(picks):
        return sum(float(c[i]) for c, i in zip(costs, picks))

    cheapest = [int(np.argmin(c)) for c in costs]
    if total(cheapest) > budget:
        picks = cheapest
    else:
        lo, hi = 0.0, 1.0 / total_full
        while total(_choose(costs, errors, hi)) > budget and hi < 1e12:
            hi *= 4.0
        if total(_choose(costs, errors, lo)) <= budget:
            hi = lo
        for _ in range(80):  # bisect the price: the smallest one whose picks fit
            if hi - lo <= 1e-9 * hi:
                break
            mid = (lo + hi) / 2
            if total(_choose(costs, errors, mid)) > budget:
                lo = mid
            else:
                hi = mid
        picks = _choose(costs, errors, hi)
        picks = _fill(costs, errors, picks, budget - total(picks))
    return Allocation([o[i] for o, i in zip(order, picks)], total(picks), budget, total(picks) <= budget + 1e-9)


def _fill(costs, errors, picks: list[int], slack: float) -> list[int]:
    """Spend ``slack`` on the upgrades with the most error removed per unit of cost."""
    picks = list(picks)
    while True:
        best, best_gain = None, 0.0
        for li, (c, e) in enumerate(zip(costs, errors)):
            now = picks[li]
            extra = c - c[now]
            gain = e[now] - e
            ok = (extra > 0) & (extra <= slack) & (gain > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, gain / np.where(extra > 0, extra, 1.0), -1.0)
            j = int(np.argmax(ratio))
            if ratio[j] > best_gain:
                best, best_gain = (li, j), float(ratio[j])
        if best is None:
            return picks
        li, j = best
        slack -= float(costs[li][j] - costs[li][picks[li]])
        picks[li] = j
