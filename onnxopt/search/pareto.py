"""The Pareto front of candidates: none of them is beaten on every objective by another."""

from __future__ import annotations

OBJECTIVES = ("size", "latency_ratio", "drop")  # all minimized


def dominates(a: dict, b: dict, objectives=OBJECTIVES) -> bool:
    """``a`` is no worse than ``b`` on every objective and better on one."""
    return all(a[k] <= b[k] for k in objectives) and any(a[k] < b[k] for k in objectives)


def front(candidates: list[dict], objectives=OBJECTIVES) -> list[dict]:
    """The candidates no other candidate dominates (duplicates of one point kept once)."""
    out, seen = [], set()
    for c in candidates:
        if any(dominates(o, c, objectives) for o in candidates if o is not c):
            continue
        point = tuple(c[k] for k in objectives)
        if point not in seen:
            seen.add(point)
            out.append(c)
    return sorted(out, key=lambda c: tuple(c[k] for k in objectives))


PREFERENCES = {"latency": ("latency_ratio", "size", "drop"), "size": ("size", "latency_ratio", "drop"),
               "metric": ("drop", "latency_ratio", "size")}


def choose(candidates: list[dict], prefer: str = "latency", tolerance: float = 0.05) -> dict:
    """The front's member best on ``prefer``, then on the others in order; latencies within
    ``tolerance`` of the best count as equal (timing noise is larger than that)."""
    order = PREFERENCES[prefer]
    pool = candidates
    if prefer == "latency":
        best = min(c["latency_ratio"] for c in candidates)
        pool = [c for c in candidates if c["latency_ratio"] <= best * (1 + tolerance)]
        order = order[1:]
    return min(pool, key=lambda c: tuple(c[k] for k in order))
