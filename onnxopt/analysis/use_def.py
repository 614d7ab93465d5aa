"""Producer/consumer facts on a graphsurgeon graph.

graphsurgeon already links each tensor to its producer (``tensor.inputs``) and consumers
(``tensor.outputs``) and keeps the links in step as passes rewire nodes, so use-def needs
no cache; these helpers name the questions passes ask.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes ``tensor`` (None for graph inputs and constants)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def outer_scope_names(graph: gs.Graph) -> set[str]:
    """Names a subgraph uses but does not define (it reads them from an enclosing graph)."""
    defined = {t.name for t in graph.inputs}
    for node in graph.nodes:
        defined.update(t.name for t in node.outputs)
    used = set()
    for node in graph.nodes:
        used.update(t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant))
    return used - defined


def is_op(node: gs.Node, *op_types: str) -> bool:
    """True when ``node`` is one of ``op_types`` of the default ONNX domain."""
    return node.op in op_types and node.domain in (None, "", "ai.onnx")


def producer_op(node: gs.Node, index: int, *ops: str) -> gs.Node | None:
    """The producer of ``node.inputs[index]`` when it is one of ``ops`` (default domain)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if not tensor.inputs:
        return None
    prod = tensor.inputs[0]
    return prod if is_op(prod, *ops) else None


def single_use(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Exactly one node reads ``tensor`` (subgraph readers count) and it is no graph output."""
    return len(tensor.outputs) == 1 and not is_graph_output(graph, tensor)


def unused(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Nothing reads ``tensor`` and it is not a graph output."""
    return not tensor.outputs and not is_graph_output(graph, tensor)


def is_present(node: gs.Node, index: int) -> bool:
    """Optional input ``index`` is given (exists and is not the empty name)."""
    return index < len(node.inputs) and bool(node.inputs[index].name)
