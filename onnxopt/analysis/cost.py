"""Cost model: parameters and bytes per weight, MACs and FLOPs per node, from inferred shapes.

Conventions (the numbers tests check by hand):

- MACs are multiply-accumulate pairs. Conv, ConvTranspose, MatMul, Gemm, Einsum-free
  attention ops and recurrent cells count the MACs of their dot products. BatchNormalization
  counts 1 per element (x * scale + shift once folded), LayerNormalization / GroupNormalization
  / InstanceNormalization 3 per element (sum, sum of squares, scale-and-shift);
  AveragePool / GlobalAveragePool / ReduceMean / ReduceSum 1 per input element of each window.
  Every other op (activations, elementwise arithmetic, MaxPool, data movement) has 0 MACs.
- FLOPs are 2 x MACs, plus one per output element for biases and elementwise ops, plus the
  window size per output element for MaxPool, 3 per element for Softmax (exp, sum, divide)
  and 2 per element for the normalizations' subtract-and-divide.
- A dim that the model names (``batch``) stays a symbol: counts are then
  polynomials such as ``1152*batch``; a dim shape inference could not infer (or named
  ``unk__N`` itself) makes the node's count unknown (None): the node is listed and left out
  of the totals, which are then lower bounds. Giving input shapes resolves both.

Subgraphs (If/Loop/Scan bodies) are counted once each, as if every branch ran once.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

# Bits per element of the integer types that quantized weights use (others: itemsize * 8).
_SUB_BYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
for _name in ("FLOAT4E2M1",):
    if hasattr(onnx.TensorProto, _name):
        _SUB_BYTE_BITS[getattr(onnx.TensorProto, _name)] = 4
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                  onnx.TensorProto.UINT16, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_QUANTIZED_CONSUMERS = {"DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                        "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "QGemm",
                        "GatherBlockQuantized"}


# -- symbolic counts ---------------------------------------------------------------------------
class Poly:
    """A polynomial with integer coefficients over symbolic dims: {monomial: coefficient}.

    A monomial is a sorted tuple of symbol names (repeated for powers); () is the constant.
    """

    __slots__ = ("terms",)

    def __init__(self, terms: dict | int = 0):
        if isinstance(terms, (int, np.integer)):
            terms = {(): int(terms)} if terms else {}
        self.terms: dict[tuple, int] = {k: v for k, v in terms.items() if v}

    @staticmethod
    def symbol(name: str) -> "Poly":
        return Poly({(name,): 1})

    def __add__(self, other) -> "Poly":
        other = other if isinstance(other, Poly) else Poly(other)
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0) + v
        return Poly(out)

    __radd__ = __add__

    def __mul__(self, other) -> "Poly":
        other = other if isinstance(other, Poly) else Poly(other)
        out: dict[tuple, int] = {}
        for k1, v1 in self.terms.items():
            for k2, v2 in other.terms.items():
                k = tuple(sorted(k1 + k2))
                out[k] = out.get(k, 0) + v1 * v2
        return Poly(out)

    __rmul__ = __mul__

    def __floordiv__(self, n: int) -> "Poly":
        """Exact division by an integer (used for group and head splits)."""
        return Poly({k: v // n for k, v in self.terms.items()})

    @property
    def is_constant(self) -> bool:
        return all(k == () for k in self.terms)

    @property
    def symbols(self) -> set[str]:
        return {s for k in self.terms for s in k}

    def value(self, bindings: dict[str, int] | None = None, default: int | None = None) -> int:
        """The number this polynomial is when every symbol is bound (KeyError otherwise)."""
        total = 0
        for k, v in self.terms.items():
            term = v
            for s in k:
                term *= (bindings or {}).get(s, default) if default is not None else (bindings or {})[s]
            total += term
        return total

    def __int__(self) -> int:
        return self.value({})

    def __eq__(self, other) -> bool:
        other = other if isinstance(other, Poly) else Poly(other)
        return self.terms == other.terms

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.terms.items())))

    def __repr__(self) -> str:
        return f"Poly({self})"

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for k in sorted(self.terms, key=lambda m: (-len(m), m)):
            v = self.terms[k]
            syms = "*".join(k)
            parts.append(str(v) if not syms else (syms if v == 1 else f"{v}*{syms}"))
        return " + ".join(parts)

    def to_json(self) -> int | str:
        """An int when constant, else the polynomial as text."""
        return int(self) if self.is_constant else str(self)


Count = Poly | None  # None: not knowable from the inferred shapes


def _mul(*xs: Count | int) -> Count:
    out = Poly(1)
    for x in xs:
        if x is None:
            return None
        out = out * x
    return out


def _add(*xs: Count | int) -> Count:
    out = Poly(0)
    for x in xs:
        if x is None:
            return None
        out = out + x
    return out


def dim_count(d) -> Count:
    """A dim as a count: int -> constant, str -> symbol, Poly -> itself, None -> unknown."""
    if isinstance(d, Poly):
        return d
    if isinstance(d, (int, np.integer)):
        return Poly(int(d)) if d >= 0 else None
    if isinstance(d, str) and d and not d.startswith("unk__"):
        return Poly.symbol(d)
    return None  # unknown, or a placeholder that onnx's inference made up (unk__N)


def numel(shape: tuple | None) -> Count:
    if shape is None:
        return None
    return _mul(*(dim_count(d) for d in shape))


def to_json(x: Count) -> int | str | None:
    return None if x is None else x.to_json()


# -- shapes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueShape:
    elem_type: int  # onnx.TensorProto data type, 0 when unknown
    shape: tuple | None  # ints, symbol names, None for unknown dims; None for unknown rank


def _dims(type_proto: onnx.TypeProto) -> ValueShape | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return ValueShape(tt.elem_type, None)
    return ValueShape(tt.elem_type, tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim))


def parse_input_shapes(specs: Iterable[str]) -> dict[str, list[int]]:
    """``name:1,3,224,224`` (or ``name=1x3x224x224``) -> {name: [1, 3, 224, 224]}."""
    from onnxopt.errors import UsageError

    out = {}
    for spec in specs:
        sep = ":" if ":" in spec else "="
        name, _, dims = spec.rpartition(sep)
        try:
            parts = dims.split(",") if "," in dims else dims.split("x")  # 1,3,224,224 or 1x3x224x224
            values = [int(d) for d in parts if d.strip() != ""]
        except ValueError:
            values = None
        if not name or values is None or any(v < 0 for v in values):
            raise UsageError(f"input shape '{spec}': expected NAME:D1,D2,… with integer dims")
        out[name] = values
    return out


def with_input_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph inputs have the given fixed shapes."""
    from onnxopt.errors import UsageError

    if not input_shapes:
        return proto
    inputs = {v.name: v for v in proto.graph.input}
    unknown = set(input_shapes) - set(inputs)
    if unknown:
        raise UsageError(f"input shape given for unknown input(s) {', '.join(sorted(unknown))} "
                         f"(inputs: {', '.join(inputs)})")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for v in out.graph.input:
        if v.name in input_shapes:
            dims = input_shapes[v.name]
            shape = v.type.tensor_type.shape
            if len(shape.dim) and len(shape.dim) != len(dims):
                raise UsageError(f"input '{v.name}' has rank {len(shape.dim)}, the shape given has "
                                 f"{len(dims)} dims")
            shape.ClearField("dim")
            for d in dims:
                shape.dim.add().dim_value = d
    # Drop stale inferred shapes so inference recomputes them from the new input shapes.
    out.graph.ClearField("value_info")
    return out


