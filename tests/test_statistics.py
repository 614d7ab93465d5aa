"""Streamed statistics (onnxopt/data/statistics.py): reducers against numpy, associative
merges, any dtype, reference-model taps, worker processes, and invalidation after a change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import Pass, PassResult, register_pass
from onnxopt.data.statistics import (REFERENCE, Calibration, ChannelMoments, Gram, Patches, Tap, TensorRange,
                                     merge, open_calibration)
from onnxopt.ir.constants import constant_value
from onnxopt.ir.model import Reference, load
from onnxopt.ir.names import new_constant
from onnxopt.measure.fidelity import Floor
from onnxopt.pipeline import registry
from tests.graphs import init, make_model, tensor


def conv_model() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(4, 3x3, stride 2, pad 1) -> c -> Relu -> r -> Shape -> s (int64)."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"])]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])],
                      [tensor("r", ["N", 4, 4, 4]), tensor("s", [4], TensorProto.INT64)], [init("w", w)])


def batches(n: int = 6, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * (i + 1)} for i in range(n)]


def reduce(model, reducers, data=None, **kw):
    m = load(model)
    cal = Calibration(source=data or batches(), reference=Reference(m), **kw)
    return cal, cal.reduce(m, reducers)


def test_channel_moments_equal_numpy():
    _, (moments,) = reduce(conv_model(), [ChannelMoments("c", axis=1)])
    c = _conv_outputs()
    per_channel = np.moveaxis(c, 1, -1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(moments.mean, per_channel.mean(0), rtol=1e-6)
    np.testing.assert_allclose(moments.variance, per_channel.var(0), rtol=1e-6)
    np.testing.assert_allclose(moments.abs_mean, np.abs(per_channel).mean(0), rtol=1e-6)
    np.testing.assert_allclose(moments.abs_max, np.abs(per_channel).max(0), rtol=1e-6)
    assert moments.count == per_channel.shape[0]


def _conv_outputs() -> np.ndarray:
    from onnxopt.measure import verify

    proto = conv_model()
    proto.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    return np.concatenate([verify.run(proto, b)[1]["c"] for b in batches()])


def test_gram_of_conv_patches_reproduces_the_conv():
    """XᵀY over im2col rows, with Y the conv output, solves back to the conv's weight: the
    patch rows line up with the output positions and the weight's layout."""
    w = onnx.numpy_helper.to_array(conv_model().graph.initializer[0]).reshape(4, -1)
    patches = Patches((3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    _, (gram,) = reduce(conv_model(), [Gram("x", y="c", y_axis=1, patches=patches)])
    assert gram.xtx.shape == (27, 27) and gram.xty.shape == (27, 4)
    solved = np.linalg.solve(gram.xtx, gram.xty)  # least squares: W.T
    np.testing.assert_allclose(solved.T, w, atol=1e-3)


def test_gram_of_a_dense_input_equals_numpy():
    x = np.random.default_rng(2).standard_normal((5, 7, 3)).astype(np.float32)
    gram = Gram("x", axis=-1)
    gram.add(x)
    rows = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(gram.xtx, rows.T @ rows)
    np.testing.assert_allclose(gram.covariance(), rows.T @ rows / 35)
    np.testing.assert_allclose(gram.mean_x, rows.mean(0))


@pytest.mark.parametrize("make", [lambda: TensorRange("t"), lambda: ChannelMoments("t", axis=1),
                                  lambda: Gram("t", axis=1, y="t", y_axis=1)])
def test_merge_is_associative_and_equals_one_pass(make):
    rng = np.random.default_rng(3)
    # ranges that grow batch by batch make the histograms double at different times
    parts = [rng.standard_normal((2, 3, 5)).astype(np.float32) * s for s in (0.1, 3.0, 0.5, 40.0)]
    whole = make()
    for p in parts:
        whole.add(*([p] * len(whole.taps)))
    pieces = []
    for p in parts:
        r = make()
        r.add(*([p] * len(r.taps)))
        pieces.append(r)
    left = merge(merge(merge(pieces[0], pieces[1]), pieces[2]), pieces[3])
    right = merge(pieces[0], merge(pieces[1], merge(pieces[2], pieces[3])))
    for got in (left, right):
        for name in ("count", "min", "max", "half_range", "hist", "mean", "m2", "abs_max", "xtx", "xty"):
            if hasattr(whole, name):
                np.testing.assert_allclose(getattr(got, name), getattr(whole, name), rtol=1e-9)
    assert pieces[0].count == parts[0].size // (1 if isinstance(whole, TensorRange) else 3)  # unchanged


def test_merging_different_requests_is_refused():
    with pytest.raises(ValueError):
        ChannelMoments("a", axis=1).merge(ChannelMoments("a", axis=2))


def test_statistics_of_an_integer_tensor():
    _, (shape,) = reduce(conv_model(), [TensorRange("s", histogram=False)])
    assert shape.count == 4 * 6 and (shape.min, shape.max) == (2.0, 4.0)


def test_reference_and_current_tensors_pair_on_the_same_batches():
    """A Gram of the current model's input against the reference model's output: the
    teacher/student pair a refit needs, after the current model was changed."""
    m = load(conv_model())
    cal = Calibration(source=batches(), reference=Reference(m))
    conv = m.graph.nodes[0]
    conv.inputs[1] = new_constant(m.graph, "w_zero", np.zeros((4, 3, 3, 3), np.float32))  # the student's is broken
    patches = Patches((3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    (student,) = cal.reduce(m, [TensorRange("c", histogram=False)])
    (pair,) = cal.reduce(m, [Gram("x", y=Tap("c", REFERENCE), y_axis=1, patches=patches)])
    assert student.min == student.max == 0.0
    teacher = onnx.numpy_helper.to_array(conv_model().graph.initializer[0]).reshape(4, -1)
    np.testing.assert_allclose(np.linalg.solve(pair.xtx, pair.xty).T, teacher, atol=1e-3)


def test_one_streamed_run_serves_every_request_and_repeats_are_cached():
    cal, _ = reduce(conv_model(), [TensorRange("c"), ChannelMoments("r"), Gram("x", axis=1)])
    assert cal.runs == 1 and cal.batches == 6
    m = load(conv_model())
    cal.reduce(m, [TensorRange("c", histogram=False), ChannelMoments("r")])  # covered by the cache
    assert cal.runs == 1


def test_state_does_not_grow_with_the_number_of_batches():
    small_cal, small = reduce(conv_model(), [ChannelMoments("c"), Gram("x", axis=1)], data=batches(2))
    big_cal, big = reduce(conv_model(), [ChannelMoments("c"), Gram("x", axis=1)], data=batches(40))
    for a, b in zip(small, big):
        for name in ("mean", "m2", "abs_sum", "xtx", "sum_x"):
            if getattr(a, name, None) is not None:
                assert getattr(a, name).nbytes == getattr(b, name).nbytes
    assert big_cal.batches == 20 * small_cal.batches


def test_worker_processes_give_the_same_statistics(tmp_path):
    stack = np.stack([b["x"] for b in batches()])
    np.savez(tmp_path / "c.npz", x=stack)
    m = load(conv_model())
    requests = [TensorRange("c"), ChannelMoments("r"), Gram("x", axis=1)]
    one = open_calibration(str(tmp_path / "c.npz"), m).reduce(m, requests)
    cal = open_calibration(str(tmp_path / "c.npz"), m)
    cal.workers = 2
    two = cal.reduce(m, requests)
    assert cal.batches == 6
    np.testing.assert_array_equal(one[0].hist, two[0].hist)
    np.testing.assert_allclose(one[1].mean, two[1].mean, rtol=1e-12)
    np.testing.assert_allclose(one[2].xtx, two[2].xtx, rtol=1e-12)


@register_pass("test-triple-weights")
class TripleWeightsPass(Pass):
    """A lossy pass that changes the model the way pruning does (here: conv weights x3)."""

    lossless = False

    def run(self, model, ctx):
        conv = next(n for n in model.graph.nodes if n.op == "Conv")
        w = conv.inputs[1]
        conv.inputs[1] = new_constant(model.graph, "w_tripled", constant_value(w) * 3)
        return PassResult(True, {})


@register_pass("test-read-ranges")
class ReadRangesPass(Pass):
    """Reads the range of the conv output 'c' (calibrating, changes nothing)."""

    lossless = False
    needs_calibration = True

    def calibration_requests(self, model, ctx):
        return [TensorRange("c", histogram=False)]

    def run(self, model, ctx):
        (r,) = ctx.calibration.reduce(model, self.calibration_requests(model, ctx))
        ctx.notes.append(f"c max {r.max:.4f}")
        return PassResult(False, {})


def test_a_change_before_quantization_makes_it_see_the_new_ranges(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.stack([b["x"] for b in batches()]))
    data = str(tmp_path / "c.npz")
    result = onnxopt.optimize(conv_model(), pipeline="test-read-ranges,test-triple-weights,test-read-ranges",
                              calibration=data, floor=Floor())  # the triple is on purpose: no floor
    first, second = [float(n.split()[-1]) for n in result.report["notes"] if n.startswith("c max")]
    assert second == pytest.approx(3 * first, rel=1e-4)
    # and quantize-static after the change calibrates on the tripled model
    plain = onnxopt.optimize(conv_model(), pipeline="quantize-static", calibration=data, floor=Floor())
    tripled = onnxopt.optimize(conv_model(), pipeline="test-read-ranges,test-triple-weights,quantize-static",
                               calibration=data, floor=Floor())
    assert _output_scale(tripled.model) == pytest.approx(3 * _output_scale(plain.model), rel=1e-3)


def _output_scale(proto: onnx.ModelProto) -> float:
    """The scale of the QuantizeLinear after the Conv (the Relu is folded into it)."""
    conv_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Conv")
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in (conv_out, "r"))
    init_values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return float(init_values[q.input[1]])


@pytest.fixture(autouse=True, scope="module")
def _unregister_test_passes():
    yield
    for name in ("test-triple-weights", "test-read-ranges"):
        registry._passes.pop(name, None)


def test_solve_recovers_a_layer_with_bias_and_a_subset_of_columns():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 6)) + 2.0  # not centered: the intercept matters
    w_true, b_true = rng.standard_normal((6, 3)), rng.standard_normal(3)
    gram = Gram("x", axis=-1, y="y")
    for chunk in np.array_split(np.arange(400), 4):
        gram.add(x[chunk], x[chunk] @ w_true + b_true)
    w, b = gram.solve(ridge=1e-9)
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    np.testing.assert_allclose(b, b_true, atol=1e-6)
    # keep columns 0, 2, 5 only (a pruned input): the best fit from what is left
    keep = np.array([0, 2, 5])
    w_sub, b_sub = gram.solve(ridge=1e-9, columns=keep)
    design = np.hstack([x[:, keep], np.ones((400, 1))])
    expected, *_ = np.linalg.lstsq(design, x @ w_true + b_true, rcond=None)
    np.testing.assert_allclose(w_sub, expected[:3], atol=1e-6)
    np.testing.assert_allclose(b_sub, expected[3], atol=1e-6)
