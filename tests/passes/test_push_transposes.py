"""push-transposes on tiny graphs: NHWC blocks, every handler, the cost rule, graph outputs."""

import numpy as np
import pytest
from onnx import helper

from onnxopt.testing import assert_valid_and_equivalent as check, op_histogram, run_pass

from tests.graphs import init, make_model, nhwc_conv_block, tensor

NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def pushed(proto, then="fuse-transposes,eliminate-identity,eliminate-dead-code", **options):
    out, result = run_pass("push-transposes", proto, **options)
    for name in then.split(",") if then else []:
        out, _ = run_pass(name, out)
    check(proto, out)
    return out, result


def test_nhwc_block_keeps_only_the_input_transpose():
    proto = nhwc_conv_block()
    out, result = pushed(proto)
    assert op_histogram(out)["Transpose"] == 1  # NHWC input -> NCHW, needed by the first Conv
    assert result.stats["cancelled_pairs"] >= 1 and result.stats["pushed_through_ReduceMean"] == 1
    # the per-channel constants are now [1, C, 1, 1]: fuse-conv-bn folds all three into the Conv
    out, fused = run_pass("fuse-conv-bn", out)
    out, _ = run_pass("eliminate-dead-code", out)
    assert fused.stats["conv-sub"] == 1 and fused.stats["conv-mul"] == 1 and fused.stats["conv-add"] == 1
    assert op_histogram(out) == {"Transpose": 1, "Conv": 2, "Relu": 2, "Add": 1, "ReduceMean": 1}
    check(proto, out)
    again, second = run_pass("push-transposes", out)
    assert not second.changed


def _after_transpose(op_nodes, x_shape, out_shape, inits=(), perm=NHWC, opset=17):
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm)] + op_nodes + \
            [helper.make_node("Transpose", ["o"], ["y"], perm=[perm.index(i) for i in range(len(perm))])]
    return make_model(nodes, [tensor("x", x_shape)], [tensor("y", out_shape)], list(inits), opset=opset)


@pytest.mark.parametrize("node,inits", [
    (helper.make_node("Sigmoid", ["t"], ["o"]), []),
    (helper.make_node("Clip", ["t", "lo", "hi"], ["o"]), [init("lo", np.float32(-0.5)), init("hi", np.float32(0.5))]),
    (helper.make_node("Add", ["t", "c"], ["o"]), [init("c", np.arange(4, dtype=np.float32))]),  # [C] broadcast
    (helper.make_node("Mul", ["t", "c"], ["o"]), [init("c", np.float32(3))]),  # a scalar
    (helper.make_node("Where", ["m", "t", "c"], ["o"]),
     [init("m", np.array([True, False, True, False])), init("c", np.float32(0))]),
    (helper.make_node("Softmax", ["t"], ["o"], axis=-1), []),
    (helper.make_node("Pad", ["t", "pads"], ["o"]), [init("pads", np.int64([0, 1, 0, 0, 0, 2, 0, 0]))]),
    (helper.make_node("Slice", ["t", "st", "en", "ax"], ["o"]),
     [init("st", np.int64([1, 1])), init("en", np.int64([4, 3])), init("ax", np.int64([1, 3]))]),
    (helper.make_node("ReduceMax", ["t"], ["o"], axes=[1], keepdims=1), []),
])
def test_handlers_keep_outputs(node, inits):
    in_shape = [1, 4, 5, 6]  # NCHW: C=4 lands last after the Transpose
    nhwc_out = {"Pad": [1, 8, 6, 4], "Slice": [1, 3, 6, 2], "ReduceMax": [1, 1, 6, 4]}.get(node.op_type, [1, 5, 6, 4])
    proto = _after_transpose([node], in_shape, [nhwc_out[i] for i in NCHW], inits, perm=NHWC)
    out, result = pushed(proto)
    assert result.stats.get(f"pushed_through_{node.op_type}") == 1
    assert "Transpose" not in op_histogram(out)


def test_reduce_without_keepdims_absorbs_the_permutation():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=NHWC),
             helper.make_node("ReduceMean", ["t"], ["y"], axes=[1, 2], keepdims=0)]
    proto = make_model(nodes, [tensor("x", [2, 3, 4, 5])], [tensor("y", [2, 3])])
    out, result = pushed(proto)
    assert op_histogram(out) == {"ReduceMean": 1}
    reduce = out.graph.node[0]
    assert [a.ints for a in reduce.attribute if a.name == "axes"][0] == [2, 3]


def test_concat_and_split_map_their_axis():
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=NHWC),
             helper.make_node("Transpose", ["z"], ["b"], perm=NHWC),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=3),
             helper.make_node("Split", ["c", "sizes"], ["s1", "s2"], axis=3),
             helper.make_node("Transpose", ["s1"], ["y1"], perm=NCHW),
             helper.make_node("Transpose", ["s2"], ["y2"], perm=NCHW)]
    proto = make_model(nodes, [tensor("x", [1, 2, 3, 4]), tensor("z", [1, 3, 3, 4])],
                       [tensor("y1", [1, 1, 3, 4]), tensor("y2", [1, 4, 3, 4])], [init("sizes", np.int64([1, 4]))])
    out, result = pushed(proto)
    assert op_histogram(out) == {"Concat": 1, "Split": 1}


def test_not_pushed_when_it_would_add_transposes():
    # Relu's output goes to a graph output and a MatMul: pushing would only move the Transpose
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Add", ["t", "z"], ["y"])]
    proto = make_model(nodes, [tensor("x", [3, 4]), tensor("z", [4, 3])], [tensor("y", [4, 3])])
    out, result = run_pass("push-transposes", proto)
    assert not result.changed and result.stats["not_worth_it"] == 1


def test_graph_output_keeps_its_name_and_layout():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=NHWC), helper.make_node("Relu", ["t"], ["y"]),
             helper.make_node("Transpose", ["y"], ["back"], perm=NCHW), helper.make_node("Neg", ["back"], ["z"])]
    proto = make_model(nodes, [tensor("x", [1, 2, 3, 4])], [tensor("y", [1, 3, 4, 2]), tensor("z", [1, 2, 3, 4])])
    out, result = pushed(proto)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    producer = {o: n for n in out.graph.node for o in n.output}
    assert producer["y"].op_type == "Transpose" and producer["z"].input[0] != "back"


def test_opset_below_13_softmax_is_not_pushed():
    proto = _after_transpose([helper.make_node("Softmax", ["t"], ["o"], axis=3)], [1, 4, 5, 6], [1, 4, 5, 6],
                             opset=12)
    out, result = run_pass("push-transposes", proto)
    assert not result.changed
