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
enough divides it by s and multiplies the matching weight rows by s, which is exact in
float; s = (range / percentile) ** strength for outlier channels and 1 elsewhere (a partial
SmoothQuant migration that leaves the other channels alone). 1/s is folded into the
activation's producer when every reader takes the smoothed value, else one ``Mul`` feeds
the quantized consumers (onnxopt/quantization/smoothing.py, shared with ``smooth-quant``).

Embedding tables (``Gather`` of a constant 2-D table on axis 0) become int8 with one
scale per row, dequantized after the lookup (Gather, Cast, Mul by the gathered scale).

Keeping sensitive layers in float. ``keep_float`` names nodes to leave alone; the
fidelity floor of a run (the target's [fidelity] table, ``--min-snr-db``/``--min-cosine``)
fills it with the layers that cost most when the quantized model falls below the floor.

Sample inputs (for smoothing) come from ``ctx.calibration`` when present,
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

from onnxopt.errors import PipelineError
from onnxopt.ir.constants import constant_value
from onnxopt.ir.graphs import named, node_key
from onnxopt.ir.names import NameTable
from onnxopt.ir.weights import bias_add_after, dense_layer, is_float32_constant
from onnxopt.pipeline.lineage import Origin
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass
from onnxopt.quantization.smoothing import activation_absmax, outlier_scales, sites, smooth
from onnxopt.quantization.scheme import (REDUCE_RANGE_CHOICES, REDUCE_RANGE_HELP, QuantScheme, quantize_weight,
                                         reduce_range_choice, target_schemes)

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def symmetric_int8(w: np.ndarray, axis: int | None, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale): symmetric, one scale per index of ``axis`` (or one)."""
    scheme = QuantScheme("int8", True, "per_channel" if axis is not None else "per_tensor", reduce_range)
    q, scale, _, _ = quantize_weight(w, scheme, axis)
    return q, scale


# -- candidates ------------------------------------------------------------------------------
def _volume(t: gs.Constant) -> int:
    """Elements of a constant, from its shape (no value is loaded)."""
    return int(np.prod(t.shape, dtype=np.int64))


def candidate_kind(node: gs.Node, op_types: set[str], min_elements: int) -> str | None:
    """Which rewrite applies to ``node`` ('matmul', 'gemm', 'conv', 'gather'), or None."""
    if node.domain not in (None, "", "ai.onnx") or not node.outputs:
        return None
    if node.op in ("MatMul", "Gemm") and node.op in op_types:
        layer = dense_layer(node)
        if layer is not None and layer.size >= min_elements:
            return node.op.lower()
    if node.op == "Conv" and "Conv" in op_types and len(node.inputs) >= 2:
        x, w = node.inputs[:2]
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if (isinstance(x, gs.Variable) and is_float32_constant(w) and _volume(w) >= min_elements
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
                and (b is None or b.name == "" or is_float32_constant(b))):
            return "conv"
    if node.op == "Gather" and "Gather" in op_types and len(node.inputs) == 2:
        data, idx = node.inputs
        if (is_float32_constant(data) and len(data.shape) == 2 and node.attrs.get("axis", 0) == 0
                and isinstance(idx, gs.Variable) and _volume(data) >= min_elements):
            return "gather"
    return None


# -- rewrites --------------------------------------------------------------------------------
class _Rewriter:
    def __init__(self, graph: gs.Graph, per_channel: bool, reduce_range: bool, contrib: bool, lineage=None):
        self.graph = graph
        self.lineage = lineage  # where to record what each layer was (onnxopt.pipeline.lineage)
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.contrib = contrib
        self.dql: dict[str, tuple] = {}  # activation name -> (q, scale, zero point) outputs
        self.new_nodes: list[gs.Node] = []
        self.removed: set[int] = set()
        self.names = NameTable.of(graph)

    def _var(self, name: str, dtype) -> gs.Variable:
        return gs.Variable(self.names(name), dtype=dtype)

    def _const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(name), values)

    def _record(self, codes: gs.Constant, out: gs.Tensor, weight: np.ndarray, bias) -> None:
        """What the layer was, for passes that recover from the rounding (refit)."""
        if self.lineage is not None:
            value = constant_value(bias) if isinstance(bias, gs.Constant) else bias
            self.lineage.record(codes.name, Origin("quantized", out.name, weight,
                                                   None if value is None else np.asarray(value, np.float32)))

    def _quantized_activation(self, x: gs.Variable):
        if x.name not in self.dql:
            q = self._var(f"{x.name}_dq_quantized", np.uint8)
            s = self._var(f"{x.name}_dq_scale", np.float32)
            z = self._var(f"{x.name}_dq_zero_point", np.uint8)
            self.new_nodes.append(gs.Node("DynamicQuantizeLinear", f"{x.name}_DynamicQuantizeLinear",
                                          inputs=[x], outputs=[q, s, z]))
            self.dql[x.name] = (q, s, z)
        return self.dql[x.name]

    def matmul(self, node: gs.Node, base: str, weight: np.ndarray, bias: gs.Constant | None,
               out: gs.Variable) -> None:
        """Replace ``node`` (A @ weight [+ bias] -> out) with its dynamically quantized form."""
        a = node.inputs[0]
        q, scale = symmetric_int8(weight, 1 if self.per_channel else None, self.reduce_range)
        wq = self._const(f"{base}_weight_quantized", q)
        ws = self._const(f"{base}_weight_scale", scale)
        # symmetric weights: one zero point 0 serves every channel (ConvInteger takes no other)
        wz = self._const(f"{base}_weight_zero_point", np.array(0, np.int8))
        self._record(wq, out, weight, bias)
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
        weight = constant_value(node.inputs[1])
        fused = bias_add_after(node, self.graph) if self.contrib else None
        if fused is not None:
            add, bias = fused
            out = add.outputs[0]
            add.outputs = []
            self.removed.add(id(add))
        else:
            bias, out = None, node.outputs[0]
        base = node_key(node)
        node.outputs = []
        self.removed.add(id(node))
        self.matmul(node, base, weight, bias, out)

    def rewrite_gemm(self, node: gs.Node) -> None:
        layer = dense_layer(node)
        weight = layer.weight_kn()
        bias = layer.bias
        if bias is not None and tuple(bias.shape) != (layer.n,):
            bias = self._const(f"{node_key(node)}_bias", layer.bias_n())
        out = node.outputs[0]
        base = node_key(node)
        node.outputs = []
        self.removed.add(id(node))
        self.matmul(node, base, weight, bias, out)

    def rewrite_conv(self, node: gs.Node) -> None:
        x, w = node.inputs[:2]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        base = node_key(node)
        weight = constant_value(w)
        q, scale = symmetric_int8(weight, 0 if self.per_channel else None, self.reduce_range)
        wq = self._const(f"{base}_weight_quantized", q)
        self._record(wq, node.outputs[0], weight, bias)
        # symmetric weights: one zero point 0 serves every channel (ConvInteger takes no other)
        wz = self._const(f"{base}_weight_zero_point", np.array(0, np.int8))
        ws = self._const(f"{base}_weight_scale", scale.reshape([-1] + [1] * (weight.ndim - 2))
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
            b = self._const(f"{base}_bias_reshaped", constant_value(bias).reshape(-1, *([1] * (weight.ndim - 2))))
            self.new_nodes.append(gs.Node("Add", f"{base}_bias_add", inputs=[scaled, b], outputs=[out]))

    def rewrite_gather(self, node: gs.Node) -> None:
        data, idx = node.inputs
        base = node_key(node)
        # dequantized in float after the lookup: no int16 saturation, all 8 bits
        q, scale = symmetric_int8(constant_value(data), 0 if self.per_channel else None)
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


@register_pass("quantize-dynamic")
class QuantizeDynamicPass(Pass):
    """Quantize MatMul/Gemm weights to int8 and their activations at run time (no calibration)."""

    lossless = False
    keep_option = "keep_float"
    promises_speed = True

    @dataclass
    class Options:
        op_types: list[str] = option(["MatMul", "Gemm", "Gather"],
                                     "ops to quantize: MatMul, Gemm, Conv, Gather (embedding tables)")
        per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
        reduce_range: str = option("target", REDUCE_RANGE_HELP, choices=REDUCE_RANGE_CHOICES)
        format: str = option("standard", "standard (DynamicQuantizeLinear shared by an activation's "
                                         "consumers, MatMulInteger) or contrib (DynamicQuantizeMatMul, "
                                         "needs runtime.contrib_ops)",
                             choices=["standard", "contrib"])
        min_elements: int = option(1024, "leave weights with fewer elements in float")
        keep_float: list[str] = option([], "node names (or output names) to leave in float")
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
            raise PipelineError(f"quantize-dynamic: cannot quantize {', '.join(sorted(unknown))} "
                                "(op_types takes MatMul, Gemm, Conv, Gather)")
        reduce, _ = reduce_range_choice(o.reduce_range, target_schemes(ctx.target)[1], True, ctx)
        contrib = o.format == "contrib"
        if contrib and not ctx.target.runtime.contrib_ops:
            raise PipelineError(f"quantize-dynamic: format=contrib needs a target with runtime.contrib_ops "
                                f"(target '{ctx.target.name}' has none); use format=standard")
        plan = self._plan(model)
        if not plan:
            return PassResult(changed=False, stats={"quantized": 0})
        if contrib and any(k in ("matmul", "gemm") for _, _, k in plan):
            model.require_opset(MS_DOMAIN, 1)
        scales = self._smoothing(model, ctx, plan) if o.smooth else {}
        stats = self._apply(model, plan, contrib, scales, reduce, ctx.lineage)
        stats["smoothed"] = len(scales)
        stats["format"] = "contrib" if contrib else "standard"
        stats["reduce_range"] = reduce
        logger.info("quantize-dynamic: %s", stats)
        return PassResult(changed=True, stats=stats)

    def _plan(self, model) -> list[tuple[gs.Graph, gs.Node, str]]:
        """(graph, node, kind) of every layer to quantize."""
        o = self.options
        plan = []
        for graph in model.graphs():
            for node in graph.nodes:
                kind = candidate_kind(node, set(o.op_types), o.min_elements)
                if kind is not None and not named(node, o.keep_float):
                    plan.append((graph, node, kind))
        return plan

    def layers(self, model, ctx) -> list[str]:
        return [node_key(node) for _, node, _ in self._plan(model)]

    def _apply(self, model, plan, contrib: bool, scales: dict[str, np.ndarray], reduce: bool, lineage=None) -> dict:
        o = self.options
        by_graph: dict[int, _Rewriter] = {}
        counts: dict[str, int] = {}
        _insert_smoothing(model.graph, plan, scales, lineage)
        for graph, node, kind in plan:
            rw = by_graph.setdefault(id(graph), _Rewriter(graph, o.per_channel, reduce, contrib, lineage))
            getattr(rw, f"rewrite_{kind}")(node)
            counts[kind] = counts.get(kind, 0) + 1
        for rw in by_graph.values():
            rw.finish()
        model.graph.cleanup()
        return {"quantized": sum(counts.values()), **counts}

    def _smoothing(self, model, ctx, plan) -> dict[str, np.ndarray]:
        """Per activation tensor: the factor s of every channel (1 for all but the outliers),
        from the channels' largest magnitudes over the calibration data, else over sample
        inputs made from the input specs (onnxopt.quantization.smoothing)."""
        found = _smoothable(plan, model.graph)
        amax, _ = activation_absmax(model, ctx, found)
        o = self.options
        scales = {}
        for site in found:
            a = amax.get(site.tensor.name)
            if a is None or a.size != site.channels:
                continue
            # Only channels above the percentile are scaled down, and only part of the way:
            # sample ranges are estimates, and each scaled channel grows its weight row.
            s = outlier_scales(a, o.smooth_percentile, o.smooth_strength)
            if s.max() >= o.smooth_min_factor:  # each Mul costs a pass over the activation
                scales[site.tensor.name] = s.astype(np.float32)
        return scales


def _smoothable(plan, graph) -> list:
    """The activations the MatMuls of ``plan`` (main graph) read as input A, with those MatMuls."""
    return sites(graph, op_types=("MatMul",), readers=[node for g, node, kind in plan if g is graph and kind == "matmul"])


def _insert_smoothing(graph, plan, scales: dict[str, np.ndarray], lineage=None) -> None:
    """x @ W == (x / s) @ (s W): 1/s folded into x's producer, or one Mul per activation."""
    names = NameTable.of(graph)
    for site in _smoothable(plan, graph):
        s = scales.get(site.tensor.name)
        if s is not None:
            smooth(site, s, graph, names, allow_mul=True, lineage=lineage)
