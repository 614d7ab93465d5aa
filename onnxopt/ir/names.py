"""Fresh names for the tensors and nodes a pass creates.

A new name must be unique in every scope it can be seen from, so a ``NameTable`` covers
a graph and every subgraph inside it (built from the main graph, it covers the model). The
names in use are collected on first use, and each base counts on from its last suffix, so
naming thousands of new tensors stays linear. A table only knows the names that existed
when it was built and the ones it gave out: use one table for the whole of a rewrite.

    names = NameTable.of(model.graph)
    w = new_constant(names, "conv1_w_q", q)          # an initializer under a fresh name
    out = gs.Variable(names("conv1_out_dq"))

Rewrite rules name things through their graph (``fresh_name(graph, base)``,
``new_constant(graph, …)``): the rule engine makes one table for the whole model and
registers it for each graph while its rules run (``naming``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graphs import iter_graphs


class NameTable:
    """Names used in some graphs (and their subgraphs); ``table(base)`` gives a new one."""

    def __init__(self, graphs: list[gs.Graph]):
        self._graphs = graphs
        self._names: set[str] | None = None
        self._next: dict[str, int] = {}

    @classmethod
    def of(cls, graph: gs.Graph) -> "NameTable":
        """A table of ``graph`` and every subgraph inside it."""
        return cls(list(iter_graphs(graph)))

    def _collect(self) -> set[str]:
        names: set[str] = set()
        for g in self._graphs:
            for node in g.nodes:
                if node.name:
                    names.add(node.name)
                names.update(t.name for t in node.inputs)
                names.update(t.name for t in node.outputs)
            names.update(t.name for t in g.inputs)
            names.update(t.name for t in g.outputs)
            names.update(getattr(g, "unused_initializers", None) or ())
        return names

    def fresh(self, base: str) -> str:
        """A name not used yet, ``base`` itself or ``base_N``."""
        if self._names is None:
            self._names = self._collect()
        # counting on from the last suffix given for this base keeps many calls linear
        name, i = base, self._next.get(base, 0)
        if i:
            name = f"{base}_{i}"
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._next[base] = i + 1
        self._names.add(name)
        return name

    __call__ = fresh


# graph id -> the table of the rewrite running on it (see ``naming``)
_ACTIVE: dict[int, NameTable] = {}


@contextmanager
def naming(graphs: list[gs.Graph]) -> Iterator[NameTable]:
    """One table for ``graphs`` (all the graphs of a model), which ``fresh_name`` and
    ``new_constant`` use for any of them until the block ends."""
    table = NameTable(graphs)
    for graph in graphs:
        _ACTIVE[id(graph)] = table
    try:
        yield table
    finally:
        for graph in graphs:
            _ACTIVE.pop(id(graph), None)


def names_for(graph: gs.Graph) -> NameTable:
    """The table registered for ``graph`` by ``naming``, else a new one of it."""
    table = _ACTIVE.get(id(graph))
    return table if table is not None else NameTable.of(graph)


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used where ``graph`` can see, derived from ``base``."""
    return names_for(graph).fresh(base)


def new_constant(where: NameTable | gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    """An initializer holding ``values`` under a fresh name derived from ``base`` (named by a
    NameTable, or by the table of a graph as ``fresh_name`` does)."""
    names = where if isinstance(where, NameTable) else names_for(where)
    values = np.asarray(values)
    return gs.Constant(names.fresh(base), np.ascontiguousarray(values) if values.ndim else values)
