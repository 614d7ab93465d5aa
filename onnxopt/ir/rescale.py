"""Rescaling channels exactly: what cross-layer equalization and SmoothQuant rewrite.

A tensor X with channels along one axis can carry X/s instead of X (s > 0 per channel)
with no change to the model's outputs when

- the nodes that produce X divide channel c of their output by s_c through their constants
  (``producer_chain`` finds them: a Conv, Gemm or MatMul with a constant weight and its
  bias, possibly behind a bias Add; a LayerNormalization over the last axis; a
  BatchNormalization; a Mul by a constant; any of these behind activations that commute with
  positive per-channel scaling: Relu, LeakyRelu, PRelu — f(x/s) = f(x)/s), and
- every reader of X multiplies channel c back by s_c through its weight (``scale_inputs``:
  Conv with one group, MatMul and Gemm reading X as their data input, a Conv's depthwise or
  grouped input channel included).

``channel_range`` gives the per-channel weight magnitudes both techniques balance. New
values are always new constants (a weight may be shared with another node).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.weights import weight_axes

_DEFAULT = (None, "", "ai.onnx")
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")  # f(x / s) = f(x) / s for s > 0, per channel


def _float_const(t) -> np.ndarray | None:
    if not isinstance(t, gs.Constant):
        return None
    value = constant_value(t)
    return value if value is not None and value.dtype == np.float32 else None


def _single_reader(t: gs.Tensor, graph: gs.Graph) -> bool:
    return len(t.outputs) == 1 and all(o is not t for o in graph.outputs)


# -- readers of X ------------------------------------------------------------------------------
def input_axis(node: gs.Node, tensor: gs.Tensor) -> int | None:
    """The channel axis of ``tensor`` when ``node`` reads it as its data input and can take
    X/s by scaling its weight (1 for a Conv, -1 for MatMul/Gemm), else None."""
    if node.domain not in _DEFAULT or not node.inputs or node.inputs[0] is not tensor:
        return None
    if any(t is tensor for t in node.inputs[1:]):
        return None
    if node.op == "Conv" and len(node.inputs) >= 2 and _float_const(node.inputs[1]) is not None:
        return 1
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = _float_const(node.inputs[1])
        return -1 if w is not None and w.ndim == 2 else None
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        w = _float_const(node.inputs[1])
        return -1 if w is not None and w.ndim == 2 else None
    return None


def input_channels(node: gs.Node) -> int | None:
    """Input channels a Conv/MatMul/Gemm reader's weight expects (all groups)."""
    shape = tuple(node.inputs[1].shape or ()) if len(node.inputs) > 1 else ()
    if node.op not in ("Conv", "MatMul", "Gemm") or (node.op != "Conv" and len(shape) != 2):
        return None
    axes = weight_axes(node, 1, len(shape))
    return axes.in_channels(shape) if axes is not None else None


def _input_slices(node: gs.Node, w: np.ndarray, channels: int):
    """(how to view the weight so that index c selects what input channel c multiplies)."""
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        per_group = w.shape[1]
        out_per_group = w.shape[0] // group
        if per_group * group != channels:
            return None

        def select(c):
            g = c // per_group
            return (slice(g * out_per_group, (g + 1) * out_per_group), c % per_group)
        return select
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return (lambda c: (slice(None), c)) if w.shape[1] == channels else None
    return (lambda c: (c, slice(None))) if w.shape[0] == channels else None


def input_range(node: gs.Node, channels: int) -> np.ndarray | None:
    """max |w| over what input channel c of ``node`` multiplies, per c."""
    w = _float_const(node.inputs[1])
    select = None if w is None else _input_slices(node, w, channels)
    if select is None:
        return None
    return np.array([np.abs(w[select(c)]).max() if w[select(c)].size else 0.0 for c in range(channels)])


def scale_inputs(node: gs.Node, s: np.ndarray, names: NameTable) -> None:
    """``node`` will read X/s for X: its weight's input channel c is multiplied by s_c."""
    w = _float_const(node.inputs[1]).astype(np.float64)
    select = _input_slices(node, w, len(s))
    for c, factor in enumerate(s):
        w[select(c)] *= factor
    node.inputs[1] = new_constant(names, node.inputs[1].name or "w", w.astype(np.float32))


