"""Constant folding: compute what does not depend on the model's inputs once, at compile time.

fold-constants
    A node of the default ONNX domain whose inputs are all constant (initializers, Constant
    nodes, outputs of nodes folded before it) is evaluated and its outputs become
    initializers. Nodes are evaluated in waves (a wave = every node whose inputs became
    known in the previous one), each wave as one small model in one onnxruntime session
    (ORT_DISABLE_ALL, so the values are exactly what the runtime would compute). A node
    onnxruntime refuses is evaluated alone, then by onnx's ReferenceEvaluator, else left.

    Shape computations: ``Shape`` (with its ``start``/``end`` attributes) and ``Size`` of a
    tensor whose dims are statically known (the ``shapes`` analysis: onnx shape inference
    with data propagation) become constants without evaluating anything, so exported
    Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains fold away. ``Shape`` with
    start/end folds when only the selected dims are static.

    Size bound (option ``max_bytes``): a node is folded only when the byte size of every
    output is known BEFORE it is evaluated and is at most ``max_bytes``: from the
    broadcast of its inputs for elementwise ops, else from the ``shapes`` analysis, else
    from onnx's shape inference of that one node fed the constant input values. So a
    ConstantOfShape/Expand/Tile/Range/Resize to a huge size is never computed.

    Left alone: random ops (RandomNormal/Uniform[Like], Multinomial, Bernoulli), ops of
    other domains (custom or contrib: their kernels may be missing or nondeterministic),
    If/Loop/Scan, sequence and optional ops, DequantizeLinear (folding it would turn the
    int8 weights of a Q/DQ model back into float; onnxruntime's folder skips it too), and
    values numpy cannot hold exactly (bfloat16, float8, int4, complex, strings).

    Graph outputs: a folded tensor that is an output of its graph (main graph or body) keeps
    being produced by a node: its producer is replaced by a ``Constant`` node writing the
    same name (an initializer cannot stand for a graph output here).

    Subgraphs: If/Loop/Scan bodies are folded after the graph that holds them, so constants
    of the outer graph (including ones just folded) are visible inside. Shape folding inside
    bodies only uses shapes of constants and of outer tensors (the analysis covers the main
    graph).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.pass_base import Pass, PassResult, option
from onnxopt.registry import register_pass

logger = logging.getLogger(__name__)

MIB = 1 << 20

NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
NEVER_FOLD = NONDETERMINISTIC | frozenset({
    "If", "Loop", "Scan", "Constant", "DequantizeLinear",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
    "Optional", "OptionalGetElement", "OptionalHasElement",
})

# TensorProto element types whose values numpy holds exactly (what we can fold).
_EXACT_TYPES = {
    onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
}
_EXACT_DTYPES = frozenset(np.dtype(t) for t in _EXACT_TYPES.values())

# Ops whose output shape is the numpy broadcast of their inputs' shapes.
ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu",
    "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish",
    "Mod", "Mul", "Neg", "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
    "Where", "Xor",
})
# Inputs of these ops that are parameters, not data (left out of the broadcast).
_PARAM_INPUTS = {"Clip": 1}

# Inputs up to this size are handed to onnx's per-node shape inference as values.
_INFER_DATA_LIMIT = 64 * 1024


def exact_array(tensor: gs.Constant) -> np.ndarray | None:
    """The value of a constant as a numpy array, or None when numpy cannot hold it exactly.

    Never touches ``tensor.values`` (that would cache a converted copy on the tensor and
    change how it is exported).
    """
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if proto.data_type not in _EXACT_TYPES or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(proto)
    if isinstance(values, np.ndarray):
        if values.dtype not in _EXACT_DTYPES:
            return None
        export = tensor.export_dtype
        if export is not None and not _same_dtype(export, values.dtype):
            return None
        return values
    return None  # sparse


def _same_dtype(export_dtype, dtype: np.dtype) -> bool:
    if isinstance(export_dtype, int):
        return _EXACT_TYPES.get(export_dtype) is not None and np.dtype(_EXACT_TYPES[export_dtype]) == dtype
    try:
        return np.dtype(export_dtype) == dtype
    except TypeError:
        return False


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Constant node, when numpy holds it exactly."""
    if len(node.attrs) != 1:
        return None
    (key, value), = node.attrs.items()
    if key == "value" and isinstance(value, gs.Constant):
        return exact_array(value)
    if key == "value_float":
        return np.array(value, dtype=np.float32)
    if key == "value_floats":
        return np.array(value, dtype=np.float32).reshape(-1)
    if key == "value_int":
        return np.array(value, dtype=np.int64)
    if key == "value_ints":
        return np.array(value, dtype=np.int64).reshape(-1)
    return None


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def shape_slice(dims: tuple, start: int | None, end: int | None) -> tuple:
    """``dims[start:end]`` with the clamping rules of the Shape operator."""
    rank = len(dims)

    def clamp(v, default):
        if v is None:
            return default
        v = v + rank if v < 0 else v
        return min(max(v, 0), rank)

    return tuple(dims[clamp(start, 0):clamp(end, rank)])


