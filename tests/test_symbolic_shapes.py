"""The symbolic shape analysis: dims algebra, values of shape computations, and the cases
peers got wrong (rank-2 values folded flat, Shape start/end, negative indices, the INT64
"to the end" sentinel, allowzero, lying declared shapes)."""


import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.analysis import dims as D
from onnxopt.analysis.shapes import symbolic_shapes
from onnxopt.ir.model import load

from tests.graphs import init, make_model, tensor
from tests.tools import load_tool

B, S = D.symbol("batch"), D.symbol("seq")
I64 = TensorProto.INT64


def facts_of(nodes, inputs, outputs, inits=(), opset=17):
    return symbolic_shapes(load(make_model(nodes, inputs, outputs, inits, opset=opset)))


def i64(v):
    return np.array(v, np.int64)


# -- the algebra -------------------------------------------------------------------------
def test_polynomials_are_canonical_and_collapse_to_ints():
    assert D.add(D.mul(B, 12), D.mul(12, B)) == D.mul(B, 24)
    assert D.sub(D.add(B, 3), B) == 3 and type(D.sub(D.add(B, 3), B)) is int
    assert D.mul(B, S) == D.mul(S, B) and str(D.mul(S, B)) == "batch*seq"
    assert D.exact_div(D.mul(B, 197 * 768), 197 * 768) == B
    assert D.exact_div(D.mul(D.add(B, 1), 256), D.add(B, 1)) == 256
    assert D.exact_div(D.add(B, 1), 2) is None


def test_signs_and_comparisons_fail_closed():
    assert D.equal(B, -1) is False  # a dim is never -1
    assert D.equal(B, 1) is None and D.equal(B, S) is None  # unknown, not "different"
    assert D.compare(D.add(B, 1), B) == 1
    minus = D.opaque("x", nonneg_=False)
    assert D.equal(minus, -1) is None
    assert D.trunc_div(-7, 2) == -3 and D.mod(-7, 2) == 1  # ONNX Div truncates; Mod takes the divisor's sign
    assert D.floor_div(D.mul(B, 4), 2) == D.mul(B, 2)
    assert D.floor_div(D.sub(B, 1), 2) == D.floor_div(D.sub(B, 1), 2)  # structurally equal opaque terms


# -- values of shape computations ----------------------------------------------------------
def test_shape_gather_concat_carry_symbols():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Mul", ["b", "twelve"], ["b12"]),
             helper.make_node("Unsqueeze", ["b12", "ax"], ["b12_1"]),
             helper.make_node("Concat", ["b12_1", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    f = facts_of(nodes, [tensor("x", ["batch", 12, 5, 7])], [tensor("y", ["N", 5, 7])],
                 [init("i0", i64(0)), init("twelve", i64(12)), init("ax", i64([0])), init("tail", i64([5, 7]))])
    assert f.value("s") == (B, 12, 5, 7)
    assert f.value("target") == (D.mul(B, 12), 5, 7)
    assert f.shape("y") == (D.mul(B, 12), 5, 7)


@pytest.mark.parametrize("start,end,expected", [(2, None, (5, 7)), (-1, None, (7,)), (1, -1, (12, 5)),
                                                (0, 1, ("batch",))])
def test_shape_start_end(start, end, expected):
    attrs = {"start": start} if end is None else {"start": start, "end": end}
    f = facts_of([helper.make_node("Shape", ["x"], ["s"], **attrs)], [tensor("x", ["batch", 12, 5, 7])],
                 [tensor("s", [len(expected)], I64)])
    assert f.value("s") == tuple(D.symbol(e) if isinstance(e, str) else e for e in expected)


def test_negative_gather_index_and_slice_with_the_int64_sentinel():
    big = np.iinfo(np.int64).max
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "minus1"], ["last"], axis=0),
             helper.make_node("Slice", ["s", "start", "end", "ax", "step"], ["rev"]),
             helper.make_node("Slice", ["s", "one", "to_end"], ["tail"])]
    f = facts_of(nodes, [tensor("x", ["batch", 3, 4])],
                 [tensor("last", [], I64), tensor("rev", [3], I64), tensor("tail", [2], I64)],
                 [init("minus1", i64(-1)), init("start", i64([-1])), init("end", i64([-big - 1])),
                  init("ax", i64([0])), init("step", i64([-1])), init("one", i64([1])), init("to_end", i64([big]))])
    assert f.value("last") == (4,)
    assert f.value("rev") == (4, 3, B)  # a reversal to the start
    assert f.value("tail") == (3, 4)


def test_rank_two_values_are_never_tracked():
    """F.pad's pads: Reshape [-1, 2] -> Slice step -1 -> Transpose -> Reshape [-1] (onnxsim #1284)."""
    nodes = [helper.make_node("Reshape", ["pads", "m12"], ["p2"]),
             helper.make_node("Slice", ["p2", "start", "end", "ax", "step"], ["rev"]),
             helper.make_node("Transpose", ["rev"], ["t"], perm=[1, 0]),
             helper.make_node("Reshape", ["t", "m1"], ["flat"]),
             helper.make_node("Identity", ["flat"], ["out"])]
    f = facts_of(nodes, [tensor("pads", [4], I64)], [tensor("out", [4], I64)],
                 [init("m12", i64([-1, 2])), init("start", i64([-1])), init("end", i64([-(2 ** 63)])),
                  init("ax", i64([0])), init("step", i64([-1])), init("m1", i64([-1]))])
    assert f.shape("p2") == (2, 2) and f.value("p2") is None and f.value("rev") is None
    assert f.value("flat") is None  # not the flat reversal of the input


