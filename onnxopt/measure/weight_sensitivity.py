"""Weight sensitivity: how much a model's outputs move when some of its weights change.

A spectrum says how well a layer's weight is approximated, not what the approximation
costs at the model's outputs: a 1 % error in one layer may be invisible downstream and a
1 % error in another ruins the result. ``WeightSensitivity`` measures it: the named
initializers become overridable inputs of one onnxruntime session (the initializer stays
the default), the outputs of the original weights on a few batches are kept, and
``error({name: new_value, …})`` runs the same batches with the replacements fed in and
returns the relative output error, ‖y' − y‖² / ‖y‖² averaged over the float outputs and the
batches. One session serves every variant, so trying dozens of ranks per layer costs
dozens of forward passes, not dozens of session builds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxopt import runtime


class WeightSensitivity:
    def __init__(self, proto: onnx.ModelProto, weights: list[str], batches: list[dict[str, np.ndarray]],
                 providers: list[str] | None = None, threads: int = 0):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        graph = copy.graph
        inits = {t.name: t for t in graph.initializer}
        declared = {i.name for i in graph.input}
        self.weights = [w for w in weights if w in inits]
        for name in self.weights:
            if name not in declared:
                t = inits[name]
                graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.session = runtime.session(copy, providers, threads, level="basic")
        self.inputs = {i.name for i in self.session.get_inputs()} - set(self.weights)
        self.batches = [{k: v for k, v in b.items() if k in self.inputs} for b in batches]
        names = [o.name for o in self.session.get_outputs()]
        self.reference = [self._run(b, {}) for b in self.batches]
        floats = [i for i, name in enumerate(names)
                  if all(np.issubdtype(np.asarray(r[i]).dtype, np.floating) for r in self.reference)]
        self._floats = floats
        self.runs = 0

    def _run(self, batch: dict, replacements: dict) -> list:
        feeds = dict(batch)
        feeds.update(replacements)
        return self.session.run(None, feeds)

    def error(self, replacements: dict[str, np.ndarray]) -> float:
        """Relative squared output error with the weights in ``replacements`` (by initializer
        name; each of the initializer's shape) instead of the model's own."""
        unknown = set(replacements) - set(self.weights)
        if unknown:
            raise KeyError(f"not an exposed weight: {', '.join(sorted(unknown))}")
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in replacements.items()}
        total, count = 0.0, 0
        for batch, ref in zip(self.batches, self.reference):
            out = self._run(batch, feeds)
            self.runs += 1
            for i in self._floats:
                r = np.asarray(ref[i], np.float64)
                d = np.asarray(out[i], np.float64) - r
                norm = float((r * r).sum())
                total += float((d * d).sum()) / norm if norm > 0 else float((d * d).sum() > 0)
                count += 1
        return total / max(count, 1)