def inferences(proto: onnx.ModelProto) -> Iterator[tuple[onnx.ModelProto, dict | None]]:
    """Weight-free copies of ``proto`` to read shapes from, each with a dict of inferred
    ValueShapes that take precedence over its value_info (or None), to try in turn.

    onnx's inference comes first (``onnxopt.analysis.shapes.infer``: fast, and enough for
    static models); the caller goes on to onnxopt's symbolic shape analysis
    (``onnxopt.analysis.shapes``) only when nodes are left without shapes: it carries
    symbolic dims through Reshape, Concat and broadcasts where onnx's inference gives up,
    as ``12*batch`` polynomials. The plain copy last. No onnxruntime.
    """
    from onnxopt.analysis.shapes import infer, light_copy

    yield infer(proto), None
    light = light_copy(proto)
    try:
        yield light, symbolic_value_shapes(light)
    except Exception as exc:  # noqa: BLE001  (the analysis is best effort here)
        logger.debug("symbolic shape analysis failed: %r", exc)
    yield light, None


def symbolic_value_shapes(proto: onnx.ModelProto) -> dict[str, ValueShape]:
    """Name -> ValueShape of every tensor the symbolic shape analysis knows, with symbolic
    dims as Poly (a dim only a run tells, such as a Reshape to a computed shape, is a symbol
    of its own, ``unknown_N``)."""
    from onnxopt.analysis.dims import Sym
    from onnxopt.analysis.shapes import symbolic_shapes
    from onnxopt.ir.model import Model

    facts = symbolic_shapes(Model(proto, sha256=""))
    out = {}
    for name, shape in facts.shapes.items():
        dtype = facts.dtypes.get(name)
        elem = onnx.helper.np_dtype_to_tensor_dtype(dtype) if dtype is not None else 0
        dims = None
        if shape is not None:
            dims = []
            for d in shape:
                if isinstance(d, Sym):
                    d = Poly({tuple(sorted("unknown_" + a[1:] if a.startswith("?") else a for a in mono)): c
                              for mono, c in d.terms})
                dims.append(d)
            dims = tuple(dims)
        out[name] = ValueShape(elem, dims)
    return out


