"""Walking a graph and the subgraphs inside it."""

from __future__ import annotations

from typing import Iterator

import onnx_graphsurgeon as gs

# The default-domain ops that carry graph attributes; ops of other domains may too.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph``, then every subgraph inside it, depth first."""
    yield graph
    for node in graph.nodes:
        if node.op not in _SUBGRAPH_OPS and node.domain in (None, "", "ai.onnx"):
            continue  # no other standard op has a graph attribute: skip its attributes
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)



def count_nodes(graph: gs.Graph) -> int:
    """Nodes of the graph and of every subgraph inside it."""
    return sum(len(g.nodes) for g in iter_graphs(graph))


def count_params(graph: gs.Graph) -> int:
    """Elements of every constant tensor (initializers and Constant-node values)."""
    seen, total = set(), 0
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    total += _volume(t.shape)
            if node.op == "Constant":
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        total += _volume(value.shape)
                    elif isinstance(value, (list, tuple)):
                        total += len(value)
                    elif isinstance(value, (int, float)):
                        total += 1
    return total


def _volume(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d) if isinstance(d, int) else 1
    return n


def op_types(graph: gs.Graph) -> set[tuple[str, str]]:
    """(domain, op type) of every node, subgraphs included ("" for the default domain)."""
    return {(node.domain or "", node.op) for g in iter_graphs(graph) for node in g.nodes}


def node_key(node: gs.Node) -> str:
    """How options name a node: its name, or its first output's name when it has none."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def named(node: gs.Node, keys) -> bool:
    """Whether ``keys`` name ``node`` (by its name or by any of its outputs' names)."""
    return bool(keys) and ((node.name and node.name in keys) or any(t.name in keys for t in node.outputs))
