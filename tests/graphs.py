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


BUILDERS = [const_chain, dead_branch, conv_bn_relu, matmul_add, if_subgraph]