def value_shapes(graph: onnx.GraphProto, outer: dict | None = None) -> dict[str, ValueShape]:
    shapes = dict(outer or {})
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        s = _dims(v.type)
        if s is not None:
            shapes[v.name] = s
    for t in graph.initializer:
        shapes[t.name] = ValueShape(t.data_type, tuple(t.dims))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    shapes[node.output[0]] = ValueShape(a.t.data_type, tuple(a.t.dims))
    return shapes


# -- per-node cost ---------------------------------------------------------------------------
@dataclass
class NodeCost:
    name: str
    op: str
    category: str  # conv, matmul, attention, recurrent, normalization, pooling, elementwise, …
    macs: Count
    flops: Count
    graph: str = "main"

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "category": self.category,
                "macs": to_json(self.macs), "flops": to_json(self.flops), "graph": self.graph}


_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Exp", "Log", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Mish", "Swish", "Sin", "Cos", "Floor", "Ceil", "Round",
    "Sign", "Clip", "Where", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
    "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ThresholdedRelu", "BiasAdd", "Cast",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Shrink",
}
_NORMALIZATION = {"LayerNormalization", "GroupNormalization", "InstanceNormalization",
                  "SimplifiedLayerNormalization", "SkipLayerNormalization",
                  "SkipSimplifiedLayerNormalization", "MeanVarianceNormalization", "RMSNormalization",
                  "LpNormalization"}
_REDUCE_SUM = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
               "ReduceLogSumExp"}
_REDUCE_CMP = {"ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "ReduceProd"}
_SOFTMAX = {"Softmax", "LogSoftmax", "Softmax_13", "Hardmax"}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
            if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}


def _shape(shapes: dict, name: str) -> tuple | None:
    s = shapes.get(name) if name else None
    return s.shape if s is not None else None