# -- producers of X ----------------------------------------------------------------------------
def _layer_out(node: gs.Node) -> tuple[int, int] | None:
    """(output channel axis of the weight, channel count) of a Conv/Gemm/MatMul whose output
    channels can be divided through its constants."""
    if node.domain not in _DEFAULT or len(node.inputs) < 2:
        return None
    w = _float_const(node.inputs[1])
    if w is None:
        return None
    if node.op == "Conv":
        return 0, w.shape[0]
    if node.op == "MatMul" and w.ndim == 2 and len(node.inputs) == 2:
        return 1, w.shape[1]
    if node.op == "Gemm" and w.ndim == 2 and not int(node.attrs.get("transA", 0)):
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
        return axis, w.shape[axis]
    return None


def _per_channel(value: np.ndarray, channels: int, axis: int, rank: int) -> bool:
    """A constant that broadcasts along ``axis`` (of a tensor of ``rank``) per channel or as one value."""
    if value.size == 1:
        return True
    if value.ndim > rank:
        return False
    shape = (1,) * (rank - value.ndim) + value.shape
    a = axis % rank
    return shape[a] == channels and all(d == 1 for i, d in enumerate(shape) if i != a)


def producer_chain(tensor: gs.Tensor, graph: gs.Graph, axis: int, rank: int | None,
                   channels: int) -> list[gs.Node] | None:
    """The nodes, last first, whose constants can divide channel c (of ``channels``, along
    ``axis``) of ``tensor`` by s_c exactly; None when no such chain exists. ``rank`` is the
    tensor's rank when known (needed for bias Adds, Muls and PRelu slopes)."""
    chain: list[gs.Node] = []
    t = tensor
    while True:
        if len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.domain not in _DEFAULT:
            return None
        if node.op in HOMOGENEOUS and len(node.inputs) >= 1 and _single_reader(node.inputs[0], graph):
            if node.op == "PRelu":
                slope = _float_const(node.inputs[1]) if len(node.inputs) > 1 else None
                if slope is None or rank is None or not _per_channel(slope, channels, axis, rank):
                    return None
            chain.append(node)
            t = node.inputs[0]
            continue
        layer = _layer_out(node)
        if layer is not None:
            if axis not in ((1,) if node.op == "Conv" else (-1,)) or layer[1] != channels:
                return None
            return chain + [node]
        if node.op == "LayerNormalization" and axis == -1 and int(node.attrs.get("axis", -1)) == -1:
            scale = _float_const(node.inputs[1]) if len(node.inputs) >= 2 else None
            if scale is not None and scale.size == channels and all(not o.outputs for o in node.outputs[1:]):
                return chain + [node]
            return None
        if node.op == "BatchNormalization" and axis == 1 and len(node.outputs) == 1 and \
                all(_float_const(x) is not None and _float_const(x).size == channels for x in node.inputs[1:3]):
            return chain + [node]
        if node.op in ("Add", "Mul") and len(node.inputs) == 2 and rank is not None:
            consts = [i for i, x in enumerate(node.inputs) if _float_const(x) is not None]
            if len(consts) != 1:
                return None
            value = _float_const(node.inputs[consts[0]])
            if not _per_channel(value, channels, axis, rank):
                return None
            other = node.inputs[1 - consts[0]]
            if node.op == "Mul":
                return chain + [node]
            if not _single_reader(other, graph):  # a bias Add: its producer must divide too
                return None
            rest = producer_chain(other, graph, axis, rank, channels)
            return None if rest is None or rest[-1].op not in ("Conv", "Gemm", "MatMul") or \
                any(n.op in HOMOGENEOUS for n in rest) else chain + [node] + rest
        return None


def output_range(node: gs.Node) -> np.ndarray | None:
    """max |w| per output channel of a Conv/Gemm/MatMul producer."""
    layer = _layer_out(node)
    if layer is None:
        return None
    axis, _ = layer
    w = np.moveaxis(_float_const(node.inputs[1]), axis, 0)
    return np.abs(w.reshape(w.shape[0], -1)).max(1)


