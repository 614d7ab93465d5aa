"""fuse-slices on tiny graphs: merged when the axes are disjoint, left alone otherwise."""

import numpy as np
import pytest
from onnx import helper

from onnxopt.testing import assert_valid_and_equivalent, op_histogram, plain_bytes, run_pass

from tests.real_models import real_model
from tests.graphs import init, make_model, tensor

BIG = np.iinfo(np.int64).max


def two_slices(first=((0,), (3,), (1,)), second=((1,), (BIG,), (2,)), steps=None, opset=17):
    """x[2, 5, 6] -> Slice(starts, ends, axes) -> Slice(...) -> y; ``steps`` for the second."""
    inits, nodes = [], []
    for i, (starts, ends, axes) in enumerate((first, second)):
        names = [f"s{i}", f"e{i}", f"a{i}"]
        inits += [init(n, np.array(v, np.int64)) for n, v in zip(names, (starts, ends, axes))]
        inputs = ["x" if i == 0 else "m"] + names
        if steps is not None and i == 1:
            inits.append(init("t1", np.array(steps, np.int64)))
            inputs.append("t1")
        nodes.append(helper.make_node("Slice", inputs, ["m" if i == 0 else "y"]))
    y = np.zeros((2, 5, 6))
    for i, (starts, ends, axes) in enumerate((first, second)):
        step = steps if steps is not None and i == 1 else (1,) * len(starts)
        index = [slice(None)] * 3
        for b, e, a, t in zip(starts, ends, axes, step):
            index[a] = slice(b, e, t)
        y = y[tuple(index)]
    return make_model(nodes, [tensor("x", [2, 5, 6])], [tensor("y", list(y.shape))], inits, opset=opset)


def test_disjoint_axes_merge_into_one_slice():
    proto = two_slices()
    out, result = run_pass("fuse-slices", proto)
    assert result.changed and result.stats["slice-pair"] == 1
    assert op_histogram(out) == {"Slice": 1} and out.graph.node[0].output[0] == "y"
    assert_valid_and_equivalent(proto, out)


def test_steps_and_negative_axes_merge():
    proto = two_slices(first=((0,), (-1,), (-3,)), second=((5,), (0,), (-1,)), steps=(-2,))
    out, result = run_pass("fuse-slices", proto)
    assert result.stats["slice-pair"] == 1
    assert_valid_and_equivalent(proto, out)


@pytest.mark.parametrize("first, second, reason", [
    (((0,), (4,), (1,)), ((1,), (3,), (1,)), "the two Slices share an axis"),
    (((0,), (4,), (1,)), ((1,), (3,), (-1,)), "axes mix negative and non-negative values"),
])
def test_pairs_that_must_not_merge_stay_byte_identical(first, second, reason):
    proto = two_slices(first, second)
    out, result = run_pass("fuse-slices", proto)
    assert not result.changed and result.stats["skipped"] == {f"slice-pair: {reason}": 1}
    assert out.SerializeToString() == plain_bytes(proto)


def test_first_slice_with_another_reader_stays():
    proto = two_slices()
    proto.graph.node.append(helper.make_node("Relu", ["m"], ["z"]))
    proto.graph.output.append(tensor("z", [2, 3, 6]))
    out, result = run_pass("fuse-slices", proto)
    assert not result.changed and result.stats["skipped"] == {"slice-pair: first Slice has other readers": 1}


def test_silero_sequence_stft_slices_merge():
    import onnxopt

    path = real_model("silero_vad_16k_sequence.onnx")
    before = onnxopt.optimize(str(path), pipeline="lift-constants,fold-constants,eliminate-duplicate").model
    out, result = run_pass("fuse-slices", before)
    assert result.stats["slice-pair"] == 2
    feeds = {"input": np.random.default_rng(0).uniform(-1, 1, (3, 576)).astype(np.float32),
             "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
    assert_valid_and_equivalent(before, out, feeds)
