"""Shape analyses: symbolic shapes and small integer values of every tensor.

``symbolic-shapes`` (``ShapeFacts``)
    One forward walk over the graph (and its If/Loop/Scan bodies) computes, per tensor
    name, its dtype, its shape as symbolic dims (``onnxopt.analysis.dims``: ints, the
    inputs' ``dim_param`` symbols, polynomials of them such as ``12*batch``, opaque terms
    for what is not a polynomial) and, for int and bool tensors of rank <= 1, their values
    as symbolic dims (``Shape(x)`` of an x of shape [batch, 197, 768] is ``(batch, 197,
    768)``; ``Gather(that, 1)`` is 197). The rules are ``onnxopt.analysis.shape_rules``;
    for an op without a rule (or one a rule gives up on) onnx's inference of that one node
    runs, fed the symbolic dims as ``dim_param`` text and the known small values.

    Seeds: the declared shapes of the graph inputs (the model's interface: a dim_param is a
    symbol, shared by every input that names it; an unnamed unknown dim a fresh symbol) and
    the constants. Declared shapes of anything else (value_info, graph outputs) are never
    read: exporters write wrong ones, and a fold built on them breaks the model. What
    cannot be told gets a fresh symbol (equal to nothing else) or stays unknown.

``shapes`` (name -> ``TensorInfo``)
    The same facts with symbolic dims as text, for passes that only need to know whether a
    dim is static. Where the facts know nothing (an op of a custom domain), the declared
    type is given as a hint: use ``symbolic-shapes`` for anything that rewrites the graph
    on the strength of a shape.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis import dims as D
from onnxopt.analysis.shape_rules import ARRAY_OPS, MAX_VALUE, RULES, View, evaluate_small
from onnxopt.ir.constants import per_values
from onnxopt.ir.surgery import topological_order
from onnxopt.pipeline.context import register_analysis

logger = logging.getLogger(__name__)

_DEFAULT = (None, "", "ai.onnx")
# dim_params exporters write for "unknown", not as a shared name (Paddle writes "?")
_ANONYMOUS = frozenset({"", "?", "-1", "None", "none", "unk", "unknown", "N/A"})


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype | None
    shape: tuple | None  # ints for known dims, str for symbolic ones, None for unknown

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def is_static(shape) -> bool:
    """A known shape whose every dim is a number (not a symbol, not -1 or unknown)."""
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


@functools.lru_cache(maxsize=None)
def np_dtype(elem_type) -> np.dtype | None:
    """numpy dtype of an ONNX element type (or of a numpy type); None when numpy has none."""
    if elem_type is None:
        return None
    if not isinstance(elem_type, int):
        try:
            return np.dtype(elem_type)
        except TypeError:
            return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


class ShapeFacts:
    """Per tensor name: dtype, symbolic shape, and the value of small int/bool tensors."""

    def __init__(self):
        self.shapes: dict[str, tuple | None] = {}
        self.dtypes: dict[str, np.dtype | None] = {}
        self.values: dict[str, tuple] = {}
        self.arrays: dict[str, np.ndarray] = {}  # small constants, any dtype

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def dtype(self, name: str) -> np.dtype | None:
        return self.dtypes.get(name)

    def value(self, name: str) -> tuple | None:
        return self.values.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def static_shape(self, name: str) -> tuple | None:
        s = self.shapes.get(name)
        return s if D.is_static(s) else None

    def static_value(self, name: str) -> np.ndarray | None:
        """The value as an array when every element is known (int or bool tensors)."""
        v, s, dt = self.values.get(name), self.shapes.get(name), self.dtypes.get(name)
        if v is None or s is None or dt is None or not all(type(x) is int for x in v):
            return None
        return np.array(v, dtype=dt).reshape(s)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes


class _NodeView(View):
    __slots__ = ("node", "op", "opset", "engine")

    def __init__(self, node: gs.Node, engine: "_Engine"):
        self.node, self.op, self.opset, self.engine = node, node.op, engine.opset, engine

    def _tensor(self, i: int) -> gs.Tensor | None:
        inputs = self.node.inputs
        if i >= len(inputs) or not inputs[i].name:
            return None
        t = inputs[i]
        if t.name not in self.engine.facts.shapes and isinstance(t, gs.Constant):
            self.engine.seed_constant(t)
        return t

    def has(self, i: int) -> bool:
        inputs = self.node.inputs
        return i < len(inputs) and bool(inputs[i].name)

    def shape(self, i: int):
        t = self._tensor(i)
        return None if t is None else self.engine.facts.shapes.get(t.name)

    def dtype(self, i: int):
        t = self._tensor(i)
        return None if t is None else self.engine.facts.dtypes.get(t.name)

    def value(self, i: int):
        t = self._tensor(i)
        return None if t is None else self.engine.facts.values.get(t.name)

    def array(self, i: int):
        t = self._tensor(i)
        if t is None:
            return None
        facts = self.engine.facts
        a = facts.arrays.get(t.name)
        return a if a is not None else facts.static_value(t.name)

    def attr(self, name: str, default=None):
        value = self.node.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    @property
    def n_out(self) -> int:
        return len(self.node.outputs)


class _Engine:
    def __init__(self, model, previous: ShapeFacts | None = None, changed: set[str] | None = None):
        self.model = model
        self.opset = model.opset or onnx.defs.onnx_opset_version()
        self.facts = ShapeFacts()
        self.by_text: dict[str, D.Dim] = {}  # dim_param text handed to onnx -> the dim
        self.stats = {"rules": 0, "onnx": 0, "unknown": 0, "kept": 0}
        # Incremental mode: facts of a node whose inputs did not change are taken over.
        self.previous = previous
        self.changed = changed if changed is not None else set()

    # -- seeds -----------------------------------------------------------------------------
    def seed_input(self, t: gs.Tensor) -> None:
        if not t.name or t.name in self.facts.shapes:
            return
        if isinstance(t, gs.Constant):
            self.seed_constant(t)
            return
        if self.previous is not None and t.name in self.previous.shapes:
            self.keep(t.name)
            return
        shape = None
        if t.shape is not None:
            shape = tuple(d if isinstance(d, int) and d >= 0 else
                          D.symbol(d) if isinstance(d, str) and d not in _ANONYMOUS else D.fresh() for d in t.shape)
        self.set(t.name, shape, np_dtype(t.dtype), None)

    def seed_constant(self, t: gs.Constant) -> None:
        self.set(t.name, *_constant_facts(t))

    def set(self, name, shape, dtype, value, array=None) -> None:
        facts = self.facts
        if shape is not None and not all(type(d) is int for d in shape):
            shape = tuple(D.as_dim(d) for d in shape)  # every dim is >= 0
        facts.shapes[name] = shape
        facts.dtypes[name] = dtype
        if value is not None and shape is not None and len(shape) <= 1 and len(value) <= MAX_VALUE:
            facts.values[name] = tuple(value)
        if array is not None:
            facts.arrays[name] = array

    def keep(self, name: str) -> None:
        """Take over the previous facts of ``name``."""
        prev, facts = self.previous, self.facts
        facts.shapes[name] = prev.shapes[name]
        facts.dtypes[name] = prev.dtypes.get(name)
        if name in prev.values:
            facts.values[name] = prev.values[name]
        if name in prev.arrays:
            facts.arrays[name] = prev.arrays[name]

    # -- the walk --------------------------------------------------------------------------
    def graph(self, graph: gs.Graph) -> None:
        for t in graph.inputs:
            self.seed_input(t)
        for node in topological_order(graph):
            self.node(node)

    def unaffected(self, node: gs.Node) -> bool:
        """In incremental mode: nothing this node reads changed, and its facts are known."""
        prev, changed = self.previous, self.changed
        if node.op in ("If", "Loop", "Scan") or not node.outputs:
            return False
        for t in node.outputs:
            if t.name and t.name not in prev.shapes:
                return False
        for t in node.inputs:
            if t.name in changed or (isinstance(t, gs.Constant) and t.name not in prev.shapes):
                return False
        return True

    def node(self, node: gs.Node) -> None:
        if self.previous is not None:
            if self.unaffected(node):
                for t in node.outputs:
                    if t.name:
                        self.keep(t.name)
                self.stats["kept"] += 1
                return
            self.compute(node)
            prev, facts = self.previous, self.facts
            for t in node.outputs:
                name = t.name
                if name and (prev.shapes.get(name) != facts.shapes.get(name)
                             or prev.dtypes.get(name) != facts.dtypes.get(name)
                             or prev.values.get(name) != facts.values.get(name)):
                    self.changed.add(name)
            return
        self.compute(node)

    def compute(self, node: gs.Node) -> None:
        outs = None
        default = node.domain in _DEFAULT
        try:
            if default and node.op == "Constant":
                outs = self.constant_node(node)
            elif default and node.op in ("If", "Loop", "Scan"):
                outs = self.control_flow(node)
            elif default and node.op in RULES:
                view = _NodeView(node, self)
                if node.op in ARRAY_OPS:
                    outs = self.small_arrays(view)
                if outs is None:
                    outs = RULES[node.op](view)
                if outs is not None:
                    self.stats["rules"] += 1
        except Exception as exc:  # a rule's bug must not stop the analysis: fall back
            logger.debug("shape rule for %s (%s) failed: %s", node.name, node.op, exc)
            outs = None
        if outs is None:
            outs = self.onnx_infer(node)
        for i, t in enumerate(node.outputs):
            if not t.name:
                continue
            if outs is not None and i < len(outs):
                shape, dtype, value, *array = outs[i]
                self.set(t.name, None if shape is None else tuple(shape), dtype, value, *array)
            else:
                self.set(t.name, None, None, None)

    def constant_node(self, node: gs.Node):
        from onnxopt.ir.constants import constant_node_value, constant_tensor

        const = constant_tensor(node.outputs[0]) if node.outputs else None
        if const is not None:
            shape = tuple(int(d) for d in const.shape)
            dtype = _constant_dtype(const)
            if int(np.prod(shape, dtype=np.int64)) > MAX_VALUE:
                return [(shape, dtype, None)]
        value = constant_node_value(node)
        if value is None:
            return [(tuple(const.shape), _constant_dtype(const), None)] if const is not None else None
        name = node.outputs[0].name
        if value.size <= MAX_VALUE:
            self.facts.arrays[name] = value
        ints = tuple(int(x) for x in value.reshape(-1)) if value.dtype.kind in "iub" and value.ndim <= 1 \
            and value.size <= MAX_VALUE else None
        return [(tuple(value.shape), value.dtype, ints)]

    def small_arrays(self, view: _NodeView):
        """``evaluate_small`` when every input is a known small int/bool array."""
        arrays = []
        for i in range(len(view.node.inputs)):
            if not view.has(i):
                arrays.append(None)
                continue
            a = view.array(i)
            if a is None or a.dtype.kind not in "iub":
                return None
            arrays.append(a)
        if not arrays or arrays[0] is None:
            return None
        return evaluate_small(view, arrays)

    # -- If / Loop / Scan ------------------------------------------------------------------
    def control_flow(self, node: gs.Node):
        if node.op == "If":
            branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
            if not all(isinstance(b, gs.Graph) for b in branches):
                return None
            for b in branches:
                self.graph(b)
            outs = []
            for k in range(len(node.outputs)):
                pair = [b.outputs[k] if k < len(b.outputs) else None for b in branches]
                if any(p is None for p in pair):
                    outs.append((None, None, None))
                    continue
                (s1, s2), (d1, d2) = ([self.facts.shapes.get(p.name) for p in pair],
                                      [self.facts.dtypes.get(p.name) for p in pair])
                shape = None
                if s1 is not None and s2 is not None and len(s1) == len(s2):
                    shape = tuple(a if a == b else D.fresh() for a, b in zip(s1, s2))
                v1, v2 = (self.facts.values.get(p.name) for p in pair)
                outs.append((shape, d1 if d1 == d2 else None, v1 if v1 is not None and v1 == v2 else None))
            return outs
        body = node.attrs.get("body")
        if not isinstance(body, gs.Graph):
            return None
        if node.op == "Loop":
            carried = len(body.inputs) - 2
            seeds = [((), np.dtype(np.int64)), ((), np.dtype(np.bool_))]
            for k in range(carried):
                outer = node.inputs[k + 2] if k + 2 < len(node.inputs) else None
                s = self.facts.shapes.get(outer.name) if outer is not None and outer.name else None
                seeds.append((None if s is None else tuple(D.fresh() for _ in s),
                              self.facts.dtypes.get(outer.name) if outer is not None else None))
            for t, (shape, dtype) in zip(body.inputs, seeds):
                self.set(t.name, shape, dtype, None)
            self.graph(body)
            outs = []
            for k, t in enumerate(node.outputs):
                body_out = body.outputs[k + 1] if k + 1 < len(body.outputs) else None
                bs = self.facts.shapes.get(body_out.name) if body_out is not None else None
                bdt = self.facts.dtypes.get(body_out.name) if body_out is not None else None
                if k < carried:
                    outer = node.inputs[k + 2]
                    init = self.facts.shapes.get(outer.name)
                    inner = self.facts.shapes.get(body.inputs[k + 2].name)
                    shape = None
                    if init is not None and bs is not None and len(init) == len(bs):
                        shape = tuple(i if (b == s or b == i) else D.fresh() for i, b, s in zip(init, bs, inner))
                    outs.append((shape, bdt, None))
                else:
                    shape = None if bs is None else (D.fresh(),) + tuple(
                        d if type(d) is int else D.fresh() for d in bs)
                    outs.append((shape, bdt, None))
            return outs
        # Scan: the body is analysed (its own tensors get facts); the outputs' sizes depend
        # on the scan axes: ranks only.
        for t in body.inputs:
            s = t.shape
            self.set(t.name, None if s is None else tuple(D.fresh() for _ in s), np_dtype(t.dtype), None)
        self.graph(body)
        return None

    # -- onnx's inference of one node ------------------------------------------------------
    def onnx_infer(self, node: gs.Node):
        from onnx import numpy_helper

        from onnxopt.ir.graph_io import export_node
        domain = node.domain or ""
        version = self.model.opset_of(domain)
        if version is None:
            self.stats["unknown"] += 1
            return None
        try:
            schema = onnx.defs.get_schema(node.op, max_inclusive_version=version, domain=domain)
        except onnx.defs.SchemaError:
            self.stats["unknown"] += 1
            return None
        if any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values()):
            self.stats["unknown"] += 1
            return None
        view = _NodeView(node, self)
        types, data = {}, {}
        for i, t in enumerate(node.inputs):
            if not t.name or t.name in types:
                continue
            shape, dtype = view.shape(i), view.dtype(i)
            elem = onnx.helper.np_dtype_to_tensor_dtype(dtype) if dtype is not None else 0
            if shape is None:
                tp = onnx.TypeProto()
                tp.tensor_type.elem_type = elem
            else:
                dims = []
                for d in shape:
                    if type(d) is int:
                        dims.append(d)
                    else:
                        text = str(d)
                        self.by_text[text] = d
                        dims.append(text)
                tp = onnx.helper.make_tensor_type_proto(elem, dims)
            types[t.name] = tp
            array = view.array(i)
            if array is not None:
                data[t.name] = numpy_helper.from_array(np.ascontiguousarray(array), t.name)
        try:
            proto = export_node(node)
            result = onnx.shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=self.model.opset_protos(),
                ir_version=self.model.template.ir_version or onnx.IR_VERSION)
        except Exception as exc:
            logger.debug("onnx inference of %s (%s) failed: %s", node.name, node.op, exc)
            self.stats["unknown"] += 1
            return None
        self.stats["onnx"] += 1
        outs = []
        for t in node.outputs:
            tp = result.get(t.name) if t.name else None
            if tp is None or not tp.HasField("tensor_type"):
                outs.append((None, None, None))
                continue
            tt = tp.tensor_type
            dtype = np_dtype(tt.elem_type) if tt.elem_type else None
            shape = None
            if tt.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else
                              self.by_text.get(d.dim_param) or D.fresh() for d in tt.shape.dim)
            outs.append((shape, dtype, None))
        return outs


def known_shape(tensor: gs.Tensor, model, ctx) -> tuple | None:
    """The shape of ``tensor`` with an int for each static dim and None for each symbolic
    one; None when even the rank is unknown. From the constant itself, else from the
    ``symbolic-shapes`` analysis (declared shapes are never read)."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    facts = ctx.analysis("symbolic-shapes", model) if ctx is not None else symbolic_shapes(model)
    shape = facts.shape(tensor.name)
    return None if shape is None else tuple(d if type(d) is int else None for d in shape)


