"""Quantization in the graph: Q/DQ pairs after activations, integer constants followed by
DequantizeLinear. New tensors get no dtype or shape (they would be written as value_info:
30% of a quantized detector's graph bytes; onnxruntime infers them anyway)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.names import NameTable
from onnxopt.ir.surgery import replace_input


class ConstantPool:
    """New initializers for a quantized graph, one per distinct value: the scale and zero
    point of tensors that share a range, equal scales of different weights, are stored once."""

    def __init__(self, names: NameTable):
        self.names = names
        self._by_value: dict[tuple, gs.Constant] = {}

    def __call__(self, base: str) -> str:
        return self.names(base)

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values)
        key = (values.dtype.str, values.shape, values.tobytes())
        found = self._by_value.get(key)
        if found is None:
            found = gs.Constant(self.names(base), np.ascontiguousarray(values) if values.ndim else values)
            self._by_value[key] = found
        return found


def _scalar_or_vector(values: np.ndarray, per_channel: bool) -> np.ndarray:
    values = np.asarray(values)
    return values.reshape(-1) if per_channel else values.reshape(())


def make_dequantized_constant(graph: gs.Graph, names: ConstantPool, base: str, q: np.ndarray, scale, zero_point,
                              axis: int | None) -> gs.Variable:
    """An integer initializer ``q`` followed by DequantizeLinear; returns the float output.

    An all-zero zero point is left out (DequantizeLinear's default is 0 of the input's
    type), which keeps symmetric weights and int32 biases small on disk."""
    per_channel = axis is not None
    q_const = names.constant(f"{base}_q", q)
    s_const = names.constant(f"{base}_s", _scalar_or_vector(scale, per_channel).astype(np.float32))
    inputs = [q_const, s_const]
    zp = np.asarray(zero_point)
    if zp.any():
        inputs.append(names.constant(f"{base}_z", _scalar_or_vector(zp, per_channel).astype(q.dtype)))
    out = gs.Variable(names(f"{base}_dq"))  # no dtype/shape: no value_info on disk (inferred on load)
    attrs = {"axis": int(axis)} if per_channel else {}
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DQ"), attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def insert_qdq(graph: gs.Graph, names: ConstantPool, tensor: gs.Tensor, scale: float, zero_point,
               consumers: list[gs.Node] | None = None) -> gs.Variable:
    """Put QuantizeLinear -> DequantizeLinear after ``tensor`` (per-tensor).

    ``consumers`` (default: every consumer) are rewired to read the dequantized tensor;
    the original tensor stays as it was, so a graph output keeps its name and float value.
    A uint8 zero point of 0 is left out (QuantizeLinear's default output is uint8 with zero
    point 0). Returns the dequantized tensor.
    """
    zp = np.asarray(zero_point).reshape(())
    base = tensor.name or "t"
    s_const = names.constant(f"{base}_s", np.asarray(scale, np.float32).reshape(()))
    quantize_inputs = [tensor, s_const]
    if zp.dtype != np.uint8 or zp.any():
        quantize_inputs.append(names.constant(f"{base}_z", zp))
    # no dtype/shape on the new tensors: they would be written as value_info (30% of a
    # quantized detector's graph bytes) and onnxruntime infers them anyway
    q_out = gs.Variable(names(f"{base}_q"))
    dq_out = gs.Variable(names(f"{base}_dq"))
    targets = list(tensor.outputs) if consumers is None else list(consumers)
    graph.nodes.append(gs.Node("QuantizeLinear", names(f"{base}_Q"), inputs=quantize_inputs, outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DQ"),
                               inputs=[q_out] + quantize_inputs[1:], outputs=[dq_out]))
    for node in targets:
        replace_input(node, tensor, dq_out)
    return dq_out


def is_float_tensor(tensor: gs.Tensor, shapes: dict | None = None) -> bool:
    """True for a float32 tensor (from the graph or from the shapes analysis)."""
    dtype = tensor.dtype  # a Constant's dtype is read without loading its values
    if dtype is None and shapes is not None and tensor.name in shapes:
        dtype = shapes[tensor.name].dtype
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return dtype == onnx.TensorProto.FLOAT
