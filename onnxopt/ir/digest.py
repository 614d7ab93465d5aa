"""A digest of everything a pass can change in a model, to catch a dishonest ``changed``.

The pass manager takes one before and after every pass (in every run, not only under
--verify) and ``onnxopt.testing.check_pass_contract`` does the same, so a pass that rewrites
the graph and reports no change is caught either way.

What it covers: the opset imports; for the main graph and every subgraph, the inputs and
outputs, every node (op, domain, name, attributes, the tensors it reads and writes, in
order) and every tensor it names (kind, dtype, shape), and the initializers kept aside as
unread. Constant values are covered by identity, not content: hashing every weight after
every pass would cost more than most passes. That is exact under the rewrite contract (a
pass builds new arrays and never mutates a constant's array in place, see
``onnxopt.ir.rewrite``): a replaced value is a new object.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs


def model_digest(model) -> str:
    """A hex digest of the model's graph(s) and opset imports (see the module docstring)."""
    parts: list = [tuple(model.opset_import)]
    _graph_parts(model.graph, parts)
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _graph_parts(graph: gs.Graph, parts: list) -> None:
    seen: set[int] = set()
    parts.append(("graph", graph.name, _names(graph.inputs), _names(graph.outputs)))
    for t in list(graph.inputs) + list(graph.outputs):
        _tensor_part(t, seen, parts)
    for node in graph.nodes:
        parts.append((node.op, node.domain, node.name, _names(node.inputs), _names(node.outputs),
                      tuple(sorted((k, _value(v, parts)) for k, v in node.attrs.items()))))
        for t in node.inputs:
            _tensor_part(t, seen, parts)
        for t in node.outputs:
            _tensor_part(t, seen, parts)
    unread = getattr(graph, "unused_initializers", None)
    if unread:
        parts.append(("unread", tuple(unread)))
    parts.append(("functions", tuple(f.name for f in graph.functions)))


def _names(tensors) -> tuple:
    return tuple([t.name for t in tensors])


def _tensor_part(t: gs.Tensor, seen: set, parts: list) -> None:
    if id(t) in seen:
        return
    seen.add(id(t))
    if isinstance(t, gs.Constant):
        parts.append(("c", t.name, id(t._values), str(t.export_dtype), tuple(t.shape)))
    else:
        shape = tuple(t.shape) if t.shape is not None else None
        parts.append(("v", t.name, str(t.dtype), shape))


def _value(value, parts: list):
    """An attribute value as something hashable; subgraphs are added to ``parts``."""
    if isinstance(value, gs.Graph):
        _graph_parts(value, parts)
        return ("subgraph",)
    if isinstance(value, gs.Constant):
        return ("tensor", value.name, id(value._values))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_value(v, parts) for v in value)
    return value if isinstance(value, (str, bytes, int, float, bool, type(None))) else repr(value)