def _constant_facts(t: gs.Constant) -> tuple:
    """(shape, dtype, value, array) of a constant, read once per values object."""
    return per_values(t, "shape-facts", _read_constant_facts)


def _read_constant_facts(t: gs.Constant) -> tuple:
    shape = tuple(int(d) for d in t.shape)
    dtype = _constant_dtype(t)
    value = array = None
    if math.prod(shape) <= MAX_VALUE:
        array = _small_array(t)
        if array is not None and array.ndim <= 1 and array.dtype.kind in "iub":
            value = tuple(int(x) for x in array.reshape(-1))
    return shape, dtype, value, array


def _small_array(t: gs.Constant) -> np.ndarray | None:
    """``exact_array(t)`` of a small constant, reading raw bytes directly when it can
    (numpy_helper.to_array's checks cost more than the tensor: Swin has 11k such reads)."""
    from onnxopt.ir.constants import EXACT_TYPES, exact_array

    values = t._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        np_type = EXACT_TYPES.get(proto.data_type)
        if np_type is not None and proto.HasField("raw_data") and proto.data_location == onnx.TensorProto.DEFAULT:
            return np.frombuffer(proto.raw_data, dtype=np.dtype(np_type).newbyteorder("<")).reshape(
                tuple(proto.dims)).astype(np_type, copy=False)
    return exact_array(t)


