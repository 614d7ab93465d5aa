"""Static int8 quantization: QuantizeLinear/DequantizeLinear pairs with calibrated scales.

quantize-static
    Weights become integer initializers followed by DequantizeLinear (per-channel
    symmetric int8 by default, per-tensor as an option); activations get QuantizeLinear ->
    DequantizeLinear pairs whose scale and zero point come from calibration statistics
    (minmax, percentile, entropy or mse; see onnxopt/calibration.py). Biases of Conv,
    ConvTranspose and Gemm become int32 with scale = input_scale * weight_scale (kept float
    when the target's bias_bits is 0). Constant inputs of other quantized ops (an Add's
    3.0 in hard-swish) are quantized per-tensor like activations, equal ones once.

    Where Q/DQ pairs go comes from the target's [quantization] table, never its name:
      quantized_ops      ops whose float inputs (and outputs, with quantize_outputs) are
                         quantized: the int8 kernels of the runtime (QLinearConv, QGemm, …)
      unified_scale_ops  ops whose inputs and outputs share one scale (Concat)
      passthrough_ops    data-movement ops Q/DQ moves through: quantized with their input's
                         scale when their input is quantized (MaxPool, Reshape, Transpose, …)
      float_ops          never quantized
      residual_add       Add of two activations gets Q/DQ on both inputs (TensorRT)
      quantize_outputs   quantize outputs too (onnxruntime's QDQ format) or inputs only
      full_graph         every float tensor between graph input and output (NPU), and the
                         constants data movement reads (an embedding table under Gather)
      weight_schemes     op type -> the scheme of its constant weights instead of `weights`
                         (QNN's MatMul takes per-tensor uint8 weights)
    With asymmetric activations, a Relu (or Clip(0, c)) after a quantized op is folded
    into the quantization of that op's output: Q with zero point at the lowest code clamps
    negatives exactly as Relu does (onnxruntime's quantizer does the same).

    Per-channel DequantizeLinear needs opset 13: an older model is raised to 13 when
    every op keeps its meaning (or onnx's version converter can rewrite the changed ones);
    otherwise weights fall back to per-tensor and the report says so. 16-bit activations
    need opset 21 likewise. A model that already holds Q/DQ or QLinear ops is left alone.

    Statistics: ``calibration_requests`` plans on a copy of the graph and names every
    tensor it will quantize, so the pass manager can gather the requests of consecutive
    calibrating passes into one streamed onnxruntime run (onnxopt/calibration.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.data.statistics import METHODS, TensorRange
from onnxopt.errors import CalibrationError
from onnxopt.ir.constants import constant_value
from onnxopt.ir.graphs import named, node_key
from onnxopt.ir.names import NameTable
from onnxopt.ir.ops import data_input_indices
from onnxopt.ir.opsets import raise_opset
from onnxopt.ir.surgery import topological_order
from onnxopt.ir.weights import WEIGHT_OPS, output_channel_axis
from onnxopt.pipeline.lineage import Origin
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass
from onnxopt.quantization import qdq
from onnxopt.quantization import scheme as qs

logger = logging.getLogger(__name__)

FOLDABLE_ACTIVATIONS = ("Relu", "Clip")


def data_inputs(node: gs.Node) -> tuple[int, ...]:
    return data_input_indices(node.op, len(node.inputs))


@dataclass
class Plan:
    """What the pass will quantize, by tensor name (found on the graph after folding)."""

    activations: dict[str, gs.Tensor] = field(default_factory=dict)
    rewire_all: dict[str, bool] = field(default_factory=dict)
    consumers: dict[str, list] = field(default_factory=dict)  # when not rewiring all
    weights: list[tuple[gs.Node, int, int | None]] = field(default_factory=list)
    biases: list[tuple[gs.Node, int]] = field(default_factory=list)
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)
    parent: dict[str, str] = field(default_factory=dict)  # union-find of shared scales
    layers: list[str] = field(default_factory=list)  # keys of the nodes that run quantized
    unified: dict[str, list[str]] = field(default_factory=dict)  # unified-scale node key -> its inputs

    def find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(name, name) != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def unite(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@register_pass("quantize-static")
class QuantizeStaticPass(Pass):
    """Insert QuantizeLinear/DequantizeLinear pairs with scales calibrated on data."""

    lossless = False
    needs_calibration = True
    keep_option = "exclude_nodes"
    promises_speed = True

    @dataclass
    class Options:
        calibration: str = option("minmax", "how activation ranges are chosen", choices=METHODS)
        percentile: float = option(99.999, "percentile kept by calibration=percentile (each tail)")
        activation_dtype: str = option("target", "activation integer type (target = the target's scheme)",
                                       choices=("target", "uint8", "int8", "uint16", "int16"))
        symmetric_activations: str = option("target", "symmetric activation ranges",
                                            choices=("target", "true", "false"))
        per_channel: bool = option(True, "per-channel weight scales (false: per-tensor)")
        reduce_range: str = option("target", qs.REDUCE_RANGE_HELP, choices=qs.REDUCE_RANGE_CHOICES)
        fold_activations: bool = option(True, "fold Relu/Clip(0,c) into the preceding quantized output")
        op_types: list[str] = option([], "op types to quantize (empty = the target's quantized_ops)")
        exclude_nodes: list[str] = option([], "nodes (names, or output names) left in float")
        unify_max_ratio: float = option(16.0, "a Concat (unified-scale op) whose inputs' value ranges differ by "
                                              "more than this factor stays in float, its inputs keeping "
                                              "their own scales")

    # -- schemes ---------------------------------------------------------------------------
    def _schemes(self, ctx) -> tuple[qs.QuantScheme, qs.QuantScheme, str]:
        act, wt = qs.target_schemes(ctx.target)
        o = self.options
        act = qs.QuantScheme(o.activation_dtype if o.activation_dtype != "target" else act.dtype,
                             act.symmetric if o.symmetric_activations == "target" else o.symmetric_activations == "true",
                             "per_tensor", False)
        reduce, why = qs.reduce_range_choice(o.reduce_range, wt, act.dtype == "uint8" and wt.dtype == "int8", ctx)
        wt = qs.QuantScheme(wt.dtype, wt.symmetric, wt.granularity if o.per_channel else "per_tensor", reduce)
        return act, wt, why

    # -- planning --------------------------------------------------------------------------
    def _fold_activations(self, graph: gs.Graph, act: qs.QuantScheme, ctx, quantized: set, shapes: dict,
                          stats: dict | None = None) -> int:
        """Remove Relu/Clip(0, c) after a quantized op whose output will be quantized (with
        ``stats``: only where the Relu's output has calibration statistics to take over)."""
        q = ctx.target.quantization
        if not (self.options.fold_activations and q.get("quantize_outputs", True)) or act.symmetric:
            return 0
        outputs = {id(t) for t in graph.outputs}
        folded = 0
        for node in list(graph.nodes):
            if node.op not in FOLDABLE_ACTIVATIONS or node.domain not in (None, "", "ai.onnx"):
                continue
            if named(node, self.options.exclude_nodes) or len(node.outputs) != 1:
                continue
            x = node.inputs[0]
            if not x.inputs or id(x) in outputs or len(x.outputs) != 1:
                continue
            producer = x.inputs[0]
            if producer.op not in quantized or producer.domain not in (None, "", "ai.onnx") or \
                    named(producer, self.options.exclude_nodes):
                continue
            if not qdq.is_float_tensor(x, shapes) or (stats is not None and not (
                    node.outputs[0].name in stats and stats[node.outputs[0].name].count)):
                continue
            if node.op == "Clip" and not _clip_from_zero(node):
                continue
            y = node.outputs[0]
            index = [i for i, t in enumerate(producer.outputs) if t is x][0]
            node.inputs.clear()
            node.outputs.clear()
            producer.outputs[index] = y
            graph.nodes.remove(node)
            folded += 1
        return folded

    def _plan(self, graph: gs.Graph, ctx, shapes: dict, act: qs.QuantScheme, left_float=frozenset()) -> Plan:
        q = ctx.target.quantization
        o = self.options
        quantized = set(o.op_types or q.get("quantized_ops", []))
        unified = set(q.get("unified_scale_ops", []))
        passthrough = set(q.get("passthrough_ops", []))
        float_ops = set(q.get("float_ops", []))
        full = bool(q.get("full_graph", False))
        outputs_too = bool(q.get("quantize_outputs", True)) or full
        plan = Plan()

        def is_activation(t: gs.Tensor) -> bool:
            return not isinstance(t, gs.Constant) and constant_value(t) is None and t.name != "" \
                and qdq.is_float_tensor(t, shapes)

        def add(t: gs.Tensor, consumer: gs.Node | None, rewire_all: bool) -> None:
            plan.activations[t.name] = t
            plan.rewire_all[t.name] = plan.rewire_all.get(t.name, False) or rewire_all
            if consumer is not None:
                plan.consumers.setdefault(t.name, [])
                if all(c is not consumer for c in plan.consumers[t.name]):
                    plan.consumers[t.name].append(consumer)

        order = topological_order(graph)
        skip = {name for name in o.exclude_nodes if name} | set(left_float)
        for node in order:
            if named(node, skip) or node.op in float_ops or node.domain not in (None, "", "ai.onnx"):
                continue
            acts = [node.inputs[i] for i in data_inputs(node) if i < len(node.inputs) and is_activation(node.inputs[i])]
            if not acts and not full:
                continue
            if node.op in unified:
                members = acts + [t for t in node.outputs if is_activation(t)]
                for t in members:
                    add(t, node if t in acts else None, outputs_too)
                for t in members[1:]:
                    plan.unite(t.name, members[0].name)
                plan.layers.append(node_key(node))
                plan.unified[node_key(node)] = [t.name for t in acts]
            elif node.op in passthrough:
                continue  # second phase, once producers and consumers are known
            elif node.op in quantized or full:
                for t in acts:
                    add(t, node, outputs_too)
                if outputs_too:
                    for t in node.outputs:
                        if is_activation(t):
                            add(t, None, True)
                self._plan_constants(node, plan, shapes)
                plan.layers.append(node_key(node))
            elif node.op == "Add" and q.get("residual_add", False) and len(acts) == 2:
                for t in acts:
                    add(t, node, outputs_too)
                plan.layers.append(node_key(node))
        # Passthrough ops: quantized with their input's scale when their input is quantized.
        changed = True
        done: set[int] = set()
        while changed:
            changed = False
            for node in order:
                if node.op not in passthrough or named(node, skip) or not node.inputs or id(node) in done:
                    continue
                x = node.inputs[0]
                outs = [t for t in node.outputs if is_activation(t)]
                if full and outs and isinstance(x, gs.Constant) and qdq.is_float_tensor(x):
                    # A full integer graph quantizes a constant that data movement reads too
                    # (an embedding table under Gather): the table in integer, the rows Q/DQ'd.
                    done.add(id(node))
                    plan.constants.append((node, 0))
                    for t in outs:
                        add(t, None, True)
                    changed = True
                    continue
                if x.name not in plan.activations or not outs:
                    continue
                done.add(id(node))
                add(x, node, outputs_too)
                for t in outs:
                    add(t, None, True)
                    plan.unite(t.name, x.name)
                changed = True
        return plan

    def _plan_constants(self, node: gs.Node, plan: Plan, shapes: dict) -> None:
        extra = (1, 2) if node.op in ("Conv", "ConvTranspose", "Gemm") else ()
        for i in tuple(dict.fromkeys(data_inputs(node) + extra)):
            if i >= len(node.inputs) or not isinstance(node.inputs[i], gs.Constant):
                continue
            t = node.inputs[i]
            if not qdq.is_float_tensor(t):
                continue
            if node.op in WEIGHT_OPS and i == 1:
                rank = len(t.shape)
                plan.weights.append((node, i, output_channel_axis(node, i, rank)))
            elif node.op in ("Conv", "ConvTranspose") and i == 2:
                plan.biases.append((node, i))
            elif node.op == "Gemm" and i == 2 and _gemm_bias_ok(node):
                plan.biases.append((node, i))
            elif i != 2 or node.op not in ("Conv", "ConvTranspose", "Gemm"):
                plan.constants.append((node, i))

    def _quantized_ops(self, graph: gs.Graph, ctx) -> set[str]:
        q = ctx.target.quantization
        ops = set(self.options.op_types or q.get("quantized_ops", []))
        if q.get("full_graph"):
            ops |= {n.op for n in graph.nodes} - set(q.get("float_ops", []))
        return ops

    # -- planning on a copy (the calibration hook, the fidelity floor) -----------------------
    def _plan_on_copy(self, model, ctx) -> Plan:
        act, _, _ = self._schemes(ctx)
        graph = model.graph.copy()
        shapes = ctx.analysis("shapes", model)
        self._fold_activations(graph, act, ctx, self._quantized_ops(graph, ctx), shapes)
        return self._plan(graph, ctx, shapes, act)

    def calibration_requests(self, model, ctx) -> list[TensorRange]:
        """The tensors this pass will ask statistics for (planned on a copy of the graph)."""
        histogram = self.options.calibration != "minmax"
        return [TensorRange(name, histogram) for name in self._plan_on_copy(model, ctx).activations]

    def layers(self, model, ctx) -> list[str]:
        """The nodes that will run quantized (the Relu/Clip folded into them excepted)."""
        return self._plan_on_copy(model, ctx).layers

    # -- run -------------------------------------------------------------------------------
    def run(self, model, ctx) -> PassResult:
        if ctx.calibration is None:
            raise CalibrationError("quantize-static needs calibration data (--calibration DATA)")
        if any(n.op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") or n.op.startswith("QLinear")
               for n in model.graph.nodes):
            return PassResult(changed=False, stats={"skipped": "the model is already quantized"})
        return self._quantize(model, ctx)

    def _quantize(self, model, ctx) -> PassResult:
        act, wt, reduce_why = self._schemes(ctx)
        stats: dict = {"method": self.options.calibration, "activations": act.dtype,
                       "weights": f"{wt.dtype} {wt.granularity.replace('-', '_')}" + (" reduce_range" if wt.reduce_range else "")}
        if wt.reduce_range:
            stats["reduce_range"] = reduce_why
        needed = max(act.min_opset, qs.PER_CHANNEL_OPSET if wt.per_channel else 10)
        if model.opset < needed:
            ok, how = raise_opset(model, needed)
            stats["opset"] = how
            if not ok and act.min_opset > model.opset:
                raise CalibrationError(f"{act.dtype} activations need opset {act.min_opset} and the model's "
                                       f"opset {model.opset} cannot be raised: {how}")
            if not ok:
                wt = qs.QuantScheme(wt.dtype, wt.symmetric, "per_tensor", wt.reduce_range)
                note = (f"quantize-static: per-channel weights need opset 13; model stays at opset "
                        f"{model.opset} ({how}); used per-tensor weights")
                ctx.notes.append(note)
                logger.warning(note)
                stats["weights"] = f"{wt.dtype} per_tensor (opset)"
            elif how != "already":
                ctx.notes.append(f"quantize-static: raised the model's {how} for per-channel DequantizeLinear")
        method = self.options.calibration
        # Statistics first, on the graph as it is (folding removes the Relu outputs whose
        # ranges the folded tensors take); cached when the manager gathered them already.
        requests = self.calibration_requests(model, ctx)
        tensor_stats = {r.name: r for r in ctx.calibration.reduce(model, requests) if r.count}
        graph = model.graph
        shapes = ctx.analysis("shapes", model)
        folded = self._fold_activations(graph, act, ctx, self._quantized_ops(graph, ctx), shapes, tensor_stats)
        plan = self._plan(graph, ctx, shapes, act)
        spread = self._spread_out(plan, tensor_stats)
        if spread:  # one scale for inputs of very different ranges would crush the small ones
            plan = self._plan(graph, ctx, shapes, act, left_float=spread)
            stats["unified_left_float"] = len(spread)
        qmin, qmax = qs.qrange(act.dtype, act.symmetric)
        ranges: dict[str, tuple[float, float]] = {}
        for name in plan.activations:
            if name in tensor_stats and tensor_stats[name].count:
                ranges[name] = tensor_stats[name].range(method, self.options.percentile, qmin, qmax,
                                                        act.symmetric, levels=(qmax - qmin + 1) // 2)
        group_range: dict[str, tuple[float, float]] = {}
        for name, (lo, hi) in ranges.items():
            root = plan.find(name)
            glo, ghi = group_range.get(root, (lo, hi))
            group_range[root] = (min(glo, lo), max(ghi, hi))
        names = qdq.ConstantPool(NameTable.of(graph))
        scales: dict[int, np.ndarray] = {}
        inserted = 0
        for name, tensor in plan.activations.items():
            if name not in ranges:
                continue
            lo, hi = group_range[plan.find(name)]
            scale, zp = qs.scale_zero_point(lo, hi, act)
            dq = self._insert(graph, names, tensor, scale, zp, plan)
            if tensor.name != name:  # a graph output's float tensor, renamed: the same values
                ctx.lineage.rescaled(name, tensor.name, None)
            if dq is not None:
                scales[id(dq)] = scale  # by dequantized tensor: what a bias's node reads
                inserted += 1
        by_op = self._op_weight_schemes(ctx, wt, self.options.per_channel and model.opset >= qs.PER_CHANNEL_OPSET)
        if by_op:
            stats["weight_schemes"] = {op: f"{w.dtype} {w.granularity}" for op, w in by_op.items()}
        weights = self._quantize_weights(graph, names, plan, wt, by_op, ctx)
        biases = self._quantize_biases(graph, names, plan, scales, weights) \
            if int(ctx.target.quantization.get("bias_bits", 32)) == 32 else 0
        constants = self._quantize_constants(graph, names, plan, act)
        stats.update({"qdq_pairs": inserted, "weights_quantized": len(weights), "biases_quantized": biases,
                      "constants_quantized": constants, "activations_folded": folded,
                      "calibration_batches": ctx.calibration.batches,
                      "uncalibrated": len(plan.activations) - len(ranges)})
        changed = inserted + len(weights) + biases + constants + folded > 0
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=changed, stats=stats)

    def _spread_out(self, plan: Plan, tensor_stats: dict) -> set[str]:
        """Unified-scale nodes (Concat) whose inputs' ranges differ by more than
        ``unify_max_ratio``: they stay in float (their inputs keep their own scales), as a
        detector's head concatenates box offsets in the hundreds with scores in [0, 1]."""
        out = set()
        for key, inputs in plan.unified.items():
            widths = [float(tensor_stats[n].max) - float(tensor_stats[n].min) for n in inputs
                      if n in tensor_stats and tensor_stats[n].count]
            widths = [w for w in widths if w > 0]
            if len(widths) > 1 and max(widths) > self.options.unify_max_ratio * min(widths):
                out.add(key)
        return out

    def _insert(self, graph: gs.Graph, names: qdq.ConstantPool, tensor: gs.Tensor, scale, zp, plan: Plan):
        is_output = any(t is tensor for t in graph.outputs)
        if plan.rewire_all.get(tensor.name):
            consumers = list(tensor.outputs)
        else:
            consumers = [c for c in plan.consumers.get(tensor.name, []) if any(t is tensor for t in c.inputs)]
        if not consumers and not (is_output and plan.rewire_all.get(tensor.name)):
            return None
        dq = qdq.insert_qdq(graph, names, tensor, scale, zp, consumers)
        if is_output and plan.rewire_all.get(tensor.name):
            # the graph output keeps its name and becomes the dequantized value (the int8
            # kernel of its producer then needs no float epilogue)
            old = tensor.name
            tensor.name = names(f"{old}_float")
            dq.name = old
            dq.dtype, dq.shape = tensor.dtype or np.float32, tensor.shape  # a graph output needs its type
            graph.outputs = [dq if t is tensor else t for t in graph.outputs]
        return dq

    def _op_weight_schemes(self, ctx, wt: qs.QuantScheme, per_channel_ok: bool) -> dict[str, qs.QuantScheme]:
        """The target's per-op weight schemes ([quantization.weight_schemes]: QNN's MatMul takes
        per-tensor uint8 weights); per-tensor when the option or the model's opset says so."""
        q = ctx.target.quantization
        out = {}
        for op, name in q.get("weight_schemes", {}).items():
            own = qs.scheme_from_table(q.get("schemes", {}).get(name), wt)
            per_channel = own.per_channel and per_channel_ok
            reduce = own.reduce_range if self.options.reduce_range == "target" else wt.reduce_range
            out[op] = qs.QuantScheme(own.dtype, own.symmetric, "per_channel" if per_channel else "per_tensor", reduce)
        return out

    def _quantize_weights(self, graph, names, plan: Plan, wt: qs.QuantScheme, by_op: dict, ctx) -> dict:
        done: dict = {}
        cache: dict = {}
        for node, index, axis in plan.weights:
            const = node.inputs[index]
            scheme = by_op.get(node.op, wt)
            key = (id(const), axis, scheme)
            if key not in cache:
                q, scale, zp, used = qs.quantize_weight(constant_value(const), scheme, axis)
                dq = qdq.make_dequantized_constant(graph, names, const.name or "w", q, scale, zp, used)
                cache[key] = (dq, scale)
            dq, scale = cache[key]
            # what the layer was, for passes that recover from the rounding (refit)
            ctx.lineage.record(dq.inputs[0].inputs[0].name, Origin(
                "quantized", node.outputs[0].name, constant_value(const), _float_bias(node)))
            node.inputs[index] = dq
            done[id(node)] = scale
        return done

    def _quantize_biases(self, graph, names, plan: Plan, scales: dict, weights: dict) -> int:
        count = 0
        for node, index in plan.biases:
            x_scale = scales.get(id(node.inputs[0]))
            if x_scale is None or id(node) not in weights:
                continue
            b = np.asarray(constant_value(node.inputs[index]), np.float32)
            w_scale = np.asarray(weights[id(node)], np.float32).reshape(-1)
            if w_scale.size not in (1, b.reshape(-1).size):
                continue
            q, scale, zp = qs.quantize_bias(b.reshape(-1), float(x_scale), w_scale)
            per_tensor = bool(np.all(scale == scale.reshape(-1)[0]))  # also valid below opset 13
            dq = qdq.make_dequantized_constant(graph, names, node.inputs[index].name or "bias",
                                              q.reshape(b.shape),
                                              scale.reshape(-1)[:1] if per_tensor else scale.reshape(-1),
                                              zp.reshape(-1)[:1] if per_tensor else zp.reshape(-1),
                                              None if per_tensor else b.ndim - 1)  # (N,) or (1, N)
            node.inputs[index] = dq
            count += 1
        return count

    def _quantize_constants(self, graph, names, plan: Plan, act: qs.QuantScheme) -> int:
        count = 0
        done: dict = {}  # equal constants (hard-swish's 3 and 6, …) share one quantized copy
        for node, index in plan.constants:
            const = node.inputs[index]
            if not isinstance(const, gs.Constant):
                continue
            values = np.asarray(constant_value(const), np.float32)
            key = (values.shape, values.tobytes())
            if key not in done:
                scheme = qs.QuantScheme(act.dtype, act.symmetric, "per_tensor", False)
                q, scale, zp, _ = qs.quantize_weight(values, scheme, None)
                done[key] = qdq.make_dequantized_constant(graph, names, const.name or "c", q, scale, zp, None)
            node.inputs[index] = done[key]
            count += 1
        return count


def _float_bias(node: gs.Node) -> np.ndarray | None:
    """The float bias of a Conv/Gemm (its third input), or None."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    value = constant_value(node.inputs[2])
    return None if value is None or value.dtype != np.float32 else value


def _clip_from_zero(node: gs.Node) -> bool:
    """Clip whose lower bound is the constant 0 (attribute before opset 11, input after)."""
    if "min" in node.attrs:
        return float(node.attrs["min"]) == 0.0
    if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        value = constant_value(node.inputs[1])
        if value is None:
            return False
        return value.size == 1 and float(value.reshape(-1)[0]) == 0.0
    return False


def _gemm_bias_ok(node: gs.Node) -> bool:
    """Gemm's C is a per-output-channel bias when alpha = beta = 1 and C is (N,) or (1, N)."""
    if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
        return False
    c = node.inputs[2]
    shape = tuple(c.shape)
    return len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
