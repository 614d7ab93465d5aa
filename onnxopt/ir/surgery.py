"""Graph order and surgery: the edits every pass makes, in time linear in what they touch.

graphsurgeon keeps each tensor's producer and consumer lists in step with the nodes'
input and output lists, but its list methods remove one link by a linear scan that calls
``Node.__eq__`` (structural, so it may unlink a look-alike node); these helpers edit the
links by identity instead.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes producers first, without reordering ``graph.nodes``.

    Exported graphs are almost always sorted already; then the given order is returned.
    A graph with a cycle (invalid) keeps its given order.
    """
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    get = index.get
    for i, n in enumerate(nodes):  # the common case, checked without building anything
        for t in n.inputs:
            producers = t.inputs
            if producers and (get(id(producers[0]), -1) > i):
                break
        else:
            continue
        break
    else:
        return list(nodes)
    deps = [{index[id(t.inputs[0])] for t in n.inputs if t.inputs and id(t.inputs[0]) in index} - {i}
            for i, n in enumerate(nodes)]
    indegree = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i in range(len(nodes)) if indegree[i] == 0][::-1]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for k in users[i]:
            indegree[k] -= 1
            if indegree[k] == 0:
                ready.append(k)
    if len(order) != len(nodes):
        return list(nodes)
    return [nodes[i] for i in order]


def dependency_levels(graph: gs.Graph, items: list, node_of) -> list[list]:
    """``items`` (each with a node of ``graph``: ``node_of(item)``) grouped by level: an item
    comes one level after the nearest items upstream of it, so items of one level depend on
    none of their own level or a later one. Layer-by-layer refits use it: a level's inputs
    are final once the levels before it are refitted, and a level's layers share one run."""
    wanted: dict[int, list] = {}
    for item in items:
        wanted.setdefault(id(node_of(item)), []).append(item)
    depth: dict[int, int] = {}  # id(node) -> levels of items up to and including it
    for node in topological_order(graph):
        d = max((depth.get(id(t.inputs[0]), 0) for t in node.inputs if t.inputs), default=0)
        depth[id(node)] = d + (1 if id(node) in wanted else 0)
    levels: dict[int, list] = {}
    for item in items:
        levels.setdefault(depth.get(id(node_of(item)), 1), []).append(item)
    return [levels[k] for k in sorted(levels)]


def detach_nodes(nodes) -> None:
    """Unlink ``nodes`` from every tensor they read or write (they keep no links)."""
    gone = {id(n) for n in nodes}
    tensors = {}
    for node in nodes:
        for t in list(node.inputs) + list(node.outputs):
            tensors[id(t)] = t
        list.clear(node.inputs)
        list.clear(node.outputs)
    for t in tensors.values():
        for links in (t.inputs, t.outputs):
            kept = [n for n in links if id(n) not in gone]
            if len(kept) != len(links):
                list.clear(links)
                list.extend(links, kept)


def remove_nodes(graph: gs.Graph, nodes) -> None:
    """Detach ``nodes`` and drop them from ``graph.nodes`` (one rebuild of the list)."""
    gone = {id(n) for n in nodes}
    if not gone:
        return
    detach_nodes(nodes)
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


def rewire(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` (in this graph or a body) reads ``new`` instead."""
    users = list(old.outputs)
    list.clear(old.outputs)
    for user in users:
        for i, t in enumerate(user.inputs):
            if t is old:
                list.__setitem__(user.inputs, i, new)
                list.append(new.outputs, user)


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """``node`` reads ``new`` wherever it read ``old`` (other readers of ``old`` stay)."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def take_outputs(old: gs.Node, new: gs.Node, count: int | None = None) -> None:
    """Make ``new`` compute ``old``'s output tensors (same objects, same names).

    With ``count``, only the first ``count`` outputs move (the caller has checked that the
    others, such as BatchNormalization's training outputs, are unused).
    """
    outputs = list(old.outputs)[:count]
    old.outputs.clear()
    new.outputs.clear()
    new.outputs.extend(outputs)
