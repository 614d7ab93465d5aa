"""fold-shapes: symbolic Reshape targets, reshape chains and equal shape values; every result
is checked in onnxruntime at several sizes of each dynamic axis."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.testing import assert_valid_and_equivalent as check, op_histogram, run_pass

from tests.graphs import dynamic_reshape_chain, init, make_model, tensor

I64 = TensorProto.INT64


def i64(v):
    return np.array(v, np.int64)


def lossless(proto, text="fold-shapes,eliminate-dead-code"):
    for name in text.split(","):
        proto, _ = run_pass(name, proto)
    return proto


def equal_at_sizes(ref, out, shape_of, sizes=(1, 3, 5)):
    rng = np.random.default_rng(0)
    for n in sizes:
        feeds = {name: rng.standard_normal(shape(n)).astype(np.float32) for name, shape in shape_of.items()}
        check(ref, out, feeds)


def targets(proto):
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in proto.graph.initializer}
    return [inits.get(n.input[1]) for n in proto.graph.node if n.op_type == "Reshape"]


def test_reshape_targets_become_constants_with_zero_and_minus_one():
    proto = dynamic_reshape_chain()
    out, result = run_pass("fold-shapes", proto)
    assert result.stats["reshape_target"] == 3
    target2 = numpy_helper.to_array(next(i for i in run_pass("fold-shapes", proto, )[0].graph.initializer
                                         if i.name.startswith("t2"))).tolist()
    assert target2 == [-1, 4, 3]  # [2*batch, 4, 3]: the one symbol inferred
    # ... and then the last two Reshapes are a chain: [batch, 2, 4, 3] -> [batch, 4, 6] directly
    assert result.stats["reshape_chain"] == 1
    out = lossless(out, "eliminate-dead-code")
    assert targets(out) == [[0, 4, 2, 3], [0, 4, 6]]
    assert op_histogram(out) == {"Reshape": 2, "Transpose": 1}
    equal_at_sizes(proto, out, {"x": lambda n: (n, 4, 6)})
    again, second = run_pass("fold-shapes", out)
    assert not second.changed


def test_allowzero_reshape_gets_no_zero():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]),
             helper.make_node("Concat", ["b1", "m1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["z"], allowzero=1)]
    proto = make_model(nodes, [tensor("x", ["batch", 3, 4])], [tensor("y", ["batch", 3, 4]), tensor("z", ["batch", 12])],
                       [init("i0", i64(0)), init("ax", i64([0])), init("m1", i64([-1]))], opset=14)
    out, result = run_pass("fold-shapes", proto)
    # [batch, 3, 4] has one symbol: [-1, 3, 4]; [batch, -1] has a -1 already and no 0 may copy: kept
    assert targets(out)[0] == [-1, 3, 4] and targets(out)[1] is None
    assert result.stats == {"reshape_target": 1, "reshape_target_kept": 1}
    equal_at_sizes(proto, out, {"x": lambda n: (n, 3, 4)})


def test_two_symbols_not_at_their_positions_are_kept():
    # [seq, batch] of x [batch, seq]: neither can be copied, only one may be -1
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "rev"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["batch", "seq"])], [tensor("y", ["seq", "batch"])],
                       [init("rev", i64([1, 0]))])
    out, result = run_pass("fold-shapes", proto)
    assert not result.changed or "reshape_target" not in result.stats
    assert result.stats.get("reshape_target_kept") == 1


def test_equal_shape_values_are_computed_once():
    # Shape of two tensors of provably equal shape, and a Concat that rebuilds the shape
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Shape", ["x"], ["s1"]),
             helper.make_node("Shape", ["r"], ["s2"]),
             helper.make_node("Gather", ["s1", "i0"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]),
             helper.make_node("Concat", ["b1", "three"], ["s3"], axis=0),
             helper.make_node("Expand", ["r", "s2"], ["e1"]),
             helper.make_node("Expand", ["r", "s3"], ["e2"]),
             helper.make_node("Add", ["e1", "e2"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["batch", 3])], [tensor("y", ["batch", 3])],
                       [init("i0", i64(0)), init("ax", i64([0])), init("three", i64([3]))])
    out, result = run_pass("fold-shapes", proto)
    assert result.stats["same_value"] == 2
    out = lossless(out, "eliminate-dead-code")
    assert op_histogram(out)["Shape"] == 1 and "Concat" not in op_histogram(out)
    equal_at_sizes(proto, out, {"x": lambda n: (n, 3)})


@pytest.mark.parametrize("batch", [1, "batch"])
def test_reshape_chain_with_a_size_one_transpose_is_one_reshape(batch):
    """LSTM's Y [T, 2, batch, H] -> Transpose(0, 2, 1, 3) -> Reshape [0, 0, -1]: one Reshape
    when batch is 1; with a symbolic batch the Transpose moves a real dim and stays."""
    nodes = [helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["t", "target"], ["z"]),
             helper.make_node("Relu", ["z"], ["out"])]
    proto = make_model(nodes, [tensor("y", ["T", 2, batch, 5])], [tensor("out", ["T", batch, 10])],
                       [init("target", i64([0, 0, -1]))])
    out, result = run_pass("fold-shapes", proto)
    out = lossless(out, "eliminate-dead-code")
    if batch == 1:
        assert result.stats["reshape_chain"] == 1
        assert op_histogram(out) == {"Reshape": 1, "Relu": 1} and targets(out) == [[0, 1, 10]]
    else:
        assert "reshape_chain" not in result.stats
    equal_at_sizes(proto, out, {"y": lambda n: (n + 1, 2, 1 if batch == 1 else n, 5)})
