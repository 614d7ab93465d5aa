"""Is a graph well formed? The load-time check of a ModelProto, and the cheap check the
pass manager runs on the graphsurgeon graph after every change.

graphsurgeon imports a cyclic graph, a doubly defined tensor or a dangling input without a
word, and passes would then rewrite garbage; ``check_proto`` refuses such a model at load
(ModelError naming the file, node or tensor), in linear time.
"""

from __future__ import annotations

import functools

import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import ModelError
from onnxopt.ir.graphs import iter_graphs


def check_proto(proto: onnx.ModelProto, where: str) -> None:
    """Raise ModelError when ``proto`` cannot be optimized safely (see the module docstring)."""
    if not proto.opset_import:
        raise ModelError(f"{where}: model imports no opset")
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            newest = onnx.defs.onnx_opset_version()
            if imp.version > newest:
                raise ModelError(
                    f"{where}: opset {imp.version} of the default domain is newer than the "
                    f"installed onnx supports ({newest})")
    opset = next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), None)
    functions = {(f.domain, f.name) for f in proto.functions}
    check_graph_structure(proto.graph, where, opset, functions)


def check_graph_structure(graph: onnx.GraphProto, where: str, opset: int | None,
                          functions: set = frozenset(), outer: frozenset = frozenset()) -> None:
    """Raise ModelError for duplicate tensor names, dangling inputs, cycles, unknown ops
    of the default domain and tensors whose data does not fit their declared shape."""
    defined = {v.name for v in graph.input}
    seen_init: set[str] = set()
    for t in graph.initializer:
        if t.name in seen_init:
            raise ModelError(f"{where}: initializer '{t.name}' is defined twice")
        seen_init.add(t.name)
        _check_tensor_data(t, where, f"initializer '{t.name}'")
    defined |= seen_init
    defined.update(s.values.name for s in graph.sparse_initializer)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in defined:
                first = (f"node {_node_label(graph.node[producer[name]])}" if name in producer
                         else "a graph input or initializer")
                raise ModelError(f"{where}: tensor '{name}' is defined twice: by {first} and by "
                                 f"node {_node_label(node)}")
            producer[name] = i
    visible = outer | defined | producer.keys()
    deps: list[set[int]] = []
    for node in graph.node:
        needs = set()
        for name in node.input:
            if name and name not in visible:
                raise ModelError(f"{where}: node {_node_label(node)} reads '{name}', which no node, "
                                 "graph input or initializer produces")
            if name in producer:
                needs.add(producer[name])
        if node.domain in ("", "ai.onnx") and ("", node.op_type) not in functions \
                and (node.domain, node.op_type) not in functions and opset is not None:
            _check_known_op(node, where, opset)
        for attr in node.attribute:
            if attr.HasField("t"):
                _check_tensor_data(attr.t, where, f"attribute '{attr.name}' of node {_node_label(node)}")
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                check_graph_structure(sub, where, opset, functions, frozenset(visible))
                needs.update(producer[n] for n in _names_read(sub) if n in producer)
        deps.append(needs)
    _check_acyclic(graph, deps, where)
    for out in graph.output:
        if out.name not in visible:
            raise ModelError(f"{where}: graph output '{out.name}' is produced by no node, input or initializer")


def _node_label(node: onnx.NodeProto) -> str:
    return f"'{node.name or (node.output[0] if node.output else '?')}' ({node.op_type})"


def _check_known_op(node: onnx.NodeProto, where: str, opset: int) -> None:
    problem = _op_problem(node.op_type, opset)
    if problem == "unknown":
        raise ModelError(f"{where}: node {_node_label(node)} uses op '{node.op_type}', which the "
                         "default ONNX domain does not define (a custom op needs its own domain)")
    if problem == "too new":
        raise ModelError(f"{where}: node {_node_label(node)}: op '{node.op_type}' does not exist at "
                         f"opset {opset}, which the model imports")