def _constant_dtype(t: gs.Constant) -> np.dtype | None:
    values = t._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        return np_dtype(values.tensor.data_type)
    return np_dtype(getattr(values, "dtype", None))


def symbolic_shapes(model, previous: ShapeFacts | None = None, changed: set[str] | None = None) -> ShapeFacts:
    """The symbolic shape facts of every tensor of ``model`` (subgraphs included).

    Incrementally, after an edit that kept every tensor's meaning but made the tensors named
    in ``changed`` known better (folded into constants): the facts of ``previous`` are
    taken over for every node that reads nothing changed (the walk then costs a few lookups
    per node)."""
    engine = _Engine(model, previous, set(changed or ()) if previous is not None else None)
    engine.graph(model.graph)
    logger.debug("symbolic shapes: %s", engine.stats)
    return engine.facts


@register_analysis("symbolic-shapes")
def _symbolic_shapes_analysis(model, ctx) -> ShapeFacts:
    return symbolic_shapes(model)


@register_analysis("shapes")
def infer_shapes(model, ctx) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the model, subgraphs included (symbolic dims as
    text; the declared type as a hint where the analysis knows nothing)."""
    facts = ctx.analysis("symbolic-shapes", model) if ctx is not None else symbolic_shapes(model)
    out: dict[str, TensorInfo] = {}
    for name, shape in facts.shapes.items():
        out[name] = TensorInfo(facts.dtypes.get(name), None if shape is None else tuple(D.to_text(d) for d in shape))
    for graph in model.graphs():
        for node in graph.nodes:
            for t in node.outputs:
                if not isinstance(t, gs.Variable) or not t.name:
                    continue
                info = out.get(t.name)
                if info is not None and info.shape is not None and info.dtype is not None:
                    continue
                declared_shape = None if t.shape is None else tuple(
                    d if isinstance(d, int) else (d or None) for d in t.shape)
                dtype = info.dtype if info is not None and info.dtype is not None else np_dtype(t.dtype)
                shape = info.shape if info is not None and info.shape is not None else declared_shape
                if dtype is not None or shape is not None:
                    out[t.name] = TensorInfo(dtype, shape)
    return out


def _longest_vector(graph: onnx.GraphProto) -> int:
    """Length of the longest rank-1 tensor with a static length in ``graph``'s value_info."""
    longest = 0
    for value in graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value"):
            longest = max(longest, dims[0].dim_value)
    return longest


