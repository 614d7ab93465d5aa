"""quantize-weights: weight-only int4/int8 for MatMul/Gemm with block-wise scales (no data).

Each constant 2-D weight W[K, N] of a MatMul (or Gemm with transA=0, alpha=1, beta=1) is
split along K into blocks of ``block_size`` rows; every block of every output column gets
its own scale (and zero point unless ``symmetric``), by round-to-nearest (``method=rtn``)
or by searching, per block, the clipping of the range that gives the smallest squared
error (``method=mse``, still data-free). The float activation is untouched.

Two forms:

* ``contrib``: com.microsoft ``MatMulNBits`` (onnxruntime CPU/GPU), weight stored
  transposed and bit-packed [N, K/block, block*bits/8], low bits first; a Gemm's bias or a
  following constant bias Add goes in its bias input. ``accuracy_level`` 4 lets
  onnxruntime compute with int8 activations quantized per block (fast on VNNI CPUs).
* ``standard``: ``DequantizeLinear`` of an int4/int8 constant with ``axis=0`` and
  ``block_size`` (opset 21), feeding the original MatMul. Models below opset 21 are moved
  to 21 directly when no op of the graph changes meaning in between, else through onnx's
  version converter; when that fails the pass declines with a warning (it never emits an
  op the model's opset does not define).

``format=auto`` takes contrib when the target allows contrib ops, else standard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_value
from onnxopt.ir.graphs import named, node_key
from onnxopt.ir.names import NameTable
from onnxopt.ir.opsets import raise_opset
from onnxopt.ir.weights import bias_add_after, dense_layer
from onnxopt.errors import PipelineError
from onnxopt.pipeline.lineage import Origin
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass
from onnxopt.quantization.scheme import pack_low_first, unpack_low_first  # noqa: F401  (unpack: part of this API)

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size and int4 arrived in opset 21


# -- block quantization (numpy) --------------------------------------------------------------
@dataclass
class BlockQuantized:
    """W[K, N] as codes q[N, blocks, block] with W ~ (q - zero_point) * scale per block."""

    codes: np.ndarray  # int (unsigned: 0..2^bits-1), shape [N, blocks, block_size]
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # int, same shape as scales (2^(bits-1) when symmetric)
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """W back as float32 [K, N]."""
        w = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return w.reshape(w.shape[0], -1)[:, :self.k].T.copy()


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool, method: str = "rtn",
                    grid: int = 20) -> BlockQuantized:
    """Block-wise quantization of W[K, N] along K (K padded with zeros to whole blocks)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    x = padded.T.reshape(n, blocks, block_size)  # [N, blocks, block]
    levels = 2 ** bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        # scale from the largest magnitude, codes in [-mid+1, mid-1] around the zero point mid
        amax = np.abs(x).max(-1)
        ratios = _clip_ratios(method, grid)
        best_s, best_err = None, None
        for r in ratios:
            s = np.where(amax > 0, amax * r / (mid - 1), 1.0).astype(np.float32)
            q = np.clip(np.rint(x / s[..., None]), -(mid - 1), mid - 1)
            err = ((q * s[..., None] - x) ** 2).sum(-1)
            if best_err is None:
                best_s, best_err = s, err
            else:
                better = err < best_err
                best_s = np.where(better, s, best_s)
                best_err = np.where(better, err, best_err)
        scale = best_s.astype(np.float32)
        zp = np.full(scale.shape, mid, np.int32)
        codes = (np.clip(np.rint(x / scale[..., None]), -(mid - 1), mid - 1) + mid).astype(np.int32)
    else:
        lo = np.minimum(x.min(-1), 0.0)
        hi = np.maximum(x.max(-1), 0.0)
        best = None
        for r in _clip_ratios(method, grid):
            s = np.where(hi > lo, (hi - lo) * r / levels, 1.0).astype(np.float32)
            z = np.clip(np.rint(-lo * r / s), 0, levels)
            q = np.clip(np.rint(x / s[..., None]) + z[..., None], 0, levels)
            err = (((q - z[..., None]) * s[..., None] - x) ** 2).sum(-1)
            if best is None:
                best = [s, z, err]
            else:
                better = err < best[2]
                best = [np.where(better, s, best[0]), np.where(better, z, best[1]), np.where(better, err, best[2])]
        scale = best[0].astype(np.float32)
        zp = best[1].astype(np.int32)
        codes = np.clip(np.rint(x / scale[..., None]) + zp[..., None], 0, levels).astype(np.int32)
    return BlockQuantized(codes, scale, zp, bits, block_size, k)


