"""fuse-slices: a Slice of a Slice on other axes becomes one Slice.

``Slice(Slice(x, s1, e1, a1, t1), s2, e2, a2, t2)`` where the two slices touch disjoint
axes is ``Slice(x, s1+s2, e1+e2, a1+a2, t1+t2)`` (lists concatenated): slicing one axis
does not move the indices of another. Exporters write such pairs for ``x[:, a:b, c:]``
(Silero VAD's STFT has two).

Required: opset >= 10 (starts/ends/axes/steps are inputs), every one of them a constant
1-D integer tensor, axes given explicitly or defaulted, all non-negative or all negative
(mixed signs cannot be compared without the rank), disjoint, and the first Slice read
only by the second.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_op, is_present, producer_op, single_use
from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import fresh_name, new_constant
from onnxopt.ir.rewrite import RewritePass, RewriteRule
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


def _params(node: gs.Node) -> dict[str, np.ndarray] | str:
    """starts, ends, axes, steps of a Slice as int64 arrays, or the reason they are unknown."""
    if len(node.inputs) < 3:
        return "Slice without starts/ends inputs"
    values = {}
    for key, index in (("starts", 1), ("ends", 2), ("axes", 3), ("steps", 4)):
        if not is_present(node, index):
            continue
        value = constant_value(node.inputs[index])
        if value is None or value.ndim != 1 or value.dtype.kind not in "iu":
            return f"Slice {key} is not a constant 1-D integer tensor"
        values[key] = value.astype(np.int64)
    n = len(values["starts"])
    values.setdefault("axes", np.arange(n, dtype=np.int64))
    values.setdefault("steps", np.ones(n, dtype=np.int64))
    if any(len(v) != n for v in values.values()):
        return "Slice parameters differ in length"
    return values


class MergeSlicePair(RewriteRule):
    """Slice(Slice(x)) on disjoint axes -> one Slice."""

    name = "slice-pair"
    root_ops = ("Slice",)

    def match(self, node, graph):
        if not is_op(node, "Slice"):
            return None
        first = producer_op(node, 0, "Slice")
        if first is None:
            return None
        return {"first": first, "second": node}

    def check(self, match, model, ctx):
        if model.opset < 10:
            return "opset below 10 (Slice parameters are attributes)"
        first, second, graph = match["first"], match["second"], match["graph"]
        if not single_use(first.outputs[0], graph):
            return "first Slice has other readers"
        p1, p2 = _params(first), _params(second)
        for p in (p1, p2):
            if isinstance(p, str):
                return p
        axes = np.concatenate([p1["axes"], p2["axes"]])
        if not ((axes >= 0).all() or (axes < 0).all()):
            return "axes mix negative and non-negative values"
        if len(set(axes.tolist())) != len(axes):
            return "the two Slices share an axis"
        match["merged"] = {k: np.concatenate([p1[k], p2[k]]) for k in ("starts", "ends", "axes", "steps")}
        return None

    def rewrite(self, match, graph):
        first, second, merged = match["first"], match["second"], match["merged"]
        base = second.name or "slice"
        inputs = [first.inputs[0]] + [new_constant(graph, f"{base}_{k}", merged[k])
                                      for k in ("starts", "ends", "axes", "steps")]
        fused = gs.Node("Slice", name=fresh_name(graph, base), inputs=inputs)
        take_outputs(second, fused)
        return [fused]


@register_pass("fuse-slices")
class FuseSlicesPass(RewritePass):
    """Merge a Slice of a Slice on disjoint axes into one Slice."""

    lossless = True
    requires_ops = frozenset({"Slice"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the merged Slice writes the same tensor
    rules = (MergeSlicePair(),)
