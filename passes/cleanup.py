"""Cleanup passes: lift Constant nodes into initializers, and remove dead code.

lift-constants
    A Constant node (default domain) whose value is a dense tensor or a value_float(s)/
    value_int(s) attribute becomes an initializer of the graph it sits in, so every later
    pass finds every weight in one place (the PP-OCR models keep all their weights in
    Constant nodes). Left alone: Constants whose output is a graph output (an output must
    be computed by a node), sparse and string values, and Constants inside local functions
    (a FunctionProto has no initializers).

eliminate-dead-code
    Nodes that contribute to no graph output, and initializers nothing reads, are removed
    in the main graph, in If/Loop/Scan bodies and in local functions. Graph inputs are
    never removed (that would change the model's interface).
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_op
from onnxopt.ir.constants import constant_node_payload
from onnxopt.ir.surgery import detach_nodes, replace_input, topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


@register_pass("lift-constants")
class LiftConstantsPass(Pass):
    """Turn Constant nodes into initializers, so every weight lives in one place."""

    lossless = True
    requires_ops = frozenset({"Constant"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # same tensors, same names

    def run(self, model, ctx) -> PassResult:
        lifted = 0
        for graph in model.graphs():
            output_ids = {id(t) for t in graph.outputs}
            removed = set()
            for node in graph.nodes:
                if not is_op(node, "Constant") or len(node.outputs) != 1:
                    continue
                out = node.outputs[0]
                if id(out) in output_ids:
                    continue
                values, export_dtype = constant_node_payload(node)
                if values is None:
                    continue
                const = gs.Constant(out.name, values, export_dtype=export_dtype)
                for consumer in list(out.outputs):
                    replace_input(consumer, out, const)
                node.outputs.clear()
                removed.add(id(node))
                lifted += 1
            if removed:  # one rebuild: list.remove per node would be quadratic
                graph.nodes = [n for n in graph.nodes if id(n) not in removed]
        return PassResult(changed=lifted > 0, stats={"lifted": lifted})


@register_pass("eliminate-dead-code")
class EliminateDeadCodePass(Pass):
    """Remove nodes and initializers that no graph output depends on."""

    lossless = True
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the tensors left keep theirs

    def run(self, model, ctx) -> PassResult:
        removed_nodes = removed_tensors = 0
        for graph in _live_graphs(model.graph):
            nodes, tensors = _sweep(graph)
            removed_nodes += nodes
            removed_tensors += tensors
        if model.graph.functions:  # functions a pass added (graph_io carries the model's own)
            model.graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=False,
                                remove_unused_graph_inputs=False, recurse_functions=True)
        # Initializers that no node read on import are kept aside by graph_io (so a model
        # passes through unchanged); dead-code elimination is where they go.
        unread = 0
        for graph in model.graphs():
            kept = getattr(graph, "unused_initializers", None)
            if kept:
                unread += len(kept)
                kept.clear()
        return PassResult(changed=removed_nodes > 0 or removed_tensors > 0 or unread > 0,
                          stats={"removed_nodes": removed_nodes, "removed_tensors": removed_tensors,
                                 "removed_unread_initializers": unread})


def _bodies(node: gs.Node) -> list[gs.Graph]:
    out = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, gs.Graph))
    return out


def _read_inside(body: gs.Graph, into: set[int]) -> None:
    """ids of every tensor a body (and the bodies in it) reads or returns: the outer ones
    among them are inputs of the node that holds the body."""
    for t in body.outputs:
        into.add(id(t))
    for node in body.nodes:
        for t in node.inputs:
            into.add(id(t))
        for sub in _bodies(node):
            _read_inside(sub, into)


def _sweep(graph: gs.Graph) -> tuple[int, int]:
    """Remove the nodes of ``graph`` no output of it depends on; (nodes, tensors) removed."""
    needed = {id(t) for t in graph.outputs}
    dead = []
    for node in reversed(topological_order(graph)):
        if any(id(t) in needed for t in node.outputs):
            for t in node.inputs:
                needed.add(id(t))
            for body in _bodies(node):
                _read_inside(body, needed)
        else:
            dead.append(node)
    if not dead:
        return 0, 0
    gone = {id(n) for n in dead}
    touched = {id(t): t for n in dead for t in list(n.inputs) + list(n.outputs)}
    detach_nodes(dead)
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]
    # tensors left without a producer or reader (and not graph inputs or outputs) are gone
    io = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    removed = sum(1 for key, t in touched.items() if key not in io and not t.inputs and not t.outputs)
    return len(dead), removed


def _live_graphs(graph: gs.Graph):
    """``graph``, then the bodies of its nodes that survive, depth first (a body of a
    removed node is not swept)."""
    yield graph
    for node in list(graph.nodes):
        for body in _bodies(node):
            yield from _live_graphs(body)
