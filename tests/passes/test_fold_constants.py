"""fold-constants on tiny graphs: what folds, what never does, the size bound, subgraphs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.testing import assert_equivalent, op_histogram, run_pass
from onnxopt.testing import assert_valid_and_equivalent as check, plain_bytes as plain

from tests.real_models import real_model
from tests.graphs import const_chain, init, make_model, shape_chain, tensor


def inits(proto):
    return {i.name: i for i in proto.graph.initializer}


def test_folds_a_constant_chain_into_an_initializer():
    proto = const_chain()
    out, result = run_pass("fold-constants", proto)
    assert result.changed and result.stats["folded_nodes"] == 1 and result.stats["sessions"] == 1
    assert op_histogram(out) == {"Constant": 2, "Add": 1}  # the Constants are dead code now
    c1 = numpy_helper.to_array(proto.graph.node[0].attribute[0].t)
    assert np.array_equal(numpy_helper.to_array(inits(out)["c12"]), c1 * np.float32([1, 2, 3, 4]))
    check(proto, out)


def test_folds_static_dims_of_a_shape_chain():
    proto = shape_chain()
    out, result = run_pass("fold-constants", proto)
    # Gather(Shape(x), 2) picks the static dim 4 (and its Unsqueeze is [4]); Gather(Shape(x), 0)
    # is the symbolic N.
    assert result.stats["shape_folds"] == 2 and result.stats["folded_nodes"] == 2
    assert op_histogram(out) == {"Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1}
    assert numpy_helper.to_array(inits(out)["w1"]).tolist() == [4]
    check(proto, out, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


def test_folds_a_fully_static_shape_chain_away():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    proto = make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])],
                       [init("i0", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)),
                        init("minus1", np.array([-1], np.int64))])
    out, result = run_pass("fold-constants", proto)
    assert op_histogram(out) == {"Reshape": 1}
    assert result.stats["folded_nodes"] == 4 and result.stats["shape_folds"] >= 1
    assert numpy_helper.to_array(inits(out)["target"]).tolist() == [2, -1]
    check(proto, out)


@pytest.mark.parametrize("start,end,expected", [(1, -1, [3, 4]), (-3, None, [3, 4, 5]), (-10, 2, [2, 3]),
                                                (2, 100, [4, 5]), (3, 1, [])])
def test_shape_start_end_attributes_are_honoured(start, end, expected):
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    nodes = [helper.make_node("Shape", ["x"], ["s"], **attrs),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["sf"], ["total"], keepdims=0),
             helper.make_node("Mul", ["x", "total"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 3, 4, 5])], [tensor("y", [2, 3, 4, 5])])
    out, result = run_pass("fold-constants", proto)
    assert op_histogram(out) == {"Mul": 1}
    assert numpy_helper.to_array(inits(out)["total"]).tolist() == sum(expected)
    check(proto, out)


def test_slice_of_shape_folds_when_the_picked_dims_are_static():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "one", "big"], ["tail"]),
             helper.make_node("Reshape", ["y0", "tail"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["N", 3, 4]), tensor("y0", [12])], [tensor("y", [3, 4])],
                       [init("one", np.array([1], np.int64)), init("big", np.array([2**62], np.int64))])
    out, result = run_pass("fold-constants", proto)
    assert op_histogram(out) == {"Shape": 1, "Reshape": 1} and result.stats["shape_folds"] == 1
    assert numpy_helper.to_array(inits(out)["tail"]).tolist() == [3, 4]
    check(proto, out, {"x": np.ones((5, 3, 4), np.float32), "y0": np.arange(12, dtype=np.float32)})


def huge_producers() -> onnx.ModelProto:
    """ConstantOfShape, Expand, Range and Tile of constants whose outputs would be terabytes."""
    nodes = [
        helper.make_node("ConstantOfShape", ["dims"], ["big1"]),
        helper.make_node("Expand", ["one", "dims"], ["big2"]),
        helper.make_node("Range", ["zero", "limit", "step"], ["big3"]),
        helper.make_node("Tile", ["one", "reps"], ["big4"]),
        # (Reduce, not Mul: onnx's data propagation of Mul allocates a 1-D input's full length)
        *[helper.make_node("ReduceMax", [f"big{i}"], [f"m{i}"], keepdims=0) for i in range(1, 5)],
        *[helper.make_node("Mul", [f"m{i}", "x"], [f"y{i}"]) for i in range(1, 5)],
    ]
    inits_ = [init("dims", np.array([2**20, 2**20], np.int64)), init("one", np.ones([1], np.float32)),
              init("zero", np.array(0, np.float32)), init("limit", np.array(2.0**40, np.float32)),
              init("step", np.array(1, np.float32)), init("reps", np.array([2**40], np.int64))]
    outs = [tensor(f"y{i}", []) for i in range(1, 5)]
    return make_model(nodes, [tensor("x", [])], outs, inits_)


def test_size_bound_skips_huge_outputs_without_computing_them():
    proto = huge_producers()
    out, result = run_pass("fold-constants", proto)
    # Nothing evaluated (no onnxruntime session): each size was known to be too large first.
    assert not result.changed and result.stats["skipped_too_large"] == 4
    assert "sessions" not in result.stats
    assert out.SerializeToString() == plain(proto)


@pytest.mark.parametrize("max_bytes,folded", [(1000, False), (1 << 20, True)])
def test_max_bytes_option(max_bytes, folded):
    nodes = [helper.make_node("ConstantOfShape", ["dims"], ["c"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["x", "c"], ["y"])]
    proto = make_model(nodes, [tensor("x", [64, 64])], [tensor("y", [64, 64])],
                       [init("dims", np.array([64, 64], np.int64))])  # 16 KiB of float
    out, result = run_pass("fold-constants", proto, max_bytes=max_bytes)
    assert result.changed is folded
    assert op_histogram(out) == ({"Add": 1} if folded else {"ConstantOfShape": 1, "Add": 1})
    if folded:
        check(proto, out)
    else:
        assert result.stats["skipped_too_large"] == 1 and out.SerializeToString() == plain(proto)


def test_graph_output_stays_produced_by_a_node():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Relu", ["x"], ["z"])]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("z", [2])],
                       [init("a", np.float32([1, 2])), init("b", np.float32([3, 4]))])
    out, result = run_pass("fold-constants", proto)
    assert result.stats["graph_outputs_as_constant_nodes"] == 1
    assert op_histogram(out) == {"Relu": 1, "Constant": 1}
    assert [o.name for o in out.graph.output] == ["y", "z"] and "y" not in inits(out)
    check(proto, out)


def test_keeps_dtypes_exactly():
    nodes = [helper.make_node("Cast", ["i"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["i"], ["u"], to=TensorProto.UINT8),
             helper.make_node("Cast", ["u"], ["uh"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["x", "h"], ["y1"]), helper.make_node("Add", ["x", "uh"], ["y2"])]
    proto = make_model(nodes, [tensor("x", [3], TensorProto.FLOAT16)],
                       [tensor("y1", [3], TensorProto.FLOAT16), tensor("y2", [3], TensorProto.FLOAT16)],
                       [init("i", np.int32([1, -2, 300]))])
    out, result = run_pass("fold-constants", proto)
    assert result.stats["folded_nodes"] == 3 and op_histogram(out) == {"Add": 2}
    assert inits(out)["h"].data_type == TensorProto.FLOAT16 and inits(out)["uh"].data_type == TensorProto.FLOAT16
    check(proto, out)


def _random_like():
    nodes = [helper.make_node("RandomUniformLike", ["c"], ["r"], seed=1.0), helper.make_node("Add", ["x", "r"], ["y"])]
    return make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("c", np.zeros(3, np.float32))])


def _custom_domain():
    nodes = [helper.make_node("Twice", ["c"], ["t"], domain="my.ops"), helper.make_node("Add", ["x", "t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [3])], [tensor("y", [3])], [init("c", np.ones(3, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    model.ir_version = 8
    return model


def _bfloat16_weight():
    b = helper.make_tensor("b", TensorProto.BFLOAT16, [2], [1.5, -2.0])
    nodes = [helper.make_node("Cast", ["b"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "f"], ["y"])]
    return make_model(nodes, [tensor("x", [2])], [tensor("y", [2])], [b])


def _dequantize_weight():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 2])], [tensor("y", [1, 2])],
                      [init("q", np.int8([[1, 2], [3, 4]])), init("s", np.float32(0.1)), init("z", np.int8(0))])


def _overridable_initializer():
    # "a" is an initializer and a graph input: the caller may feed another value.
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2]), tensor("a", [2])], [tensor("y", [2])],
                              [init("a", np.float32([1, 1])), init("b", np.float32([2, 3]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("build", [_random_like, _custom_domain, _bfloat16_weight, _dequantize_weight,
                                   _overridable_initializer])
def test_never_folds_random_custom_unrepresentable_or_dequantize(build):
    proto = build()
    out, result = run_pass("fold-constants", proto)
    assert not result.changed and out.SerializeToString() == plain(proto)


def if_model(cond_nodes, cond_inits, cond_input=()):
    """An If whose then-branch multiplies an outer constant by a local one and adds x."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["w", "k"], ["wk"]), helper.make_node("Add", ["x", "wk"], ["t_out"])],
        "then", [], [tensor("t_out", [3])], [init("k", np.float32([2, 2, 2]))])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [tensor("e_out", [3])])
    nodes = list(cond_nodes) + [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [*cond_input, tensor("x", [3])], [tensor("y", [3])],
                      [init("w", np.float32([1, 2, 3])), *cond_inits])