# Tensors larger than this lose their data in the copy that onnx's inference sees (their
# type and dims stay): inference only needs their shapes. Small ones keep their data,
# which data propagation reads (Reshape targets, Slice bounds, ...).
_KEEP_DATA_BYTES = 4096
# Longest static rank-1 tensor for which data propagation is allowed (see ``infer``).
_MAX_PROPAGATED_LENGTH = 1 << 16


def light_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose large tensors (initializers and Constant values, subgraphs
    included) keep their name, type and dims but not their data. The weights' bytes are
    never copied: they are moved aside while the rest is copied, then put back."""
    from onnxopt.ir.storage import model_tensors

    large = [t for t in model_tensors(proto) if t.HasField("raw_data") and len(t.raw_data) > _KEEP_DATA_BYTES]
    saved = [t.raw_data for t in large]
    try:
        for t in large:
            t.ClearField("raw_data")
        light = onnx.ModelProto()
        light.CopyFrom(proto)
    finally:
        for t, data in zip(large, saved):
            t.raw_data = data
    return light


def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``light_copy(proto)`` with onnx's inferred shapes in its value_info (for the cost
    model, which works on protos): data propagation unless some rank-1 tensor is so long
    that propagating it would exhaust memory; best effort."""
    light = light_copy(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
        longest = _longest_vector(inferred.graph)
        if longest <= _MAX_PROPAGATED_LENGTH:
            try:
                inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
            except Exception as exc:
                logger.debug("shape inference with data propagation failed: %s", exc)
        else:
            logger.debug("shape inference without data propagation: a vector of %d elements", longest)
    except Exception as exc:  # inference is best effort
        logger.debug("shape inference failed: %s", exc)
        inferred = light
    return inferred


def _info(type_proto: onnx.TypeProto) -> TensorInfo | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    dtype = np_dtype(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tt.shape.dim)
    return TensorInfo(dtype, shape)


def _collect(graph: onnx.GraphProto, out: dict) -> None:
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        info = _info(value.type)
        if info is not None:
            out[value.name] = info
    for init in graph.initializer:
        out[init.name] = TensorInfo(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                                    if init.data_type else None, tuple(init.dims))
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _collect(attr.g, out)
            for sub in attr.graphs:
                _collect(sub, out)


def tensor_infos(proto: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of ``proto``, subgraphs included, after inference
    (which keeps the declared types it cannot improve)."""
    shapes: dict[str, TensorInfo] = {}
    _collect(infer(proto).graph, shapes)
    return shapes
