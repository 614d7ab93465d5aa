"""lift-constants and eliminate-dead-code on tiny graphs."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.testing import assert_equivalent, op_histogram, run_pass

from tests.graphs import const_chain, dead_branch, if_subgraph, make_model, tensor


def test_lift_constants_moves_every_kind_of_constant():
    proto = const_chain()
    out, result = run_pass("lift-constants", proto)
    assert result.changed and result.stats == {"lifted": 2}
    assert op_histogram(out) == {"Mul": 1, "Add": 1}
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits["c2"].dtype == np.float32 and inits["c2"].tolist() == [1, 2, 3, 4]
    onnx.checker.check_model(out)
    assert_equivalent(proto, out)


def test_lift_constants_inside_subgraphs():
    proto = if_subgraph()
    out, result = run_pass("lift-constants", proto)
    assert result.stats == {"lifted": 1}
    else_branch = {a.name: a.g for a in out.graph.node[0].attribute}["else_branch"]
    assert [n.op_type for n in else_branch.node] == ["Mul"] and else_branch.initializer[0].name == "k"
    for cond in (True, False):
        assert_equivalent(proto, out, {"cond": np.array(cond), "x": np.ones((2, 3), np.float32)})


def test_lift_constants_keeps_constant_that_is_a_graph_output():
    node = helper.make_node("Constant", [], ["y"], value_ints=[1, 2])
    proto = make_model([node], [], [tensor("y", [2], onnx.TensorProto.INT64)])
    out, result = run_pass("lift-constants", proto)
    assert not result.changed and out.graph == proto.graph


def test_eliminate_dead_code_removes_nodes_and_initializers_not_inputs():
    proto = dead_branch()
    out, result = run_pass("eliminate-dead-code", proto)
    assert result.changed and result.stats["removed_nodes"] == 1
    assert op_histogram(out) == {"Add": 1}
    assert [i.name for i in out.graph.initializer] == ["b"]
    assert [i.name for i in out.graph.input] == ["x"]
    assert_equivalent(proto, out)


def test_eliminate_dead_code_keeps_unused_graph_inputs():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2]), tensor("unused", [3])], [tensor("y", [2])])
    out, result = run_pass("eliminate-dead-code", proto)
    assert not result.changed and [i.name for i in out.graph.input] == ["x", "unused"]