def test_equal_and_where_decide_with_signs():
    # torch's expand with -1: Where(Equal(shape, -1), 1, shape)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Concat", ["s", "m1"], ["t"], axis=0),
             helper.make_node("Equal", ["t", "m1"], ["is_m1"]),
             helper.make_node("Where", ["is_m1", "one", "t"], ["w"])]
    f = facts_of(nodes, [tensor("x", ["batch"])], [tensor("w", [2], I64)],
                 [init("m1", i64([-1])), init("one", i64([1]))])
    assert f.value("is_m1") == (0, 1) and f.value("w") == (B, 1)


def test_reshape_zero_copies_unless_allowzero():
    nodes = [helper.make_node("Reshape", ["x", "t"], ["y"]), helper.make_node("Reshape", ["x", "t"], ["z"], allowzero=1)]
    f = facts_of(nodes, [tensor("x", ["batch", 0, 6])], [tensor("y", ["batch", 0, 6]), tensor("z", [0, 0, 6])],
                 [init("t", i64([0, 0, 6]))], opset=14)
    assert f.shape("y") == (B, 0, 6)
    assert f.shape("z") == (0, 0, 6)


def test_two_dynamic_dims_through_conv_and_pool():
    w = np.zeros((4, 3, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["x", "w"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2])]
    f = facts_of(nodes, [tensor("x", ["batch", 3, "h", "w"])], [tensor("p", list("abcd")), tensor("c2", list("efgh"))],
                 [init("w", w)])
    c, c2 = f.shape("c"), f.shape("c2")
    assert c[0] == B and c[1] == 4 and c[2] != c[3]
    assert c == c2  # the same formula on the same input: equal dims


def test_declared_shapes_are_never_read():
    """value_info and the graph output claim [1, 3] for a tensor of shape [batch, 3]."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"])],
                       [tensor("x", ["batch", 3])], [tensor("s", [2], I64)])
    model.graph.value_info.append(tensor("r", [1, 3]))
    f = symbolic_shapes(load(model))
    assert f.shape("r") == (B, 3) and f.value("s") == (B, 3)


def test_anonymous_input_dims_are_distinct_symbols():
    model = make_model([helper.make_node("Add", ["x", "y"], ["z"])], [tensor("x", ["?", 3]), tensor("y", [None, 3])],
                       [tensor("z", ["n", 3])])
    f = symbolic_shapes(load(model))
    assert f.shape("x")[0] != f.shape("y")[0]


def test_if_with_a_known_condition_keeps_both_ranks_apart():
    then_g = helper.make_graph([helper.make_node("Squeeze", ["x", "ax"], ["t"])], "then", [], [tensor("t", ["n"])],
                               [init("ax", i64([0]))])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor("e", ["n", "m"])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [tensor("c", [], TensorProto.BOOL), tensor("x", [1, 3])], [tensor("y", ["n"])])
    f = symbolic_shapes(load(model))
    assert f.shape("t") == (3,) and f.shape("e") == (1, 3)
    assert f.shape("y") is None  # ranks differ: unknown, not a guess


# -- against onnxruntime -------------------------------------------------------------------
def _check_shapes_tool():
    return load_tool("check_shapes")


def test_claims_hold_on_conformance_cases_of_shape_ops():
    """Every static dim and value claimed for the outputs of a sample of the node suite
    equals what onnxruntime computes (tools/check_shapes.py runs the whole suite)."""
    tool = _check_shapes_tool()  # puts tools/ on sys.path
    import conformance

    patterns = ["test_reshape*", "test_slice*", "test_conv_*", "test_maxpool_2d*", "test_averagepool_2d*",
                "test_shape*", "test_split*", "test_pad*", "test_resize_upsample*", "test_gather_*",
                "test_expand*", "test_squeeze*", "test_unsqueeze*", "test_concat*", "test_range*",
                "test_flatten*", "test_tile*", "test_reduce_mean*", "test_transpose*"]
    checked = 0
    for case in conformance.load_cases(patterns):
        names = [i.name for i in case.model.graph.input]
        inputs, _ = case.data_sets[0]
        feeds = {n: conformance._feed_value(conformance._as_array(v)) for n, v in zip(names, inputs)}
        fixed = tool.fixed_inputs(case.model, feeds)
        try:
            sess = conformance.make_session(fixed)
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        except Exception:
            continue  # onnxruntime refuses the case: nothing to compare
        assert not tool.check(fixed, outs), case.name
        checked += 1
    assert checked > 150


def test_a_table_sliced_to_a_symbolic_length_broadcasts_to_it():
    """BERT's position ids: table[:, :seq] of [1, 512], added to [batch, seq]: the sum is
    [batch, seq] (for seq > 512 the model itself is invalid)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["seq"], axis=0),
             helper.make_node("Unsqueeze", ["seq", "ax"], ["end"]),
             helper.make_node("Slice", ["table", "zero", "end", "ax1"], ["pos"]),
             helper.make_node("Add", ["x", "pos"], ["y"])]
    f = facts_of(nodes, [tensor("x", ["batch", "seq"])], [tensor("y", ["batch", "seq"])],
                 [init("table", np.zeros((1, 512), np.float32)), init("one", i64(1)), init("ax", i64([0])),
                  init("zero", i64([0])), init("ax1", i64([1]))])
    assert f.shape("pos")[0] == 1 and str(f.shape("pos")[1]) == "min(512, seq)"
    assert f.shape("y") == (B, S)
