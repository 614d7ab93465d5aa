"""Layer sensitivity: what each layer of a lossy pass costs, and trials with layers kept.

A lossy pass that changes layers one by one names the option that leaves layers alone
(``Pass.keep_option``) and lists the layers it would change (``Pass.layers``). On that
contract this module offers what the fidelity floor (``onnxopt.pipeline.floor``) and the
accuracy-aware search (``onnxopt.search``) both need:

- ``LayerTrials``: the pass run again from the model before it with some layers kept, each
  result measured (the model, the pass's stats, notes and metadata kept with it);
- ``rank_by_own_error``: one capture run of the model after the pass ranks the layers by
  the error each adds by itself (its output there against the original layer run in float
  on the very inputs it saw there);
- ``fewest``: the smallest count of layers (in a ranking) that makes a monotone test hold,
  by doubling then bisection;
- ``Sensitivity``: per layer, the fidelity when only that layer is compressed (the others
  kept), and ``SensitivityCache``, which keeps it on disk in the user's cache folder by
  model, pass, options and data, since it costs one run of the pass per layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxopt import runtime
from onnxopt.data.capture import Capture, capturable
from onnxopt.errors import OnnxoptError
from onnxopt.ir.constants import constant_value, is_constant
from onnxopt.ir.graphs import node_key
from onnxopt.ir.model import ModelState
from onnxopt.ir.submodel import submodel
from onnxopt.ir.validate import structural_problem
from onnxopt.measure.fidelity import Fidelity
from onnxopt.user_cache import user_cache_dir

logger = logging.getLogger(__name__)


@dataclass
class Trial:
    """One run of the pass with some layers kept: what it gave and what it said."""

    fidelity: Fidelity
    state: ModelState
    stats: dict
    notes: list[str]
    metadata: dict


class LayerTrials:
    """Runs pass ``cls`` with ``options`` again from ``before`` (a snapshot of ``model``), with
    layers kept, and measures each result with ``measure`` (proto -> Fidelity)."""

    def __init__(self, cls, options: dict, model, ctx, before: ModelState, measure: Callable):
        self.cls, self.options, self.model, self.ctx, self.before = cls, dict(options), model, ctx, before
        self.measure = measure
        self.saved = (len(ctx.notes), dict(ctx.metadata))  # what the context held before the pass

    def run(self, keep: list[str]) -> Trial | None:
        """The pass run again from ``before`` with ``keep`` left alone, or None when it failed."""
        model, ctx, cls = self.model, self.ctx, self.cls
        model.restore(self.before.copy())
        del ctx.notes[self.saved[0]:]
        ctx.metadata.clear()
        ctx.metadata.update(self.saved[1])
        ctx.invalidate(frozenset({"statistics"}))  # the model is the one the statistics are of
        opts = dict(self.options)
        opts[cls.keep_option] = list(opts.get(cls.keep_option, [])) + list(keep)
        try:
            result = cls(**opts).run(model, ctx)
        except OnnxoptError:
            raise
        except Exception as exc:  # noqa: BLE001  (the trial fails; the search goes on)
            logger.debug("%s with %d layer(s) kept raised: %s", cls.name, len(keep), exc)
            return None
        if result.changed and structural_problem(model.graph) is not None:
            return None
        fidelity = self.fidelity()
        logger.info("%s with %d layer(s) kept: %s", cls.name, len(keep), describe(fidelity))
        return Trial(fidelity, model.snapshot(), dict(result.stats), list(ctx.notes[self.saved[0]:]),
                     dict(ctx.metadata))

    def fidelity(self) -> Fidelity:
        try:
            return self.measure(self.model.export())
        except runtime.CannotRun as exc:
            return Fidelity(-math.inf, 0.0, f"(onnxruntime cannot run it: {exc})")

    def accept(self, chosen: Trial, record=None) -> None:
        """Make ``chosen`` the model, with what its run said."""
        self.model.restore(chosen.state)
        del self.ctx.notes[self.saved[0]:]
        self.ctx.notes.extend(chosen.notes)
        self.ctx.metadata.clear()
        self.ctx.metadata.update(chosen.metadata)
        if record is not None:
            record.stats = dict(chosen.stats)


def describe(f: Fidelity) -> str:
    return f"worst output '{f.output}' at {f.snr_db:.1f} dB SNR, cosine {f.cosine:.5f}"


# -- ranking by the error each layer adds ---------------------------------------------------------
def rank_by_own_error(candidates: list[str], model, after: ModelState, probe) -> list[str]:
    """``candidates`` (keys of layers of ``model``, the model before the pass) ordered by the
    error each adds by itself, most first: the layer's output in the model after the pass
    against the original layer run in float on the inputs it saw there, over ``probe``'s
    batches. Layers that cannot be measured (inside subgraphs, renamed, non-numeric) come last."""
    nodes = {node_key(n): n for n in model.graph.nodes}
    layers = {}
    for key in candidates:
        node = nodes.get(key)
        if node is None or not node.outputs or not node.outputs[0].name:
            continue
        constants, data = {}, []
        for t in node.inputs:
            if not t.name:
                continue
            if is_constant(t):
                value = constant_value(t)
                if value is None:
                    break
                constants[t.name] = value
            else:
                data.append(t.name)
        else:
            layers[key] = (node, constants, data, node.outputs[0].name)
    after_proto = model.copy(after).export()
    available = capturable(after_proto)
    layers = {k: v for k, v in layers.items() if v[3] in available and all(n in available for n in v[2])}
    own = _own_snr(layers, after_proto, model, probe)
    measured = sorted(own, key=lambda k: own[k])  # noisiest first
    return measured + [k for k in candidates if k not in own]


def _own_snr(layers: dict, after_proto, model, probe) -> dict[str, float]:
    """Per layer: the SNR (dB) of its output in ``after_proto`` against the original layer
    computed in float on the inputs it saw there, over the probe's batches."""
    if not layers:
        return {}
    names = sorted({n for _, _, data, out in layers.values() for n in data + [out]})
    try:
        cap = Capture(after_proto, names, probe.providers, probe.threads, what="the model after the pass")
    except OnnxoptError as exc:
        logger.debug("cannot rank layers: %s", exc)
        return {}
    opsets, ir_version = model.opset_protos(), model.template.ir_version
    sessions: dict[str, Any] = {}
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)
    for i, batch in enumerate(probe.batches):
        seen = cap.run(batch, i)
        for key, (node, constants, data, out) in layers.items():
            if key not in signal:
                continue
            feeds = {n: _float32(seen[n]) for n in data}
            got = seen[out]
            try:
                if key not in sessions:
                    sessions[key] = runtime.session(submodel([node], constants, feeds, opsets, ir_version),
                                                    ["CPUExecutionProvider"], 1)
                (want,) = sessions[key].run([out], feeds)
            except Exception as exc:  # noqa: BLE001  (a layer that cannot run alone is not ranked)
                logger.debug("cannot run layer %s alone: %s", key, exc)
                signal.pop(key)
                continue
            if not isinstance(got, np.ndarray) or got.shape != want.shape or want.dtype.kind != "f":
                signal.pop(key)
                continue
            w, g = want.astype(np.float64), got.astype(np.float64)
            signal[key] += float(np.sum(w * w))
            noise[key] += float(np.sum((w - g) ** 2))
    return {k: (math.inf if noise[k] == 0 else 10 * math.log10(max(signal[k], 1e-300) / noise[k]))
            for k in signal}