def topological_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes producers first, without reordering ``graph.nodes``.

    Exported graphs are almost always sorted already; then the given order is returned.
    """
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    deps = [{index[id(t.inputs[0])] for t in n.inputs if t.inputs and id(t.inputs[0]) in index} - {i}
            for i, n in enumerate(nodes)]
    if all(j < i for i, d in enumerate(deps) for j in d):
        return list(nodes)
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
    if len(order) != len(nodes):  # a cycle (invalid model): keep the given order
        return list(nodes)
    return [nodes[i] for i in order]


def graph_output_ids(model) -> set[int]:
    """ids of every tensor that is an output of the main graph or of any body."""
    return {id(t) for g in model.graphs() for t in g.outputs}


@register_pass("fold-constants")
class FoldConstantsPass(Pass):
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers."""

    lossless = True

    @dataclass
    class Options:
        max_bytes: int = option(MIB, "never fold a node whose output would be larger than this many bytes")

    def run(self, model, ctx) -> PassResult:
        stats: dict[str, int] = defaultdict(int)
        changed = False
        for round_ in range(8):
            shapes = ctx.analysis("shapes", model) if ctx is not None else {}
            folder = _Folder(model, shapes, self.options.max_bytes, stats)
            round_changed, blocked = folder.fold_all()
            changed |= round_changed
            stats["rounds"] = round_ + 1
            if not (round_changed and blocked):
                break
            # Folding may have made more shapes static: infer them again and retry.
            if ctx is not None:
                ctx.invalidate(frozenset(a for a in ctx.cached_analyses if a != "shapes"))
        stats = {k: v for k, v in sorted(stats.items()) if v or k in ("folded_nodes",)}
        return PassResult(changed=changed, stats=stats)


