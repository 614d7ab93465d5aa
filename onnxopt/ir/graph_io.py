"""The faithful bridge between ``onnx.ModelProto`` and onnx-graphsurgeon's ``Graph``.

``import_graph`` builds the graph every pass rewrites; ``export_model`` turns it back into
a ModelProto, taking everything a Graph does not model (IR version, opset imports, local
functions, model metadata, training info, ...) from a template proto. A model whose graph
no pass touched comes back byte-identical.

We use graphsurgeon's IR but not its importer/exporter, which (0.6.1) lose or break:
non-tensor value types (optional/map crash the exporter), node and value doc strings and
metadata, attribute types (empty lists cannot be exported; SPARSE_TENSOR, TYPE_PROTO,
TENSORS, GRAPHS attributes are dropped), initializers that are also graph inputs (turned
into foldable constants), unreferenced initializers, int4/uint4/fnuz/string constants
re-encoded from numpy, and the exporter writes tensor names into the caller's protos.
tests/test_graph_io.py has a test for each; tools/conformance.py --peer compares.

How the extra information travels with the graph (and survives ``Graph.copy()``, which
the pass manager uses for rollback snapshots):

* ``OnnxGraph`` keeps a ``GraphSource``: the original value_info, input/output infos,
  initializer order, defaults of inputs that have an initializer, metadata, and the
  ``unused_initializers`` no node reads (kept so nothing is lost; a dead-code pass may
  clear that dict).
* ``OnnxNode`` keeps its source NodeProto (doc string, metadata, attribute types) and a
  snapshot of what it looked like; an unchanged node is written back as its source proto.
* ``OnnxVariable`` keeps the ValueInfoProto it came from (so a renamed optional input
  keeps its type) and fixes ``copy()``, which in gs resets ``type`` to tensor_type.
* Constants keep graphsurgeon's ``LazyValues``: the original TensorProto is written back
  (renamed on a copy when the tensor was renamed); nothing is decoded to numpy unless a
  pass reads ``.values``.

Local functions are not imported into ``graph.functions``: graphsurgeon's Function round
trip is lossy, so they are carried unchanged from the template. Functions a pass appends
to ``graph.functions`` are exported (with graphsurgeon's exporter) next to them.

An input that also has an initializer is imported as a graph input (a Variable, so no
pass folds it: a caller may feed it) whose default value is re-emitted on export.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import Message
from onnx import numpy_helper
from onnx_graphsurgeon.importers.onnx_importer import get_numpy_type
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.util import misc as gs_misc

logger = logging.getLogger(__name__)

_AP = onnx.AttributeProto

__all__ = ["import_graph", "export_model", "export_node", "copy_fields", "OnnxGraph", "OnnxNode", "OnnxVariable", "GraphSource"]


# --------------------------------------------------------------------------- IR classes


class OnnxVariable(gs.Variable):
    """A Variable that remembers the ValueInfoProto it was imported from (``info``).

    ``copy()`` keeps ``type`` (gs resets it to tensor_type) and ``info``. A renamed
    variable is still written with its original type structure and doc string.
    """

    info: onnx.ValueInfoProto | None = None

    def copy(self):
        t = OnnxVariable(self.name, self.dtype, self.shape, self.type)
        t.info = self.info
        return t


class OnnxNode(gs.Node):
    """A Node that remembers the NodeProto it came from.

    ``source`` gives the doc string, metadata and attribute types back on export;
    ``snapshot`` is (op, domain, name, input names, output names, attributes) at import,
    or None when the node has a subgraph. A node still equal to its snapshot is written
    back as its source proto.
    """

    source: onnx.NodeProto | None = None
    snapshot: tuple | None = None

    def copy(self, inputs=None, outputs=None, tensor_map=None):
        node = super().copy(inputs=inputs, outputs=outputs, tensor_map=tensor_map)
        node.__class__ = OnnxNode
        node.source = self.source
        node.snapshot = self.snapshot
        return node


# Building a 100k-node graph through the gs constructors costs seconds (every attribute
# goes through a Python __setattr__ and every list through SynchronizedList.extend). The
# importer instead fills the objects' __dict__ with exactly what the constructors would
# set; _fast_construction_matches() checks that against the installed graphsurgeon once
# and falls back to the constructors if its classes ever hold different state.
_SyncList = gs_misc.SynchronizedList


def _sync_list(parent: Any, field_name: str, items: list) -> list:
    sync = _SyncList.__new__(_SyncList)
    sync.parent_obj = parent
    sync.field_name = field_name
    list.extend(sync, items)
    for item in items:
        list.append(getattr(item, field_name), parent)
    return sync


def _fast_variable(name: str) -> OnnxVariable:
    t = object.__new__(OnnxVariable)
    t.__dict__.update(
        name=name,
        inputs=_sync_list(t, "outputs", []),
        outputs=_sync_list(t, "inputs", []),
        dtype=None,
        shape=None,
        type="tensor_type",
    )
    return t


def _fast_node(op: str, name: str, attrs: dict, inputs: list, outputs: list, domain, **extra) -> OnnxNode:
    node = object.__new__(OnnxNode)
    node.__dict__.update(
        op=op,
        name=name,
        attrs=attrs,
        inputs=_sync_list(node, "outputs", inputs),
        outputs=_sync_list(node, "inputs", outputs),
        domain=domain,
        **extra,
    )
    return node


def _state(obj: Any) -> dict:
    state = {}
    for key, value in vars(obj).items():
        if isinstance(value, _SyncList):
            value = ("sync", value.field_name, [id(v) for v in value], sorted(vars(value)))
        elif isinstance(value, gs.Tensor) or isinstance(value, gs.Node):
            value = id(value)
        state[key] = value
    return state


def _fast_construction_matches() -> bool:
    try:
        a, b = OnnxVariable("a"), _fast_variable("a")
        if _state(a) != _state(b) or type(a) is not type(b):
            return False
        x, y = OnnxVariable("x"), OnnxVariable("y")
        slow = OnnxNode(op="Relu", name="n", attrs={"k": 1}, inputs=[x], outputs=[y], domain=None)
        slow_in, slow_out = list(x.outputs), list(y.inputs)
        list.clear(x.outputs)
        list.clear(y.inputs)
        fast = _fast_node("Relu", "n", {"k": 1}, [x], [y], None)
        fast_state, slow_state = _state(fast), _state(slow)
        for state in (fast_state, slow_state):
            state["inputs"] = state["inputs"][:2] + state["inputs"][3:]
            state["outputs"] = state["outputs"][:2] + state["outputs"][3:]
        return (
            fast_state == slow_state
            and list(x.outputs) == [fast] and slow_in == [slow]
            and list(y.inputs) == [fast] and slow_out == [slow]
        )
    except Exception:  # noqa: BLE001 - any surprise means: use the constructors
        return False


@dataclass
class GraphSource:
    """What a GraphProto held that graphsurgeon's Graph has no field for."""

    proto: onnx.GraphProto | None = None  # for metadata_props, quantization_annotation, name
    initializer_rank: dict[str, int] = field(default_factory=dict)  # original order
    sparse_rank: dict[str, int] = field(default_factory=dict)
    input_defaults: dict[str, onnx.TensorProto] = field(default_factory=dict)
    value_info: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    input_info: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    output_info: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    # Initializers (dense or sparse) that no node or output of this graph reads.
    unused_initializers: dict[str, Message] = field(default_factory=dict)

    def copy(self) -> "GraphSource":
        # The protos are shared (never modified); the dicts a pass may edit are not.
        return GraphSource(
            proto=self.proto,
            initializer_rank=self.initializer_rank,
            sparse_rank=self.sparse_rank,
            input_defaults=dict(self.input_defaults),
            value_info=self.value_info,
            input_info=self.input_info,
            output_info=self.output_info,
            unused_initializers=dict(self.unused_initializers),
        )


