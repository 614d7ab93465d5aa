"""quantize-dynamic: int8 weights, activations quantized at run time (no calibration data).

MatMul and Gemm with a constant 2-D weight (and Conv when listed in ``op_types``) get an
int8 weight with one symmetric scale per output channel (or one per tensor), and their
float input is quantized to uint8 at run time from its own min/max. Two forms:

* ``standard`` (default): ``DynamicQuantizeLinear`` (one per activation, shared by all its
  consumers) -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by ``a_scale * b_scale`` (the
  pattern onnxruntime fuses), bias Add left in place. Conv becomes ``ConvInteger`` the
  same way. On MiniLM this ran faster than the contrib form (the shared quantization of
  the Q/K/V input), see BENCHMARKS.md.
* ``contrib`` (targets with ``runtime.contrib_ops``): one com.microsoft
  ``DynamicQuantizeMatMul`` node per MatMul/Gemm, with a following constant bias Add folded
  in.

Outlier smoothing (``smooth``, on by default). One scale per tensor for the activation
loses most on transformer activations with a few outlier channels (MiniLM: one channel of
the FFN input reaches 28 where the 90th percentile of channel ranges is 2.4). The pass
measures channel ranges on sample inputs, and for an activation whose outliers are large
enough inserts one ``Mul`` by 1/s before its quantized consumers and multiplies the
matching weight rows by s, which is exact in float; s = (range / percentile) ** strength
for outlier channels and 1 elsewhere (a partial SmoothQuant migration that leaves the
other channels alone).

Embedding tables (``Gather`` of a constant 2-D table on axis 0) become int8 with one
scale per row, dequantized after the lookup (Gather, Cast, Mul by the gathered scale).

Keeping sensitive layers in float. ``keep_float`` names nodes to leave alone. With
``min_cosine`` > 0 the pass measures, on sample inputs, the cosine between the float
model's outputs and those of the model with one layer quantized, for every layer; then
quantizes all and, while the whole model's cosine is below ``min_cosine``, returns the
most sensitive remaining layer to float (at most ``max_float`` layers); this builds one
onnxruntime session per layer, so it is off by default.

Sample inputs (for smoothing and sensitivity) come from ``ctx.calibration`` when present,
else they are made from the input specs, like a tokenizer's batch: 16 rows of 64 for
symbolic dims; integer inputs that index an embedding table get random ids below its row
count, other integer inputs ones, each 2-D integer input right-padded with zeros to a
random length per row (padding rows carry their own outliers); float inputs standard
normal values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_graph_output, is_op
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.passes._quant_common import Names
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


# -- weight quantization (numpy) -------------------------------------------------------------
def symmetric_int8(w: np.ndarray, axis: int | None, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale): scale = max|w| / qmax along every slice of ``axis``.

    ``axis`` None gives one scale; otherwise one scale per index of that axis. ``qmax`` is
    127, or 63 with ``reduce_range`` (7-bit weights avoid the int16 overflow of u8*s8 dot
    products on x86 CPUs without VNNI).
    """
    qmax = 63.0 if reduce_range else 127.0
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=other) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = (amax / qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


# -- candidates ------------------------------------------------------------------------------
def _float_const(t) -> bool:
    return isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32


def _node_key(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "")


def candidate_kind(node: gs.Node, op_types: set[str], min_elements: int) -> str | None:
    """Which rewrite applies to ``node`` ('matmul', 'gemm', 'conv', 'gather'), or None."""
    if node.domain not in (None, "", "ai.onnx") or not node.outputs:
        return None
    if node.op == "MatMul" and "MatMul" in op_types and len(node.inputs) == 2:
        a, b = node.inputs
        if isinstance(a, gs.Variable) and _float_const(b) and len(b.shape) == 2 and b.values.size >= min_elements:
            return "matmul"
    if node.op == "Gemm" and "Gemm" in op_types and len(node.inputs) >= 2:
        a, b = node.inputs[:2]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = node.attrs
        if (isinstance(a, gs.Variable) and _float_const(b) and len(b.shape) == 2
                and b.values.size >= min_elements and attrs.get("transA", 0) == 0
                and attrs.get("alpha", 1.0) == 1.0
                and (c is None or (c.name == "") or (_float_const(c) and attrs.get("beta", 1.0) == 1.0
                                                   and c.values.ndim <= 1))):
            return "gemm"
    if node.op == "Conv" and "Conv" in op_types and len(node.inputs) >= 2:
        x, w = node.inputs[:2]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if (isinstance(x, gs.Variable) and _float_const(w) and w.values.size >= min_elements
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
                and (b is None or b.name == "" or _float_const(b))):
            return "conv"
    if node.op == "Gather" and "Gather" in op_types and len(node.inputs) == 2:
        data, idx = node.inputs
        if (_float_const(data) and len(data.shape) == 2 and node.attrs.get("axis", 0) == 0
                and isinstance(idx, gs.Variable) and data.values.size >= min_elements):
            return "gather"
    return None


# -- rewrites --------------------------------------------------------------------------------
class _Rewriter:
    def __init__(self, graph: gs.Graph, per_channel: bool, reduce_range: bool, contrib: bool):
        self.graph = graph
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.contrib = contrib
        self.dql: dict[str, tuple] = {}  # activation name -> (q, scale, zero point) outputs
        self.new_nodes: list[gs.Node] = []
        self.removed: set[int] = set()
        self.names = Names(graph)

    def _var(self, name: str, dtype) -> gs.Variable:
        return gs.Variable(self.names(name), dtype=dtype)

    def _const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(name), values)

    def _quantized_activation(self, x: gs.Variable):
        if x.name not in self.dql:
            q = self._var(f"{x.name}_dq_quantized", np.uint8)
            s = self._var(f"{x.name}_dq_scale", np.float32)
            z = self._var(f"{x.name}_dq_zero_point", np.uint8)
            self.new_nodes.append(gs.Node("DynamicQuantizeLinear", f"{x.name}_DynamicQuantizeLinear",
                                          inputs=[x], outputs=[q, s, z]))
            self.dql[x.name] = (q, s, z)
        return self.dql[x.name]

    def _bias_add(self, node: gs.Node) -> tuple[gs.Node, gs.Constant] | None:
        """The Add of a constant 1-D bias that alone consumes ``node``'s output."""
        out = node.outputs[0]
        if len(out.outputs) != 1 or is_graph_output(self.graph, out):
            return None
        add = out.outputs[0]
        if not is_op(add, "Add") or len(add.inputs) != 2:
            return None
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if _float_const(other) and other.values.ndim == 1 and other.values.shape[0] == node.inputs[1].shape[-1]:
            return add, other
        return None

    def matmul(self, node: gs.Node, base: str, weight: np.ndarray, bias: gs.Constant | None,
               out: gs.Variable) -> None:
        """Replace ``node`` (A @ weight [+ bias] -> out) with its dynamically quantized form."""
        a = node.inputs[0]
        q, scale = symmetric_int8(weight, 1 if self.per_channel else None, self.reduce_range)
        wq = self._const(f"{base}_weight_quantized", q)
        ws = self._const(f"{base}_weight_scale", scale)
        # symmetric weights: one zero point 0 serves every channel (ConvInteger takes no other)
        wz = self._const(f"{base}_weight_zero_point", np.array(0, np.int8))
        if self.contrib:
            inputs = [a, wq, ws, wz] + ([bias] if bias is not None else [])
            self.new_nodes.append(gs.Node("DynamicQuantizeMatMul", f"{base}_quant", domain=MS_DOMAIN,
                                          inputs=inputs, outputs=[out]))
            return
        aq, a_scale, a_zp = self._quantized_activation(a)
        acc = self._var(f"{base}_int32", np.int32)
        acc_f = self._var(f"{base}_int32_float", np.float32)
        both = self._var(f"{base}_scale", np.float32)
        self.new_nodes += [
            gs.Node("MatMulInteger", f"{base}_quant", inputs=[aq, wq, a_zp, wz], outputs=[acc]),
            gs.Node("Cast", f"{base}_cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[acc], outputs=[acc_f]),
            gs.Node("Mul", f"{base}_scales_mul", inputs=[a_scale, ws], outputs=[both]),
        ]
        if bias is None:
            self.new_nodes.append(gs.Node("Mul", f"{base}_output_scale_mul", inputs=[acc_f, both], outputs=[out]))
        else:
            scaled = self._var(f"{base}_scaled", np.float32)
            self.new_nodes += [
                gs.Node("Mul", f"{base}_output_scale_mul", inputs=[acc_f, both], outputs=[scaled]),
                gs.Node("Add", f"{base}_bias_add", inputs=[scaled, bias], outputs=[out]),
            ]

    def rewrite_matmul(self, node: gs.Node) -> None:
        weight = node.inputs[1].values
        fused = self._bias_add(node) if self.contrib else None
        if fused is not None:
            add, bias = fused
            out = add.outputs[0]
            add.outputs = []
            self.removed.add(id(add))
        else:
            bias, out = None, node.outputs[0]
        base = _node_key(node)
        node.outputs = []
        self.removed.add(id(node))
        self.matmul(node, base, weight, bias, out)

    def rewrite_gemm(self, node: gs.Node) -> None:
        weight = node.inputs[1].values
        if node.attrs.get("transB", 0):
            weight = weight.T
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and (bias.values.ndim == 0 or bias.values.shape[0] != weight.shape[1]):
            bias = self._const(f"{_node_key(node)}_bias", np.broadcast_to(bias.values, (weight.shape[1],)).copy())
        out = node.outputs[0]
        base = _node_key(node)
        node.outputs = []
        self.removed.add(id(node))
        self.matmul(node, base, weight, bias, out)

    def rewrite_conv(self, node: gs.Node) -> None:
        x, w = node.inputs[:2]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        base = _node_key(node)
        q, scale = symmetric_int8(w.values, 0 if self.per_channel else None, self.reduce_range)
        wq = self._const(f"{base}_weight_quantized", q)
        # symmetric weights: one zero point 0 serves every channel (ConvInteger takes no other)
        wz = self._const(f"{base}_weight_zero_point", np.array(0, np.int8))
        ws = self._const(f"{base}_weight_scale", scale.reshape([-1] + [1] * (w.values.ndim - 2))
                         if scale.ndim else scale)
        out = node.outputs[0]
        node.outputs = []
        self.removed.add(id(node))
        xq, x_scale, x_zp = self._quantized_activation(x)
        acc = self._var(f"{base}_int32", np.int32)
        acc_f = self._var(f"{base}_int32_float", np.float32)
        both = self._var(f"{base}_scale", np.float32)
        scaled = self._var(f"{base}_scaled", np.float32) if bias is not None else out
        attrs = {k: v for k, v in node.attrs.items() if k in ("dilations", "group", "kernel_shape", "pads", "strides")}
        self.new_nodes += [
            gs.Node("ConvInteger", f"{base}_quant", attrs=attrs, inputs=[xq, wq, x_zp, wz], outputs=[acc]),
            gs.Node("Cast", f"{base}_cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[acc], outputs=[acc_f]),
            gs.Node("Mul", f"{base}_scales_mul", inputs=[x_scale, ws], outputs=[both]),
            gs.Node("Mul", f"{base}_output_scale_mul", inputs=[acc_f, both], outputs=[scaled]),
        ]
        if bias is not None:
            b = self._const(f"{base}_bias_reshaped", bias.values.reshape(-1, *([1] * (w.values.ndim - 2))))
            self.new_nodes.append(gs.Node("Add", f"{base}_bias_add", inputs=[scaled, b], outputs=[out]))

    def rewrite_gather(self, node: gs.Node) -> None:
        data, idx = node.inputs
        base = _node_key(node)
        # dequantized in float after the lookup: no int16 saturation, all 8 bits
        q, scale = symmetric_int8(data.values, 0 if self.per_channel else None)
        out = node.outputs[0]
        node.outputs = []
        self.removed.add(id(node))
        rows = self._var(f"{base}_rows_quantized", np.int8)
        rows_f = self._var(f"{base}_rows_float", np.float32)
        self.new_nodes += [
            gs.Node("Gather", f"{base}_quant", attrs={"axis": 0},
                    inputs=[self._const(f"{base}_table_quantized", q), idx], outputs=[rows]),
            gs.Node("Cast", f"{base}_cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[rows], outputs=[rows_f]),
        ]
        if self.per_channel:
            row_scale = self._var(f"{base}_row_scale", np.float32)
            self.new_nodes += [
                gs.Node("Gather", f"{base}_scale_gather", attrs={"axis": 0},
                        inputs=[self._const(f"{base}_table_scale", scale.reshape(-1, 1)), idx], outputs=[row_scale]),
                gs.Node("Mul", f"{base}_dequantize", inputs=[rows_f, row_scale], outputs=[out]),
            ]
        else:
            self.new_nodes.append(gs.Node("Mul", f"{base}_dequantize",
                                          inputs=[rows_f, self._const(f"{base}_table_scale", scale)], outputs=[out]))

    def finish(self) -> None:
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed] + self.new_nodes
        self.graph.toposort()


# -- sample data and sensitivity ---------------------------------------------------------------
def sample_feeds(model, ctx, batches: int = 4) -> list[dict[str, np.ndarray]]:
    """Inputs to judge quantization error on: calibration batches, else made from input specs."""
    calib = getattr(ctx, "calibration", None)
    if calib is not None:
        feeds = _calibration_batches(calib, batches)
        if feeds:
            return feeds
    graph = model.graph
    rng = np.random.default_rng(getattr(ctx, "seed", 0))
    out = {}
    lengths = None  # token sequences: per row, how many leading positions are real tokens
    for inp in graph.inputs:
        shape = [d if isinstance(d, (int, np.integer)) and d >= 0 else (16 if i == 0 else 64)
                 for i, d in enumerate(inp.shape or [])]
        dtype = np.dtype(inp.dtype) if inp.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            rows = _indexed_rows(inp)
            if len(shape) == 2 and lengths is None:
                lengths = rng.integers(max(1, shape[1] // 4), shape[1] + 1, size=shape[0])
            # Like a tokenizer's batch: random ids (or ones) right-padded with zeros.
            values = rng.integers(0, rows, size=shape) if rows else np.ones(shape)
            if len(shape) == 2:
                values = np.where(np.arange(shape[1])[None, :] < lengths[:, None], values, 0)
            out[inp.name] = values.astype(dtype)
        elif dtype.kind == "b":
            out[inp.name] = np.ones(shape, dtype=bool)
        else:
            return []
    return [out]


def _indexed_rows(t: gs.Tensor) -> int | None:
    """Row count of the smallest constant table that ``t`` indexes through Gather (axis 0)."""
    rows = []
    for node in t.outputs:
        if is_op(node, "Gather") and len(node.inputs) == 2 and node.inputs[1] is t \
                and isinstance(node.inputs[0], gs.Constant) and node.attrs.get("axis", 0) == 0:
            rows.append(node.inputs[0].shape[0])
    return min(rows) if rows else None


def _calibration_batches(calib, limit: int) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` batches of a calibration source (onnxopt.data.calibration.Calibration, a
    list of feed dicts, or an object with ``get_next()``)."""
    source = getattr(calib, "source", calib)
    out: list[dict[str, np.ndarray]] = []
    if hasattr(source, "get_next"):
        while len(out) < limit:
            batch = source.get_next()
            if batch is None:
                break
            out.append(dict(batch))
        return out
    try:
        for batch in source:
            out.append(dict(batch))
            if len(out) >= limit:
                break
    except TypeError:
        return []
    return out


def output_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Smallest cosine between float and candidate outputs over samples (rows of axis 0)."""
    worst = 1.0
    for a, b in zip(ref, got):
        if a.dtype.kind != "f" or a.size == 0:
            continue
        a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim > 1 else a.reshape(1, -1).astype(np.float64)
        b2 = b.reshape(a2.shape).astype(np.float64)
        num = (a2 * b2).sum(1)
        den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        worst = min(worst, float(cos.min()))
    return worst


@register_pass("quantize-dynamic")
class QuantizeDynamicPass(Pass):
    """Quantize MatMul/Gemm weights to int8 and their activations at run time (no calibration)."""

    lossless = False

    @dataclass
    class Options:
        op_types: list[str] = option(["MatMul", "Gemm", "Gather"],
                                     "ops to quantize: MatMul, Gemm, Conv, Gather (embedding tables)")
        per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
        reduce_range: str = option("auto", "7-bit weights: on, off, or auto (on for the CPU provider on an "
                                           "x86 CPU without VNNI, where u8*s8 dot products saturate int16)",
                                   choices=["auto", "on", "off"])
        format: str = option("standard", "standard (DynamicQuantizeLinear shared by an activation's "
                                         "consumers, MatMulInteger) or contrib (DynamicQuantizeMatMul, "
                                         "needs runtime.contrib_ops)",
                             choices=["standard", "contrib"])
        min_elements: int = option(1024, "leave weights with fewer elements in float")
        keep_float: list[str] = option([], "node names (or output names) to leave in float")
        min_cosine: float = option(0.0, "when > 0: return the most sensitive layers to float until "
                                        "the outputs' cosine on sample data reaches this")
        max_float: int = option(4, "at most this many layers returned to float by min_cosine")
        smooth: bool = option(True, "divide activation outlier channels by s and multiply the weights' "
                                    "rows by s (exact in float), s from sample-data channel ranges")
        smooth_percentile: float = option(90.0, "channels whose range exceeds this percentile of the "
                                                "channel ranges count as outliers")
        smooth_strength: float = option(0.6, "s = (range / percentile range) ** strength")
        smooth_min_factor: float = option(1.8, "smooth an activation only when its largest s reaches this")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        op_types = set(o.op_types)
        unknown = op_types - {"MatMul", "Gemm", "Conv", "Gather"}
        if unknown:
            from onnxopt.errors import PipelineError

            raise PipelineError(f"quantize-dynamic: cannot quantize {', '.join(sorted(unknown))} "
                                "(op_types takes MatMul, Gemm, Conv, Gather)")
        reduce = o.reduce_range == "on" or (o.reduce_range == "auto" and _cpu_saturates(ctx))
        contrib = o.format == "contrib"
        if contrib and not ctx.target.runtime.contrib_ops:
            from onnxopt.errors import PipelineError

            raise PipelineError(f"quantize-dynamic: format=contrib needs a target with runtime.contrib_ops "
                                f"(target '{ctx.target.name}' has none); use format=standard")
        keep = set(o.keep_float)
        plan = []  # (graph, node, kind)
        for graph in model.graphs():
            for node in graph.nodes:
                kind = candidate_kind(node, op_types, o.min_elements)
                if kind is None:
                    continue
                if _node_key(node) in keep or any(t.name in keep for t in node.outputs):
                    continue
                plan.append((graph, node, kind))
        if not plan:
            return PassResult(changed=False, stats={"quantized": 0})
        if contrib and any(k in ("matmul", "gemm") for _, _, k in plan):
            model.require_opset(MS_DOMAIN, 1)
        floated: list[str] = []
        cosine = None
        scales = self._smoothing(model, ctx, plan) if o.smooth else {}
        if o.min_cosine > 0:
            plan, floated, cosine = self._drop_sensitive(model, ctx, plan, contrib, scales, reduce)
        stats = self._apply(model, plan, contrib, scales, reduce)
        stats["smoothed"] = len(scales)
        stats["format"] = "contrib" if contrib else "standard"
        stats["reduce_range"] = reduce
        stats["kept_float"] = floated
        if cosine is not None:
            stats["sample_cosine"] = round(cosine, 5)
        logger.info("quantize-dynamic: %s", stats)
        return PassResult(changed=True, stats=stats)

    def _apply(self, model, plan, contrib: bool, scales: dict[str, np.ndarray], reduce: bool) -> dict:
        o = self.options
        by_graph: dict[int, _Rewriter] = {}
        counts: dict[str, int] = {}
        _insert_smoothing(model.graph, plan, scales)
        for graph, node, kind in plan:
            rw = by_graph.setdefault(id(graph), _Rewriter(graph, o.per_channel, reduce, contrib))
            getattr(rw, f"rewrite_{kind}")(node)
            counts[kind] = counts.get(kind, 0) + 1
        for rw in by_graph.values():
            rw.finish()
        model.graph.cleanup()
        return {"quantized": sum(counts.values()), **counts}

    def _smoothing(self, model, ctx, plan) -> dict[str, np.ndarray]:
        """Per activation tensor: the factor s of every channel (1 for all but the outliers)."""
        from onnxopt.measure import verify

        groups = _smoothable(plan, model.graph)
        feeds = sample_feeds(model, ctx)
        if not groups or not feeds:
            return {}
        proto = model.to_proto()
        have = {o.name for o in proto.graph.output}
        for name in groups:
            if name not in have and name not in feeds[0]:  # graph inputs: read from the feeds
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        try:
            sess = verify.session(proto, optimize=True)
            wanted = [o.name for o in sess.get_outputs()]
            runs = [sess.run(wanted, f) for f in feeds]
        except Exception as exc:  # noqa: BLE001 - no statistics, no smoothing
            logger.warning("quantize-dynamic: cannot run the model on sample data (%s); no smoothing", exc)
            return {}
        amax: dict[str, np.ndarray] = {}
        for f, values in zip(feeds, runs):
            for name, value in list(zip(wanted, values)) + list(f.items()):
                if name in groups:
                    m = np.abs(value.reshape(-1, value.shape[-1])).max(0)
                    amax[name] = np.maximum(amax[name], m) if name in amax else m
        o = self.options
        scales = {}
        for name, nodes in groups.items():
            if name not in amax:
                continue
            a = np.maximum(amax[name], 1e-6)
            # Only channels above the percentile are scaled down, and only part of the way:
            # sample ranges are estimates, and each scaled channel grows its weight row.
            s = np.maximum(1.0, a / np.percentile(a, o.smooth_percentile)) ** o.smooth_strength
            if s.max() >= o.smooth_min_factor:  # each Mul costs a pass over the activation
                scales[name] = s.astype(np.float32)
        return scales

    # Sensitivity: quantize one layer at a time on a copy, compare outputs with float.
    def _drop_sensitive(self, model, ctx, plan, contrib: bool, scales: dict, reduce: bool):
        from onnxopt.measure import verify
        from onnxopt.ir.model import load

        feeds = sample_feeds(model, ctx)
        layers = [(g, n, k) for g, n, k in plan if k in ("matmul", "gemm", "conv") and g is model.graph]
        if not feeds or not layers:
            return plan, [], None
        base_proto = model.to_proto()

        def quantized_outputs(selected_keys: set[str]) -> list[list[np.ndarray]]:
            trial = load(base_proto)
            trial_plan = [(trial.graph, n, k) for n in trial.graph.nodes
                          for k in [candidate_kind(n, set(self.options.op_types), self.options.min_elements)]
                          if k is not None and _node_key(n) in selected_keys]
            if contrib:
                trial.require_opset(MS_DOMAIN, 1)
            self._apply(trial, trial_plan, contrib, scales, reduce)
            trial.modified = True
            sess = verify.session(trial.to_proto(), optimize=True)
            return [sess.run(None, f) for f in feeds]

        ref_sess = verify.session(base_proto, optimize=True)
        ref = [ref_sess.run(None, f) for f in feeds]

        def cosine(outs) -> float:
            return min(output_cosine(r, q) for r, q in zip(ref, outs))

        all_keys = {_node_key(n) for _, n, _ in plan}
        scores = {}
        for _, node, _ in layers:
            key = _node_key(node)
            scores[key] = cosine(quantized_outputs({key}))
        order = sorted(scores, key=lambda k: scores[k])  # most damaging first
        floated: list[str] = []
        current = cosine(quantized_outputs(all_keys))
        while current < self.options.min_cosine and len(floated) < min(self.options.max_float, len(order)):
            floated.append(order[len(floated)])
            current = cosine(quantized_outputs(all_keys - set(floated)))
        logger.info("quantize-dynamic: sample cosine %.5f with %d layer(s) kept in float", current, len(floated))
        plan = [(g, n, k) for g, n, k in plan if _node_key(n) not in set(floated)]
        return plan, floated, current


def _smoothable(plan, graph) -> dict[str, list[gs.Node]]:
    """Activation name -> the MatMuls (in ``plan``, main graph) that read it as input A."""
    groups: dict[str, list[gs.Node]] = {}
    for g, node, kind in plan:
        if g is graph and kind == "matmul":
            groups.setdefault(node.inputs[0].name, []).append(node)
    return groups


def _insert_smoothing(graph, plan, scales: dict[str, np.ndarray]) -> None:
    """x @ W == (x / s) @ (s W): one Mul per activation, weights rescaled by row."""
    names = Names(graph)
    for name, nodes in _smoothable(plan, graph).items():
        s = scales.get(name)
        if s is None:
            continue
        x = nodes[0].inputs[0]
        xs = gs.Variable(names(f"{name}_smoothed"), dtype=np.float32)
        inv = gs.Constant(names(f"{name}_smooth_scale"), (1.0 / s).astype(np.float32))
        graph.nodes.append(gs.Node("Mul", f"{name}_smooth", inputs=[x, inv], outputs=[xs]))
        for node in nodes:
            w = node.inputs[1]
            node.inputs[0] = xs
            node.inputs[1] = gs.Constant(names(f"{w.name}_smoothed"), (w.values * s[:, None]).astype(np.float32))


def _cpu_saturates(ctx) -> bool:
    """True when the target runs on onnxruntime's CPU provider on an x86 CPU without VNNI."""
    providers = list(ctx.target.runtime.get("execution_providers", []))[:1]
    if providers != ["CPUExecutionProvider"]:
        return False
    from onnxopt.passes._quant_common import cpu_has_vnni

    return not cpu_has_vnni()
