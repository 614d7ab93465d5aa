"""eliminate-identity on tiny graphs: each no-op rule, graph outputs, subgraphs, must-not-fire cases."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.testing import op_histogram, run_pass
from onnxopt.testing import assert_valid_and_equivalent as check, plain_bytes as plain

from tests.graphs import if_subgraph, init, make_model, noop_ops, tensor




def test_removes_identity_dropout_cast_transpose_pad():
    proto = noop_ops()
    out, result = run_pass("eliminate-identity", proto)
    assert result.changed
    assert result.stats == {"identity": 2, "dropout": 1, "cast_same_type": 1, "transpose_identity": 1,
                            "pad_zero": 1, "removed": 6}
    assert op_histogram(out) == {"Relu": 2}
    # The last Identity wrote the graph output: its producer (Relu) now writes "y".
    assert [o.name for o in out.graph.output] == ["y"] and out.graph.node[-1].output[0] == "y"
    check(proto, out)


def between_relus(op_nodes, inits=(), shape=(2, 3, 4), out_shape=None, opset=17):
    """x -> Relu -> <op_nodes: 'a' to 'b'> -> Relu -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), *op_nodes, helper.make_node("Relu", ["b"], ["y"])]
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", list(out_shape or shape))], inits, opset=opset)


def i64(values):
    return np.array(values, np.int64)


NOOPS = {
    "reshape_same_shape": ([helper.make_node("Reshape", ["a", "s"], ["b"])], [init("s", i64([2, -1, 4]))]),
    "expand_same_shape": ([helper.make_node("Expand", ["a", "s"], ["b"])], [init("s", i64([3, 1]))]),
    "squeeze_same_shape": ([helper.make_node("Squeeze", ["a"], ["b"])], []),
    "slice_whole": ([helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"])],
                    [init("st", i64([0, 0])), init("en", i64([2**62, 3])), init("ax", i64([0, 1]))]),
    "tile_ones": ([helper.make_node("Tile", ["a", "r"], ["b"])], [init("r", i64([1, 1, 1]))]),
    "single_input_concat": ([helper.make_node("Concat", ["a"], ["b"], axis=1)], []),
    "single_input_max": ([helper.make_node("Max", ["a"], ["b"])], []),
    "single_input_sum": ([helper.make_node("Sum", ["a"], ["b"])], []),
    "cast_same_type": ([helper.make_node("CastLike", ["a", "like"], ["b"])], [init("like", np.float32([0]))]),
    "dropout": ([helper.make_node("Dropout", ["a", "ratio", "train"], ["b", "mask"])],
                [init("ratio", np.float32(0.5)), init("train", np.array(False))]),
}


@pytest.mark.parametrize("rule", sorted(NOOPS))
def test_each_noop_rule(rule):
    nodes, inits = NOOPS[rule]
    proto = between_relus(nodes, inits)
    out, result = run_pass("eliminate-identity", proto)
    assert result.stats == {rule: 1, "removed": 1}
    assert op_histogram(out) == {"Relu": 2}
    check(proto, out)


def test_slice_to_the_end_of_a_symbolic_dim():
    nodes = [helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["b"])]
    inits = [init("st", i64([0])), init("en", i64([2**63 - 1])), init("ax", i64([1])), init("sp", i64([1]))]
    proto = between_relus(nodes, inits, shape=(2, "T", 4))
    out, result = run_pass("eliminate-identity", proto)
    assert result.stats == {"slice_whole": 1, "removed": 1}
    assert op_histogram(out) == {"Relu": 2}
    check(proto, out, {"x": np.ones((2, 5, 4), np.float32)})


MUST_NOT_FIRE = {
    "reshape_changes_shape": ([helper.make_node("Reshape", ["a", "s"], ["b"])], [init("s", i64([3, 2, 4]))], (3, 2, 4)),
    "transpose_permutes": ([helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1])], [], (2, 4, 3)),
    "cast_changes_type": ([helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
                           helper.make_node("Cast", ["h"], ["b"], to=TensorProto.FLOAT)], [], None),
    "pad_nonzero": ([helper.make_node("Pad", ["a", "p"], ["b"])], [init("p", i64([0, 0, 1, 0, 0, -1]))], None),
    "slice_from_one": ([helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"])],
                       [init("st", i64([1])), init("en", i64([2**63 - 1])), init("ax", i64([1]))], (2, 2, 4)),
    "slice_reverses": ([helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["b"])],
                       [init("st", i64([-1])), init("en", i64([-2**62])), init("ax", i64([2])),
                        init("sp", i64([-1]))], None),
    "dropout_training": ([helper.make_node("Dropout", ["a", "ratio", "train"], ["b"], seed=0)],
                         [init("ratio", np.float32(0.0)), init("train", np.array(True))], None),
    "concat_two": ([helper.make_node("Concat", ["a", "a"], ["b"], axis=0)], [], (4, 3, 4)),
}


@pytest.mark.parametrize("case", sorted(MUST_NOT_FIRE))
def test_must_not_fire_leaves_model_byte_identical(case):
    nodes, inits, out_shape = MUST_NOT_FIRE[case]
    proto = between_relus(nodes, inits, out_shape=out_shape)
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and result.stats["removed"] == 0
    assert out.SerializeToString() == plain(proto)


def test_dropout_whose_mask_is_read_stays():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"]),
             helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT)]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("m", [2])])
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def test_identity_from_graph_input_to_graph_output_stays():
    proto = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and result.stats["kept_graph_output"] == 1
    assert out.SerializeToString() == plain(proto)


def test_identity_to_output_stays_when_its_input_has_other_readers():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Neg", ["r"], ["z"])]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("z", [2])])
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def test_identity_between_two_graph_outputs_stays():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("r", [2]), tensor("y", [2])])
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def test_identity_in_a_branch_reading_an_outer_tensor():
    proto = if_subgraph()  # then-branch: t0 = Identity(x) (outer), t_out = Add(t0, w)
    out, result = run_pass("eliminate-identity", proto)
    assert result.stats == {"identity": 1, "removed": 1}
    then_g = {a.name: a.g for a in out.graph.node[0].attribute}["then_branch"]
    assert [(n.op_type, list(n.input)) for n in then_g.node] == [("Add", ["x", "w"])]
    for cond in (True, False):
        check(proto, out, {"cond": np.array(cond), "x": np.ones((2, 3), np.float32)})


def test_identity_writing_a_branch_output_from_an_outer_tensor_stays():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t_out"])], "then", [], [tensor("t_out", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [tensor("e_out", [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [2])], [tensor("y", [2])])
    out, result = run_pass("eliminate-identity", proto)
    assert not result.changed and result.stats["kept_graph_output"] == 1
    assert out.SerializeToString() == plain(proto)


def test_old_opset_dropout_and_pad_attribute():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["p"], ratio=0.3),
             helper.make_node("Pad", ["p"], ["b"], pads=[0, 0, 0, 0]), helper.make_node("Relu", ["b"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], opset=9)
    out, result = run_pass("eliminate-identity", proto)
    assert result.stats == {"dropout": 1, "pad_zero": 1, "removed": 2}
    check(proto, out)


def test_second_run_changes_nothing():
    out, _ = run_pass("eliminate-identity", noop_ops())
    again, result = run_pass("eliminate-identity", out)
    assert not result.changed and again.SerializeToString() == plain(out)
