"""convert-float16: run the graph in float16 (or bfloat16), keeping what must stay float32.

Every float32 node computes in the new type unless it is blocked: its op is in
``block_ops`` (numerically fragile or without low-precision kernels on the target; the
target adds its own through ``[passes.convert-float16]``), its name is in ``keep_nodes``,
it is not a default-domain op, it holds a subgraph, or its float output type comes from an
attribute (ConstantOfShape, Random*, EyeLike). Per input and output, the op's schema
decides: a slot whose type constraint does not allow the new type (Resize's ``scales``)
stays float32.

Casts: each float tensor lives in one type (that of its producer, or float32 for graph
inputs when ``keep_io``); a consumer wanting the other type reads one shared Cast of it,
so a tensor gets at most one Cast whatever its number of consumers. Constants are
converted in place instead (a constant both sides read gets a second, converted copy), so
weights never cost a Cast. Graph outputs keep float32 when ``keep_io`` (one Cast before
each that needs it). Constants beyond the float16 range are clamped to +-65504 with a
warning when they feed an op of ``clamp_ops`` (where they act as sentinels: -1e9 in an
attention mask); any other node reading one stays float32 with a warning (PP-OCR det has
BatchNormalization variances above 1e5: clamping them ruined its output, -104 dB SNR).
bfloat16 has float32's range and needs neither.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import outer_scope_names
from onnxopt.errors import PipelineError
from onnxopt.ir.constants import constant_value
from onnxopt.ir.graphs import iter_graphs, named, node_key
from onnxopt.ir.names import NameTable
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)

# Ops kept in float32 by default: index/count arithmetic, sorting and box ops whose results
# change with rounding, and ops whose output type is an attribute.
DEFAULT_BLOCK = ["Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign", "ConstantOfShape",
                 "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                 "Multinomial", "Bernoulli"]


def _low_dtype(name: str):
    if name == "float16":
        return np.dtype(np.float16), onnx.TensorProto.FLOAT16, "tensor(float16)"
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16), onnx.TensorProto.BFLOAT16, "tensor(bfloat16)"


@functools.lru_cache(maxsize=None)
def _slot_types(op: str, opset: int) -> tuple | None:
    """(input type strings, output type strings, {type param: allowed types}) from the schema."""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    ins = tuple((p.type_str, p.option == onnx.defs.OpSchema.FormalParameterOption.Variadic) for p in schema.inputs)
    outs = tuple((p.type_str, p.option == onnx.defs.OpSchema.FormalParameterOption.Variadic) for p in schema.outputs)
    return ins, outs, allowed


def _slot_allows(params: tuple, allowed: dict, index: int, type_str: str) -> bool:
    if not params:
        return False
    if index < len(params):
        t, _ = params[index]
    elif params[-1][1]:  # variadic last parameter covers the rest
        t = params[-1][0]
    else:
        return False
    return type_str in allowed.get(t, {t})


def clamp_to_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Values as float16 with magnitudes over 65504 clamped (and how many were)."""
    finite = np.isfinite(values)
    over = finite & (np.abs(values) > FP16_MAX)
    n = int(over.sum())
    if n:
        values = np.where(over, np.sign(values) * FP16_MAX, values)
    return values.astype(np.float16), n


def _reads_out_of_range(node: gs.Node) -> bool:
    for t in node.inputs:
        if isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32:
            v = constant_value(t)
            if v is not None and v.size and np.any(np.isfinite(v) & (np.abs(v) > FP16_MAX)):
                return True
    return False