def divide_outputs(chain: list[gs.Node], s: np.ndarray, axis: int, rank: int | None,
                   names: NameTable) -> list[tuple[str, str]]:
    """Rewrite the constants of ``chain`` (from ``producer_chain``) so channel c of the
    tensor it produces is divided by s_c. The tensors whose values change are renamed (a
    name stands for the same values as in the original model, the teacher a refit matches,
    and these no longer do): returns (name before, name after) of each, for the caller to
    record how they relate (``onnxopt.pipeline.lineage.Lineage.rescaled``)."""
    inv = 1.0 / np.asarray(s, np.float64)
    renamed = []
    for node in chain:
        for t in node.outputs[:1]:
            if t.name:
                old = t.name
                if not old.endswith("_rescaled"):
                    t.name = names(f"{old}_rescaled")
                renamed.append((old, t.name))
        if node.op in HOMOGENEOUS:
            continue
        layer = _layer_out(node)
        if layer is not None:
            w_axis, channels = layer
            w = np.moveaxis(_float_const(node.inputs[1]).astype(np.float64), w_axis, 0)
            w = np.moveaxis(w * inv.reshape((-1,) + (1,) * (w.ndim - 1)), 0, w_axis)
            node.inputs[1] = new_constant(names, node.inputs[1].name or "w", w.astype(np.float32))
            if len(node.inputs) > 2 and node.inputs[2].name:
                b = np.broadcast_to(_float_const(node.inputs[2]).astype(np.float64).reshape(-1), (channels,)) * inv
                shape = (channels,) if node.op == "Conv" else ((1, channels) if len(node.inputs[2].shape) == 2
                                                               else (channels,))
                node.inputs[2] = new_constant(names, node.inputs[2].name, b.reshape(shape).astype(np.float32))
            continue
        if node.op == "LayerNormalization":
            for i in (1, 2):
                if len(node.inputs) > i and node.inputs[i].name:
                    v = np.broadcast_to(_float_const(node.inputs[i]).astype(np.float64), inv.shape) * inv
                    node.inputs[i] = new_constant(names, node.inputs[i].name, v.astype(np.float32))
            continue
        if node.op == "BatchNormalization":
            for i in (1, 2):  # scale and bias: y = scale·x̂ + bias
                v = _float_const(node.inputs[i]).astype(np.float64) * inv
                node.inputs[i] = new_constant(names, node.inputs[i].name, v.astype(np.float32))
            continue
        # Add (a bias) or Mul by a per-channel constant
        index = next(i for i, x in enumerate(node.inputs) if _float_const(x) is not None)
        value = _float_const(node.inputs[index]).astype(np.float64)
        shape = [1] * rank
        shape[axis % rank] = len(inv)
        full = np.broadcast_to(value, np.broadcast_shapes(value.shape, tuple(shape))) * inv.reshape(shape)
        node.inputs[index] = new_constant(names, node.inputs[index].name or "c", np.asarray(full, np.float32))
    return renamed


def multiply_before(tensor: gs.Tensor, readers: list[gs.Node], s: np.ndarray, axis: int, rank: int | None,
                    graph: gs.Graph, names: NameTable) -> gs.Node:
    """Insert Mul(X, 1/s) read by ``readers`` only (the others keep reading X)."""
    shape = [len(s)] if axis == -1 or rank is None else [len(s)] + [1] * (rank - 1 - axis % rank)
    inv = new_constant(names, f"{tensor.name}_smooth_scale", (1.0 / np.asarray(s, np.float64)).reshape(shape)
                       .astype(np.float32))
    out = gs.Variable(names(f"{tensor.name}_smoothed"), dtype=tensor.dtype, shape=tensor.shape)
    mul = gs.Node("Mul", names(f"{tensor.name}_smooth"), inputs=[tensor, inv], outputs=[out])
    for node in readers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = out
    graph.nodes.append(mul)
    return mul
