"""How much faster one model runs than another, measured in onnxruntime.

Both sessions run the same inputs in turns (A B B A …, after a warm-up, spinning off so an
idle session does not steal the other's cores) and the ratio is the median of the pairs'
ratios: load that comes and goes on a shared machine cancels out better than in a ratio
of medians. Used by the speed floor of a run (a pass that promises speed must not leave the
model slower) and by passes that choose a rewrite by its measured speed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class Speed:
    ratio: float  # time of b / time of a (below 1: b is faster)
    ms_a: float
    ms_b: float
    runs: int

    def to_json(self) -> dict:
        return {"latency_ratio": round(self.ratio, 4), "ms_before": round(self.ms_a, 4),
                "ms_after": round(self.ms_b, 4), "runs": self.runs}


def compare_speed(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray],
                  providers: list[str] | None = None, threads: int = 1, runs: int = 30,
                  budget_s: float = 15.0, warmup: int = 3) -> Speed:
    """Latency of ``b`` against ``a`` on ``feeds`` (raises onnxopt.runtime.CannotRun when
    onnxruntime cannot load or run either)."""
    from onnxopt import runtime
    from onnxopt.errors import ModelError
    from onnxopt.measure.compare import interleaved_latency

    sess_a = runtime.session(a, providers, threads, level="all", spinning=False)
    sess_b = runtime.session(b, providers, threads, level="all", spinning=False)
    wanted = {i.name for i in sess_a.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    try:
        times_a, times_b = interleaved_latency(sess_a, sess_b, feeds, runs=runs, warmup=warmup, budget_s=budget_s)
    except ModelError as exc:  # a run failed
        raise runtime.CannotRun(str(exc)) from None
    return Speed(pair_ratio(times_a, times_b), statistics.median(times_a) * 1e3,
                 statistics.median(times_b) * 1e3, len(times_a))


def pair_ratio(times_a: list[float], times_b: list[float]) -> float:
    """The median of b/a over runs made back to back (see the module docstring)."""
    return statistics.median(y / x for x, y in zip(times_a, times_b) if x > 0)
