"""Fidelity metrics: how far a candidate model's outputs are from the reference's.

Built-in metrics (``--metric NAME``) compare every float output and keep the worst:

| name   | value                                     | drop (what --max-drop bounds) |
|--------|-------------------------------------------|-------------------------------|
| cosine | cosine similarity of the flattened output | 1 - cosine                    |
| snr    | signal-to-noise ratio in dB               | noise/signal power, 10^(-SNR/10): 0.01 = 20 dB |
| top1   | agreement of the argmax over the last axis (classifier-like outputs) | 1 - agreement |
| mse    | mean squared error                        | mse                           |

``--metric module:function`` calls the user's ``function(reference, candidate)`` where both
are dicts output name -> array (batches concatenated along axis 0 when their other dims
agree, else a list of arrays, one a batch). It returns either

- a pair ``(reference_score, candidate_score)`` or a dict with those two keys: a task
  score of each model (accuracy on labels, mAP, …). The drop is reference - candidate, or
  candidate - reference when the function has an attribute ``higher_is_better = False``
  (WER, loss); or
- one number: the drop itself (how much worse the candidate is; 0 = no loss).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from onnxopt.errors import UsageError


# -- per-output statistics -------------------------------------------------------------------
def is_classifier_like(ref: np.ndarray) -> bool:
    """Scores over classes: [N, C] logits, or [N, T, C] / [N, C] rows that sum to 1."""
    if ref.dtype.kind != "f" or ref.ndim not in (2, 3) or ref.shape[-1] < 2 or ref.size == 0:
        return False
    if ref.ndim == 2:
        return True
    rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    return bool(np.all(rows >= -1e-6) and np.allclose(rows.sum(-1), 1.0, atol=1e-3))


def output_stats(ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    """cosine, snr_db, max/mean absolute error, mse and (classifier-like) top-1 agreement."""
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        return {"error": f"shape {cand.shape} instead of {ref.shape}"}
    if ref.dtype.kind not in "fiub" or ref.size == 0:
        return {"equal": bool(np.array_equal(ref, cand))}
    a = ref.astype(np.float64).ravel()
    b = cand.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    out: dict[str, Any] = {"nonfinite_mismatch": int(np.sum(np.isfinite(a) != np.isfinite(b)))}
    a, b = a[finite], b[finite]
    diff = a - b
    signal, noise = float(np.dot(a, a)), float(np.dot(diff, diff))
    norms = math.sqrt(signal) * math.sqrt(float(np.dot(b, b)))
    # Equal outputs are exactly 1 (rounding in the dot products would leave 1 - 2e-16).
    out["cosine"] = 1.0 if noise == 0 else (
        float(np.clip(np.dot(a, b) / norms, -1.0, 1.0)) if norms > 0 else 0.0)
    out["snr_db"] = (math.inf if noise == 0 else
                     (10 * math.log10(signal / noise) if signal > 0 else -math.inf))
    out["max_abs"] = float(np.max(np.abs(diff))) if diff.size else 0.0
    out["mean_abs"] = float(np.mean(np.abs(diff))) if diff.size else 0.0
    out["mse"] = float(np.mean(diff * diff)) if diff.size else 0.0
    if is_classifier_like(ref):
        out["top1"] = float(np.mean(np.argmax(ref, -1) == np.argmax(cand, -1)))
    return out


# -- metrics -----------------------------------------------------------------------------------
@dataclass
class MetricResult:
    metric: str
    value: float | None  # the metric's own value (worst output for built-ins)
    drop: float  # how much worse the candidate is: 0 = no loss
    reference: float | None = None  # task scores, for user metrics that return a pair
    candidate: float | None = None
    output: str | None = None  # the output that gave the worst value

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _worst(stats: dict[str, dict], key: str, worse: Callable[[float, float], bool]):
    best = None
    for name, s in stats.items():
        if key in s and (best is None or worse(s[key], best[1])):
            best = (name, s[key])
    return best


def _snr_drop(snr: float) -> float:
    return 0.0 if snr == math.inf else 10 ** (-snr / 10)


# name -> (stat key, True when smaller values are worse, value -> drop)
BUILTIN = {
    "cosine": ("cosine", True, lambda v: 1.0 - v),
    "snr": ("snr_db", True, _snr_drop),
    "top1": ("top1", True, lambda v: 1.0 - v),
    "mse": ("mse", False, lambda v: v),
}


def load_metric(spec: str) -> Callable | str:
    """A built-in name, or the function named by ``module:function`` (UsageError otherwise)."""
    if spec in BUILTIN:
        return spec
    if ":" not in spec:
        raise UsageError(f"unknown metric '{spec}' (built-in: {', '.join(BUILTIN)}; or module:function)")
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"metric '{spec}': cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"metric '{spec}': module '{module_name}' has no function '{func_name}'")
    return fn


def evaluate(metric: str | Callable, stats: dict[str, dict], reference: dict, candidate: dict) -> MetricResult:
    """Apply ``metric`` to per-output ``stats`` (built-ins) or to the outputs (user functions)."""
    if isinstance(metric, str):
        key, smaller_is_worse, to_drop = BUILTIN[metric]
        worst = _worst(stats, key, (lambda x, y: x < y) if smaller_is_worse else (lambda x, y: x > y))
        if worst is None:
            raise UsageError(f"metric '{metric}' applies to no output of this model"
                             + (" (no classifier-like output: [N, C] or rows of probabilities)"
                                if metric == "top1" else " (no numeric output)"))
        return MetricResult(metric, worst[1], float(to_drop(worst[1])), output=worst[0])
    name = f"{metric.__module__}:{metric.__name__}"
    value = metric(reference, candidate)
    if isinstance(value, dict):
        if not {"reference", "candidate"} <= set(value):
            raise UsageError(f"metric {name} returned a dict without 'reference' and 'candidate' keys")
        value = (value["reference"], value["candidate"])
    if isinstance(value, (tuple, list)) and len(value) == 2:
        ref_score, cand_score = float(value[0]), float(value[1])
        higher = getattr(metric, "higher_is_better", True)
        drop = ref_score - cand_score if higher else cand_score - ref_score
        return MetricResult(name, cand_score, drop, reference=ref_score, candidate=cand_score)
    try:
        drop = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"metric {name} returned {type(value).__name__}; expected a number or a "
                         "(reference, candidate) pair") from None
    return MetricResult(name, drop, drop)


def join_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Outputs of several batches as one dict: concatenated on axis 0 when possible."""
    if not batches:
        return {}
    out: dict[str, Any] = {}
    for name in batches[0]:
        arrays = [np.asarray(b[name]) for b in batches]
        if len(arrays) == 1:
            out[name] = arrays[0]
        elif all(a.ndim >= 1 and a.shape[1:] == arrays[0].shape[1:] and a.dtype == arrays[0].dtype
                 for a in arrays):
            out[name] = np.concatenate(arrays, axis=0)
        else:
            out[name] = arrays
    return out


def stats_by_output(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``output_stats`` of every output of ``reference``, both sides as ``join_batches`` gives
    them (batches of different shapes are raveled into one array)."""
    def joined(value):
        return np.concatenate([np.asarray(v).ravel() for v in value]) if isinstance(value, list) else value

    return {name: output_stats(joined(reference[name]), joined(candidate[name])) for name in reference}


def min_row_cosine(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The smallest cosine between matching float outputs, row by row (rows = axis 0):
    the worst sample of the worst output, 1.0 when there is no float output."""
    worst = 1.0
    for a, b in zip(reference, candidate):
        if a.dtype.kind != "f" or a.size == 0:
            continue
        a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim > 1 else a.reshape(1, -1).astype(np.float64)
        b2 = b.reshape(a2.shape).astype(np.float64)
        num = (a2 * b2).sum(1)
        den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        worst = min(worst, float(cos.min()))
    return worst