def node_cost(node: onnx.NodeProto, shapes: dict[str, ValueShape]) -> NodeCost:
    """MACs and FLOPs of one node from the shapes of its inputs and outputs."""
    op = node.op_type
    attrs = _attrs(node)
    ins = [_shape(shapes, n) for n in node.input]
    outs = [_shape(shapes, n) for n in node.output]
    y = outs[0] if outs else None
    n_out = numel(y)

    def cost(category: str, macs: Count, extra_flops: Count = Poly(0)) -> NodeCost:
        flops = _add(_mul(2, macs), extra_flops) if macs is not None and extra_flops is not None else None
        return NodeCost(node.name, op, category, macs, flops)

    def at(shape, i):
        if shape is None:
            return None
        try:
            return dim_count(shape[i])
        except IndexError:
            return None

    has_bias = lambda i: len(node.input) > i and node.input[i] != ""  # noqa: E731

    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"):
        w = ins[3] if op == "QLinearConv" else ins[1]
        if w is None or y is None:
            return cost("conv", None, None)
        per_out = _mul(*(dim_count(d) for d in w[1:]))  # (C/group) * kernel
        bias = n_out if has_bias(8 if op == "QLinearConv" else 2) else Poly(0)
        return cost("conv", _mul(n_out, per_out), bias)
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return cost("conv", None, None)
        per_in = _mul(*(dim_count(d) for d in w[1:]))  # (M/group) * kernel
        bias = n_out if has_bias(2) else Poly(0)
        return cost("conv", _mul(numel(x), per_in), bias)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = ins[0]
        k = at(a, -1) if a is not None and len(a) >= 1 else None
        b = ins[1] if len(ins) > 1 and op == "MatMul" else None
        if (k is None or not k.is_constant) and b is not None and len(b) >= 2:
            kb = at(b, -2)  # the same dim, seen from the weight: often static where a's is not
            if kb is not None and kb.is_constant:
                k = kb
        return cost("matmul", _mul(n_out, k))
    if op in ("Gemm", "QGemm"):
        a = ins[0]
        trans_a = attrs.get("transA", 0)
        k = at(a, 0 if trans_a else 1) if a is not None and len(a) == 2 else None
        return cost("matmul", _mul(n_out, k), n_out if has_bias(2) else Poly(0))
    if op == "MatMulNBits":  # com.microsoft: A [..., K] x packed B [N, K] -> [..., N]
        return cost("matmul", _mul(numel(ins[0]), attrs.get("N")), n_out if has_bias(5) else Poly(0))
    if op == "Attention" and node.domain in ("", "ai.onnx"):  # opset 23: Q, K, V -> Y
        q, k = ins[0], ins[1]
        kv_len = at(k, -2) if k is not None and len(k) in (3, 4) else None
        if k is not None and len(k) == 3:
            kv_len = at(k, 1)
        return cost("attention", _mul(kv_len, _add(numel(q), n_out)))
    if op == "Attention":  # com.microsoft: X [B, S, Hin] x W [Hin, 3H] -> Y [B, S, H]
        x, w = ins[0], ins[1]
        seq = at(x, 1) if x is not None and len(x) == 3 else None
        proj = _mul(numel(x), at(w, -1) if w is not None else None)
        return cost("attention", _add(proj, _mul(2, seq, n_out)))
    if op in ("MultiHeadAttention", "GroupQueryAttention"):  # com.microsoft, 3-D Q/K
        q, k = ins[0], ins[1] if len(ins) > 1 else None
        kv_len = at(k, 1) if k is not None and len(k) == 3 else None
        return cost("attention", _mul(kv_len, _add(numel(q), n_out)))
    if op in ("LSTM", "GRU", "RNN"):  # X [seq, batch, input], W [dirs, gates*H, input]
        x, w = ins[0], ins[1]
        r = ins[2] if len(ins) > 2 else None
        if x is None or w is None or r is None or len(x) != 3:
            return cost("recurrent", None, None)
        steps = _mul(at(x, 0), at(x, 1))  # seq * batch (layout=1 swaps them: same product)
        per_step = _add(_mul(*(dim_count(d) for d in w)), _mul(*(dim_count(d) for d in r)))
        return cost("recurrent", _mul(steps, per_step), _mul(steps, at(w, 0), at(w, 1)))
    if op in ("BatchNormalization",):
        return cost("normalization", n_out)
    if op in _NORMALIZATION:
        return cost("normalization", _mul(3, n_out), _mul(2, n_out))
    if op in ("AveragePool", "LpPool", "MaxPool"):
        kernel = _mul(*attrs.get("kernel_shape", []))
        if op == "MaxPool":
            return cost("pooling", Poly(0), _mul(n_out, kernel))
        return cost("pooling", _mul(n_out, kernel))
    if op in ("GlobalAveragePool", "GlobalLpPool"):
        return cost("pooling", numel(ins[0]))
    if op == "GlobalMaxPool":
        return cost("pooling", Poly(0), numel(ins[0]))
    if op in _REDUCE_SUM:
        return cost("reduction", numel(ins[0]))
    if op in _REDUCE_CMP:
        return cost("reduction", Poly(0), numel(ins[0]))
    if op in _SOFTMAX:
        return cost("softmax", Poly(0), _mul(3, n_out))
    if op in _ELEMENTWISE:
        return cost("elementwise", Poly(0), n_out)
    if op == "Resize":
        return cost("resize", Poly(0), n_out)
    if op in ("If", "Loop", "Scan"):
        return cost("control", Poly(0))
    # Reshape, Transpose, Concat, Gather, Slice, Shape, … move data and compute nothing.
    return cost("data", Poly(0))