def test_folds_inside_a_branch_with_outer_constants():
    proto = if_model([], [], [tensor("cond", [], TensorProto.BOOL)])
    out, result = run_pass("fold-constants", proto)
    # both branches visited in every round (a second round looks for what the folded
    # small value makes known)
    assert result.stats["folded_nodes"] == 1 and result.stats["subgraphs_visited"] == 2 * result.stats["rounds"]
    then_g = {a.name: a.g for a in out.graph.node[0].attribute}["then_branch"]
    assert [n.op_type for n in then_g.node] == ["Add"]
    for cond in (True, False):
        check(proto, out, {"cond": np.array(cond), "x": np.float32([1, 2, 3])})


@pytest.mark.parametrize("a,b", [(3.0, 1.0), (1.0, 3.0)])
def test_inlines_an_if_whose_condition_is_constant(a, b):
    proto = if_model([helper.make_node("Greater", ["a", "b"], ["cond"])],
                     [init("a", np.float32(a)), init("b", np.float32(b))])
    out, result = run_pass("fold-constants", proto)
    assert result.stats["inlined_ifs"] == 1
    hist = op_histogram(out)
    assert "If" not in hist and hist.get("Add", 0) + hist.get("Neg", 0) == 1
    assert [o.name for o in out.graph.output] == ["y"]
    check(proto, out)


