"""Tiny graphs for the channel-dependency analysis and the pruning passes, one per pattern.

Each builder returns a checked ModelProto whose last layer writes the graph output (so
there is something to prune before it). ``zero_channels`` makes the channels a pruning
would remove exactly zero, which proves the surgery exact: the pruned model must then
give the same outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.graphs import make_model, tensor


class Builder:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.r, self.n = [], [], np.random.default_rng(seed), 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base, array) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, group=1, bias=True, stride=1):
        w = self.const("w", self.r.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3)
        ins = [x, w] + ([self.const("b", self.r.standard_normal(cout).astype(np.float32) * 0.1)] if bias else [])
        return self.node("Conv", ins, pads=[k // 2] * 4, group=group, strides=[stride, stride])

    def bn(self, x, c):
        r = self.r
        return self.node("BatchNormalization", [x, self.const("g", r.uniform(0.5, 1.5, c).astype(np.float32)),
                                                self.const("be", r.standard_normal(c).astype(np.float32) * 0.1),
                                                self.const("mu", r.standard_normal(c).astype(np.float32) * 0.1),
                                                self.const("var", r.uniform(0.5, 1.5, c).astype(np.float32))])

    def matmul(self, x, k, n, bias=True):
        y = self.node("MatMul", [x, self.const("w", self.r.standard_normal((k, n)).astype(np.float32) * 0.3)])
        return self.node("Add", [y, self.const("b", self.r.standard_normal(n).astype(np.float32) * 0.1)]) if bias else y

    def model(self, inputs, out, out_shape, opset=17) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"  # the last node writes the graph output
        return make_model(self.nodes, inputs, [tensor("y", out_shape)], self.inits, opset=opset)


def chain() -> onnx.ModelProto:
    """conv(3->8) -> BN -> relu -> conv(8->4)."""
    b = Builder(1)
    h = b.node("Relu", [b.bn(b.conv("x", 3, 8), 8)])
    b.conv(h, 8, 4)
    return b.model([tensor("x", [1, 3, 6, 6])], "y", [1, 4, 6, 6])


def residual() -> onnx.ModelProto:
    """conv1 -> relu -> [conv2 -> BN] + relu1 -> relu -> conv3: conv1 and conv2 coupled."""
    b = Builder(2)
    h = b.node("Relu", [b.conv("x", 3, 8)])
    s = b.node("Add", [b.bn(b.conv(h, 8, 8), 8), h])
    b.conv(b.node("Relu", [s]), 8, 4)
    return b.model([tensor("x", [1, 3, 6, 6])], "y", [1, 4, 6, 6])


def concat() -> onnx.ModelProto:
    """Two convs concatenated on channels (8 + 6), max-pooled, into a conv."""
    b = Builder(3)
    a = b.node("Relu", [b.conv("x", 3, 8)])
    c = b.node("Relu", [b.conv("x", 3, 6)])
    cat = b.node("Concat", [a, c], axis=1)
    b.conv(b.node("MaxPool", [cat], kernel_shape=[2, 2], strides=[2, 2]), 14, 4)
    return b.model([tensor("x", [1, 3, 8, 8])], "y", [1, 4, 4, 4])


def split_slice() -> onnx.ModelProto:
    """conv(3->12) split 8/4 on channels; the 8 part sliced [2:8]; both into convs, added."""
    b = Builder(4)
    h = b.node("Relu", [b.conv("x", 3, 12)])
    p, q = b.node("Split", [h, b.const("split", np.array([8, 4], np.int64))], n_out=2, axis=1)
    s = b.node("Slice", [p, b.const("st", np.array([2], np.int64)), b.const("en", np.array([8], np.int64)),
                         b.const("ax", np.array([1], np.int64))])
    y1 = b.conv(s, 6, 4, bias=False)
    y2 = b.conv(q, 4, 4, bias=False)
    b.node("Add", [y1, y2])
    return b.model([tensor("x", [1, 3, 6, 6])], "y", [1, 4, 6, 6])


def flatten_gemm() -> onnx.ModelProto:
    """conv(3->8) -> relu -> Flatten -> Gemm(8*4*4 -> 5)."""
    b = Builder(5)
    h = b.node("Flatten", [b.node("Relu", [b.conv("x", 3, 8)])], axis=1)
    w = b.const("fc", b.r.standard_normal((5, 8 * 16)).astype(np.float32) * 0.1)
    b.node("Gemm", [h, w, b.const("fcb", np.zeros(5, np.float32))], transB=1)
    return b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 5])


def depthwise() -> onnx.ModelProto:
    """Inverted residual: 1x1 expand (4->12) -> relu -> depthwise 3x3 -> BN -> relu -> 1x1 (12->4),
    then Resize x2 and Pad (spatial)."""
    b = Builder(6)
    h = b.node("Relu", [b.conv("x", 4, 12, k=1)])
    h = b.node("Relu", [b.bn(b.conv(h, 12, 12, group=12), 12)])
    h = b.node("Resize", [h, "", b.const("sc", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    h = b.node("Pad", [h, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    b.conv(h, 12, 4, k=1)
    return b.model([tensor("x", [1, 4, 5, 5])], "y", [1, 4, 12, 12])


def grouped() -> onnx.ModelProto:
    """1x1 (4->8) -> relu -> grouped 3x3 (8->8, 2 groups) -> relu -> 1x1 (8->4)."""
    b = Builder(7)
    h = b.node("Relu", [b.conv("x", 4, 8, k=1)])
    h = b.node("Relu", [b.conv(h, 8, 8, group=2)])
    b.conv(h, 8, 4, k=1)
    return b.model([tensor("x", [1, 4, 5, 5])], "y", [1, 4, 5, 5])


def nhwc_matmul() -> onnx.ModelProto:
    """conv(3->8) -> Transpose to NHWC -> MatMul (8->5) over the last axis."""
    b = Builder(8)
    h = b.node("Transpose", [b.node("Relu", [b.conv("x", 3, 8)])], perm=[0, 2, 3, 1])
    b.matmul(h, 8, 5)
    return b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 5])


def ffn() -> onnx.ModelProto:
    """Transformer FFN: x [2, 5, 6] -> LayerNorm -> MatMul(6->16)+b -> Gelu (erf form) -> MatMul(16->6)+b -> + x."""
    b = Builder(9)
    ln = b.node("LayerNormalization", ["x", b.const("lg", np.ones(6, np.float32)), b.const("lb", np.zeros(6, np.float32))],
                axis=-1)
    h = b.matmul(ln, 6, 16)
    e = b.node("Erf", [b.node("Div", [h, b.const("sq2", np.array(1.4142135, np.float32))])])
    g = b.node("Mul", [b.node("Mul", [h, b.node("Add", [e, b.const("one", np.array(1.0, np.float32))])]),
                       b.const("half", np.array(0.5, np.float32))])
    o = b.matmul(g, 16, 6)
    b.node("Add", [o, "x"])
    return b.model([tensor("x", [2, 5, 6])], "y", [2, 5, 6])


def attention(heads: int = 4, dim: int = 3) -> onnx.ModelProto:
    """Self-attention with constant head reshapes: q, k, v = x W (+b) -> [B,S,H,D] -> [B,H,S,D];
    softmax(q kᵀ) v -> [B,S,H·D] -> output projection."""
    b = Builder(10)
    e = heads * dim

    def split_heads(t):
        r = b.node("Reshape", [t, b.const("hs", np.array([1, 5, heads, dim], np.int64))])
        return b.node("Transpose", [r], perm=[0, 2, 1, 3])

    q, k, v = (split_heads(b.matmul("x", 8, e)) for _ in range(3))
    kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    att = b.node("Softmax", [b.node("Mul", [b.node("MatMul", [q, kt]), b.const("scale", np.array(0.5, np.float32))])],
                 axis=-1)
    ctx = b.node("Transpose", [b.node("MatMul", [att, v])], perm=[0, 2, 1, 3])
    merged = b.node("Reshape", [ctx, b.const("ms", np.array([1, 5, e], np.int64))])
    b.matmul(merged, e, 8)
    return b.model([tensor("x", [1, 5, 8])], "y", [1, 5, 8])


def se_block() -> onnx.ModelProto:
    """conv(3->8) -> relu -> x * hardsigmoid(conv(relu(conv(GAP(x))))) -> conv(8->4): the excite
    conv's output is coupled to the trunk."""
    b = Builder(11)
    x = b.node("Relu", [b.conv("x", 3, 8)])
    s = b.node("GlobalAveragePool", [x])
    s = b.node("HardSigmoid", [b.conv(b.node("Relu", [b.conv(s, 8, 4, k=1)]), 4, 8, k=1)])
    b.conv(b.node("Mul", [x, s]), 8, 4)
    return b.model([tensor("x", [1, 3, 6, 6])], "y", [1, 4, 6, 6])


