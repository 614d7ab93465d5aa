"""Tiny graph builders for tests: each returns a checked onnx.ModelProto.

Add builders here (one function each, named after what the graph shows) and list them in
``BUILDERS`` so the contract test runs every lossless pass on them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def rng(seed=0):
    return np.random.default_rng(seed)


def const_chain() -> onnx.ModelProto:
    """x + (c1 * c2) with c1*c2 computed by Constant nodes: folding and lifting work."""
    r = rng(1)
    nodes = [
        helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(r.standard_normal((4,)).astype(np.float32))),
        helper.make_node("Constant", [], ["c2"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        helper.make_node("Mul", ["c1", "c2"], ["c12"]),
        helper.make_node("Add", ["x", "c12"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 4])])


def dead_branch() -> onnx.ModelProto:
    """A Relu branch and an initializer that nothing downstream uses."""
    nodes = [
        helper.make_node("Relu", ["x"], ["dead"]),
        helper.make_node("Add", ["x", "b"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])],
                      [init("b", np.ones(3, np.float32)), init("unused", np.zeros(5, np.float32))])


def conv_bn_relu() -> onnx.ModelProto:
    """Conv (with bias) -> BatchNormalization -> Relu, random weights."""
    r = rng(2)
    w = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = r.standard_normal(8).astype(np.float32)
    scale, bias = r.uniform(0.5, 1.5, 8).astype(np.float32), r.standard_normal(8).astype(np.float32)
    mean, var = r.standard_normal(8).astype(np.float32), r.uniform(0.5, 2, 8).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8])],
                      [init("w", w), init("b", b), init("s", scale), init("bb", bias), init("m", mean), init("v", var)])


def matmul_add() -> onnx.ModelProto:
    """MatMul with a constant 2-D weight followed by Add of a constant bias."""
    r = rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    return make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                      [init("w", r.standard_normal((16, 8)).astype(np.float32)),
                       init("b", r.standard_normal(8).astype(np.float32))])


def if_subgraph() -> onnx.ModelProto:
    """An If whose branches read an outer initializer and hold Identity and Constant nodes."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t0"]), helper.make_node("Add", ["t0", "w"], ["t_out"])],
        "then", [], [tensor("t_out", [2, 3])])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value_float=2.0), helper.make_node("Mul", ["x", "k"], ["e_out"])],
        "else", [], [tensor("e_out", [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [2, 3])], [tensor("y", [2, 3])],
                      [init("w", np.arange(3, dtype=np.float32))])


def layernorm_decomposed(opset=OPSET, square="pow", divide="div", scale=True, bias=True, axes=(-1,),
                         shape=(2, 5, 8), eps=1e-5, extra_reader=None) -> onnx.ModelProto:
    """LayerNorm as torch exports it below opset 17: ReduceMean, Sub, Pow 2 (int 2, or Mul d*d),
    ReduceMean, Add eps, Sqrt, Div (or Reciprocal+Mul), then Mul gamma and Add beta.
    ``axes`` are an attribute before opset 18, an input from 18. ``extra_reader`` names an
    intermediate (mean, d, var, n) that a Neg also reads, as a second graph output."""
    r = rng(4)
    norm = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    two = np.array(2, np.int64) if square == "pow_int" else np.array(2.0, np.float32)
    inits = [init("two", two), init("eps", np.array(eps, np.float32))]
    reduce_kw, reduce_in = ({"axes": list(axes)}, []) if opset < 18 else ({}, ["axes"])
    if opset >= 18:
        inits.append(init("axes", np.array(axes, np.int64)))
    nodes = [
        helper.make_node("ReduceMean", ["x"] + reduce_in, ["mean"], **reduce_kw),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]) if square == "mul" else helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"] + reduce_in, ["var"], **reduce_kw),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
    ]
    if divide == "div":
        nodes.append(helper.make_node("Div", ["d", "std"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["std"], ["rstd"]), helper.make_node("Mul", ["rstd", "d"], ["n"])]
    last = "n"
    if scale:
        inits.append(init("gamma", r.uniform(0.5, 1.5, norm).astype(np.float32)))
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["scaled"]))
        last = "scaled"
    if bias:
        inits.append(init("beta", r.standard_normal(norm).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["beta", last], ["shifted"]))
        last = "shifted"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    outputs = [tensor("y", list(shape))]
    if extra_reader:
        nodes.append(helper.make_node("Neg", [extra_reader], ["extra"]))
        reduced = extra_reader in ("mean", "var", "ve", "std", "rstd")
        red_axes = {a % len(shape) for a in axes}
        outputs.append(tensor("extra", [1 if reduced and i in red_axes else n for i, n in enumerate(shape)]))
    return make_model(nodes, [tensor("x", list(shape))], outputs, inits, opset=opset)