# The ops that may sit between the two matmuls of an attention block.
_ATTENTION_GLUE = {"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Dropout",
                   "Identity"}


def attention_matmuls(graph: onnx.GraphProto) -> tuple[set[int], int]:
    """(indices of MatMuls in a MatMul -> … -> Softmax -> … -> MatMul pattern, number of patterns).

    Both matmuls of the pattern multiply two activations (scores = Q·Kᵀ, context = P·V),
    which is what makes them attention rather than a projection with a weight.
    """
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers[name].append(i)
    weights = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"}
    tagged: set[int] = set()
    patterns = 0
    for s, node in enumerate(graph.node):
        if node.op_type not in ("Softmax",):
            continue
        before = after = None
        name = node.input[0]
        for _ in range(6):  # walk back through scaling / masking glue
            i = producer.get(name)
            if i is None:
                break
            prev = graph.node[i]
            if prev.op_type == "MatMul":
                before = i
                break
            if prev.op_type not in _ATTENTION_GLUE:
                break
            name = next((x for x in prev.input if x and x not in weights), None)
            if name is None:
                break
        frontier = [node.output[0]]
        for _ in range(4):  # walk forward through dropout / cast glue
            nxt = [j for name in frontier for j in consumers.get(name, [])]
            hit = [j for j in nxt if graph.node[j].op_type == "MatMul"]
            if hit:
                after = hit[0]
                break
            frontier = [o for j in nxt if graph.node[j].op_type in _ATTENTION_GLUE
                        for o in graph.node[j].output]
            if not frontier:
                break
        if before is not None and after is not None and not any(
                x in weights for k in (before, after) for x in graph.node[k].input):
            tagged.update((before, after))
            patterns += 1
    return tagged, patterns


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for a in node.attribute:
        if a.HasField("g"):
            yield a.name, a.g
        for i, g in enumerate(a.graphs):
            yield f"{a.name}[{i}]", g


def graph_costs(graph: onnx.GraphProto, shapes: dict[str, ValueShape],
                where: str = "main", inferred: dict[str, ValueShape] | None = None) -> list[NodeCost]:
    """NodeCost of every node of ``graph`` and of its subgraphs (depth first); ``inferred``
    shapes take precedence over the graph's own value_info."""
    shapes = value_shapes(graph, shapes)
    if inferred:
        shapes.update(inferred)
    attention, _ = attention_matmuls(graph)
    out = []
    for i, node in enumerate(graph.node):
        c = node_cost(node, shapes)
        c.graph = where
        if i in attention:
            c.category = "attention"
        out.append(c)
        for attr, body in _subgraphs(node):
            out.extend(graph_costs(body, shapes, f"{where}/{node.name or node.op_type}.{attr}"))
    return out


# -- weights -------------------------------------------------------------------------------
@dataclass
class WeightInfo:
    name: str
    dtype: str
    shape: tuple
    params: int  # logical elements (a packed int4 matrix counts its N*K weights)
    bytes: int  # bytes as stored
    bits: float  # bits per weight (bytes*8/params for packed formats)
    kind: str  # dense, sparse, quantized
    zeros: int  # elements equal to zero (for sparse tensors: params - stored values)
    consumer: str | None = None  # op type of the first consumer

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["shape"] = list(self.shape)
        d["sparsity"] = round(self.sparsity, 6)
        return d


def dtype_bits(data_type: int) -> int:
    if data_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[data_type]
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8
    except Exception:
        return 0


def _dtype_name(data_type: int) -> str:
    return onnx.TensorProto.DataType.Name(data_type).lower()