class OnnxGraph(gs.Graph):
    """A Graph with its ``GraphSource`` and a faithful, fast ``copy()``."""

    def copy(self, tensor_map=None):
        """A copy that shares no mutable state with this graph.

        Unlike graphsurgeon's copy (which the pass manager uses for rollback snapshots)
        it keeps variable types and infos, node sources, the GraphSource and producer
        fields; it copies numpy weights (gs shares them, so a pass editing a weight in
        place would also edit the snapshot) while LazyValues, which wrap the model's
        immutable TensorProtos, stay shared; and it is about 10x faster.
        """
        created: list[gs.Graph] = []
        with _no_gc():
            graph = _copy_graph(self, tensor_map or {}, created)
        if tensor_map is None:
            for sub in created:  # one function list per graph tree, as in graphsurgeon
                sub._functions = graph._functions
        return graph

    @property
    def unused_initializers(self) -> dict[str, Message]:
        """Initializers no node reads, written back on export unless removed from here."""
        return self.onnx_source.unused_initializers


_PLAIN_NODES = (gs.Node, OnnxNode)


def _copy_tensor(t: gs.Tensor) -> gs.Tensor:
    kind = type(t)
    if kind is gs.Constant:
        # The values are shared, not copied: passes never change an array in place (they
        # build new ones, see onnxopt.ir.rewrite), so a rollback snapshot costs no weight
        # bytes and keeps the constants' identity (onnxopt.ir.digest).
        return gs.Constant(t.name, t._values, data_location=t.data_location, export_dtype=t._export_dtype)
    if kind is gs.Variable or kind is OnnxVariable:
        c = _new_variable(t.name)
        shape = t.shape
        c.__dict__.update(dtype=t.dtype, shape=list(shape) if isinstance(shape, list) else shape, type=t.type)
        info = getattr(t, "info", None)
        if info is not None:
            c.__dict__["info"] = info
        return c
    return t.copy()  # a Tensor subclass we do not know: its own copy