@functools.lru_cache(maxsize=None)
def _op_problem(op_type: str, opset: int) -> str | None:
    """Schema lookups are slow next to a dict: a model of 100k nodes has a few dozen op types."""
    if not onnx.defs.has(op_type):
        return "unknown"
    try:
        onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return "too new"
    return None


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    names.update(o.name for o in graph.output)
    return names


def _check_acyclic(graph: onnx.GraphProto, deps: list[set[int]], where: str) -> None:
    """Kahn's algorithm; on a cycle, name a node that lies on it."""
    users: list[list[int]] = [[] for _ in deps]
    indegree = [0] * len(deps)
    for i, needs in enumerate(deps):
        for j in needs:
            users[j].append(i)
            indegree[i] += 1
    ready = [i for i, d in enumerate(indegree) if d == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users[i]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    if done == len(deps):
        return
    # Walk back through unfinished producers until a node repeats: that node is on a cycle.
    node = next(i for i, d in enumerate(indegree) if d > 0)
    visited: set[int] = set()
    while node not in visited:
        visited.add(node)
        node = next(j for j in deps[node] if indegree[j] > 0)
    raise ModelError(f"{where}: the graph has a cycle through node {_node_label(graph.node[node])}")


def _check_tensor_data(t: onnx.TensorProto, where: str, what: str) -> None:
    """The stored data holds exactly as many elements as the declared shape."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return  # located (and length-checked) by storage.locate_external_data
    count = 1
    for d in t.dims:
        count *= d
    if t.HasField("raw_data") or t.raw_data:
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
        if bits is None and getattr(onnx.TensorProto, "FLOAT4E2M1", None) == t.data_type:
            bits = 4
        if bits is not None:
            expected = (count * bits + 7) // 8
        else:
            try:
                expected = count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:
                return  # a type numpy has no size for (strings never use raw_data)
        if len(t.raw_data) != expected:
            raise ModelError(f"{where}: {what} declares shape {list(t.dims)} ({expected} bytes) "
                             f"but holds {len(t.raw_data)} bytes")
        return
    fields = {"float_data": t.float_data, "int32_data": t.int32_data, "int64_data": t.int64_data,
              "double_data": t.double_data, "uint64_data": t.uint64_data, "string_data": t.string_data}
    held = max(len(v) for v in fields.values())
    if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        held //= 2
    elif t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and held * 2 in (count, count + 1):
        return  # int4 in int32_data is packed two a value
    if held != count:
        raise ModelError(f"{where}: {what} declares shape {list(t.dims)} ({count} elements) "
                         f"but holds {held}")



def structural_problem(graph: gs.Graph) -> str | None:
    """A cheap check after every change: every input produced or constant, no cycle.

    Linear in the graph's size: one walk checks that every node of the main graph reads
    only what graph inputs, constants or earlier nodes provide. Only when a pass left
    nodes out of order does graphsurgeon's (slower) toposort run, to reorder them or to
    find a cycle.
    """
    graphs = list(iter_graphs(graph))
    available = set()
    for sub in graphs:
        available.update(t.name for t in sub.inputs)
        for node in sub.nodes:
            available.update(t.name for t in node.outputs)
    for sub in graphs:
        for node in sub.nodes:
            for t in node.inputs:
                if t.name and not isinstance(t, gs.Constant) and t.name not in available:
                    return f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces"
    for out in graph.outputs:
        if not isinstance(out, gs.Constant) and out.name not in available:
            return f"graph output '{out.name}' is no longer produced"
    if not _in_order(graph):
        try:
            graph.toposort(recurse_subgraphs=False)
        except Exception as exc:
            return f"graph is no longer a DAG ({exc})"
        if not _in_order(graph):
            return "graph is no longer a DAG (its nodes cannot be ordered)"
    return None


def _in_order(graph: gs.Graph) -> bool:
    """True when each node of ``graph`` reads only tensors ready before it."""
    ready = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and id(t) not in ready and t.inputs:
                return False  # produced by a node of this graph that comes later (or a cycle)
        ready.update(id(t) for t in node.outputs)
    return True