def _zeros(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return _external_zeros(t)
    try:
        arr = numpy_helper.to_array(t)
    except Exception:
        return 0
    if arr.dtype.kind not in "biufc":
        return 0
    return int(arr.size - np.count_nonzero(arr))


def _external_zeros(t: onnx.TensorProto, chunk: int = 1 << 22) -> int:
    """Zeros of a tensor left in its data file, read in chunks (never all in memory)."""
    from onnxopt.ir.storage import external_span

    span = external_span(t)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    except Exception:
        return 0
    if span is None or dtype.kind not in "biufc":
        return 0
    path, offset, length = span
    step = max(chunk // dtype.itemsize, 1) * dtype.itemsize
    nonzero = count = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            data = f.read(min(step, length))
            if not data:
                break
            values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype=dtype)
            nonzero += int(np.count_nonzero(values))
            count += values.size
            length -= len(data)
    return count - nonzero


def _graph_weights(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str | None, onnx.NodeProto | None]]:
    consumers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, node)
    for t in graph.initializer:
        yield t, "initializer", consumers.get(t.name)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    t = onnx.TensorProto()
                    t.CopyFrom(a.t)
                    t.name = node.output[0]
                    yield t, "constant", consumers.get(node.output[0])
        for _, body in _subgraphs(node):
            yield from _graph_weights(body)


def weight_infos(proto: onnx.ModelProto, count_zeros: bool = True) -> list[WeightInfo]:
    """Every constant tensor of the model (initializers, Constant nodes, sparse initializers)."""
    out = []
    for t, _, consumer in _graph_weights(proto.graph):
        params = math.prod(t.dims)
        bits = dtype_bits(t.data_type)
        nbytes = (params * bits + 7) // 8 if bits else len(t.raw_data)
        kind = "dense"
        op = consumer.op_type if consumer is not None else None
        if op == "MatMulNBits" and list(consumer.input).index(t.name) == 1:
            a = _attrs(consumer)
            params, bits = int(a["N"]) * int(a["K"]), float(a.get("bits", 4))
            kind = "quantized"
        elif t.data_type in _INTEGER_TYPES and op in _QUANTIZED_CONSUMERS:
            kind = "quantized"
        zeros = _zeros(t) if count_zeros and kind == "dense" and params else 0
        out.append(WeightInfo(t.name, _dtype_name(t.data_type), tuple(t.dims), params, nbytes,
                              nbytes * 8 / params if kind == "quantized" and params else float(bits),
                              kind, zeros, op))
    for s in proto.graph.sparse_initializer:
        params = math.prod(s.dims)
        stored = math.prod(s.values.dims)
        nbytes = (stored * dtype_bits(s.values.data_type) + 7) // 8 + \
            (math.prod(s.indices.dims) * dtype_bits(s.indices.data_type) + 7) // 8
        out.append(WeightInfo(s.values.name, _dtype_name(s.values.data_type), tuple(s.dims), params,
                              nbytes, nbytes * 8 / params if params else 0.0, "sparse",
                              params - stored, None))
    return out


# -- the whole model -----------------------------------------------------------------------
@dataclass
class CostReport:
    params: int
    weight_bytes: int
    macs: Count
    flops: Count
    nodes: list[NodeCost]
    weights: list[WeightInfo]
    unknown: list[str]  # nodes whose count the shapes could not give
    symbols: list[str]
    attention_patterns: int
    memory: "object | None" = None  # memory.ActivationMemory
    by_category: dict = field(default_factory=dict)

    def to_json(self, per_node: bool = False) -> dict:
        out = {
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "macs": to_json(self.macs),
            "flops": to_json(self.flops),
            "macs_by_category": {k: to_json(v) for k, v in self.by_category.items()},
            "attention_patterns": self.attention_patterns,
            "symbolic_dims": self.symbols,
            "uncounted_nodes": self.unknown,
            "weights_by_kind": dict(Counter(w.kind for w in self.weights)),
        }
        if self.memory is not None:
            out["activation_memory"] = self.memory.to_json()
        if per_node:
            out["nodes"] = [n.to_json() for n in self.nodes]
            out["weights"] = [w.to_json() for w in self.weights]
        return out


