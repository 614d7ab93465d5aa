"""A digest of everything a pass can change in a model, to catch a dishonest ``changed``.

The pass manager takes one before and after every pass (in every run, not only under
--verify) and ``onnxopt.testing.run_pass`` does the same, so a pass that rewrites
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

import numpy as np
import onnx_graphsurgeon as gs


def model_digest(model) -> int:
    """A digest of the model's graph(s) and opset imports (see the module docstring).

    Python's own hash of one big tuple: fast (a 30k-node graph in about 0.1 s) and only ever
    compared within one process.
    """
    parts: list = [tuple(model.opset_import)]
    _graph_parts(model.graph, parts)
    return hash(tuple(parts))


def _graph_parts(graph: gs.Graph, parts: list) -> None:
    seen: set[int] = set()
    add = parts.append
    Constant = gs.Constant
    value = _value

    def constant(t) -> None:
        key = id(t)
        if key not in seen:
            seen.add(key)
            shape = t.shape
            add((t.name, id(t._values), t._export_dtype, tuple(shape) if shape is not None else None))

    def variable(t) -> None:
        d = t.__dict__
        shape = d.get("shape")
        add((d["name"], d.get("dtype"), tuple(shape) if shape is not None else None))

    add(("graph", graph.name, tuple([t.name for t in graph.inputs]), tuple([t.name for t in graph.outputs])))
    for t in list(graph.inputs) + list(graph.outputs):
        constant(t) if isinstance(t, Constant) else variable(t)
    # A variable is written by one node (or is a graph input): it is covered there. Only
    # constants, read by any number of nodes, need the "seen" check.
    for node in graph.nodes:
        inputs, outputs, attrs = node.inputs, node.outputs, node.attrs
        if attrs:
            items = attrs.items()
            attr_part = tuple([(k, value(v, parts)) for k, v in (sorted(items) if len(attrs) > 1 else items)])
        else:
            attr_part = ()
        add((node.op, node.domain, node.name, tuple([t.name for t in inputs]), tuple([t.name for t in outputs]),
             attr_part))
        for t in inputs:
            if type(t) is Constant or (type(t) is not gs.Variable and isinstance(t, Constant)):
                constant(t)
        for t in outputs:
            if type(t) is Constant or isinstance(t, Constant):
                constant(t)
            else:
                variable(t)
    unread = getattr(graph, "unused_initializers", None)
    if unread:
        parts.append(("unread", tuple(unread)))
    parts.append(("functions", tuple(f.name for f in graph.functions)))


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