PATTERNS = {"chain": chain, "residual": residual, "concat": concat, "split_slice": split_slice,
            "flatten_gemm": flatten_gemm, "depthwise": depthwise, "grouped": grouped,
            "nhwc_matmul": nhwc_matmul, "ffn": ffn, "attention": attention, "se_block": se_block}


# -- refusals: the channels of the first layer must not be pruned ---------------------------------
def refused_layernorm() -> onnx.ModelProto:
    b = Builder(20)
    h = b.matmul("x", 6, 8)
    h = b.node("LayerNormalization", [h, b.const("g", np.ones(8, np.float32)), b.const("b", np.zeros(8, np.float32))])
    b.matmul(h, 8, 3)
    return b.model([tensor("x", [2, 6])], "y", [2, 3])


def refused_unknown_op() -> onnx.ModelProto:
    b = Builder(21)
    h = b.conv("x", 3, 8)
    h = b.node("Relu", [h])
    b.nodes.append(helper.make_node("Mystery", [h], ["m"], domain="my.ops", name="mystery"))
    b.conv("m", 8, 4)
    model = helper.make_model(helper.make_graph(b.nodes, "g", [tensor("x", [1, 3, 4, 4])],
                                                [tensor(b.nodes[-1].output[0], [1, 4, 4, 4])], b.inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    model.ir_version = 8
    return model


def refused_runtime_reshape() -> onnx.ModelProto:
    b = Builder(22)
    h = b.node("Relu", [b.conv("x", 3, 8)])
    shape = b.node("Concat", [b.node("Slice", [b.node("Shape", ["x"]), b.const("s0", np.array([0], np.int64)),
                                               b.const("s1", np.array([1], np.int64))]),
                              b.const("rest", np.array([8, 16], np.int64))], axis=0)
    h = b.node("Reshape", [h, shape])
    b.matmul(b.node("Transpose", [h], perm=[0, 2, 1]), 8, 3)
    return b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 16, 3])