def _float32(value: np.ndarray) -> np.ndarray:
    """A low-precision float activation (the pass converted it) as the original's float32."""
    return value.astype(np.float32) if isinstance(value, np.ndarray) and value.dtype == np.float16 else value


def fewest(ok, n: int, budget: int) -> int | None:
    """The smallest k in 1..n with ``ok(k)``, assuming ``ok`` is monotone: doubling k until it
    holds, then bisecting; None when even n does not hold (or the budget of calls ends)."""
    calls, k, good = 0, 1, None
    while calls < budget:
        calls += 1
        if ok(min(k, n)):
            good = min(k, n)
            break
        if k >= n:
            return None
        k *= 2
    if good is None:
        return None
    lo = good // 2
    while good - lo > 1 and calls < budget:
        calls += 1
        mid = (lo + good) // 2
        if ok(mid):
            good = mid
        else:
            lo = mid
    return good


# -- per-layer sensitivity ----------------------------------------------------------------------
@dataclass
class Sensitivity:
    """Per layer of pass ``pass_name`` with ``options``: the fidelity of the model when only
    that layer is compressed (every other layer of the pass kept as it was)."""

    pass_name: str
    options: dict
    layers: dict[str, Fidelity] = field(default_factory=dict)
    data: str = ""  # which batches it was measured on
    cached: bool = False

    def ranking(self) -> list[str]:
        """Layers, most sensitive (lowest SNR alone) first."""
        return sorted(self.layers, key=lambda k: (self.layers[k].snr_db, self.layers[k].cosine))

    def to_json(self) -> dict:
        return {"pass": self.pass_name, "options": self.options, "data": self.data, "cached": self.cached,
                "layers": [{"layer": k, **self.layers[k].to_json()} for k in self.ranking()]}

    @classmethod
    def from_json(cls, data: dict) -> "Sensitivity":
        layers = {}
        for row in data["layers"]:
            snr = row["snr_db"]
            snr = float(snr) if not isinstance(snr, str) else (math.inf if snr == "inf" else -math.inf)
            layers[row["layer"]] = Fidelity(snr, float(row["cosine"]), row["worst_output"])
        return cls(data["pass"], data["options"], layers, data.get("data", ""), True)


def alone(keys: list[str], key: str) -> list[str]:
    """What to keep so that only ``key`` is compressed."""
    return [k for k in keys if k != key]


def digest_batches(batches: list[dict[str, np.ndarray]]) -> str:
    """A short digest of data batches (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


class SensitivityCache:
    """Sensitivities on disk: one JSON file per model sha256, pass, options and data digest."""

    def __init__(self, folder: Path | None = None):
        self.folder = (folder or user_cache_dir()) / "sensitivity"

    def _path(self, model_sha256: str, pass_name: str, options: dict, data: str) -> Path:
        from onnxopt import __version__

        key = json.dumps([__version__, pass_name, options, data], sort_keys=True, default=str)
        return self.folder / f"{model_sha256[:24]}-{pass_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def get(self, model_sha256: str, pass_name: str, options: dict, data: str) -> Sensitivity | None:
        path = self._path(model_sha256, pass_name, options, data)
        try:
            return Sensitivity.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, model_sha256: str, sensitivity: Sensitivity, data: str) -> None:
        path = self._path(model_sha256, sensitivity.pass_name, sensitivity.options, data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sensitivity.to_json(), indent=1, default=str))
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written only costs time
            logger.warning("cannot write the sensitivity cache %s: %s", path, exc)