def gelu_erf(opset=OPSET, order="torch", scaled="div", shape=(2, 16)) -> onnx.ModelProto:
    """x * 0.5 * (1 + erf(x / sqrt(2))): torch's ((x*u)*0.5), or (x*0.5)*u, or x*(u*0.5);
    x/sqrt(2) as Div or as Mul by 1/sqrt(2)."""
    inits = [init("one", np.array(1.0, np.float32)), init("half", np.array(0.5, np.float32))]
    if scaled == "div":
        inits.append(init("sqrt2", np.array(np.sqrt(2.0), np.float32)))
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["s"])]
    else:
        inits.append(init("rsqrt2", np.array(1 / np.sqrt(2.0), np.float32)))
        nodes = [helper.make_node("Mul", ["rsqrt2", "x"], ["s"])]
    nodes += [helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["u"])]
    if order == "torch":
        nodes += [helper.make_node("Mul", ["x", "u"], ["xu"]), helper.make_node("Mul", ["xu", "half"], ["y"])]
    elif order == "half_first":
        nodes += [helper.make_node("Mul", ["half", "x"], ["hx"]), helper.make_node("Mul", ["hx", "u"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["u", "half"], ["hu"]), helper.make_node("Mul", ["x", "hu"], ["y"])]
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", list(shape))], inits, opset=opset)


def gelu_tanh(opset=OPSET, cube="mul", shape=(2, 16)) -> onnx.ModelProto:
    """torch's tanh GELU: 0.5 * (x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x*(x*x)))))."""
    inits = [init(k, np.array(v, np.float32)) for k, v in
             (("one", 1.0), ("half", 0.5), ("kappa", 0.044715), ("beta", np.sqrt(2 / np.pi)), ("three", 3.0))]
    if cube == "mul":
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"])]
    else:
        nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    nodes += [
        helper.make_node("Mul", ["kappa", "x3"], ["kx3"]),
        helper.make_node("Add", ["x", "kx3"], ["inner"]),
        helper.make_node("Mul", ["beta", "inner"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["u"]),
        helper.make_node("Mul", ["x", "u"], ["xu"]),
        helper.make_node("Mul", ["half", "xu"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", list(shape))], inits, opset=opset)


def transpose_pairs() -> onnx.ModelProto:
    """Two Transpose pairs around a Relu: the first cancels (NCHW->NHWC->NCHW), the second composes."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Relu", ["nchw"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t1"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0, 2, 3]),
    ]
    return make_model(nodes, [tensor("x", [1, 2, 3, 4])], [tensor("y", [3, 1, 2, 4])])


def convtranspose_bn_grouped() -> onnx.ModelProto:
    """ConvTranspose (group 2, no bias) -> BatchNormalization: weight is [C_in, C_out/group, k, k]."""
    r = rng(4)
    c_out = 6
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [1, 4, 3, 3])], [tensor("y", [1, c_out, 7, 7])],
                      [init("w", r.standard_normal((4, c_out // 2, 3, 3)).astype(np.float32)),
                       init("s", r.uniform(0.5, 1.5, c_out).astype(np.float32)),
                       init("bb", r.standard_normal(c_out).astype(np.float32)),
                       init("m", r.standard_normal(c_out).astype(np.float32)),
                       init("v", r.uniform(0.5, 2, c_out).astype(np.float32))])


def shape_chain() -> onnx.ModelProto:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape of a tensor whose batch dim is symbolic."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["w"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Unsqueeze", ["w", "ax0"], ["w1"]),
        helper.make_node("Concat", ["n1", "minus1", "w1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", ["N", 3, 4])], [tensor("y", ["N", 3, 4])],
                      [init("i0", np.array(0, np.int64)), init("i2", np.array(2, np.int64)),
                       init("ax0", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))])


def noop_ops() -> onnx.ModelProto:
    """Identity, inference Dropout, Cast to the same type, identity Transpose and zero Pad between Relus."""
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["d"], ["e"], perm=[0, 1]),
        helper.make_node("Pad", ["e", "zeros"], ["f"]),
        helper.make_node("Relu", ["f"], ["g"]),
        helper.make_node("Identity", ["g"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("zeros", np.zeros(4, np.int64))])


def duplicate_nodes() -> onnx.ModelProto:
    """Two identical weights and two identical MatMul -> Relu branches added together."""
    w = rng(5).standard_normal((3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("MatMul", ["x", "w2"], ["m2"]),
        helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("Relu", ["m2"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("w1", w), init("w2", w.copy())])


def nhwc_conv_block(channels: int = 4) -> onnx.ModelProto:
    """What TensorFlow/Caffe converters write: NHWC input, Transpose around each Conv, a
    BatchNorm as per-channel Sub/Mul/Add on the last axis, Relu, a residual Add, and a mean
    over H, W at the end."""
    r = rng(7)
    c = channels
    to_nchw, to_nhwc = [0, 3, 1, 2], [0, 2, 3, 1]
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=to_nchw),
             helper.make_node("Conv", ["x_nchw", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c1"], ["c1_nhwc"], perm=to_nhwc),
             helper.make_node("Sub", ["c1_nhwc", "mean"], ["s1"]),
             helper.make_node("Mul", ["s1", "scale"], ["m1"]),
             helper.make_node("Add", ["m1", "shift"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["r1_nchw"], perm=to_nchw),
             helper.make_node("Conv", ["r1_nchw", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c2"], ["c2_nhwc"], perm=to_nhwc),
             helper.make_node("Add", ["c2_nhwc", "r1"], ["res"]),
             helper.make_node("Relu", ["res"], ["r2"]),
             helper.make_node("ReduceMean", ["r2"], ["y"], axes=[1, 2], keepdims=0)]
    inits = [init("w1", r.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3),
             init("w2", r.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3),
             init("b2", r.standard_normal(c).astype(np.float32)),
             init("mean", r.standard_normal(c).astype(np.float32)),
             init("scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
             init("shift", r.standard_normal(c).astype(np.float32))]
    return make_model(nodes, [tensor("x", [1, 6, 5, c])], [tensor("y", [1, c])], inits)


def dynamic_reshape_chain() -> onnx.ModelProto:
    """Attention-style reshapes of x [batch, 4, 6] computed from Shape(x) (a dynamic batch):
    [batch, 4, 2, 3] (batch copied), then [batch*2, 4, 3] (one inferred dim), then back."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Concat", ["b1", "c4", "c2", "c3"], ["t1"], axis=0),
        helper.make_node("Reshape", ["x", "t1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["tr"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["b", "two"], ["b2"]),
        helper.make_node("Unsqueeze", ["b2", "ax0"], ["b21"]),
        helper.make_node("Concat", ["b21", "c4", "c3"], ["t2"], axis=0),
        helper.make_node("Reshape", ["tr", "t2"], ["r2"]),
        helper.make_node("Shape", ["x"], ["s_again"]),
        helper.make_node("Reshape", ["r2", "s_again"], ["y"]),
    ]
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    return make_model(nodes, [tensor("x", ["batch", 4, 6])], [tensor("y", ["batch", 4, 6])],
                      [init("i0", i64(0)), init("ax0", i64([0])), init("c4", i64([4])), init("c2", i64([2])),
                       init("c3", i64([3])), init("two", i64(2))])


BUILDERS = [const_chain, dead_branch, conv_bn_relu, matmul_add, if_subgraph, layernorm_decomposed, gelu_erf,
            gelu_tanh, transpose_pairs, convtranspose_bn_grouped, shape_chain, noop_ops, duplicate_nodes,
            nhwc_conv_block, dynamic_reshape_chain]


def tiny_transformer(seq=8, hidden=32, heads=2, ffn=64) -> onnx.ModelProto:
    """One pre-norm encoder block as exporters write it: LayerNormalization, Q/K/V MatMul+Add,
    Reshape/Transpose to heads, scaled QK^T, Softmax, MatMul with V, back to [1, seq, hidden],
    output projection, residual Add, then LayerNormalization, an FFN with tanh-GELU written out
    (x * 0.5 * (1 + tanh(0.79788 * (x + 0.044715 x^3)))) and a residual Add. Static shapes."""
    r = rng(6)
    d = hidden // heads

    def w(*shape, scale=0.2):
        return (r.standard_normal(shape) * scale).astype(np.float32)

    inits = [init("ln1_g", r.uniform(0.8, 1.2, hidden).astype(np.float32)), init("ln1_b", w(hidden, scale=0.1)),
             init("ln2_g", r.uniform(0.8, 1.2, hidden).astype(np.float32)), init("ln2_b", w(hidden, scale=0.1)),
             init("heads_shape", np.array([1, seq, heads, d], np.int64)),
             init("merge_shape", np.array([1, seq, hidden], np.int64)),
             init("scale", np.array(1.0 / np.sqrt(d), np.float32)),
             init("half", np.array(0.5, np.float32)), init("one", np.array(1.0, np.float32)),
             init("k0", np.array(0.044715, np.float32)), init("k1", np.array(0.7978845608, np.float32))]
    for name, (k, n) in {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
                         "o": (hidden, hidden), "f1": (hidden, ffn), "f2": (ffn, hidden)}.items():
        inits += [init(f"w_{name}", w(k, n)), init(f"b_{name}", w(n, scale=0.05))]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["h"], axis=-1, epsilon=1e-5)]
    for name in "qkv":
        nodes += [helper.make_node("MatMul", ["h", f"w_{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [f"{name}_b"]),
                  helper.make_node("Reshape", [f"{name}_b", "heads_shape"], [f"{name}_r"])]
    nodes += [
        helper.make_node("Transpose", ["q_r"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_r"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_r"], ["v_t"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"]),
        helper.make_node("MatMul", ["ctx_m", "w_o"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "b_o"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["res1"]),
        helper.make_node("LayerNormalization", ["res1", "ln2_g", "ln2_b"], ["h2"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h2", "w_f1"], ["f1_mm"]),
        helper.make_node("Add", ["f1_mm", "b_f1"], ["f1"]),
        helper.make_node("Mul", ["f1", "f1"], ["sq"]),
        helper.make_node("Mul", ["sq", "f1"], ["cube"]),
        helper.make_node("Mul", ["cube", "k0"], ["cube_k"]),
        helper.make_node("Add", ["f1", "cube_k"], ["inner"]),
        helper.make_node("Mul", ["inner", "k1"], ["inner_k"]),
        helper.make_node("Tanh", ["inner_k"], ["th"]),
        helper.make_node("Add", ["th", "one"], ["th1"]),
        helper.make_node("Mul", ["f1", "half"], ["half_x"]),
        helper.make_node("Mul", ["half_x", "th1"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w_f2"], ["f2_mm"]),
        helper.make_node("Add", ["f2_mm", "b_f2"], ["f2"]),
        helper.make_node("Add", ["res1", "f2"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", [1, seq, hidden])], [tensor("y", [1, seq, hidden])], inits)


BUILDERS.append(tiny_transformer)
