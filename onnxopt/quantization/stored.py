"""A quantized layer as the graph stores it: integer weight codes, their grid, its bias.

Passes that improve a quantized layer after the fact (``refit``: error-compensating
rounding, bias correction) read the layer here and write new codes and a new bias back,
whatever form the quantization pass left:

- ``qdq``: Conv/MatMul/Gemm whose weight is ``DequantizeLinear(codes, scale[, zero point])``,
  per tensor, per output channel, or in blocks along the summed axis (opset 21
  ``block_size``); the bias is a Conv/Gemm input (float, or DequantizeLinear of int32 with
  scale = input scale × weight scale, which stays valid while the weight scales do);
- ``integer``: ``DynamicQuantizeLinear(x) → MatMulInteger/ConvInteger(codes) → Cast →
  Mul(scale) [→ Add(bias)]`` (quantize-dynamic's standard form);
- ``contrib``: ``com.microsoft.DynamicQuantizeMatMul(x, codes, scale, zero point[, bias])``;
- ``nbits``: ``com.microsoft.MatMulNBits`` (quantize-weights' contrib form): 4- or 8-bit codes
  packed in blocks along K, a scale and zero point per block.

Every form is seen the same way: per group of a Conv (one group for MatMul/Gemm), the
weight as a matrix [rows = output channels, cols = what is summed over] in the order of the
layer's input Gram (im2col patches for a Conv), with one ``Grid`` per group. The input ``x``
is the float tensor the layer multiplies (the dequantized activation, or the input of the
dynamic quantizer), the output ``y`` the float tensor it writes (bias included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.data.statistics import Patches, conv_patches
from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.quantization.gptq import Grid
from onnxopt.quantization.scheme import pack_low_first, unpack_low_first

_DEFAULT = (None, "", "ai.onnx")
MS_DOMAIN = "com.microsoft"


@dataclass
class BiasSlot:
    """Where a layer's bias is stored: input ``index`` of ``node``, float or int32 codes
    (``scale``: the int32 codes' scale, per output channel)."""

    node: gs.Node
    index: int
    scale: np.ndarray | None = None  # None: a float constant


@dataclass
class StoredLayer:
    """One quantized layer (see the module docstring)."""

    graph: gs.Graph
    node: gs.Node  # the node that multiplies
    form: str  # qdq | integer | contrib
    op: str  # Conv | MatMul | Gemm: how the stored weight is laid out
    x: gs.Tensor
    y: gs.Tensor
    codes_holder: gs.Node  # the node reading the codes constant (a DequantizeLinear or ``node``)
    codes_index: int
    grids: list[Grid]
    transposed: bool = False  # Gemm with transB: stored [N, K]
    groups: int = 1
    patches: Patches | None = None
    bias_slot: BiasSlot | None = None

    @property
    def codes_tensor(self) -> gs.Constant:
        return self.codes_holder.inputs[self.codes_index]

    @property
    def key(self) -> str:
        """The name of the stored codes: what lineage records are keyed by."""
        return self.codes_tensor.name

    @property
    def x_axis(self) -> int:
        return 1 if self.op == "Conv" else -1

    @property
    def y_axis(self) -> int:
        return 1 if self.op == "Conv" else -1

    # -- layouts ---------------------------------------------------------------------------
    def matrices(self, stored: np.ndarray) -> np.ndarray:
        """A weight as the op stores it -> [groups, rows, cols]."""
        w = np.asarray(stored)
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        return (w if self.transposed else w.T)[None]

    def stored(self, matrices: np.ndarray, shape: tuple) -> np.ndarray:
        """[groups, rows, cols] -> the op's layout of ``shape``."""
        if self.op == "Conv":
            return matrices.reshape(shape)
        m = matrices[0]
        return (m if self.transposed else m.T).reshape(shape)

    def codes(self) -> np.ndarray:
        return self.matrices(codes_array(self.codes_tensor)).astype(np.int64)

    def weight(self) -> np.ndarray:
        """The dequantized weight, [groups, rows, cols] float64."""
        codes = self.codes().astype(np.float64)
        return np.stack([g.values(c) for g, c in zip(self.grids, codes)])

    def bias(self) -> np.ndarray | None:
        """The bias as float [out channels], or None when the layer holds none."""
        if self.bias_slot is None:
            return None
        slot = self.bias_slot
        t = slot.node.inputs[slot.index]
        if slot.scale is None:
            return np.asarray(constant_value(t), np.float64).reshape(-1)
        dq = t.inputs[0]
        return np.asarray(constant_value(dq.inputs[0]), np.float64).reshape(-1) * slot.scale

    # -- writing ---------------------------------------------------------------------------
    def write(self, codes: np.ndarray, bias: np.ndarray | None, names: NameTable) -> str:
        """Store new ``codes`` ([groups, rows, cols]) and, when given and the layer has a bias
        slot, a new ``bias``; returns the new codes tensor's name. New constants only: an
        existing one may be shared with another layer."""
        old = self.codes_tensor
        dtype = codes_array(old).dtype  # int8, uint8, int4 (ml_dtypes), …
        values = self.stored(codes, tuple(old.shape)).astype(np.int64).astype(dtype)
        holder = self._own(self.codes_holder, self.node) if self.codes_holder is not self.node else self.node
        holder.inputs[self.codes_index] = new_constant(names, old.name or "codes", values)
        self.codes_holder = holder
        if bias is not None and self.bias_slot is not None:
            slot = self.bias_slot
            current = slot.node.inputs[slot.index]
            shape = tuple(current.shape) if current.shape is not None else (len(bias),)
            if slot.scale is None:
                slot.node.inputs[slot.index] = new_constant(names, current.name or "bias",
                                                            np.asarray(bias, np.float32).reshape(shape))
            else:
                dq = self._own(current.inputs[0], slot.node)
                q = np.clip(np.rint(np.asarray(bias, np.float64) / slot.scale), -2 ** 31, 2 ** 31 - 1)
                old_q = dq.inputs[0]
                dq.inputs[0] = new_constant(names, old_q.name or "bias_q", q.astype(np.int32).reshape(old_q.shape))
        return self.codes_tensor.name

    def _own(self, dq: gs.Node, user: gs.Node) -> gs.Node:
        """``dq`` itself when ``user`` is its only reader, else a copy of it for ``user``."""
        out = dq.outputs[0]
        if len(out.outputs) <= 1:
            return dq
        graph_names = NameTable.of(self.graph)
        copy_out = gs.Variable(graph_names(f"{out.name}_own"), dtype=out.dtype, shape=out.shape)
        copy = gs.Node(dq.op, graph_names(f"{dq.name or 'dq'}_own"), attrs=dict(dq.attrs), inputs=list(dq.inputs),
                       outputs=[copy_out], domain=dq.domain)
        for i, t in enumerate(user.inputs):
            if t is out:
                user.inputs[i] = copy_out
        self.graph.nodes.append(copy)
        return copy


# -- reading ---------------------------------------------------------------------------------
def read_layer(node: gs.Node, graph: gs.Graph) -> StoredLayer | None:
    """``node`` (of ``graph``) as a StoredLayer when it is a quantized Conv/MatMul/Gemm in one
    of the forms this module knows, else None."""
    try:
        if node.domain in _DEFAULT and node.op in ("Conv", "MatMul", "Gemm"):
            return _read_qdq(node, graph)
        if node.domain in _DEFAULT and node.op in ("MatMulInteger", "ConvInteger"):
            return _read_integer(node, graph)
        if node.domain == MS_DOMAIN and node.op == "DynamicQuantizeMatMul":
            return _read_contrib(node, graph)
        if node.domain == MS_DOMAIN and node.op == "MatMulNBits":
            return _read_nbits(node, graph)
    except (ValueError, TypeError, IndexError, KeyError):  # a layout this module does not know
        return None
    return None


def codes_array(t: gs.Constant) -> np.ndarray | None:
    """An integer constant's value, 4-bit types included (as ml_dtypes arrays, which
    ``constant_value`` leaves out)."""
    value = constant_value(t)
    if value is not None or not isinstance(t, gs.Constant):
        return value
    values = t._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if proto.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and \
                proto.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(proto)
        return None
    return values if isinstance(values, np.ndarray) and "int4" in str(values.dtype) else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def _int_codes(t) -> bool:
    if not isinstance(t, gs.Constant):
        return False
    try:
        kind = np.dtype(t.dtype).kind
    except TypeError:
        return False
    return kind in "iu" or "int4" in str(t.dtype)


def _grids(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, groups: int, rows: int, cols: int,
           group: int) -> list[Grid]:
    """One Grid per group from a scale laid out [groups·rows, blocks] (blocks = 1 for a scale
    per row or per tensor)."""
    qmin, qmax = int(codes.min()), int(codes.max())
    zero = np.zeros_like(scale) if zero is None else zero
    out = []
    for i in range(groups):
        s = scale[i * rows:(i + 1) * rows].astype(np.float64)
        z = zero[i * rows:(i + 1) * rows].astype(np.float64)
        out.append(Grid(s, z, group, qmin, qmax))
    return out


def _per_row(values: np.ndarray | None, out: int) -> np.ndarray | None:
    """A per-tensor or per-output-channel parameter as [out, 1]."""
    if values is None:
        return None
    v = np.asarray(values).astype(np.float64).reshape(-1)
    if v.size == 1:
        return np.full((out, 1), v[0])
    if v.size != out:
        raise ValueError("not one value per output channel")
    return v.reshape(out, 1)


def _layout(node: gs.Node, op: str, shape: tuple) -> tuple[int, int, int, int, bool, Patches | None]:
    """(groups, rows, cols, output axis of the stored weight, transposed, patches)."""
    if op == "Conv":
        groups = int(node.attrs.get("group", 1))
        patches = conv_patches(node, tuple(shape[2:]))
        if patches is None:
            raise ValueError("conv geometry")
        return groups, shape[0] // groups, int(np.prod(shape[1:])), 0, False, patches
    transposed = op == "Gemm" and bool(int(node.attrs.get("transB", 0)))
    if op == "Gemm" and (int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0
                         or float(node.attrs.get("beta", 1.0)) != 1.0):
        raise ValueError("gemm attributes")
    if len(shape) != 2:
        raise ValueError("weight rank")
    n, k = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
    return 1, n, k, 0 if transposed else 1, transposed, None


def _read_qdq(node: gs.Node, graph: gs.Graph) -> StoredLayer | None:
    if len(node.inputs) < 2 or not node.outputs:
        return None
    dq = _producer(node.inputs[1])
    if dq is None or dq.op != "DequantizeLinear" or dq.domain not in _DEFAULT or not _int_codes(dq.inputs[0]):
        return None
    if any(not isinstance(t, gs.Constant) for t in dq.inputs[1:] if t.name):
        return None
    codes = codes_array(dq.inputs[0])
    if codes is None:
        return None
    shape = tuple(codes.shape)
    groups, rows, cols, out_axis, transposed, patches = _layout(node, node.op, shape)
    scale = np.asarray(constant_value(dq.inputs[1]), np.float64)
    zero = np.asarray(codes_array(dq.inputs[2])).astype(np.float64) if len(dq.inputs) > 2 and dq.inputs[2].name \
        else None
    block = int(dq.attrs.get("block_size", 0))
    axis = int(dq.attrs.get("axis", 1)) % len(shape)
    out = groups * rows
    if scale.size == 1:
        s, z, group = _per_row(scale, out), _per_row(zero, out), cols
    elif block:
        if node.op == "Conv" or axis == out_axis:
            return None
        s = scale if transposed else scale.T  # [N, K/block]
        z = None if zero is None else (zero if transposed else zero.T)
        group = block
    else:
        if axis != out_axis:
            return None
        s, z, group = _per_row(scale, out), _per_row(zero, out), cols
    layer = StoredLayer(graph, node, "qdq", node.op, node.inputs[0], node.outputs[0], dq, 0,
                        _grids(codes.astype(np.int64), s, z, groups, rows, cols, group), transposed, groups, patches)
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        layer.bias_slot = _bias_slot(node, 2, out)
    return layer


def _bias_slot(node: gs.Node, index: int, out: int) -> BiasSlot | None:
    t = node.inputs[index]
    if isinstance(t, gs.Constant):
        value = constant_value(t)
        return BiasSlot(node, index) if value is not None and value.size == out and value.dtype == np.float32 else None
    dq = _producer(t)
    if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
        return None
    q = constant_value(dq.inputs[0])
    if q is None or q.dtype != np.int32 or q.size != out:
        return None
    zero = constant_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if zero is not None and np.any(zero):
        return None
    scale = np.asarray(constant_value(dq.inputs[1]), np.float64).reshape(-1)
    return BiasSlot(node, index, np.broadcast_to(scale, (out,)).copy())


def _read_integer(node: gs.Node, graph: gs.Graph) -> StoredLayer | None:
    """DynamicQuantizeLinear(x) -> MatMulInteger/ConvInteger -> Cast -> Mul(a_scale × w_scale) [-> Add]."""
    if len(node.inputs) < 2 or not _int_codes(node.inputs[1]):
        return None
    dql = _producer(node.inputs[0])
    if dql is None or dql.op != "DynamicQuantizeLinear" or node.inputs[0] is not dql.outputs[0]:
        return None
    if len(node.inputs) > 3 and node.inputs[3].name and np.any(constant_value(node.inputs[3])):
        return None  # a weight zero point other than 0
    (cast,) = node.outputs[0].outputs if len(node.outputs[0].outputs) == 1 else (None,)
    if cast is None or cast.op != "Cast" or len(cast.outputs[0].outputs) != 1:
        return None
    mul = cast.outputs[0].outputs[0]
    if mul.op != "Mul":
        return None
    both = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
    scales = _producer(both)
    if scales is None or scales.op != "Mul":
        return None
    w_scale = next((t for t in scales.inputs if isinstance(t, gs.Constant)), None)
    if w_scale is None:
        return None
    op = "Conv" if node.op == "ConvInteger" else "MatMul"
    codes = constant_value(node.inputs[1])
    groups, rows, cols, _, _, patches = _layout(node, op, tuple(codes.shape))
    out = groups * rows
    layer = StoredLayer(graph, node, "integer", op, dql.inputs[0], mul.outputs[0], node, 1,
                        _grids(codes.astype(np.int64), _per_row(constant_value(w_scale), out), None, groups, rows,
                               cols, cols), False, groups, patches)
    y = mul.outputs[0]
    if len(y.outputs) == 1 and y.outputs[0].op == "Add":
        add = y.outputs[0]
        index = 1 if add.inputs[0] is y else 0
        other = add.inputs[index]
        value = constant_value(other) if isinstance(other, gs.Constant) else None
        if value is not None and value.dtype == np.float32 and value.size == out and add.outputs[0].outputs is not None:
            layer.y, layer.bias_slot = add.outputs[0], BiasSlot(add, index)
    return layer


def _read_contrib(node: gs.Node, graph: gs.Graph) -> StoredLayer | None:
    """com.microsoft.DynamicQuantizeMatMul(A, B codes [K, N], b_scale, b_zero_point[, bias])."""
    if len(node.inputs) < 3 or not _int_codes(node.inputs[1]) or not isinstance(node.inputs[2], gs.Constant):
        return None
    if len(node.inputs) > 3 and node.inputs[3].name and np.any(constant_value(node.inputs[3])):
        return None
    codes = constant_value(node.inputs[1])
    if codes.ndim != 2:
        return None
    n, k = codes.shape[1], codes.shape[0]
    layer = StoredLayer(graph, node, "contrib", "MatMul", node.inputs[0], node.outputs[0], node, 1,
                        _grids(codes.astype(np.int64), _per_row(constant_value(node.inputs[2]), n), None, 1, n, k, k))
    if len(node.inputs) > 4 and node.inputs[4].name:
        layer.bias_slot = _bias_slot(node, 4, n)
    return layer


class NBitsLayer(StoredLayer):
    """com.microsoft.MatMulNBits: codes packed low bits first, [N, blocks, block·bits/8]."""

    bits: int = 4
    block: int = 32
    k: int = 0

    def codes(self) -> np.ndarray:
        packed = constant_value(self.codes_tensor)
        n, blocks = packed.shape[0], packed.shape[1]
        codes = unpack_low_first(packed, self.bits, self.block).reshape(n, blocks * self.block)[:, :self.k]
        return codes.astype(np.int64)[None]

    def write(self, codes: np.ndarray, bias: np.ndarray | None, names: NameTable) -> str:
        old = self.codes_tensor
        n, blocks = old.shape[0], old.shape[1]
        padded = np.zeros((n, blocks * self.block), np.int64)
        padded[:, :self.k] = codes[0]
        packed = pack_low_first(padded.reshape(n, blocks, self.block), self.bits)
        self.node.inputs[1] = new_constant(names, old.name or "codes", packed.astype(np.uint8))
        if bias is not None and self.bias_slot is not None:
            slot = self.bias_slot
            slot.node.inputs[slot.index] = new_constant(names, slot.node.inputs[slot.index].name or "bias",
                                                        np.asarray(bias, np.float32).reshape(-1))
        return self.codes_tensor.name


def _read_nbits(node: gs.Node, graph: gs.Graph) -> StoredLayer | None:
    """MatMulNBits(A, B packed, scales[, zero points packed][, g_idx][, bias]): Y = A @ dequant(B)ᵀ + bias."""
    bits, block = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 32))
    k, n = int(node.attrs["K"]), int(node.attrs["N"])
    present = [i < len(node.inputs) and bool(node.inputs[i].name) for i in range(6)]
    if bits not in (4, 8) or present[4] or not all(isinstance(node.inputs[i], gs.Constant) for i in (1, 2)):
        return None
    packed = constant_value(node.inputs[1])
    if packed is None or packed.dtype != np.uint8 or packed.ndim != 3:
        return None
    blocks = packed.shape[1]
    scale = np.asarray(constant_value(node.inputs[2]), np.float64).reshape(n, blocks)
    if present[3]:
        zp = constant_value(node.inputs[3])
        if zp is None or zp.dtype != np.uint8:
            return None  # float zero points: not this module's grid
        zero = unpack_low_first(zp.reshape(n, -1), bits, blocks).astype(np.float64)
    else:
        zero = np.full((n, blocks), 2.0 ** (bits - 1))
    layer = NBitsLayer(graph, node, "nbits", "MatMul", node.inputs[0], node.outputs[0], node, 1, [])
    layer.bits, layer.block, layer.k = bits, block, k
    codes = layer.codes()[0]
    layer.grids = [Grid(scale, zero, block, 0, 2 ** bits - 1)]
    if codes.min() > 0 and codes.max() < 2 ** bits - 1 and not present[3]:  # symmetric codes stay off the edges
        layer.grids = [Grid(scale, zero, block, int(codes.min()), int(codes.max()))]
    if present[5]:
        layer.bias_slot = _bias_slot(node, 5, n)
    return layer
