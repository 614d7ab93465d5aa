"""Which axis of a layer's weight is which: output channels, input channels, groups.

Every pass that touches weights per channel (quantization scales, pruning, low rank,
refit) asks here instead of knowing each op's layout:

    Conv           W [M, C/g, k…]   out 0, in 1 (per group); Y channel axis 1
    ConvTranspose  W [C, M/g, k…]   out 1 (per group), in 0; Y channel axis 1
    Gemm           B [K, N] (transB=0: out 1, in 0) or [N, K] (transB=1: out 0, in 1)
                   A [M, K] (transA=0: out 0 = rows of Y, in 1) or [K, M] (transA=1)
    MatMul         B [… K, N]: out -1, in -2;  A [… M, K]: out -2 (rows of Y), in -1

For a grouped Conv, input channel c of the layer is channel ``c % (C/g)`` of group
``c // (C/g)``: the weight's input axis holds C/g channels. Depthwise means one input
channel per group (C/g == 1) and groups == C.

``dense_layer`` sees a MatMul or Gemm with a constant weight as x @ W + b, whatever its
attributes, for the passes that rewrite such layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_value

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightAxes:
    """The layout of one constant operand of a Conv, ConvTranspose, Gemm or MatMul."""

    op: str
    out_axis: int  # axis of the weight that indexes the layer's output channels (or rows)
    in_axis: int  # axis that indexes what is summed over (input channels, K)
    groups: int = 1  # Conv/ConvTranspose groups; 1 for Gemm and MatMul
    rank: int = 2

    @property
    def grouped(self) -> bool:
        return self.groups > 1

    def is_depthwise(self, shape) -> bool:
        """One input channel per group (the weight's input axis has length 1) and more than
        one group: each output channel reads only its own group's channel."""
        return self.groups > 1 and int(shape[self.in_axis]) == 1

    def out_channels(self, shape) -> int:
        """Output channels of the layer (all groups)."""
        n = int(shape[self.out_axis])
        return n * self.groups if self.op == "ConvTranspose" else n

    def in_channels(self, shape) -> int:
        """Input channels of the layer (all groups)."""
        n = int(shape[self.in_axis])
        return n * self.groups if self.op == "Conv" else n


def weight_axes(node: gs.Node, index: int, rank: int) -> WeightAxes | None:
    """The axes of input ``index`` (of rank ``rank``) of ``node`` when it is a weight
    operand of a Conv, ConvTranspose, Gemm or MatMul; None otherwise."""
    op = node.op
    if node.domain not in (None, "", "ai.onnx") or op not in WEIGHT_OPS or rank < 1:
        return None
    if op in ("Conv", "ConvTranspose"):
        if index != 1 or rank < 3:
            return None
        groups = int(node.attrs.get("group", 1))
        return WeightAxes(op, 0, 1, groups, rank) if op == "Conv" else WeightAxes(op, 1, 0, groups, rank)
    if op == "Gemm":
        if rank != 2 or index not in (0, 1):
            return None
        if index == 1:
            return WeightAxes(op, 0, 1) if int(node.attrs.get("transB", 0)) else WeightAxes(op, 1, 0)
        return WeightAxes(op, 1, 0) if int(node.attrs.get("transA", 0)) else WeightAxes(op, 0, 1)
    # MatMul: numpy semantics; a 1-D operand has no output axis
    if rank < 2 or index not in (0, 1):
        return None
    return WeightAxes(op, rank - 1, rank - 2, 1, rank) if index == 1 else WeightAxes(op, rank - 2, rank - 1, 1, rank)


def output_channel_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The axis of a weight along which each slice feeds exactly one output channel (what a
    per-channel scale needs), or None: a grouped ConvTranspose's axis 1 holds M/g channels,
    each shared by g outputs, and a weight of the left MatMul/Gemm operand indexes rows."""
    axes = weight_axes(node, index, rank)
    if axes is None or index != 1:
        return None
    if axes.op == "ConvTranspose" and axes.grouped:
        return None
    return axes.out_axis


@dataclass(frozen=True)
class DenseLayer:
    """A MatMul or Gemm that computes x @ W (+ b) with a constant 2-D W: the form that
    quantization, low rank and refit rewrite. ``weight`` is the constant as stored
    (``transposed``: stored as [N, K], Gemm's transB); ``bias`` is Gemm's C, if any."""

    node: gs.Node
    x: gs.Tensor
    weight: gs.Constant
    transposed: bool
    bias: gs.Constant | None

    @property
    def k(self) -> int:
        return int(self.weight.shape[1 if self.transposed else 0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[0 if self.transposed else 1])

    @property
    def size(self) -> int:
        return self.k * self.n

    def weight_kn(self) -> np.ndarray:
        """W as [K, N] (float32)."""
        w = constant_value(self.weight)
        return (w.T if self.transposed else w).astype(np.float32, copy=False)

    def bias_n(self) -> np.ndarray | None:
        """b broadcast to [N], or None."""
        if self.bias is None:
            return None
        return np.broadcast_to(constant_value(self.bias).reshape(-1), (self.n,)).astype(np.float32)


def is_float32_constant(t) -> bool:
    """A graphsurgeon Constant of dtype float32 (a weight the float rewrites may change)."""
    try:
        return isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32
    except TypeError:
        return False


def dense_layer(node: gs.Node) -> DenseLayer | None:
    """``node`` as a DenseLayer: MatMul(x, W) with a constant float32 2-D W, or Gemm(x, W[, C])
    with transA=0, alpha=1 and, when C is given, beta=1 and C a constant of shape [N] or
    [1, N] (or a scalar); None otherwise."""
    if node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2 or not node.outputs:
        return None
    x, w = node.inputs[:2]
    if isinstance(x, gs.Constant) or not is_float32_constant(w) or len(w.shape) != 2:
        return None
    if node.op == "MatMul" and len(node.inputs) == 2:
        return DenseLayer(node, x, w, False, None)
    if node.op != "Gemm":
        return None
    attrs = node.attrs
    if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0:
        return None
    transposed = bool(int(attrs.get("transB", 0)))
    n = int(w.shape[0 if transposed else 1])
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if c is not None:
        shape = tuple(c.shape)
        if not is_float32_constant(c) or float(attrs.get("beta", 1.0)) != 1.0 \
                or shape not in ((), (1,), (n,), (1, n), (1, 1)):
            return None
    return DenseLayer(node, x, w, transposed, c)


def bias_add_after(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node, gs.Constant] | None:
    """(the Add, its constant [N] bias) when ``node``'s only reader adds a constant 1-D float32
    bias as long as its last dim (the form exporters give MatMul + bias)."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    add = out.outputs[0]
    if add.op != "Add" or add.domain not in (None, "", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    n = node.inputs[1].shape[-1] if len(node.inputs) > 1 and node.inputs[1].shape else None
    if is_float32_constant(other) and len(other.shape) == 1 and other.shape[0] == n:
        return add, other
    return None