def test_falls_back_to_the_reference_evaluator(monkeypatch):
    from onnxopt.passes import fold_constants

    monkeypatch.setattr(fold_constants._Folder, "run_ort", lambda self, nodes: None)
    proto = const_chain()
    out, result = run_pass("fold-constants", proto)
    assert result.stats["evaluated_by_reference"] == 1 and result.stats["folded_nodes"] == 1
    check(proto, out)


def test_a_deep_chain_is_folded_in_one_session():
    depth = 300
    nodes = [helper.make_node("Add", [f"c{i}", "one"], [f"c{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("Add", ["x", f"c{depth}"], ["y"]))
    proto = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])],
                       [init("c0", np.zeros(4, np.float32)), init("one", np.ones(4, np.float32))])
    out, result = run_pass("fold-constants", proto)
    assert result.stats["folded_nodes"] == depth and result.stats["sessions"] == 1
    assert numpy_helper.to_array(inits(out)[f"c{depth}"]).tolist() == [depth] * 4
    check(proto, out)


def test_second_run_changes_nothing():
    out, _ = run_pass("fold-constants", shape_chain())
    again, result = run_pass("fold-constants", out)
    assert not result.changed and again.SerializeToString() == plain(out)


def test_silero_vad_ifs_fold_and_outputs_stay_equal():
    path = real_model("silero_vad_16k_op15.onnx")
    proto = onnx.load(str(path))
    out, result = run_pass("fold-constants", proto)
    assert result.stats["inlined_ifs"] >= 1 and result.stats["folded_nodes"] > 0
    onnx.checker.check_model(out)
    r = np.random.default_rng(0)
    for sr, n in ((16000, 512), (8000, 256)):
        feeds = {"input": r.standard_normal((2, n)).astype(np.float32),
                 "state": r.standard_normal((2, 2, 128)).astype(np.float32), "sr": np.array(sr, np.int64)}
        assert_equivalent(proto, out, feeds)