def observed_shapes(proto: onnx.ModelProto, feeds: dict) -> dict[str, onnx.ValueInfoProto]:
    """Shapes of the main graph's tensors as onnxruntime computes them on ``feeds``
    (``onnxopt.data.capture``: every node output read in one run). Tensors inside If/Loop
    bodies cannot be observed this way; their consumers stay as inference left them."""
    from onnxopt.data.capture import Capture
    from onnxopt.errors import OnnxoptError

    names = [name for node in proto.graph.node for name in node.output if name]
    try:
        cap = Capture(proto, names)
        wanted = {i.name for i in cap.session.get_inputs()}
        values = cap.run({k: v for k, v in feeds.items() if k in wanted})
    except (OnnxoptError, Exception) as exc:  # noqa: BLE001  (observation is best effort)
        logger.debug("cannot observe shapes: %s", exc)
        return {}
    out = {}
    for name, value in values.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            out[name] = onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
    return out


def model_cost(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
               memory: bool = True, count_zeros: bool = True, feeds: dict | None = None) -> CostReport:
    """Params, bytes, MACs, FLOPs (and peak activation memory) of ``proto``.

    ``input_shapes`` fixes the shapes of graph inputs (resolving their symbolic dims).
    ``feeds`` (one batch of inputs) fixes them too, and when inference leaves nodes without
    shapes (or with symbolic ones), the main graph's shapes are observed in one onnxruntime
    run on them.
    """
    if feeds is not None and not input_shapes:
        input_shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
    inferred, nodes, facts = None, None, None
    for candidate, candidate_facts in inferences(with_input_shapes(proto, input_shapes or {})):
        costs = graph_costs(candidate.graph, {}, inferred=candidate_facts)
        if nodes is None or _unknowns(costs) < _unknowns(nodes):
            inferred, nodes, facts = candidate, costs, candidate_facts
        if _unknowns(nodes) == 0:
            break
    if feeds is not None and _unresolved(nodes):
        seen = observed_shapes(proto, feeds)
        if seen:
            patched = onnx.ModelProto()
            patched.CopyFrom(inferred)
            kept = [v for v in patched.graph.value_info if v.name not in seen]
            patched.graph.ClearField("value_info")
            patched.graph.value_info.extend(kept + [v for n, v in seen.items()
                                                    if n not in {o.name for o in patched.graph.output}])
            for out in patched.graph.output:
                if out.name in seen:
                    out.type.CopyFrom(seen[out.name].type)
            unseen = {k: v for k, v in (facts or {}).items() if k not in seen}
            costs = graph_costs(patched.graph, {}, inferred=unseen)
            if _unresolved(costs) <= _unresolved(nodes):
                inferred, nodes, facts = patched, costs, unseen
    shapes = value_shapes(inferred.graph)
    if facts:
        shapes.update(facts)
    total_macs: Count = Poly(0)
    total_flops: Count = Poly(0)
    unknown = []
    by_category: dict[str, Count] = {}
    for n in nodes:
        if n.macs is None or n.flops is None:
            unknown.append(f"{n.op} '{n.name}'" if n.name else n.op)
            continue
        total_macs = total_macs + n.macs
        total_flops = total_flops + n.flops
        by_category[n.category] = by_category.get(n.category, Poly(0)) + n.macs
    weights = weight_infos(proto, count_zeros=count_zeros)
    symbols = sorted({s for x in [total_macs, total_flops] for s in x.symbols})
    _, patterns = attention_matmuls(inferred.graph)
    report = CostReport(
        params=sum(w.params for w in weights), weight_bytes=sum(w.bytes for w in weights),
        macs=total_macs, flops=total_flops, nodes=nodes, weights=weights, unknown=unknown,
        symbols=symbols, attention_patterns=patterns,
        by_category={k: v for k, v in sorted(by_category.items(), key=lambda kv: kv[0]) if v != Poly(0)})
    if memory:
        from onnxopt.analysis.memory import activation_memory

        report.memory = activation_memory(inferred.graph, shapes, report.weight_bytes, inferred=facts)
    return report


def _unknowns(nodes: list[NodeCost]) -> int:
    return sum(1 for n in nodes if n.macs is None or n.flops is None)


def _unresolved(nodes: list[NodeCost]) -> int:
    """Nodes whose count is unknown or still symbolic (with concrete inputs, both are gaps)."""
    return sum(1 for n in nodes if n.macs is None or n.flops is None
               or not n.macs.is_constant or not n.flops.is_constant)


def human(n: int | str | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'; symbolic and unknown counts are shown as they are."""
    if n is None:
        return "unknown"
    if isinstance(n, str):
        return n
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}"
    return f"{n} {unit}".rstrip()
