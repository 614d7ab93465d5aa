"""Fidelity during a run: how far the model is from the original after each lossy pass.

``FidelityProbe`` holds a few batches set aside for judging (from ``--data``, else held
back from the calibration data, else made from the input specs: ``source`` says which) and
the original model's outputs on them, computed once. ``measure(proto)`` runs a candidate on
the same batches, as onnxruntime would deploy it (all graph optimizations on the target's
providers), and gives the worst output's SNR and cosine. A ``Floor`` (from the target's
[fidelity] table or the command line) says whether that is good enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.measure.metrics import join_batches, output_stats


@dataclass(frozen=True)
class Fidelity:
    """The worst output's SNR (dB) and cosine against the original on the probe's batches."""

    snr_db: float
    cosine: float
    output: str  # the output with the lowest SNR

    def to_json(self) -> dict:
        snr = self.snr_db if math.isfinite(self.snr_db) else ("inf" if self.snr_db > 0 else "-inf")
        return {"snr_db": snr if isinstance(snr, str) else round(snr, 3), "cosine": round(self.cosine, 6),
                "worst_output": self.output}


@dataclass(frozen=True)
class Floor:
    """What a lossy pass must keep: the worst output's SNR and/or cosine, and (for a pass that
    promises speed) the latency against the model before it (None = no bound)."""

    min_snr_db: float | None = None
    min_cosine: float | None = None
    max_latency_ratio: float | None = None

    def __bool__(self) -> bool:
        return self.fidelity_bound or self.max_latency_ratio is not None

    @property
    def fidelity_bound(self) -> bool:
        return self.min_snr_db is not None or self.min_cosine is not None

    def holds(self, f: Fidelity) -> bool:
        return (self.min_snr_db is None or f.snr_db >= self.min_snr_db) and \
            (self.min_cosine is None or f.cosine >= self.min_cosine)

    def fast_enough(self, ratio: float) -> bool:
        return self.max_latency_ratio is None or ratio <= self.max_latency_ratio

    def describe(self) -> str:
        parts = []
        if self.min_snr_db is not None:
            parts.append(f"SNR >= {self.min_snr_db:g} dB")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return " and ".join(parts) or "none"

    def to_json(self) -> dict:
        return {"min_snr_db": self.min_snr_db, "min_cosine": self.min_cosine,
                "max_latency_ratio": self.max_latency_ratio}


class FidelityProbe:
    """The original's outputs on a few batches, and the fidelity of candidates against them."""

    def __init__(self, reference: onnx.ModelProto, batches: list[dict[str, np.ndarray]], source: str,
                 providers: list[str] | None = None, threads: int = 0):
        self.batches = batches
        self.source = source
        self.providers, self.threads = providers, threads
        self.reference = self._outputs(reference)
        self.runs = 0

    def _outputs(self, proto: onnx.ModelProto) -> dict:
        sess = runtime.session(proto, self.providers, self.threads, level="all")
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        outs = []
        for batch in self.batches:
            values = sess.run(names, {k: v for k, v in batch.items() if k in wanted})
            outs.append(dict(zip(names, values)))
        return join_batches(outs)

    def measure(self, proto: onnx.ModelProto) -> Fidelity:
        """The worst output's fidelity of ``proto`` (raises runtime.CannotRun)."""
        self.runs += 1
        got = self._outputs(proto)
        worst_snr, worst_cos, worst_name = math.inf, 1.0, ""
        for name, ref in self.reference.items():
            if name not in got:
                return Fidelity(-math.inf, 0.0, name)
            a = _flat(ref)
            b = _flat(got[name])
            if a is None or a.dtype.kind not in "fc":
                continue
            stats = output_stats(a, b)
            if "error" in stats or stats.get("nonfinite_mismatch"):  # an inf or NaN the original has not
                return Fidelity(-math.inf, 0.0, name)
            if stats["snr_db"] < worst_snr or not worst_name:
                worst_snr, worst_name = stats["snr_db"], name
            worst_cos = min(worst_cos, stats["cosine"])
        return Fidelity(worst_snr, worst_cos, worst_name)


def _flat(value) -> np.ndarray | None:
    """Outputs of all batches as one array (batches of different shapes are raveled)."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, np.ndarray) for v in value):
            return None
        return np.concatenate([v.ravel() for v in value])
    return value if isinstance(value, np.ndarray) else None