def _copy_graph(graph: gs.Graph, outer: Mapping[str, gs.Tensor], created: list) -> gs.Graph:
    """graphsurgeon's Graph.copy semantics: local tensors are new, foreign ones come from
    ``outer`` (the enclosing graph's copies) when present."""
    local_names = {t.name for t in graph.inputs}
    referenced: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        referenced.setdefault(t.name, t)
    for node in graph.nodes:
        for t in node.inputs:
            if t.name not in referenced:
                referenced[t.name] = t
            if isinstance(t, gs.Constant):
                local_names.add(t.name)
        for t in node.outputs:
            referenced.setdefault(t.name, t)
            local_names.add(t.name)
    for t in graph.outputs:
        referenced.setdefault(t.name, t)
        if isinstance(t, gs.Constant):
            local_names.add(t.name)
    referenced.pop("", None)

    copies: dict[str, gs.Tensor] = {}
    for name, t in referenced.items():
        if name not in local_names and name in outer:
            copies[name] = outer[name]
        else:
            copies[name] = _copy_tensor(t)
    scope = ChainMap(copies, outer) if outer else copies

    def get(t: gs.Tensor) -> gs.Tensor:
        return copies[t.name] if t.name else gs.Variable.empty()

    nodes = []
    for node in graph.nodes:
        attrs = {}
        snapshot = getattr(node, "snapshot", None)
        for key, value in node.attrs.items():
            if type(value) is OnnxGraph:
                value = _copy_graph(value, scope, created)
                created.append(value)
            elif isinstance(value, gs.Graph):
                value = value.copy(tensor_map=dict(scope))
                created.append(value)
            elif isinstance(value, gs.Constant):  # e.g. a Constant node's value
                copied = _copy_tensor(value)
                if snapshot is not None:
                    snapshot = _with_tensor_snap(snapshot, key, value, copied)
                value = copied
            elif isinstance(value, list):
                value = list(value)
            attrs[key] = value
        inputs = [get(t) for t in node.inputs]
        outputs = [get(t) for t in node.outputs]
        if type(node) in _PLAIN_NODES:
            nodes.append(_new_node(node.op, node.name, attrs, inputs, outputs, node.domain,
                                   source=getattr(node, "source", None), snapshot=snapshot))
        else:  # a Node subclass we do not know: its own copy
            nodes.append(node.copy(inputs=inputs, outputs=outputs, tensor_map=dict(scope)))

    clone = OnnxGraph(
        inputs=[get(t) for t in graph.inputs],
        outputs=[get(t) for t in graph.outputs],
        name=graph.name,
        doc_string=graph.doc_string,
        opset=graph.opset,
        import_domains=graph.import_domains,
        producer_name=graph.producer_name,
        producer_version=graph.producer_version,
        functions=list(graph.functions),
        ir_version=graph.ir_version,
    )
    clone.nodes = nodes
    clone.name_idx = graph.name_idx
    source = _source_of(graph)
    clone.onnx_source = source.copy() if source is not None else GraphSource()
    return clone


def _with_tensor_snap(snapshot: tuple, key: str, old: gs.Constant, new: gs.Constant) -> tuple:
    """The snapshot of a copied node, pointing at its copied TENSOR attribute."""
    before = snapshot[5].get(key)
    if not isinstance(before, _TensorSnap) or before.const is not old:
        return snapshot
    attrs = dict(snapshot[5])
    attrs[key] = _TensorSnap(new, before.proto)
    return snapshot[:5] + (attrs,)


def _source_of(graph: gs.Graph) -> GraphSource | None:
    return graph.__dict__.get("onnx_source")


if _fast_construction_matches():
    _new_variable, _new_node = _fast_variable, _fast_node
else:  # pragma: no cover - a graphsurgeon whose classes changed
    logger.debug("graphsurgeon's classes changed; importing through their constructors")

    def _new_variable(name: str) -> OnnxVariable:
        return OnnxVariable(name)

    def _new_node(op, name, attrs, inputs, outputs, domain, **extra) -> OnnxNode:
        node = OnnxNode(op=op, name=name, attrs=attrs, inputs=inputs, outputs=outputs, domain=domain)
        for key, value in extra.items():
            setattr(node, key, value)
        return node


# --------------------------------------------------------------------------- types


def _np_dtype(elem_type: int):
    """The dtype graphsurgeon uses for an ONNX element type (np dtype, or the int)."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    dtype = get_numpy_type(elem_type)
    return dtype if dtype is not None else elem_type


def _elem_type(dtype: Any) -> int:
    """ONNX element type of a graphsurgeon dtype (np dtype, numpy type, ONNX int or None)."""
    if dtype is None:
        return onnx.TensorProto.UNDEFINED
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    if isinstance(dtype, onnx.TypeProto):  # what gs's importer stores for optional/map
        return onnx.TensorProto.UNDEFINED
    # onnx maps the ml_dtypes types (bfloat16, float8 incl. fnuz, int4, ...) correctly;
    # graphsurgeon's dtype_to_onnx maps float8e4m3fnuz to FLOAT8E4M3FN.
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _kind(type_proto: onnx.TypeProto) -> str | None:
    """graphsurgeon's name for the kind of a type: "tensor_type", "sequence_type", ..."""
    return type_proto.WhichOneof("value")


