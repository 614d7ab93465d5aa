"""Merge duplicate initializers and common subexpressions.

eliminate-duplicate
    Initializers: constants with the same element type, shape and bytes (hashed, then
    compared) become one; readers of the others read the first. Constants that are graph
    inputs or outputs keep their own name.

    Common subexpressions: two nodes with the same op, domain, attributes and the same
    input tensors (after earlier merges) compute the same values; the later one goes and
    its readers read the first one's outputs. Nodes are visited producers first, each
    keyed on inputs that are already merged, so one visit reaches the fixed point in
    linear time. Never merged: random ops, ``Dropout``, nodes of domains other than the
    default and ``ai.onnx.ml`` (a custom op may have side effects), nodes with a subgraph
    attribute, nodes without outputs, and a node whose output is a graph output (its
    name must stay).

    Both are done in the main graph and in every If/Loop/Scan body (a body's nodes are
    merged among themselves; a body may read a constant merged in an enclosing graph).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.registry import register_pass

from onnxopt.ir.constants import per_values
from onnxopt.ir.ops import NONDETERMINISTIC
from onnxopt.ir.surgery import detach_nodes, rewire, topological_order

logger = logging.getLogger(__name__)

CSE_DOMAINS = (None, "", "ai.onnx", "ai.onnx.ml")
NEVER_MERGE = NONDETERMINISTIC | {"Dropout"}


def _payload(t: gs.Constant) -> tuple[tuple, bytes | memoryview] | None:
    """(what identifies the encoding, the value's bytes) of a dense constant; None for sparse,
    string and external values. Both encodings of a value in a TensorProto (raw_data, typed
    fields such as float_data) give the same bytes (through numpy for the typed ones)."""
    values = t._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if proto.data_location != 0:
            return None
        data = proto.raw_data if proto.HasField("raw_data") else numpy_helper.to_array(proto).tobytes()
        return ("onnx", proto.data_type, tuple(proto.dims)), data
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "OUS":
            return None
        return (("np", str(values.dtype), str(t.export_dtype), values.shape),
                memoryview(np.ascontiguousarray(values)).cast("B"))
    return None


def constant_key(t: gs.Constant) -> tuple | None:
    """(element type, shape, digest of the bytes) of a constant; None when it is sparse."""
    payload = _payload(t)
    if payload is None:
        return None
    kind, data = payload
    return kind + (hashlib.sha256(data).digest(),)


_SAMPLE = 64  # bytes read from each of a few places of a large constant


def _sample_key(t: gs.Constant) -> tuple | None:
    """A cheap key two equal constants share: their size and some of their bytes."""
    payload = _payload(t)
    if payload is None:
        return None
    data = payload[1]
    n = len(data)
    if n <= 4 * _SAMPLE:
        return (n, bytes(data))
    mid = n // 2
    return (n, bytes(data[:_SAMPLE]), bytes(data[mid:mid + _SAMPLE]), bytes(data[-_SAMPLE:]))


def _attr_key(value):
    """A hashable key for an attribute value; None when it cannot be compared exactly."""
    if isinstance(value, gs.Graph):
        return None
    if isinstance(value, gs.Constant):
        return constant_key(value)
    if isinstance(value, (list, tuple)):
        items = tuple(_attr_key(v) for v in value)
        return None if any(i is None for i in items) else ("list", items)
    if isinstance(value, float):
        return ("float", np.float32(value).tobytes())  # NaN == NaN by bytes
    if isinstance(value, (int, str, bytes, bool)):
        return (type(value).__name__, value)
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, value.tobytes())
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value).__name__, repr(value))


@register_pass("eliminate-duplicate")
class EliminateDuplicatePass(Pass):
    """Merge identical initializers and nodes that compute the same thing."""

    lossless = True
    preserves = frozenset({"shapes", "symbolic-shapes"})  # merged tensors had equal shapes

    def run(self, model, ctx) -> PassResult:
        graphs = list(model.graphs())
        output_ids = {id(t) for g in graphs for t in g.outputs}
        input_ids = {id(t) for g in graphs for t in g.inputs}
        merged_constants = self.merge_constants(graphs, output_ids | input_ids)
        merged_nodes = sum(self.merge_nodes(g, output_ids) for g in graphs)
        stats = {"merged_initializers": merged_constants, "merged_nodes": merged_nodes}
        return PassResult(changed=merged_constants + merged_nodes > 0, stats=stats)

    @staticmethod
    def merge_constants(graphs: list[gs.Graph], protected: set[int]) -> int:
        # Group by (dtype, shape) first, then by a sample of the bytes, so that only
        # constants that could match are hashed whole (weights of equal shape in every layer
        # of a transformer differ in their first bytes already).
        by_size: dict[tuple, list[gs.Constant]] = defaultdict(list)
        seen = set()
        for g in graphs:
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and id(t) not in seen and id(t) not in protected:
                        seen.add(id(t))
                        by_size[(str(t.dtype), tuple(t.shape))].append(t)
        merged = 0
        for group in by_size.values():
            if len(group) < 2:
                continue
            by_sample: dict[tuple, list[gs.Constant]] = defaultdict(list)
            for t in group:
                sample = per_values(t, "sample-key", _sample_key)
                if sample is not None:
                    by_sample[sample].append(t)
            for candidates in by_sample.values():
                if len(candidates) < 2:
                    continue
                first: dict[tuple, gs.Constant] = {}
                for t in candidates:
                    key = per_values(t, "constant-key", constant_key)
                    if key is None:
                        continue
                    keep = first.setdefault(key, t)
                    if keep is t:
                        continue
                    rewire(t, keep)
                    merged += 1
        return merged

    @staticmethod
    def merge_nodes(graph: gs.Graph, output_ids: set[int]) -> int:
        first: dict[tuple, gs.Node] = {}
        gone, gone_nodes = set(), []
        for node in topological_order(graph):
            key = _node_key(node)
            if key is None:
                continue
            keep = first.setdefault(key, node)
            if keep is node:
                continue
            if any(id(o) in output_ids for o in node.outputs):
                continue
            for old, new in zip(node.outputs, keep.outputs):
                if old.name:
                    rewire(old, new)
            gone.add(id(node))
            gone_nodes.append(node)
        detach_nodes(gone_nodes)
        if gone:
            graph.nodes[:] = [n for n in graph.nodes if id(n) not in gone]
        return len(gone)


def _node_key(node: gs.Node) -> tuple | None:
    if node.domain not in CSE_DOMAINS or node.op in NEVER_MERGE or not node.outputs:
        return None
    # Optional outputs left empty differ from ones that are computed: keep the pattern.
    pattern = tuple(bool(o.name) for o in node.outputs)
    attrs = []
    for name in sorted(node.attrs):
        k = _attr_key(node.attrs[name])
        if k is None:
            return None
        attrs.append((name, k))
    inputs = tuple(id(t) if t.name else None for t in node.inputs)
    return (node.op, node.domain or "", inputs, tuple(attrs), pattern)
