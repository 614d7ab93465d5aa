"""Peak activation memory by a liveness analysis over the graph's topological order.

A tensor is live from the step of the node that makes it (step 0 for graph inputs) to
the step of its last consumer (the end for graph outputs); a node's inputs and outputs are
live together while it runs. The peak is the largest sum of live tensors' bytes over the
steps. Weights (initializers, Constant outputs) are not activations: they are reported
beside the peak as a separate figure. A node with a subgraph adds the subgraph's own peak
at its step, and keeps live every outer tensor its body reads.

This is what a runtime that frees each tensor right after its last use would need, with no
in-place reuse and no allocator slack: a lower bound for the runtime's real arena.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxopt.analysis.cost import Count, Poly, ValueShape, dtype_bits, numel, to_json, value_shapes

# When dims are symbolic the worst step is chosen with every symbol set to this value.
SYMBOL_PROBE = 64


@dataclass
class ActivationMemory:
    peak: Count  # bytes of live activations at the worst step
    weights: int  # bytes of constant tensors
    at_node: str | None  # the node running at the worst step
    live: list[tuple[str, int | str]]  # the biggest live tensors at that step (name, bytes)
    unsized: list[str]  # activations whose size the shapes do not give (counted as 0)

    @property
    def total(self) -> Count:
        return None if self.peak is None else self.peak + self.weights

    def to_json(self) -> dict:
        return {"peak_bytes": to_json(self.peak), "weight_bytes": self.weights,
                "total_bytes": to_json(self.total), "at_node": self.at_node,
                "largest_live": [{"name": n, "bytes": b} for n, b in self.live],
                "unsized_tensors": len(self.unsized)}


def tensor_bytes(s: ValueShape | None) -> Count:
    if s is None or s.shape is None or not s.elem_type:
        return None
    bits = dtype_bits(s.elem_type)
    n = numel(s.shape)
    if n is None or not bits:
        return None
    if bits % 8 == 0:
        return n * (bits // 8)
    # Sub-byte elements pack two to a byte; rounding up per tensor only matters when constant.
    return Poly((int(n) * bits + 7) // 8) if n.is_constant else n * bits // 8


def _probe(x: Poly) -> int:
    return x.value(default=SYMBOL_PROBE)


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads but does not define: the outer-scope tensors it captures."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                reads.add(name)
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                reads |= {n for n in _outer_reads(g) if n not in defined}
        defined.update(node.output)
    return reads


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.HasField("g"):
            out.append(a.g)
        out.extend(a.graphs)
    return out


def activation_memory(graph: onnx.GraphProto, shapes: dict[str, ValueShape] | None = None,
                      weight_bytes: int = 0, inferred: dict[str, ValueShape] | None = None) -> ActivationMemory:
    """Peak bytes of live activations of ``graph`` (nodes in their stored, topological order);
    ``inferred`` shapes take precedence over the graph's own value_info."""
    shapes = value_shapes(graph, shapes)
    if inferred:
        shapes.update(inferred)
    weights = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    steps = len(graph.node)
    born: dict[str, int] = {}
    last: dict[str, int] = {}
    for v in graph.input:
        if v.name not in weights:
            born[v.name] = 0
            last[v.name] = 0
    extra: list[Count] = [Poly(0)] * steps  # subgraph peaks, step by step
    for i, node in enumerate(graph.node):
        reads = [n for n in node.input if n]
        for body in _bodies(node):
            reads.extend(_outer_reads(body))
            inner = activation_memory(body, shapes).peak
            extra[i] = None if inner is None or extra[i] is None else _max(extra[i], inner)
        for name in reads:
            if name in born:
                last[name] = max(last[name], i)
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if name and name not in weights:
                born[name] = i
                last[name] = i
    for v in graph.output:
        if v.name in last:
            last[v.name] = max(steps - 1, 0)
    sizes = {name: tensor_bytes(shapes.get(name)) for name in born}
    unsized = [name for name, b in sizes.items() if b is None]
    # Sweep: +bytes at birth, -bytes after the last use.
    delta: list[Poly] = [Poly(0) for _ in range(steps + 1)]
    for name, b in sizes.items():
        if b is None:
            continue
        delta[born[name]] = delta[born[name]] + b
        delta[last[name] + 1] = delta[last[name] + 1] + b * -1
    live = Poly(0)
    peak, peak_step = Poly(0), None
    for i in range(steps):
        live = live + delta[i]
        here = live + (extra[i] if extra[i] is not None else Poly(0))
        if peak_step is None or _probe(here) > _probe(peak):
            peak, peak_step = here, i
    if steps == 0:  # inputs straight to outputs
        peak = sum((b for b in sizes.values() if b is not None), Poly(0))
    biggest: list[tuple[str, int | str]] = []
    if peak_step is not None:
        at = [(n, b) for n, b in sizes.items()
              if b is not None and born[n] <= peak_step <= last[n]]
        at.sort(key=lambda nb: -_probe(nb[1]))
        biggest = [(n, b.to_json()) for n, b in at[:5]]
    node = graph.node[peak_step] if peak_step is not None else None
    return ActivationMemory(peak=peak, weights=weight_bytes,
                            at_node=(node.name or node.op_type) if node is not None else None,
                            live=biggest, unsized=unsized)


def _max(a: Poly, b: Poly) -> Poly:
    return a if _probe(a) >= _probe(b) else b