class _Folder:
    """One round of folding over every graph of a model."""

    def __init__(self, model, shapes: dict, max_bytes: int, stats: dict):
        self.model = model
        self.shapes = shapes
        self.max_bytes = max_bytes
        self.stats = stats
        self.opset_import = list(model.template.opset_import)
        self.ir_version = model.template.ir_version
        self.known: dict[int, np.ndarray] = {}  # id(tensor) -> value
        self.outputs = graph_output_ids(model)

    # -- driver --------------------------------------------------------------------------
    def fold_all(self) -> tuple[bool, bool]:
        changed = blocked = False
        graphs = list(self.model.graphs())
        for graph in graphs:
            c, b = self.fold_graph(graph)
            changed |= c
            blocked |= b
        self.stats["subgraphs_visited"] = len(graphs) - 1
        return changed, blocked

    def value_of(self, t: gs.Tensor) -> np.ndarray | None:
        key = id(t)
        if key in self.known:
            return self.known[key]
        value = None
        if isinstance(t, gs.Constant):
            value = exact_array(t)
        elif t.inputs and t.inputs[0].op == "Constant" and is_default_domain(t.inputs[0]):
            value = constant_node_value(t.inputs[0])
        if value is not None:
            self.known[key] = value
        return value

    def static_dims(self, t: gs.Tensor) -> tuple | None:
        value = self.value_of(t)
        if value is not None:
            return tuple(value.shape)
        info = self.shapes.get(t.name) if t.name else None
        if info is None or info.shape is None:
            return None
        return info.shape

    # -- one graph -----------------------------------------------------------------------
    def fold_graph(self, graph: gs.Graph) -> tuple[bool, bool]:
        order = topological_order(graph)
        # Candidate nodes and how many of their distinct inputs are not yet known.
        missing: dict[int, int] = {}
        waiting: dict[int, list[gs.Node]] = defaultdict(list)  # id(tensor) -> candidates
        ready: list[gs.Node] = []
        blocked = False
        for node in order:
            if not self.candidate(node):
                continue
            if node.op in ("Shape", "Size") and node.inputs and self.shape_value(node) is not None:
                ready.append(node)
                continue
            unknown = {}
            for t in node.inputs:
                if t.name and self.value_of(t) is None:
                    unknown[id(t)] = t
            if not unknown:
                ready.append(node)
                continue
            if all(t.inputs and self.candidate(t.inputs[0]) for t in unknown.values()):
                missing[id(node)] = len(unknown)
                for key in unknown:
                    waiting[key].append(node)

        folded: dict[int, gs.Node] = {}
        while ready:
            batch = []
            for node in ready:
                if node.op in ("Shape", "Size"):
                    value = self.shape_value(node)
                    if value is not None:
                        self.known[id(node.outputs[0])] = value
                        folded[id(node)] = node
                        self.stats["shape_folds"] += 1
                        continue
                if self.fits(node):
                    batch.append(node)
                else:
                    blocked = True
            done = [n for n in ready if id(n) in folded]
            done += self.evaluate(batch, folded)
            ready = []
            for node in done:
                for out in node.outputs:
                    for user in waiting.pop(id(out), ()):
                        missing[id(user)] -= 1
                        if missing[id(user)] == 0:
                            ready.append(user)
        if not folded:
            return False, blocked
        self.replace(graph, folded)
        return True, blocked

    def candidate(self, node: gs.Node) -> bool:
        if not is_default_domain(node) or node.op in NEVER_FOLD:
            return False
        if any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values()):
            return False
        return bool(node.outputs)

    # -- shape folding -------------------------------------------------------------------
    def shape_value(self, node: gs.Node) -> np.ndarray | None:
        dims = self.static_dims(node.inputs[0])
        if dims is None:
            return None
        if node.op == "Size":
            if not all(isinstance(d, int) for d in dims):
                return None
            return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        dims = shape_slice(dims, node.attrs.get("start"), node.attrs.get("end"))
        if not all(isinstance(d, int) for d in dims):
            return None
        return np.array(dims, dtype=np.int64)

    # -- the size bound ------------------------------------------------------------------
    def fits(self, node: gs.Node) -> bool:
        sizes = self.output_bytes(node)
        if sizes is None:
            self.stats["skipped_unknown_size"] += 1
            return False
        if max(sizes, default=0) > self.max_bytes:
            self.stats["skipped_too_large"] += 1
            return False
        return True

    def output_bytes(self, node: gs.Node) -> list[int] | None:
        """Bytes of each output, known without evaluating the node; None when unknown."""
        live = [o for o in node.outputs if o.name]
        if node.op in ELEMENTWISE and len(live) == 1:
            skip = _PARAM_INPUTS.get(node.op)
            shapes = [self.value_of(t).shape for i, t in enumerate(node.inputs)
                      if t.name and (skip is None or i < skip)]
            try:
                count = int(np.prod(np.broadcast_shapes(*shapes), dtype=np.int64)) if shapes else 1
            except ValueError:
                return None
            itemsize = self.output_itemsize(node)
            if itemsize is not None:
                return [count * itemsize]
        sizes = [self.analysis_bytes(o) for o in live]
        if all(s is not None for s in sizes):
            return sizes
        return self.inferred_bytes(node)

    def output_itemsize(self, node: gs.Node) -> int | None:
        if node.op == "Cast":
            np_type = _EXACT_TYPES.get(node.attrs.get("to"))
            return np.dtype(np_type).itemsize if np_type else None
        if node.op in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsInf", "IsNaN",
                       "And", "Or", "Xor", "Not"):
            return 1
        data = [self.value_of(t) for t in node.inputs if t.name]
        if node.op == "Where":
            data = data[1:]
        return max((v.dtype.itemsize for v in data), default=None)

    def analysis_bytes(self, t: gs.Tensor) -> int | None:
        info = self.shapes.get(t.name)
        if info is None or not info.is_static or info.dtype is None:
            return None
        return int(np.prod(info.shape, dtype=np.int64)) * np.dtype(info.dtype).itemsize

    def inferred_bytes(self, node: gs.Node) -> list[int] | None:
        """onnx shape inference of this one node, fed the (small) constant inputs' values."""
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        try:
            schema = onnx.defs.get_schema(node.op, max_inclusive_version=self.opset(""), domain="")
            proto = OnnxExporter.export_node(node)
            types, data = {}, {}
            for t in node.inputs:
                if not t.name or t.name in types:
                    continue
                value = self.value_of(t)
                types[t.name] = onnx.helper.make_tensor_type_proto(
                    onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                if value.nbytes <= _INFER_DATA_LIMIT:
                    data[t.name] = numpy_helper.from_array(value, t.name)
            result = onnx.shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=self.opset_import, ir_version=self.ir_version)
        except Exception as exc:  # inference is best effort: an unknown size means no folding
            logger.debug("no shape for %s (%s): %s", node.name, node.op, exc)
            return None
        sizes = []
        for out in node.outputs:
            if not out.name:
                continue
            tp = result.get(out.name)
            if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
                return None
            dims = tp.tensor_type.shape.dim
            if not all(d.HasField("dim_value") for d in dims):
                return None
            np_type = _EXACT_TYPES.get(tp.tensor_type.elem_type)
            if np_type is None:
                return None
            count = int(np.prod([d.dim_value for d in dims], dtype=np.int64))
            sizes.append(count * np.dtype(np_type).itemsize)
        return sizes

    def opset(self, domain: str) -> int:
        return self.model.opset_of(domain) or onnx.defs.onnx_opset_version()

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, batch: list[gs.Node], folded: dict) -> list[gs.Node]:
        """Evaluate a wave; returns the nodes whose outputs are now known."""
        if not batch:
            return []
        self.stats["waves"] += 1
        results = self.run_ort(batch)
        if results is None and len(batch) > 1:
            results = {}
            for node in batch:  # find the node onnxruntime refuses; run the others alone
                single = self.run_ort([node])
                if single is None:
                    single = self.run_reference(node)
                    if single is not None:
                        self.stats["evaluated_by_reference"] += 1
                if single is not None:
                    results.update(single)
        elif results is None:
            results = self.run_reference(batch[0]) or {}
            if results:
                self.stats["evaluated_by_reference"] += 1
        done = []
        for node in batch:
            values = [results.get(o.name) for o in node.outputs if o.name]
            if any(not isinstance(v, np.ndarray) or v.dtype not in _EXACT_DTYPES for v in values):
                self.stats["skipped_not_evaluable"] += 1
                continue
            if any(v.nbytes > self.max_bytes for v in values):  # inference was wrong
                self.stats["skipped_too_large"] += 1
                continue
            for o in node.outputs:
                if o.name:
                    self.known[id(o)] = results[o.name]
            folded[id(node)] = node
            done.append(node)
        return done

    def batch_model(self, nodes: list[gs.Node]) -> tuple[onnx.ModelProto, dict]:
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        feeds, inputs, outputs = {}, [], []
        for node in nodes:
            for t in node.inputs:
                if t.name and t.name not in feeds:
                    value = self.value_of(t)
                    feeds[t.name] = value
                    inputs.append(onnx.helper.make_tensor_value_info(
                        t.name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
            for o in node.outputs:
                if o.name:
                    vi = onnx.ValueInfoProto()
                    vi.name = o.name
                    outputs.append(vi)
        graph = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "fold", inputs, outputs)
        proto = onnx.helper.make_model(graph, opset_imports=self.opset_import)
        proto.ir_version = self.ir_version
        return proto, feeds

    def run_ort(self, nodes: list[gs.Node]) -> dict | None:
        from onnxopt import verify

        try:
            proto, feeds = self.batch_model(nodes)
            sess = verify.session(proto)
            self.stats["sessions"] += 1
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:  # onnxruntime refuses the model or a kernel fails
            logger.debug("onnxruntime cannot fold %d node(s) (%s): %s", len(nodes),
                         ",".join(sorted({n.op for n in nodes})), exc)
            return None

    def run_reference(self, node: gs.Node) -> dict | None:
        from onnx.reference import ReferenceEvaluator

        try:
            proto, feeds = self.batch_model([node])
            ref = ReferenceEvaluator(proto)
            names = [o.name for o in node.outputs if o.name]
            return dict(zip(names, ref.run(names, feeds)))
        except Exception as exc:
            logger.debug("cannot evaluate %s (%s): %s", node.name, node.op, exc)
            return None

    # -- rewrite -------------------------------------------------------------------------
    def replace(self, graph: gs.Graph, folded: dict[int, gs.Node]) -> None:
        new_nodes = []
        for node in graph.nodes:
            if id(node) not in folded:
                new_nodes.append(node)
                continue
            self.stats["folded_nodes"] += 1
            outs = [o for o in node.outputs if o.name]
            kept = [o for o in outs if id(o) in self.outputs]
            node.inputs.clear()
            node.outputs.clear()
            for o in outs:
                if id(o) not in self.outputs:
                    o.to_constant(self.known[id(o)])
            for o in kept:  # a graph output stays produced by a node
                const = gs.Constant(f"{o.name}_value", self.known[id(o)])
                new_nodes.append(gs.Node("Constant", name=f"{o.name}_constant", attrs={"value": const},
                                         outputs=[o]))
                self.stats["graph_outputs_as_constant_nodes"] += 1
        graph.nodes[:] = new_nodes
