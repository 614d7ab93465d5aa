"""eliminate-duplicate on tiny graphs: identical initializers, common subexpressions, what stays."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.testing import op_histogram, run_pass
from onnxopt.testing import assert_valid_and_equivalent as check, plain_bytes as plain

from tests.graphs import duplicate_nodes, init, make_model, tensor




def test_merges_identical_weights_then_the_branches_that_use_them():
    proto = duplicate_nodes()
    out, result = run_pass("eliminate-duplicate", proto)
    # One visit reaches the fixed point: weights, then MatMul, then Relu.
    assert result.stats == {"merged_initializers": 1, "merged_nodes": 2}
    assert op_histogram(out) == {"MatMul": 1, "Relu": 1, "Add": 1}
    assert [i.name for i in out.graph.initializer] == ["w1"]
    assert list(out.graph.node[-1].input) == ["r1", "r1"]
    check(proto, out)


def test_same_bytes_but_other_type_or_shape_are_not_merged():
    ints = np.arange(6, dtype=np.int32)
    nodes = [helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["b", "s"], ["bf"]),
             helper.make_node("Add", ["x", "af"], ["y1"]), helper.make_node("Add", ["x", "c"], ["y2"]),
             helper.make_node("Add", ["x", "bf"], ["y3"])]
    proto = make_model(nodes, [tensor("x", [6])], [tensor("y1", [6]), tensor("y2", [6]), tensor("y3", [6])],
                       [init("a", ints), init("b", ints.reshape(2, 3).view(np.float32)), init("s", np.int64([6])),
                        init("c", ints.view(np.float32))])
    out, result = run_pass("eliminate-duplicate", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def test_common_subexpressions_including_constants_and_shapes():
    nodes = [helper.make_node("Constant", [], ["k1"], value_float=2.0),
             helper.make_node("Constant", [], ["k2"], value_float=2.0),
             helper.make_node("Shape", ["x"], ["s1"]), helper.make_node("Shape", ["x"], ["s2"]),
             helper.make_node("Mul", ["x", "k1"], ["m1"]), helper.make_node("Mul", ["x", "k2"], ["m2"]),
             helper.make_node("Reshape", ["m1", "s1"], ["r1"]), helper.make_node("Reshape", ["m2", "s2"], ["r2"]),
             helper.make_node("Sub", ["r1", "r2"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["N", 3])], [tensor("y", ["N", 3])])
    out, result = run_pass("eliminate-duplicate", proto)
    assert result.stats == {"merged_initializers": 0, "merged_nodes": 4}
    assert op_histogram(out) == {"Constant": 1, "Shape": 1, "Mul": 1, "Reshape": 1, "Sub": 1}
    check(proto, out, {"x": np.ones((4, 3), np.float32)})


def _two(op, attrs_a, attrs_b, inputs=("x",), extra_inits=()):
    nodes = [helper.make_node(op, list(inputs), ["a"], **attrs_a), helper.make_node(op, list(inputs), ["b"], **attrs_b),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return make_model(nodes, [tensor("x", [2, 2])], [tensor("y", [2, 2])], list(extra_inits))


MUST_NOT_MERGE = {
    "random": lambda: _two("RandomNormalLike", {"seed": 1.0}, {"seed": 1.0}),
    "dropout_training": lambda: _two("Dropout", {}, {}, ("x", "r", "t"),
                                     [init("r", np.float32(0.5)), init("t", np.array(True))]),
    "other_attribute": lambda: _two("Transpose", {"perm": [1, 0]}, {"perm": [0, 1]}),
    "other_float_attribute": lambda: _two("LeakyRelu", {"alpha": 0.1}, {"alpha": 0.2}),
    "other_inputs": lambda: make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x2"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"])],
        [tensor("x", [2]), tensor("x2", [2])], [tensor("y", [2])]),
    "both_graph_outputs": lambda: make_model(
        [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])],
        [tensor("x", [2])], [tensor("y1", [2]), tensor("y2", [2])]),
}


@pytest.mark.parametrize("case", sorted(MUST_NOT_MERGE))
def test_must_not_merge_leaves_model_byte_identical(case):
    proto = MUST_NOT_MERGE[case]()
    out, result = run_pass("eliminate-duplicate", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def test_duplicate_inside_a_branch_is_merged_and_ifs_are_not():
    def branch(name):
        nodes = [helper.make_node("Sigmoid", ["x"], ["s1"]), helper.make_node("Sigmoid", ["x"], ["s2"]),
                 helper.make_node("Mul", ["s1", "s2"], [f"{name}_out"])]
        return helper.make_graph(nodes, name, [], [tensor(f"{name}_out", [3])])

    nodes = [helper.make_node("If", ["cond"], ["y1"], then_branch=branch("t1"), else_branch=branch("e1")),
             helper.make_node("If", ["cond"], ["y2"], then_branch=branch("t2"), else_branch=branch("e2")),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [3])], [tensor("y", [3])])
    out, result = run_pass("eliminate-duplicate", proto)
    assert result.stats == {"merged_initializers": 0, "merged_nodes": 4}  # one Sigmoid in each branch
    assert op_histogram(out) == {"If": 2, "Add": 1}
    for cond in (True, False):
        check(proto, out, {"cond": np.array(cond), "x": np.float32([-1, 0, 2])})


def test_weight_shared_with_a_branch_is_merged():
    w = np.float32([1, 2, 3])
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w_in"], ["t_out"])], "then", [], [tensor("t_out", [3])],
                               [init("w_in", w)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [tensor("e_out", [3])])
    nodes = [helper.make_node("Mul", ["x", "w_out"], ["m"]),
             helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["m", "i"], ["y"])]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [3])], [tensor("y", [3])],
                       [init("w_out", w)])
    out, result = run_pass("eliminate-duplicate", proto)
    assert result.stats["merged_initializers"] == 1
    for cond in (True, False):
        check(proto, out, {"cond": np.array(cond), "x": np.float32([-1, 0, 2])})


def test_constant_graph_input_is_not_merged_away():
    # An initializer that is also a graph input can be overridden by the caller.
    nodes = [helper.make_node("Add", ["x", "a"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2]), tensor("a", [2])], [tensor("y", [2])],
                              [init("a", np.float32([1, 1])), init("b", np.float32([1, 1]))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    out, result = run_pass("eliminate-duplicate", proto)
    assert "a" in [i.name for i in out.graph.input]
    feeds = {"x": np.float32([1, 2]), "a": np.float32([5, 7])}
    check(proto, out, feeds)


def test_second_run_changes_nothing():
    out, _ = run_pass("eliminate-duplicate", duplicate_nodes())
    again, result = run_pass("eliminate-duplicate", out)
    assert not result.changed and again.SerializeToString() == plain(out)


def test_linear_in_a_wide_graph():
    # 2000 identical Relus of one input and 2000 copies of one weight merge in one visit.
    n = 2000
    nodes = [helper.make_node("Relu", ["x"], [f"r{i}"]) for i in range(n)]
    nodes += [helper.make_node("Add", [f"r{i}", f"w{i}"], [f"a{i}"]) for i in range(n)]
    nodes.append(helper.make_node("Sum", [f"a{i}" for i in range(n)], ["y"]))
    inits = [numpy_helper.from_array(np.float32([0.5, 1.5]), f"w{i}") for i in range(n)]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("y", [2])], inits)
    out, result = run_pass("eliminate-duplicate", proto)
    assert result.stats == {"merged_initializers": n - 1, "merged_nodes": 2 * (n - 1)}
    assert op_histogram(out) == {"Relu": 1, "Add": 1, "Sum": 1}
    check(proto, out)
