"""Helpers shared by the quantization passes: schemes, scales, Q/DQ insertion, opsets.

Not a pass module (the leading underscore keeps it out of the registry's view; nothing
here is registered). Used by quantize-static, quantize-dynamic and quantize-weights.

Conventions (ONNX QuantizeLinear): q = saturate(round(x / scale) + zero_point), and
DequantizeLinear gives (q - zero_point) * scale. Rounding is half to even, as in ONNX.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

# Integer types a QuantizeLinear may produce, with their ONNX element types and the
# default-domain opset that first allows them in QuantizeLinear/DequantizeLinear.
QUANT_DTYPES = {
    "uint8": (np.uint8, onnx.TensorProto.UINT8, 10),
    "int8": (np.int8, onnx.TensorProto.INT8, 10),
    "uint16": (np.uint16, onnx.TensorProto.UINT16, 21),
    "int16": (np.int16, onnx.TensorProto.INT16, 21),
    "int32": (np.int32, onnx.TensorProto.INT32, 10),  # bias only (DequantizeLinear)
}

# QuantizeLinear/DequantizeLinear take an `axis` (per-channel) from opset 13.
PER_CHANNEL_OPSET = 13

FLOAT_DTYPES = (np.float32,)


@dataclass(frozen=True)
class QuantScheme:
    """How one kind of tensor is quantized (one entry of a target's [quantization.schemes])."""

    dtype: str = "int8"  # uint8 | int8 | uint16 | int16
    symmetric: bool = True
    granularity: str = "per_channel"  # per_channel | per_tensor (hyphens accepted)
    reduce_range: bool = False  # one bit less (7-bit weights; avoids int16 overflow on AVX2)

    @property
    def per_channel(self) -> bool:
        return self.granularity.replace("-", "_") == "per_channel"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(QUANT_DTYPES[self.dtype][0])

    @property
    def min_opset(self) -> int:
        return QUANT_DTYPES[self.dtype][2]


def scheme_from_table(table: dict | None, fallback: QuantScheme) -> QuantScheme:
    """A QuantScheme from a target's scheme table (missing keys keep ``fallback``'s)."""
    if not table:
        return fallback
    return QuantScheme(
        dtype=table.get("dtype", fallback.dtype),
        symmetric=table.get("symmetric", fallback.symmetric),
        granularity=table.get("granularity", fallback.granularity),
        reduce_range=table.get("reduce_range", fallback.reduce_range),
    )


def qrange(dtype: str, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """The integer range a scheme uses. Symmetric signed types drop the lowest value
    (-127..127 for int8) so that zero is exactly in the middle, as TensorRT does."""
    info = np.iinfo(QUANT_DTYPES[dtype][0])
    qmin, qmax = int(info.min), int(info.max)
    if reduce_range:
        bits = info.bits - 1
        if qmin < 0:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            qmin, qmax = 0, 2 ** bits - 1
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def scale_zero_point(lo, hi, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (scheme dtype) covering [lo, hi] (arrays broadcast).

    The range is widened to include 0 so that 0 is exactly representable (padding, ReLU).
    Symmetric: scale = max|.| / qmax, zero point = 0 (unsigned types: the middle value).
    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = round(qmin - lo / scale).
    A zero range gets scale 1 (any scale is exact for an all-zero tensor).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = qrange(scheme.dtype, scheme.symmetric, scheme.reduce_range)
    if scheme.symmetric:
        absmax = np.maximum(-lo, hi)
        if qmin < 0:
            scale = absmax / qmax
            zp = np.zeros_like(scale)
        else:  # unsigned symmetric: zero point in the middle of the range
            half = (qmax - qmin) // 2
            scale = absmax / max(qmax - qmin - half, 1)
            zp = np.full_like(scale, qmin + half)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return scale.astype(np.float32), zp.astype(scheme.np_dtype)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str,
                    axis: int | None = None, qmin: int | None = None, qmax: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (per-tensor, or per-channel along ``axis``)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(QUANT_DTYPES[dtype][0])
    lo = info.min if qmin is None else qmin
    hi = info.max if qmax is None else qmax
    q = np.clip(np.rint(x.astype(np.float64) / scale.astype(np.float64)) + zp, lo, hi)
    return q.astype(QUANT_DTYPES[dtype][0])


# -- weights -------------------------------------------------------------------------------
def weight_channel_axis(node: gs.Node, input_index: int, rank: int) -> int | None:
    """The output-channel axis of a weight input, or None when per-channel does not apply."""
    op = node.op
    if input_index != 1 or rank < 1:
        return None
    if op == "Conv":
        return 0
    if op == "ConvTranspose":  # weight is (C_in, C_out/group, k...): per-channel only without groups
        return 1 if int(node.attrs.get("group", 1)) == 1 and rank >= 2 else None
    if op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def quantize_weight(w: np.ndarray, scheme: QuantScheme, axis: int | None):
    """(q, scale, zero_point, axis_used) for a float weight; per-channel along ``axis``
    when the scheme says so and an axis exists, per-tensor otherwise."""
    w = np.asarray(w, dtype=np.float32)
    if scheme.per_channel and axis is not None and w.ndim >= 1 and w.shape[axis] > 1:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        lo = w.min(axis=reduce_axes) if w.size else np.zeros(w.shape[axis], np.float32)
        hi = w.max(axis=reduce_axes) if w.size else np.zeros(w.shape[axis], np.float32)
        used = axis
    else:
        lo = np.float32(w.min()) if w.size else np.float32(0)
        hi = np.float32(w.max()) if w.size else np.float32(0)
        used = None
    scale, zp = scale_zero_point(lo, hi, scheme)
    qmin, qmax = qrange(scheme.dtype, scheme.symmetric, scheme.reduce_range)
    q = quantize_values(w, scale, zp, scheme.dtype, used, qmin, qmax)
    return q, scale, zp, used


def quantize_bias(b: np.ndarray, input_scale: float, weight_scale: np.ndarray):
    """Bias as int32 with scale input_scale * weight_scale and zero point 0."""
    scale = (np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)).astype(np.float32)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    if scale.ndim == 0 or scale.size == 1:
        scale = np.full(np.asarray(b).shape, float(np.ravel(scale)[0]), np.float32)
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(np.asarray(b, np.float64) / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
    return q, scale, np.zeros(q.shape, np.int32)


# -- graph editing -------------------------------------------------------------------------
class Names:
    """Fresh tensor/node names that do not clash with anything in the graph."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _param(names: Names, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(names(base), np.asarray(values))


def _scalar_or_vector(values: np.ndarray, per_channel: bool) -> np.ndarray:
    values = np.asarray(values)
    return values.reshape(-1) if per_channel else values.reshape(())


def make_dequantized_constant(graph: gs.Graph, names: Names, base: str, q: np.ndarray, scale, zero_point,
                              axis: int | None) -> gs.Variable:
    """An integer initializer ``q`` followed by DequantizeLinear; returns the float output.

    An all-zero zero point of a signed type is left out (DequantizeLinear's default), which
    keeps symmetric weights and int32 biases small on disk."""
    per_channel = axis is not None
    q_const = _param(names, f"{base}_q", q)
    s_const = _param(names, f"{base}_s", _scalar_or_vector(scale, per_channel).astype(np.float32))
    inputs = [q_const, s_const]
    zp = np.asarray(zero_point)
    if np.issubdtype(q.dtype, np.unsignedinteger) or zp.any():
        inputs.append(_param(names, f"{base}_z", _scalar_or_vector(zp, per_channel).astype(q.dtype)))
    out = gs.Variable(names(f"{base}_dq"))  # no dtype/shape: no value_info on disk (inferred on load)
    attrs = {"axis": int(axis)} if per_channel else {}
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DQ"), attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def insert_qdq(graph: gs.Graph, names: Names, tensor: gs.Tensor, scale: float, zero_point,
               consumers: list[gs.Node] | None = None) -> gs.Variable:
    """Put QuantizeLinear -> DequantizeLinear after ``tensor`` (per-tensor).

    ``consumers`` (default: every consumer) are rewired to read the dequantized tensor;
    the original tensor stays as it was, so a graph output keeps its name and float value.
    Returns the dequantized tensor.
    """
    zp = np.asarray(zero_point).reshape(())
    base = tensor.name or "t"
    s_const = _param(names, f"{base}_s", np.asarray(scale, np.float32).reshape(()))
    z_const = _param(names, f"{base}_z", zp)
    # no dtype/shape on the new tensors: they would be written as value_info (30% of a
    # quantized detector's graph bytes) and onnxruntime infers them anyway
    q_out = gs.Variable(names(f"{base}_q"))
    dq_out = gs.Variable(names(f"{base}_dq"))
    targets = list(tensor.outputs) if consumers is None else list(consumers)
    graph.nodes.append(gs.Node("QuantizeLinear", names(f"{base}_Q"),
                               inputs=[tensor, s_const, z_const], outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DQ"),
                               inputs=[q_out, s_const, z_const], outputs=[dq_out]))
    for node in targets:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = dq_out
    return dq_out


def is_float_tensor(tensor: gs.Tensor, shapes: dict | None = None) -> bool:
    """True for a float32 tensor (from the graph or from the shapes analysis)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values).dtype == np.float32
    dtype = tensor.dtype
    if dtype is None and shapes is not None and tensor.name in shapes:
        dtype = shapes[tensor.name].dtype
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return dtype == onnx.TensorProto.FLOAT


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


# -- opsets --------------------------------------------------------------------------------
def ops_changed_between(graph_ops: set[tuple[str, str]], old: int, new: int) -> list[str]:
    """Default-domain op types whose schema changed after opset ``old`` up to ``new``."""
    changed = []
    for domain, op in sorted(graph_ops):
        if domain not in ("", "ai.onnx"):
            continue
        try:
            before = onnx.defs.get_schema(op, old, "").since_version
            after = onnx.defs.get_schema(op, new, "").since_version
        except Exception:
            changed.append(op)
            continue
        if before != after:
            changed.append(op)
    return changed


def graph_op_types(model) -> set[tuple[str, str]]:
    ops = set()
    for g in model.graphs():
        for node in g.nodes:
            ops.add((node.domain or "", node.op))
    return ops


def raise_opset(model, version: int) -> tuple[bool, str]:
    """Raise the default-domain opset to ``version`` when every op keeps its meaning.

    Safe directly when no op of the graph has a new schema version in between. Otherwise
    onnx's version converter rewrites the changed ops (Squeeze/Unsqueeze/Split/Reduce*
    axes move from attributes to inputs, …); when it fails the opset is left alone.
    Returns (raised, how).
    """
    from onnxopt.ir.graph_io import export_model, import_graph

    current = model.opset
    if current >= version:
        return True, "already"
    changed = ops_changed_between(graph_op_types(model), current, version)
    if not changed:
        model.require_opset("", version)
        return True, f"opset {current} -> {version} (no op changed meaning)"
    proto = export_model(model.graph, model.template)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter lacks an adapter for some op
        return False, f"onnx version converter failed ({str(exc).splitlines()[0][:120]})"
    model.require_opset("", version)
    model.graph = import_graph(converted)
    model.graph.opset = version
    return True, f"opset {current} -> {version} (converted {', '.join(changed)})"


def cpu_has_vnni() -> bool:
    """True when this x86 CPU has a u8*s8 dot product without int16 saturation (VNNI),
    or is not x86 (ARM's dot products do not saturate either)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        return bool(features.get("avx512vnni") or features.get("avxvnni"))
    except Exception:  # unknown: assume the older CPU, which is the safe choice
        return False
