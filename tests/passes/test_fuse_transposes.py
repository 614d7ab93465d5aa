"""fuse-transposes: Transpose(Transpose(x)) becomes one Transpose, or nothing when it cancels."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from tests.graphs import make_model, tensor
from onnx import TensorProto, helper

from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import load
from onnxopt.ir.digest import model_digest as graph_digest
from onnxopt.pipeline.registry import get_pass
from onnxopt.target import load_target
from onnxopt.testing import assert_equivalent, op_histogram, run_pass
from onnxopt.passes.fuse_transposes import compose

X_SHAPE = [2, 3, 4, 5]


def transpose(inp, out, perm=None, name=""):
    return helper.make_node("Transpose", [inp], [out], name=name, **({"perm": perm} if perm is not None else {}))


def shape_after(shape, *perms):
    for p in perms:
        p = p if p is not None else list(range(len(shape) - 1, -1, -1))
        shape = [shape[i] for i in p]
    return shape


def pair(p1, p2, tail="Relu"):
    """x -> Transpose(p1) -> Transpose(p2) -> [Relu] -> y."""
    nodes = [transpose("x", "t1", p1, "t1"), transpose("t1", "t2" if tail else "y", p2, "t2")]
    if tail:
        nodes.append(helper.make_node(tail, ["t2"], ["y"]))
    return make_model(nodes, [tensor("x", X_SHAPE)], [tensor("y", shape_after(X_SHAPE, p1, p2))])


def fused(proto):
    out, result = run_pass("fuse-transposes", proto)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def perm_of(node):
    return list(next(a.ints for a in node.attribute if a.name == "perm"))


def test_compose_matches_numpy():
    a = np.arange(2 * 3 * 4 * 5).reshape(X_SHAPE)
    for p1 in itertools.permutations(range(4)):
        for p2 in [(0, 1, 2, 3), (3, 2, 1, 0), (0, 2, 3, 1), (1, 0, 3, 2)]:
            want = np.transpose(np.transpose(a, p1), p2)
            assert np.array_equal(np.transpose(a, compose(list(p1), list(p2))), want)
    assert compose([0, 2, 3, 1], None) == [1, 3, 2, 0]
    assert compose(None, [0, 2, 3, 1]) == [3, 1, 0, 2]


def test_pair_becomes_one_transpose():
    proto = pair([0, 2, 3, 1], [0, 2, 1, 3])
    out, result = fused(proto)
    assert op_histogram(proto) == {"Transpose": 2, "Relu": 1}
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1}
    assert result.changed and result.stats == {"transpose-pair": 1}
    assert perm_of(out.graph.node[0]) == [0, 3, 2, 1]
    assert_equivalent(proto, out)


def test_cancelling_pair_disappears():
    proto = pair([0, 2, 3, 1], [0, 3, 1, 2])  # NCHW -> NHWC -> NCHW
    out, result = fused(proto)
    assert op_histogram(out) == {"Relu": 1}
    assert list(out.graph.node[0].input) == ["x"]
    assert result.stats == {"transpose-pair": 1}
    assert_equivalent(proto, out)


def test_cancelling_pair_that_writes_the_graph_output_leaves_an_identity():
    proto = pair([0, 2, 3, 1], [0, 3, 1, 2], tail=None)
    out, _ = fused(proto)
    assert op_histogram(out) == {"Identity": 1}
    assert out.graph.node[0].output[0] == "y" and [o.name for o in out.graph.output] == ["y"]
    assert_equivalent(proto, out)


@pytest.mark.parametrize("p1,p2", [(None, None), (None, [3, 2, 1, 0]), ([0, 2, 3, 1], None)], ids=str)
def test_missing_perm_means_reverse(p1, p2):
    proto = pair(p1, p2)
    out, result = fused(proto)
    assert result.stats == {"transpose-pair": 1}
    assert_equivalent(proto, out)


def test_chain_of_four_folds_to_one():
    perms = [[1, 0, 2, 3], [0, 2, 1, 3], [3, 1, 2, 0], [0, 1, 3, 2]]
    names = ["x", "a", "b", "c", "t"]
    nodes = [transpose(i, o, p) for i, o, p in zip(names, names[1:], perms)] + [helper.make_node("Relu", ["t"], ["y"])]
    proto = make_model(nodes, [tensor("x", X_SHAPE)], [tensor("y", shape_after(X_SHAPE, *perms))])
    out, result = fused(proto)
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1}
    assert result.stats == {"transpose-pair": 3}
    assert_equivalent(proto, out)


def untouched(proto):
    m = load(proto)
    before = graph_digest(m)
    result = get_pass("fuse-transposes")().run(m, PassContext(target=load_target("cpu")))
    assert not result.changed and graph_digest(m) == before
    return result


def test_shared_first_transpose_is_kept_when_the_pair_does_not_cancel():
    proto = pair([0, 2, 3, 1], [0, 2, 1, 3])
    proto.graph.node.append(helper.make_node("Relu", ["t1"], ["z"]))
    proto.graph.output.append(tensor("z", shape_after(X_SHAPE, [0, 2, 3, 1])))
    result = untouched(proto)
    assert result.stats["skipped"] == {
        "transpose-pair: first Transpose has other readers and the pair is not the identity": 1}


def test_shared_first_transpose_stays_when_the_pair_cancels():
    proto = pair([0, 2, 3, 1], [0, 3, 1, 2])
    proto.graph.node.append(helper.make_node("Sigmoid", ["t1"], ["z"]))
    proto.graph.output.append(tensor("z", shape_after(X_SHAPE, [0, 2, 3, 1])))
    out, result = fused(proto)
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1, "Sigmoid": 1}
    assert result.stats == {"transpose-pair": 1}
    assert_equivalent(proto, out)


def test_first_transpose_read_by_two_transposes_is_absorbed_by_both():
    p1 = [0, 2, 3, 1]
    nodes = [transpose("x", "t1", p1), transpose("t1", "a", [1, 0, 2, 3]), transpose("t1", "b", [0, 1, 3, 2])]
    proto = make_model(nodes, [tensor("x", X_SHAPE)],
                       [tensor("a", shape_after(X_SHAPE, p1, [1, 0, 2, 3])), tensor("b", shape_after(X_SHAPE, p1, [0, 1, 3, 2]))])
    out, result = fused(proto)
    assert op_histogram(out) == {"Transpose": 2}  # from 3: t1 is gone
    assert all(n.input[0] == "x" for n in out.graph.node)
    assert [n.output[0] for n in out.graph.node] == ["a", "b"]
    assert_equivalent(proto, out)


def test_first_transpose_that_is_a_graph_output_stays():
    proto = pair([0, 2, 3, 1], [0, 3, 1, 2])
    proto.graph.output.append(tensor("t1", shape_after(X_SHAPE, [0, 2, 3, 1])))
    out, result = fused(proto)
    assert op_histogram(out) == {"Transpose": 1, "Relu": 1}
    assert {o.name for o in out.graph.output} == {"y", "t1"}
    assert_equivalent(proto, out)


def test_reader_inside_a_subgraph_is_rewired():
    """The cancelling pair's output is read inside an If branch (outer-scope name)."""
    then_g = helper.make_graph([helper.make_node("Relu", ["t2"], ["r"])], "then", [], [tensor("r", X_SHAPE)])
    else_g = helper.make_graph([helper.make_node("Neg", ["t2"], ["e"])], "else", [], [tensor("e", X_SHAPE)])
    nodes = [transpose("x", "t1", [0, 2, 3, 1]), transpose("t1", "t2", [0, 3, 1, 2]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", X_SHAPE)], [tensor("y", X_SHAPE)])
    out, result = fused(proto)
    assert op_histogram(out) == {"If": 1}
    x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
    for cond in (True, False):
        assert_equivalent(proto, out, feeds={"cond": np.array(cond), "x": x})


def test_pair_inside_a_loop_body_is_folded():
    body = helper.make_graph(
        [transpose("v_in", "t1", [1, 0]), transpose("t1", "t2", [1, 0]), helper.make_node("Add", ["t2", "one"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", [2, 3])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", [2, 3])],
        initializer=[onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "one")])
    nodes = [helper.make_node("Loop", ["n", "", "v0"], ["v"], body=body)]
    proto = make_model(nodes, [tensor("n", [], TensorProto.INT64), tensor("v0", [2, 3])], [tensor("v", [2, 3])])
    out, result = fused(proto)
    assert result.stats == {"transpose-pair": 1}
    body_out = out.graph.node[0].attribute[0].g
    assert [n.op_type for n in body_out.node] == ["Add", "Identity"]
    assert_equivalent(proto, out, feeds={"n": np.array(3, np.int64), "v0": np.zeros((2, 3), np.float32)})


def test_second_run_changes_nothing():
    out, _ = fused(pair([0, 2, 3, 1], [0, 2, 1, 3]))
    assert not run_pass("fuse-transposes", out)[1].changed


def test_shared_builder_cancels_one_pair_and_composes_the_other():
    from tests.graphs import transpose_pairs

    proto = transpose_pairs()
    out, result = fused(proto)
    assert result.stats == {"transpose-pair": 2}
    assert op_histogram(out) == {"Relu": 1, "Transpose": 1}
    assert perm_of(out.graph.node[1]) == [2, 0, 1, 3]
    assert_equivalent(proto, out)
