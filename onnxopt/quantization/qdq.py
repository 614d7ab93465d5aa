"""Quantization in the graph: Q/DQ pairs after activations, integer constants followed by
DequantizeLinear. New tensors get no dtype or shape (they would be written as value_info:
30% of a quantized detector's graph bytes; onnxruntime infers them anyway)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.surgery import replace_input


def _scalar_or_vector(values: np.ndarray, per_channel: bool) -> np.ndarray:
    values = np.asarray(values)
    return values.reshape(-1) if per_channel else values.reshape(())


def make_dequantized_constant(graph: gs.Graph, names: NameTable, base: str, q: np.ndarray, scale, zero_point,
                              axis: int | None) -> gs.Variable:
    """An integer initializer ``q`` followed by DequantizeLinear; returns the float output.

    An all-zero zero point of a signed type is left out (DequantizeLinear's default), which
    keeps symmetric weights and int32 biases small on disk."""
    per_channel = axis is not None
    q_const = new_constant(names, f"{base}_q", q)
    s_const = new_constant(names, f"{base}_s", _scalar_or_vector(scale, per_channel).astype(np.float32))
    inputs = [q_const, s_const]
    zp = np.asarray(zero_point)
    if np.issubdtype(q.dtype, np.unsignedinteger) or zp.any():
        inputs.append(new_constant(names, f"{base}_z", _scalar_or_vector(zp, per_channel).astype(q.dtype)))
    out = gs.Variable(names(f"{base}_dq"))  # no dtype/shape: no value_info on disk (inferred on load)
    attrs = {"axis": int(axis)} if per_channel else {}
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DQ"), attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def insert_qdq(graph: gs.Graph, names: NameTable, tensor: gs.Tensor, scale: float, zero_point,
               consumers: list[gs.Node] | None = None) -> gs.Variable:
    """Put QuantizeLinear -> DequantizeLinear after ``tensor`` (per-tensor).

    ``consumers`` (default: every consumer) are rewired to read the dequantized tensor;
    the original tensor stays as it was, so a graph output keeps its name and float value.
    Returns the dequantized tensor.
    """
    zp = np.asarray(zero_point).reshape(())
    base = tensor.name or "t"
    s_const = new_constant(names, f"{base}_s", np.asarray(scale, np.float32).reshape(()))
    z_const = new_constant(names, f"{base}_z", zp)
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