def _inner_elem_type(type_proto: onnx.TypeProto) -> int:
    """The element type graphsurgeon reports for a value: the innermost tensor's."""
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        return getattr(type_proto, kind).elem_type
    if kind == "sequence_type":
        return _inner_elem_type(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _inner_elem_type(type_proto.optional_type.elem_type)
    return onnx.TensorProto.UNDEFINED


def _shape_of(type_proto: onnx.TypeProto) -> list | None:
    kind = type_proto.WhichOneof("value")
    if kind not in ("tensor_type", "sparse_tensor_type"):
        return None
    tensor_type = getattr(type_proto, kind)
    if not tensor_type.HasField("shape"):
        return None
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        elif dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(None)
    return shape


def _info_key(vi: onnx.ValueInfoProto) -> tuple:
    """(element type, shape, kind) of a ValueInfoProto, as the Variable would hold it."""
    # An empty type (allowed in subgraphs) reads as a Variable with no dtype and shape.
    kind = _kind(vi.type) or "tensor_type"
    return (_inner_elem_type(vi.type), _shape_key(_shape_of(vi.type)), kind)


def _variable_key(t: gs.Variable) -> tuple:
    kind = t.type if t.type is not None else "tensor_type"
    return (_elem_type(t.dtype), _shape_key(t.shape), kind)


def _shape_key(shape) -> tuple | None:
    if shape is None:
        return None
    return tuple(None if d is None or (isinstance(d, int) and d < 0) else d for d in shape)


def _fill_from_info(t: gs.Variable, vi: onnx.ValueInfoProto, overwrite: bool) -> None:
    if isinstance(t, OnnxVariable) and (overwrite or t.info is None):
        t.info = vi
    if vi.type.ByteSize() == 0:
        return
    if overwrite or t.dtype is None:
        t.dtype = _np_dtype(_inner_elem_type(vi.type))
    if overwrite or t.shape is None:
        t.shape = _shape_of(vi.type)
    kind = _kind(vi.type)
    if overwrite or (kind and t.type in (None, "tensor_type")):
        t.type = kind


def _variable_from_info(vi: onnx.ValueInfoProto) -> OnnxVariable:
    t = _new_variable(vi.name)
    _fill_from_info(t, vi, overwrite=True)
    return t


# --------------------------------------------------------------------------- import


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic garbage collector: building 10^5 linked objects otherwise triggers
    collections that walk the whole growing heap again and again (about 2x the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The main graph of ``model`` as an onnx-graphsurgeon Graph (see module docstring).

    The graph refers to ``model``'s TensorProtos (no weight is copied): do not modify
    ``model`` while the graph is in use.
    """
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    domains = []
    for imp in model.opset_import:
        copy = onnx.OperatorSetIdProto()
        copy.CopyFrom(imp)
        domains.append(copy)
    subgraphs: list[OnnxGraph] = []
    with _no_gc():
        graph = _import_graph(model.graph, {}, opset, domains, subgraphs)
    for sub in subgraphs:  # graphsurgeon shares one function list across a graph tree
        sub._functions = graph._functions
    graph.producer_name = model.producer_name
    graph.producer_version = model.producer_version
    graph.ir_version = model.ir_version
    return graph


def _import_graph(gp: onnx.GraphProto, outer: Mapping[str, gs.Tensor], opset, domains,
                  subgraphs: list[OnnxGraph]) -> OnnxGraph:
    """Imports ``gp``; every subgraph created on the way is appended to ``subgraphs``."""
    local: dict[str, gs.Tensor] = {}
    scope: Mapping[str, gs.Tensor] = ChainMap(local, outer) if outer else local
    source = GraphSource(proto=gp)

    input_names = {vi.name for vi in gp.input}
    initializers: dict[str, Message] = {}
    for rank, tensor in enumerate(gp.initializer):
        source.initializer_rank.setdefault(tensor.name, rank)
        if tensor.name in input_names:
            source.input_defaults[tensor.name] = tensor
            continue
        location = int(tensor.data_location) if tensor.HasField("data_location") else None
        local[tensor.name] = gs.Constant(tensor.name, LazyValues(tensor), data_location=location)
        initializers[tensor.name] = tensor
    for rank, sparse in enumerate(gp.sparse_initializer):
        name = sparse.values.name
        source.sparse_rank.setdefault(name, rank)
        local[name] = gs.Constant(name, SparseValues(sparse), data_location=sparse.values.data_location)
        initializers[name] = sparse

    for vi in gp.value_info:
        source.value_info.setdefault(vi.name, vi)
        t = local.get(vi.name)
        if t is None:
            if vi.name in scope:
                continue  # annotates an outer tensor; kept in source.value_info
            local[vi.name] = _variable_from_info(vi)
        elif isinstance(t, gs.Variable):
            _fill_from_info(t, vi, overwrite=False)

    # Graph inputs and outputs never resolve to an outer tensor (as in graphsurgeon).
    inputs = []
    for vi in gp.input:
        source.input_info.setdefault(vi.name, vi)
        t = local.get(vi.name)
        if t is None or isinstance(t, gs.Constant):
            t = local[vi.name] = _variable_from_info(vi)
        else:
            _fill_from_info(t, vi, overwrite=False)
        inputs.append(t)
    outputs = []
    for vi in gp.output:
        source.output_info.setdefault(vi.name, vi)
        t = local.get(vi.name)
        if t is None:
            t = local[vi.name] = _variable_from_info(vi)
        elif isinstance(t, gs.Variable):
            _fill_from_info(t, vi, overwrite=False)
        outputs.append(t)

    # The hot loop of a big import: lookups inlined, protobuf fields read once.
    new_variable, empty, lookup, local_get = _new_variable, gs.Variable.empty, scope.get, local.get
    nodes = []
    for proto in gp.node:
        in_names = tuple(proto.input)
        out_names = tuple(proto.output)
        node_inputs = []
        for name in in_names:
            t = lookup(name) if name else empty()
            if t is None:
                t = local[name] = new_variable(name)
            node_inputs.append(t)
        node_outputs = []
        for name in out_names:
            t = local_get(name) if name else empty()
            if t is None:
                t = local[name] = new_variable(name)
            node_outputs.append(t)
        if proto.attribute:
            attrs, snap_attrs = _import_attributes(proto.attribute, scope, opset, domains, subgraphs)
        else:
            attrs, snap_attrs = {}, {}
        domain = proto.domain if proto.HasField("domain") else None
        op, name = proto.op_type, proto.name
        snapshot = None if snap_attrs is None else (op, domain, name, in_names, out_names, snap_attrs)
        nodes.append(_new_node(op, name, attrs, node_inputs, node_outputs, domain,
                               source=proto, snapshot=snapshot))

    # Initializers nothing reads stay out of the IR (gs would drop them) but are kept.
    output_ids = {id(t) for t in outputs}
    for name, proto in initializers.items():
        t = local[name]
        if not t.outputs and id(t) not in output_ids:
            source.unused_initializers[name] = proto
            del local[name]

    # Nodes are set after construction: Graph.__init__ would walk them all to merge the
    # function lists of subgraphs, which import_graph does once for the whole tree.
    graph = OnnxGraph(
        inputs=inputs,
        outputs=outputs,
        name=gp.name,
        doc_string=gp.doc_string,
        opset=opset,
        import_domains=domains,
    )
    graph.nodes = nodes
    graph.onnx_source = source
    return graph


@dataclass(frozen=True)
class _TensorSnap:
    """Snapshot of a TENSOR attribute: unchanged while the Constant still wraps the proto."""

    const: gs.Constant
    proto: onnx.TensorProto


def _import_attributes(attributes, scope, opset, domains, subgraphs) -> tuple[dict, dict | None]:
    """(attrs for gs, snapshot of them or None when a subgraph makes a snapshot useless)."""
    attrs: dict[str, Any] = {}
    snap: dict[str, Any] | None = {}
    for attr in attributes:
        kind = attr.type
        if attr.ref_attr_name:
            value = gs.Node.AttributeRef(attr.ref_attr_name, gs_misc.convert_from_onnx_attr_type(kind))
            attrs[attr.name] = value
            if snap is not None:
                snap[attr.name] = value
            continue
        if kind == _AP.FLOAT:
            value = attr.f
        elif kind == _AP.INT:
            value = attr.i
        elif kind == _AP.STRING:
            value = _decode(attr.s)
        elif kind == _AP.FLOATS:
            value = list(attr.floats)
        elif kind == _AP.INTS:
            value = list(attr.ints)
        elif kind == _AP.STRINGS:
            value = [_decode(s) for s in attr.strings]
        elif kind == _AP.TENSOR:
            value = gs.Constant(attr.t.name, LazyValues(attr.t))
            attrs[attr.name] = value
            if snap is not None:
                snap[attr.name] = _TensorSnap(value, attr.t)
            continue
        elif kind == _AP.GRAPH:
            sub = _import_graph(attr.g, scope, opset, domains, subgraphs)
            subgraphs.append(sub)
            attrs[attr.name] = sub
            snap = None
            continue
        elif kind == _AP.SPARSE_TENSOR:
            value = attr.sparse_tensor
        elif kind == _AP.TYPE_PROTO:
            value = attr.tp
        elif kind == _AP.TENSORS:
            value = list(attr.tensors)
        elif kind == _AP.GRAPHS:
            # No standard op has GRAPHS attributes; they are carried as protos.
            value = list(attr.graphs)
        elif kind == _AP.SPARSE_TENSORS:
            value = list(attr.sparse_tensors)
        elif kind == _AP.TYPE_PROTOS:
            value = list(attr.type_protos)
        else:
            raise ValueError(f"attribute '{attr.name}' has unknown type {kind}")
        attrs[attr.name] = value
        if snap is not None:
            snap[attr.name] = list(value) if isinstance(value, list) else value
    return attrs, snap


def _decode(raw: bytes) -> str | bytes:
    # gs decodes STRING attributes and crashes on non-UTF-8 bytes; keep those as bytes.
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


# --------------------------------------------------------------------------- export


class _Scope:
    """Names visible in a graph: its own, then its enclosing graphs' (a chain, not a copy)."""

    __slots__ = ("names", "parent")

    def __init__(self, names: set[str], parent: "_Scope | None" = None):
        self.names = names
        self.parent = parent

    def __contains__(self, name: str) -> bool:
        scope = self
        while scope is not None:
            if name in scope.names:
                return True
            scope = scope.parent
        return False


def export_model(graph: gs.Graph, template: onnx.ModelProto,
                 opset_import: list[onnx.OperatorSetIdProto] | None = None,
                 initializers: list | None = None) -> onnx.ModelProto:
    """A new ModelProto: ``graph`` as its graph, everything else from ``template`` (with
    ``opset_import`` instead of the template's when given).

    ``template`` is not modified. Unchanged parts of the graph are written back from the
    protos they were imported from. With an ``initializers`` list, the main graph's dense
    initializers are appended to it (in the order they would have) instead of being copied
    into the new proto: ``storage.write_model`` writes them from where they are.
    """
    model = copy_fields(template, onnx.ModelProto(), skip=("graph",) + (("opset_import",) if opset_import is not None
                                                                      else ()))
    if opset_import is not None:
        model.opset_import.extend(opset_import)
    used_domains: set[str] = set()
    with _no_gc():
        _export_graph(graph, model.graph, None, used_domains, initializers)
    _add_new_functions(model, graph)
    _sync_opsets(model, graph, used_domains)
    return model


def copy_fields(src: Message, dst: Message, skip: tuple[str, ...] = ()) -> Message:
    """Copy every field of ``src`` but those in ``skip`` into ``dst`` (skipped fields are
    not even read: the main graph's weights are never copied by accident)."""
    for desc, value in src.ListFields():
        if desc.name in skip:
            continue
        target = getattr(dst, desc.name)
        if hasattr(value, "extend") and hasattr(target, "extend"):
            target.extend(value)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(dst, desc.name, value)
    return dst


def _add_new_functions(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """Functions a pass put into ``graph.functions`` (import leaves it empty)."""
    if not graph.functions:
        return
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    present = {(f.domain, f.name, f.overload) for f in model.functions}
    for func in graph.functions:
        proto = OnnxExporter.export_function(func)
        if (proto.domain, proto.name, proto.overload) not in present:
            model.functions.append(proto)


def _sync_opsets(model: onnx.ModelProto, graph: gs.Graph, used_domains: set[str]) -> None:
    imported = {imp.domain for imp in model.opset_import}
    if "ai.onnx" in imported:
        imported.add("")
    for imp in model.opset_import:
        # A pass may raise graph.opset (graphsurgeon's own field) to emit newer ops.
        if imp.domain in ("", "ai.onnx") and graph.opset and graph.opset > imp.version:
            imp.version = graph.opset
    for domain in sorted(used_domains - imported):
        # As graphsurgeon does: a domain a pass introduced without importing it.
        version = onnx.defs.onnx_opset_version() if domain in ("", "ai.onnx") else 1
        logger.warning("domain '%s' is used but not imported; importing version %d", domain, version)
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _export_graph(graph: gs.Graph, gp: onnx.GraphProto, outer: _Scope | None, used_domains: set[str],
                  initializers_out: list | None = None) -> None:
    source = _source_of(graph)
    src_proto = source.proto if source is not None else None

    # Phase 1: the tensors this graph refers to, and the names its nodes define.
    referenced: dict[str, gs.Tensor] = {}
    produced: set[str] = set()
    node_io: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for t in graph.inputs:
        if t.name:
            referenced.setdefault(t.name, t)
    for node in graph.nodes:
        in_names = tuple([t.name for t in node.inputs])
        out_names = tuple([t.name for t in node.outputs])
        node_io.append((in_names, out_names))
        for t in node.inputs:
            if t.name and t.name not in referenced:
                referenced[t.name] = t
        for t in node.outputs:
            if t.name:
                referenced.setdefault(t.name, t)
                produced.add(t.name)
    for t in graph.outputs:
        if t.name:
            referenced.setdefault(t.name, t)

    # Phase 2: the initializers written here: constants this graph reads that no
    # enclosing graph defines, plus those its subgraphs read that it owned originally.
    def outside(name: str) -> bool:
        return outer is not None and name in outer

    constants: dict[str, gs.Constant] = {
        name: t for name, t in referenced.items() if isinstance(t, gs.Constant) and not outside(name)
    }
    owned = source.initializer_rank.keys() | source.sparse_rank.keys() if source is not None else ()
    if owned:
        for name, t in _subgraph_constants(graph).items():
            if name in owned and name not in constants and not outside(name):
                constants[name] = t
    defaults = {}
    if source is not None:
        for t in graph.inputs:
            default = source.input_defaults.get(t.name)
            if default is not None and isinstance(t, gs.Variable):
                defaults[t.name] = default
    defined = set(referenced) | constants.keys()
    unused = {}
    if source is not None:
        unused = {
            name: proto
            for name, proto in source.unused_initializers.items()
            if name not in defined and not outside(name)
        }
    scope = _Scope(defined | unused.keys(), outer)

    # Phase 3: nodes (subgraphs see this graph's names as outer names).
    nodes = gp.node
    for node, (in_names, out_names) in zip(graph.nodes, node_io):
        used_domains.add(node.domain or "")
        snap = getattr(node, "snapshot", None)
        if snap is not None and _node_unchanged(node, snap, in_names, out_names):
            nodes.append(node.source)
        else:
            _export_node(node, nodes.add(), in_names, out_names, scope, used_domains)

    if graph.name or (src_proto is not None and src_proto.HasField("name")):
        gp.name = graph.name
    if graph.doc_string:
        gp.doc_string = graph.doc_string

    # Initializers in their original order, then new ones in the order they are used.
    dense: list[tuple[tuple, onnx.TensorProto]] = []
    sparse: list[tuple[tuple, onnx.SparseTensorProto]] = []
    init_rank = source.initializer_rank if source is not None else {}
    sparse_rank = source.sparse_rank if source is not None else {}
    for order, (name, t) in enumerate(constants.items()):
        if isinstance(t._values, SparseValues):
            sparse.append((_rank_key(sparse_rank, name, order), _sparse_proto(t)))
        else:
            dense.append((_rank_key(init_rank, name, order), _tensor_proto(t)))
    for name, proto in defaults.items():
        dense.append((_rank_key(init_rank, name, len(constants)), proto))
    for name, proto in unused.items():
        if isinstance(proto, onnx.SparseTensorProto):
            sparse.append((_rank_key(sparse_rank, name, len(constants)), proto))
        else:
            dense.append((_rank_key(init_rank, name, len(constants)), proto))
    dense.sort(key=lambda item: item[0])
    sparse.sort(key=lambda item: item[0])
    if initializers_out is not None:
        initializers_out.extend(proto for _, proto in dense)
    else:
        gp.initializer.extend([proto for _, proto in dense])
    gp.sparse_initializer.extend([proto for _, proto in sparse])

    input_info = source.input_info if source is not None else {}
    output_info = source.output_info if source is not None else {}
    gp.input.extend([_value_info(t, input_info.get(t.name)) for t in graph.inputs])
    gp.output.extend([_value_info(t, output_info.get(t.name)) for t in graph.outputs])

    # value_info: the original entries still meaningful, then any local Variable a pass
    # gave a type or shape (as graphsurgeon's exporter does).
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    infos = []
    done = set()
    if source is not None:
        for name, vi in source.value_info.items():
            t = referenced.get(name)
            if t is None or name in io_names:
                continue
            if isinstance(t, gs.Constant):
                if name in constants and _constant_key(t) == _info_key(vi)[:2]:
                    infos.append(vi)
                    done.add(name)
                continue
            if t.dtype is None and t.shape is None:
                continue
            infos.append(_value_info(t, vi))
            done.add(name)
    for name, t in referenced.items():
        if (
            name in done
            or name in io_names
            or name not in produced
            or not isinstance(t, gs.Variable)
            or (t.dtype is None and t.shape is None)
        ):
            continue
        infos.append(_value_info(t, None))
    gp.value_info.extend(infos)

    if src_proto is not None:
        gp.metadata_props.extend(src_proto.metadata_props)
        for annotation in src_proto.quantization_annotation:
            if annotation.tensor_name in scope:
                gp.quantization_annotation.append(annotation)


def _rank_key(rank: dict[str, int], name: str, order: int) -> tuple:
    r = rank.get(name)
    return (0, r) if r is not None else (1, order)


def _subgraph_constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Constants read anywhere inside the subgraphs of ``graph``'s nodes."""
    found: dict[str, gs.Constant] = {}
    stack = [sub for node in graph.nodes for sub in _graph_attrs(node)]
    while stack:
        sub = stack.pop()
        for node in sub.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name:
                    found.setdefault(t.name, t)
            stack.extend(_graph_attrs(node))
        for t in sub.outputs:
            if isinstance(t, gs.Constant) and t.name:
                found.setdefault(t.name, t)
    return found


def _graph_attrs(node: gs.Node) -> list[gs.Graph]:
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)]


def _node_unchanged(node: gs.Node, snap: tuple, in_names: tuple, out_names: tuple) -> bool:
    op, domain, name, ins, outs, attrs = snap
    if node.op != op or node.domain != domain or node.name != name or in_names != ins or out_names != outs:
        return False
    current = node.attrs
    if len(current) != len(attrs):
        return False
    for key, before in attrs.items():
        if key not in current or not _attr_unchanged(current[key], before):
            return False
    return True


def _attr_unchanged(value: Any, before: Any) -> bool:
    if isinstance(before, _TensorSnap):
        return (
            value is before.const
            and isinstance(value._values, LazyValues)
            and value._values.tensor is before.proto
            and value.name == before.proto.name
            and value._export_dtype is None
        )
    if isinstance(before, Message):
        return value is before
    if isinstance(before, list) and before and isinstance(before[0], Message):
        return isinstance(value, list) and len(value) == len(before) and all(a is b for a, b in zip(value, before))
    return type(value) is type(before) and value == before


def export_node(node: gs.Node) -> onnx.NodeProto:
    """One node as a NodeProto (for onnx's per-node inference or a small evaluation model),
    written as export_model writes it; unlike graphsurgeon's exporter it never replaces a
    tensor attribute's lazily loaded proto by an array (which would change the model)."""
    proto = onnx.NodeProto()
    _export_node(node, proto, [t.name for t in node.inputs], [t.name for t in node.outputs], _Scope(set()), set())
    return proto


def _export_node(node: gs.Node, proto: onnx.NodeProto, in_names, out_names, scope: _Scope, used_domains) -> None:
    source = getattr(node, "source", None)
    proto.op_type = node.op
    if node.domain is not None:
        proto.domain = node.domain
    if node.name or (source is not None and source.HasField("name")):
        proto.name = node.name
    proto.input.extend(in_names)
    proto.output.extend(out_names)
    src_attrs = {a.name: a for a in source.attribute} if source is not None else {}
    snap = getattr(node, "snapshot", None)
    snap_attrs = snap[5] if snap is not None else {}
    for key, value in node.attrs.items():
        src = src_attrs.get(key)
        if src is not None and key in snap_attrs and _attr_unchanged(value, snap_attrs[key]):
            proto.attribute.append(src)
            continue
        attr = proto.attribute.add()
        _export_attribute(attr, node, key, value, src, scope, used_domains)
    if source is not None:
        if source.doc_string:
            proto.doc_string = source.doc_string
        if source.HasField("overload"):
            proto.overload = source.overload
        proto.metadata_props.extend(source.metadata_props)
        proto.device_configurations.extend(source.device_configurations)


def _export_attribute(attr: onnx.AttributeProto, node: gs.Node, key: str, value: Any,
                      src: onnx.AttributeProto | None, scope: _Scope, used_domains) -> None:
    attr.name = key
    if src is not None and src.doc_string:
        attr.doc_string = src.doc_string
    if isinstance(value, gs.Graph):
        attr.type = _AP.GRAPH
        _export_graph(value, attr.g, scope, used_domains)
        return
    if isinstance(value, gs.Constant):
        attr.type = _AP.TENSOR
        attr.t.CopyFrom(_tensor_proto(value))
        return
    if isinstance(value, gs.Node.AttributeRef):
        attr.type = gs_misc.convert_to_onnx_attr_type(value.type)
        attr.ref_attr_name = value.name
        return
    expected = src.type if src is not None else _schema_attr_type(node.op, node.domain or "", key)
    value = _plain(value)
    if expected == _AP.FLOAT and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif expected == _AP.FLOATS and isinstance(value, (list, tuple)):
        value = [float(v) for v in value]
    attr_type = None
    if isinstance(value, (list, tuple)) and len(value) == 0:
        if expected is None:
            raise ValueError(
                f"node '{node.name}' ({node.op}): attribute '{key}' is an empty list of "
                "unknown type (not in the op's schema)")
        attr_type = expected
    made = onnx.helper.make_attribute(key, value, attr_type=attr_type)
    doc = attr.doc_string
    attr.CopyFrom(made)
    if doc:
        attr.doc_string = doc


def _plain(value: Any) -> Any:
    """Python values onnx.helper.make_attribute understands."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.dtype, type)) and not issubclass(getattr(value, "type", value), Message):
        try:
            return _elem_type(value)  # e.g. Cast's `to` given as np.float32
        except (TypeError, ValueError):
            return value
    if isinstance(value, tuple):
        return list(value)
    return value


@functools.lru_cache(maxsize=None)
def _schema_attr_type(op: str, domain: str, key: str) -> int | None:
    try:
        schema = onnx.defs.get_schema(op, domain=domain)
    except Exception:  # noqa: BLE001 - custom op: no schema
        return None
    attr = schema.attributes.get(key)
    return int(attr.type) if attr is not None else None


def _tensor_proto(c: gs.Constant) -> onnx.TensorProto:
    """The TensorProto of a Constant; its source proto when unchanged (no weight copy)."""
    values = c._values
    export_type = _elem_type(c._export_dtype) if c._export_dtype is not None else None
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        src = values.tensor
        if export_type is None or export_type == src.data_type:
            if src.name == c.name:
                return src
            # Renamed: copy rather than rename the caller's proto (gs does the latter).
            renamed = onnx.TensorProto()
            renamed.CopyFrom(src)
            renamed.name = c.name
            return renamed
    array = values.load() if isinstance(values, LazyValues) else np.asarray(values)
    if export_type is not None and export_type != _elem_type(array.dtype):
        array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(export_type))
    return numpy_helper.from_array(array, c.name)


def _sparse_proto(c: gs.Constant) -> onnx.SparseTensorProto:
    src = c._values.tensor
    if src.values.name == c.name:
        return src
    renamed = onnx.SparseTensorProto()
    renamed.CopyFrom(src)
    renamed.values.name = c.name
    return renamed


def _constant_key(c: gs.Constant) -> tuple:
    return (_elem_type(c.export_dtype), _shape_key(list(c.shape)))


def _value_info(t: gs.Tensor, source: onnx.ValueInfoProto | None) -> onnx.ValueInfoProto:
    """A ValueInfoProto for ``t``: its source when type and shape are unchanged.

    ``source`` is the entry of the same name in the graph's original list; failing that,
    the info the variable was imported with (it may have been renamed since).
    """
    if isinstance(t, gs.Constant):
        info = onnx.helper.make_tensor_value_info(t.name, _elem_type(t.export_dtype), list(t.shape))
        return info
    if source is None:
        source = getattr(t, "info", None)
    if source is not None and _variable_key(t) == _info_key(source):
        if source.name == t.name:
            return source
        info = onnx.ValueInfoProto()
        info.CopyFrom(source)
        info.name = t.name
        return info
    info = onnx.ValueInfoProto()
    info.name = t.name
    kind = t.type or "tensor_type"
    if source is not None and kind != "tensor_type" and _kind(source.type) == kind:
        # graphsurgeon only models the innermost element type of a sequence/optional/
        # map; their structure comes from the source when the kind is unchanged.
        info.type.CopyFrom(source.type)
    elif kind == "tensor_type" and (t.dtype is not None or t.shape is not None):
        _fill_tensor_type(info.type.tensor_type, t)
    elif kind == "sparse_tensor_type":
        _fill_tensor_type(info.type.sparse_tensor_type, t)
    elif kind == "sequence_type" and t.dtype is not None:
        _fill_tensor_type(info.type.sequence_type.elem_type.tensor_type, t, with_shape=False)
    if source is not None:
        if source.doc_string:
            info.doc_string = source.doc_string
        info.metadata_props.extend(source.metadata_props)
    return info


def _fill_tensor_type(tensor_type, t: gs.Variable, with_shape: bool = True) -> None:
    tensor_type.elem_type = _elem_type(t.dtype)
    if not with_shape or t.shape is None:
        return
    shape = tensor_type.shape
    shape.SetInParent()  # a scalar has a shape with no dims
    for d in t.shape:
        dim = shape.dim.add()
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            dim.dim_value = int(d)
        elif isinstance(d, str):
            dim.dim_param = d
