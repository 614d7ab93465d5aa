"""A small model of a few nodes of a graph, to run them alone in onnxruntime.

Constant folding evaluates batches of nodes this way, and the fidelity floor re-runs one
layer in float on the inputs it saw in a quantized model. Each input the nodes read (and
do not compute themselves) is either an initializer (``constants``) or a typed graph input
(``inputs``: name -> an example array, for its type and shape); every output they write is
an output of the small model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def submodel(nodes: list[gs.Node], constants: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
             opset_import, ir_version: int) -> onnx.ModelProto:
    """The model of ``nodes`` (producers first) with ``constants`` as initializers and
    ``inputs`` as graph inputs (typed from their example arrays)."""
    from onnxopt.ir.graph_io import export_node

    initializers = [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()]
    graph_inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                       value.shape) for name, value in inputs.items()]
    outputs = []
    for node in nodes:
        for o in node.outputs:
            if o.name:
                vi = onnx.ValueInfoProto()
                vi.name = o.name  # no type: onnxruntime returns it as computed
                outputs.append(vi)
    graph = onnx.helper.make_graph([export_node(n) for n in nodes], "submodel", graph_inputs, outputs,
                                   initializer=initializers)
    proto = onnx.helper.make_model(graph, opset_imports=list(opset_import))
    proto.ir_version = ir_version
    return proto


def upstream(proto: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``proto`` holding only the main-graph nodes that ``names`` depend on, with no
    graph outputs (a Capture adds the ones it reads): running it computes ``names`` and
    nothing after them, so reading early tensors does not pay for the whole model."""
    graph = proto.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed, stack = set(), [n for n in names if n in producer]
    seen = set(stack)
    while stack:
        i = producer[stack.pop()]
        if i in needed:
            continue
        needed.add(i)
        node = graph.node[i]
        inputs = list(node.input)
        for attr in node.attribute:  # names a subgraph reads from this scope
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                inputs.extend(_outer_names(sub))
        for name in inputs:
            if name and name in producer and name not in seen:
                seen.add(name)
                stack.append(name)
    used = {n for i in needed for n in graph.node[i].input}
    for i in needed:
        for attr in graph.node[i].attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used.update(_outer_names(sub))
    out = onnx.ModelProto()  # filled field by field: no copy of the nodes and weights left out
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(proto, field))
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node[i] for i in sorted(needed))
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in used)
    g.input.extend(graph.input)
    g.value_info.extend(v for v in graph.value_info if v.name in seen or v.name in used)
    return out


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define (from the enclosing scopes)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        defined.update(o for o in node.output if o)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                read.update(_outer_names(sub))
    return read - defined