def test_cast_slice_concat_of_a_partly_symbolic_shape():
    # Cast(Shape(x), int32) -> Slice [1:3] -> Cast(int64) -> Concat with a constant: all static.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["s32", "one", "three"], ["hw32"]),
             helper.make_node("Cast", ["hw32"], ["hw"], to=TensorProto.INT64),
             helper.make_node("Concat", ["minus1", "hw"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["N", 3, 4])], [tensor("y", ["N", 3, 4])],
                       [init("one", np.array([1], np.int64)), init("three", np.array([3], np.int64)),
                        init("minus1", np.array([-1], np.int64))])
    out, result = run_pass("fold-constants", proto)
    # Slice, the second Cast and Concat fold; Shape and the first Cast are left dead.
    assert result.stats["shape_folds"] == 3 and result.stats["folded_nodes"] == 3
    assert op_histogram(out) == {"Shape": 1, "Cast": 1, "Reshape": 1}
    assert numpy_helper.to_array(inits(out)["target"]).tolist() == [-1, 3, 4]
    check(proto, out, {"x": np.ones((2, 3, 4), np.float32)})


def test_folds_a_loop_invariant_inside_a_loop_body():
    # body: acc_out = acc + (w * k)   where w is an outer constant and k a body constant
    body = helper.make_graph(
        [helper.make_node("Mul", ["w", "k"], ["wk"]), helper.make_node("Add", ["acc", "wk"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("acc", [3])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("acc_out", [3])], [init("k", np.float32([2, 2, 2]))])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    proto = make_model(nodes, [tensor("n", [], TensorProto.INT64), tensor("x", [3])], [tensor("y", [3])],
                       [init("w", np.float32([1, 2, 3]))])
    out, result = run_pass("fold-constants", proto)
    assert result.stats["folded_nodes"] == 1 and result.stats["subgraphs_visited"] == result.stats["rounds"]
    body_out = out.graph.node[0].attribute[0].g
    assert [n.op_type for n in body_out.node] == ["Add", "Identity"]
    check(proto, out, {"n": np.array(3, np.int64), "x": np.float32([0, 1, 2])})


def test_a_lying_declared_shape_is_not_folded():
    """value_info says [1, 3] for a tensor of shape [batch, 3]: Shape stays (folding it to
    [1, 3] would break every batch but 1)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["batch", 3])], [tensor("y", ["batch", 3])])
    proto.graph.value_info.append(tensor("r", [1, 3]))
    out, result = run_pass("fold-constants", proto)
    assert not result.changed and op_histogram(out)["Shape"] == 1