def _clip_ratios(method: str, grid: int) -> list[float]:
    if method == "rtn":
        return [1.0]
    # mse: shrink the range by up to 25 % in equal steps and keep, per block, the best
    return [1.0 - 0.25 * i / grid for i in range(grid + 1)]


# -- candidates ------------------------------------------------------------------------------
def _weight_of(node: gs.Node, min_elements: int):
    """(weight [K, N] as numpy, bias [N] or None) when ``node`` can be rewritten."""
    layer = dense_layer(node)
    if layer is None or layer.size < min_elements:
        return None
    return layer.weight_kn(), layer.bias_n()


@register_pass("quantize-weights")
class QuantizeWeightsPass(Pass):
    """Store MatMul/Gemm weights as int4/int8 with block-wise scales (weight-only, no data)."""

    lossless = False
    keep_option = "keep_float"

    @dataclass
    class Options:
        bits: int = option(4, "weight bits", choices=[4, 8])
        block_size: int = option(32, "rows of K sharing one scale (power of two, >= 16)")
        symmetric: bool = option(False, "no zero points (codes centred on 2^(bits-1))")
        method: str = option("rtn", "rtn: round to nearest; mse: per-block clipping search (data-free)",
                             choices=["rtn", "mse"])
        format: str = option("auto", "contrib (MatMulNBits), standard (DequantizeLinear, opset 21) or "
                                     "auto (contrib when the target allows contrib ops)",
                             choices=["auto", "contrib", "standard"])
        accuracy_level: int = option(0, "MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, "
                                        "4 int8 activations)", choices=[0, 1, 2, 3, 4])
        min_elements: int = option(1024, "leave weights with fewer elements in float")
        keep_float: list[str] = option([], "node names (or output names) to leave in float")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        if o.block_size < 16 or o.block_size & (o.block_size - 1):
            raise PipelineError(f"quantize-weights: block_size must be a power of two >= 16, not {o.block_size}")
        contrib = o.format == "contrib" or (o.format == "auto" and bool(ctx.target.runtime.contrib_ops))
        if contrib and not ctx.target.runtime.contrib_ops:
            raise PipelineError(f"quantize-weights: format=contrib (MatMulNBits) needs a target with "
                                f"runtime.contrib_ops; target '{ctx.target.name}' has none")
        if o.bits == 4 and not contrib and not ctx.target.capabilities.get("int4", False):
            raise PipelineError(f"quantize-weights: target '{ctx.target.name}' does not run int4 "
                                "(capabilities.int4 = false); use bits=8")
        plan = self._plan(model)
        if not plan:
            return PassResult(changed=False, stats={"quantized": 0})
        how = None
        if not contrib and model.opset < BLOCKED_DQ_OPSET:
            raised, how = raise_opset(model, BLOCKED_DQ_OPSET)
            if not raised:
                logger.warning("quantize-weights: the standard form needs opset %d and the model is at %d (%s); "
                               "nothing done (format=contrib works on onnxruntime at any opset)",
                               BLOCKED_DQ_OPSET, model.opset, how)
                return PassResult(changed=False, stats={"quantized": 0, "declined": how})
            plan = self._plan(model)  # the graph may have been rebuilt by the converter
        if contrib:
            model.require_opset(MS_DOMAIN, 1)
        else:
            model.require_opset("", BLOCKED_DQ_OPSET)
        before = after = 0
        by_graph: dict[int, tuple] = {}
        self._names = NameTable.of(model.graph)  # one table: new names are unique in every scope
        for graph, node, (w, bias) in plan:
            q = quantize_blocks(w, o.bits, o.block_size, o.symmetric, o.method)
            before += w.size * 4
            new_nodes, size = (self._contrib(graph, node, q, bias) if contrib else self._standard(node, q))
            # what the layer was, for passes that recover from the rounding (refit)
            codes = new_nodes[0].inputs[1 if contrib else 0].name
            output = (new_nodes[0] if contrib else node).outputs[0].name
            ctx.lineage.record(codes, Origin("quantized", output, w, bias))
            after += size
            entry = by_graph.setdefault(id(graph), (graph, [], set()))
            entry[1].extend(new_nodes)
            if contrib:  # the standard form keeps the node, now reading the dequantized weight
                entry[2].add(id(node))
        for graph, new_nodes, removed in by_graph.values():
            graph.nodes = [n for n in graph.nodes if id(n) not in removed] + new_nodes
            graph.toposort()
            graph.cleanup()
        stats = {"quantized": len(plan), "format": "contrib" if contrib else "standard", "bits": o.bits,
                 "weight_bytes_before": before, "weight_bytes_after": after}
        if how:
            stats["opset"] = how
        logger.info("quantize-weights: %s", stats)
        return PassResult(changed=True, stats=stats)

    def _plan(self, model) -> list:
        o = self.options
        plan = []
        for graph in model.graphs():
            for node in graph.nodes:
                found = _weight_of(node, o.min_elements)
                if found is not None and not named(node, o.keep_float):
                    plan.append((graph, node, found))
        return plan

    def layers(self, model, ctx) -> list[str]:
        return [node_key(node) for _, node, _ in self._plan(model)]

    # MatMulNBits: Y = A @ dequant(B)^T + bias
    def _contrib(self, graph, node: gs.Node, q: BlockQuantized, bias):
        o = self.options
        base = node_key(node)
        out = node.outputs[0]
        if bias is None and node.op == "MatMul":
            add = bias_add_after(node, graph)
            if add is not None:
                add_node, bias = add
                bias = constant_value(bias)
                out = add_node.outputs[0]
                add_node.outputs = []
                add_node.inputs = []
        node.outputs = []
        n, blocks, _ = q.codes.shape
        packed = pack_low_first(q.codes, q.bits)  # [N, blocks, block*bits/8]
        inputs = [node.inputs[0], gs.Constant(self._names(f"{base}_weight_nbits"), packed),
                  gs.Constant(self._names(f"{base}_weight_scales"), q.scales.reshape(-1).astype(np.float32))]
        size = packed.nbytes + q.scales.nbytes
        if not o.symmetric:
            zp = pack_low_first(q.zero_points.astype(np.uint8), q.bits).reshape(-1)
            inputs.append(gs.Constant(self._names(f"{base}_weight_zero_points"), zp))
            size += zp.nbytes
        if bias is not None:
            while len(inputs) < 5:
                inputs.append(gs.Variable.empty())
            inputs.append(gs.Constant(self._names(f"{base}_bias"), np.asarray(bias, np.float32)))
        attrs = {"K": q.k, "N": n, "bits": q.bits, "block_size": q.block_size}
        if o.accuracy_level:
            attrs["accuracy_level"] = o.accuracy_level
        return [gs.Node("MatMulNBits", f"{base}_nbits", domain=MS_DOMAIN, attrs=attrs, inputs=inputs,
                        outputs=[out])], size

    # DequantizeLinear(int4/int8 W, scale [blocks, N], zero point, axis=0, block_size) -> MatMul
    def _standard(self, node: gs.Node, q: BlockQuantized):
        base = node_key(node)
        mid = 2 ** (q.bits - 1)
        signed = (q.codes.astype(np.int32) - mid)  # store signed codes, zero point shifted alike
        w_codes = signed.reshape(signed.shape[0], -1)[:, :q.k].T  # [K, N]
        if q.bits == 4:
            import ml_dtypes

            dtype = ml_dtypes.int4
        else:
            dtype = np.int8
        wq = gs.Constant(self._names(f"{base}_weight_quantized"), np.ascontiguousarray(w_codes).astype(dtype))
        scale = gs.Constant(self._names(f"{base}_weight_scale"), q.scales.T.copy().astype(np.float32))  # [blocks, N]
        inputs = [wq, scale]
        size = (w_codes.size * q.bits + 7) // 8 + q.scales.nbytes
        if not self.options.symmetric:
            zp = (q.zero_points.T.astype(np.int32) - mid).astype(dtype)
            inputs.append(gs.Constant(self._names(f"{base}_weight_zero_point"), np.ascontiguousarray(zp)))
            size += (zp.size * q.bits + 7) // 8
        w = gs.Variable(self._names(f"{base}_weight_dequantized"), dtype=np.float32, shape=[q.k, q.codes.shape[0]])
        dq = gs.Node("DequantizeLinear", f"{base}_weight_dq", attrs={"axis": 0, "block_size": q.block_size},
                     inputs=inputs, outputs=[w])
        if node.op == "Gemm":  # keep the Gemm (bias and all), now reading W as [K, N]
            node.attrs = {k: v for k, v in node.attrs.items() if k != "transB"}
        node.inputs[1] = w
        return [dq], size