def refused_channel_pad() -> onnx.ModelProto:
    b = Builder(23)
    h = b.node("Relu", [b.conv("x", 3, 8)])
    h = b.node("Pad", [h, b.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    b.conv(h, 10, 4)
    return b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 4])


def refused_shared_weight() -> onnx.ModelProto:
    b = Builder(24)
    w = b.const("w", b.r.standard_normal((8, 3, 3, 3)).astype(np.float32))
    a = b.node("Conv", ["x", w], pads=[1, 1, 1, 1])
    c = b.node("Conv", ["x2", w], pads=[1, 1, 1, 1])
    b.conv(b.node("Add", [a, c]), 8, 4)
    return b.model([tensor("x", [1, 3, 4, 4]), tensor("x2", [1, 3, 4, 4])], "y", [1, 4, 4, 4])


def refused_output() -> onnx.ModelProto:
    """The first conv's output is also a graph output."""
    b = Builder(25)
    h = b.conv("x", 3, 8)
    b.conv(h, 8, 4)
    m = b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 4])
    m.graph.output.append(tensor(h, [1, 8, 4, 4]))
    return m


REFUSALS = {"layernorm": (refused_layernorm, "LayerNormalization"),
            "unknown_op": (refused_unknown_op, "has no channel rule"),
            "runtime_reshape": (refused_runtime_reshape, "computed at run time"),
            "channel_pad": (refused_channel_pad, "pads the channel axis"),
            "shared_weight": (refused_shared_weight, "shared by 2 nodes"),
            "graph_output": (refused_output, "graph output")}


def zero_channels(model: onnx.ModelProto, cg, removed: set[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose channels of the ``removed`` classes are exactly zero where
    they are made: producer rows, biases, BatchNorm scale and shift, additive constants."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for m in cg.members:
        if m.kind not in ("out", "param", "depthwise"):
            continue
        if m.kind == "param" and (m.node.op in ("Mul", "Div") or (m.node.op == "BatchNormalization" and m.index > 2)):
            continue
        roots = cg.atoms.roots(m.layout)
        drop = np.array([int(c) in removed for c in roots])
        if not drop.any():
            continue
        t = inits[m.node.inputs[m.index].name]
        a = numpy_helper.to_array(t).copy()
        index = [slice(None)] * a.ndim
        index[m.axis] = np.flatnonzero(drop)
        a[tuple(index)] = 0
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out