@register_pass("convert-float16")
class ConvertFloat16Pass(Pass):
    """Compute in float16 (or bfloat16), keeping graph I/O and blocked ops in float32."""

    lossless = False
    keep_option = "keep_nodes"

    @dataclass
    class Options:
        dtype: str = option("float16", "the low-precision type", choices=["float16", "bfloat16"])
        keep_io: bool = option(True, "graph inputs and outputs stay float32 (casts at the edges)")
        block_ops: list[str] = option([], "more op types to keep in float32 (added to the built-in list)")
        keep_nodes: list[str] = option([], "nodes (names, or output names) to keep in float32")
        use_default_block: bool = option(True, "also keep the built-in list of fragile ops in float32")
        clamp_ops: list[str] = option(["Add", "Sub", "Where", "Min", "Max", "Clip"],
                                      "ops whose out-of-float16-range constants are clamped (sentinels such "
                                      "as -1e9 masks); any other op reading one stays float32")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        caps = ctx.target.capabilities
        if o.dtype == "bfloat16" and not caps.get("bfloat16", False):
            raise PipelineError(f"convert-float16: target '{ctx.target.name}' does not support bfloat16 "
                                "(capabilities.bfloat16 = false)")
        if o.dtype == "float16" and not caps.get("float16", False):
            logger.warning("convert-float16: target '%s' does not list float16; converting as asked",
                           ctx.target.name)
        low, low_enum, low_str = _low_dtype(o.dtype)
        graph = model.graph
        f32 = np.dtype(np.float32)
        dtype_of = self._dtype_reader(model, ctx)
        converted, blocked, kept_range = self._decide(model, dtype_of)
        if not converted:
            return PassResult(changed=False, stats={"converted": 0})

        # 2. Home type of every float tensor: its producer's, float32 for graph inputs.
        low_home: set[int] = set()
        for node in graph.nodes:
            if id(node) in converted:
                for t, is_low in zip(node.outputs, converted[id(node)][1]):
                    if is_low:
                        low_home.add(id(t))
        if not o.keep_io:
            for t in graph.inputs:
                if dtype_of(t) == f32:
                    low_home.add(id(t))
                    t.dtype = low

        # 3. Rewire: constants converted (copied when both types are read), one Cast per
        #    tensor and direction.
        names = NameTable.of(graph)
        casts: dict[tuple[int, str], gs.Variable] = {}
        const_copies: dict[int, gs.Constant] = {}
        new_nodes: list[gs.Node] = []
        clamped = 0
        n_casts = 0

        def cast_of(t: gs.Tensor, to_low: bool) -> gs.Tensor:
            nonlocal n_casts
            key = (id(t), "low" if to_low else "f32")
            if key not in casts:
                suffix = o.dtype if to_low else "float32"
                out = gs.Variable(names(f"{t.name}_{suffix}"), dtype=low if to_low else f32, shape=t.shape)
                new_nodes.append(gs.Node("Cast", f"{t.name}_cast_{suffix}",
                                         attrs={"to": low_enum if to_low else onnx.TensorProto.FLOAT},
                                         inputs=[t], outputs=[out]))
                casts[key] = out
                n_casts += 1
            return casts[key]

        def low_constant(c: gs.Constant) -> gs.Constant:
            nonlocal clamped
            if id(c) not in const_copies:
                values = np.asarray(constant_value(c), dtype=np.float32)
                if o.dtype == "float16":
                    conv, n = clamp_to_float16(values)
                    if n:
                        logger.warning("convert-float16: %d value(s) of constant '%s' exceed the float16 "
                                       "range and were clamped to +-%g", n, c.name, FP16_MAX)
                        clamped += n
                else:
                    conv = values.astype(low)
                const_copies[id(c)] = gs.Constant(names(f"{c.name}_{o.dtype}"), conv)
            return const_copies[id(c)]

        for node in list(graph.nodes):
            ins = converted[id(node)][0] if id(node) in converted else [False] * len(node.inputs)
            for i, t in enumerate(list(node.inputs)):
                if not t.name:
                    continue
                wants_low = ins[i]
                if isinstance(t, gs.Constant):
                    if wants_low and np.dtype(t.dtype) == f32:
                        node.inputs[i] = low_constant(t)
                    continue
                if dtype_of(t) != f32 and id(t) not in low_home:
                    continue
                is_low = id(t) in low_home
                if wants_low != is_low:
                    node.inputs[i] = cast_of(t, wants_low)
            if id(node) in converted:
                outs = converted[id(node)][1]
                if node.op == "Cast" and outs[0]:
                    node.attrs = {**node.attrs, "to": low_enum}
                if node.op == "Constant":
                    node.attrs = {"value": low_constant(node.attrs["value"])}
                for t, is_low in zip(node.outputs, outs):
                    if is_low:
                        t.dtype = low

        # 4. Graph outputs: float32 when keep_io (rename the low tensor, Cast to the name).
        if o.keep_io:
            for i, t in enumerate(list(graph.outputs)):
                if id(t) not in low_home:
                    continue
                name = t.name
                t.name = names(f"{name}_{o.dtype}")
                out = gs.Variable(name, dtype=f32, shape=t.shape)
                new_nodes.append(gs.Node("Cast", f"{name}_cast_float32", attrs={"to": onnx.TensorProto.FLOAT},
                                         inputs=[t], outputs=[out]))
                n_casts += 1
                graph.outputs[i] = out
        else:
            for t in graph.outputs:
                if id(t) in low_home:
                    t.dtype = low

        graph.nodes.extend(new_nodes)
        graph.toposort()
        graph.cleanup()
        stats = {"converted": len(converted), "kept_float32": blocked, "kept_for_range": kept_range,
                 "casts": n_casts, "clamped": clamped, "dtype": o.dtype}
        logger.info("convert-float16: %s", stats)
        return PassResult(changed=True, stats=stats)

    def _dtype_reader(self, model, ctx):
        """tensor -> numpy dtype (the graph's, else shape inference's, else None)."""
        shapes = ctx.analysis("shapes", model)

        def dtype_of(t: gs.Tensor):
            if isinstance(t, gs.Constant):
                return np.dtype(t.dtype)
            if t.dtype is not None:
                try:
                    return np.dtype(t.dtype)
                except TypeError:
                    return None
            info = shapes.get(t.name)
            return info.dtype if info is not None else None

        return dtype_of

    def _decide(self, model, dtype_of) -> tuple[dict, int, int]:
        """(node id -> (low-precision input slots, output slots), nodes kept float32, of which
        for the float16 range) for the main graph."""
        o = self.options
        _, _, low_str = _low_dtype(o.dtype)
        block = set(o.block_ops) | (set(DEFAULT_BLOCK) if o.use_default_block else set())
        keep = set(o.keep_nodes)
        graph = model.graph
        f32 = np.dtype(np.float32)

        # Tensors that subgraphs read from this graph keep float32 (their bodies are not
        # converted), so their producers are blocked.
        outer_read = set()
        for node in graph.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    for sub in iter_graphs(value):
                        outer_read |= outer_scope_names(sub)

        # 1. Which nodes compute in the low type, and which of their slots follow.
        converted: dict[int, tuple[list[bool], list[bool]]] = {}
        blocked = 0
        kept_range = 0
        clamp_ops = set(o.clamp_ops)
        for node in graph.nodes:
            float_in = [bool(t.name) and dtype_of(t) == f32 for t in node.inputs]
            float_out = [dtype_of(t) == f32 for t in node.outputs]
            if not any(float_in) and not any(float_out):
                continue
            if (node.op in block or named(node, keep) or node.domain not in (None, "", "ai.onnx")
                    or any(isinstance(v, gs.Graph) for v in node.attrs.values())
                    or any(t.name in outer_read for t in node.outputs)):
                blocked += 1
                continue
            if node.op == "Constant":
                value = node.attrs.get("value")
                if len(node.attrs) == 1 and isinstance(value, gs.Constant) and np.dtype(value.dtype) == f32:
                    converted[id(node)] = ([], [True])
                else:
                    blocked += 1
                continue
            if node.op == "Cast":
                ins = [False] * len(node.inputs)  # a Cast reads anything
                outs = [float_out[0]]
                converted[id(node)] = (ins, outs)
                continue
            types = _slot_types(node.op, model.opset)
            if types is None:
                blocked += 1
                continue
            if o.dtype == "float16" and node.op not in clamp_ops and _reads_out_of_range(node):
                # e.g. a BatchNormalization variance of 1e6: clamping it would change the
                # result, so the node computes in float32 instead
                logger.warning("convert-float16: node '%s' (%s) reads constants beyond the float16 range; "
                               "kept in float32", node.name, node.op)
                blocked += 1
                kept_range += 1
                continue
            ins_p, outs_p, allowed = types
            ins = [f and _slot_allows(ins_p, allowed, i, low_str) for i, f in enumerate(float_in)]
            outs = [f and _slot_allows(outs_p, allowed, i, low_str) for i, f in enumerate(float_out)]
            if any(f and not ok for f, ok in zip(float_out, outs)):
                blocked += 1  # a float output that cannot be low precision: leave the node
                continue
            converted[id(node)] = (ins, outs)
        return converted, blocked, kept_range

    def layers(self, model, ctx) -> list[str]:
        """The nodes that will compute in the low type."""
        converted, _, _ = self._decide(model, self._dtype_reader(model, ctx))
        return [node_key(n) for n in model.graph.nodes if id(n) in converted]
