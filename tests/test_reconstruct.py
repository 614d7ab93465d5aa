"""Least-squares reconstruction of a layer against the reference model (onnxopt/data/reconstruct.py)."""

import numpy as np
from onnx import helper

from onnxopt.data.reconstruct import LayerFit, refit_layers
from onnxopt.data.statistics import open_calibration
from onnxopt.ir.constants import constant_value
from onnxopt.ir.model import Reference, load
from onnxopt.pipeline.context import PassContext
from onnxopt.target import load_target
from tests.graphs import init, make_model, tensor


class Reader:
    def __init__(self, batches):
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


def _conv_model(w, b):
    return make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                      [tensor("x", [2, 3, 5, 5])], [tensor("y", [2, 4, 5, 5])], [init("w", w), init("b", b)])


def test_a_perturbed_conv_is_fitted_back_to_the_reference():
    r = np.random.default_rng(0)
    w, b = r.standard_normal((4, 3, 3, 3)).astype(np.float32), r.standard_normal(4).astype(np.float32)
    reference = load(_conv_model(w, b))
    current = load(_conv_model(w + 0.3 * r.standard_normal(w.shape).astype(np.float32), b + 1.0))
    batches = [{"x": r.standard_normal((2, 3, 5, 5)).astype(np.float32)} for _ in range(20)]
    ctx = PassContext(target=load_target("cpu"), reference=Reference(reference))
    ctx.calibration = open_calibration(Reader(batches), current, ctx.reference)
    records = refit_layers(current, ctx, [LayerFit(current.graph.nodes[0])], ridge=1e-6)
    assert records[0]["status"] == "refitted" and records[0]["error_change"] < 0
    conv = current.graph.nodes[0]
    np.testing.assert_allclose(constant_value(conv.inputs[1]), w, atol=1e-3)
    np.testing.assert_allclose(constant_value(conv.inputs[2]), b, atol=1e-3)


def test_matmul_with_bias_add_and_a_subset_of_output_columns():
    """The current layer keeps reference outputs [0, 2]; its intercept goes into the Add."""
    r = np.random.default_rng(1)
    w, b = r.standard_normal((6, 3)).astype(np.float32), r.standard_normal(3).astype(np.float32)

    def model(wm, bm):
        return make_model([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
                          [tensor("x", [4, 6])], [tensor("z", [4, bm.size])], [init("w", wm), init("b", bm)])

    reference = load(model(w, b))
    current = load(model(w[:, [0, 2]] * 0.5, b[[0, 2]]))
    batches = [{"x": r.standard_normal((4, 6)).astype(np.float32)} for _ in range(30)]
    ctx = PassContext(target=load_target("cpu"), reference=Reference(reference))
    ctx.calibration = open_calibration(Reader(batches), current, ctx.reference)
    records = refit_layers(current, ctx, [LayerFit(current.graph.nodes[0], np.array([0, 2]))], ridge=1e-6)
    assert records[0]["status"] == "refitted"
    np.testing.assert_allclose(constant_value(current.graph.nodes[0].inputs[1]), w[:, [0, 2]], atol=5e-3)
    np.testing.assert_allclose(constant_value(current.graph.nodes[1].inputs[1]), b[[0, 2]], atol=5e-3)


def test_a_layer_the_reference_does_not_have_is_skipped():
    r = np.random.default_rng(2)
    w, b = r.standard_normal((4, 3, 3, 3)).astype(np.float32), r.standard_normal(4).astype(np.float32)
    reference = load(_conv_model(w, b))
    current = load(_conv_model(w, b))
    current.graph.nodes[0].outputs[0].name = "renamed"
    current.graph.outputs[0].name = "renamed"
    ctx = PassContext(target=load_target("cpu"), reference=Reference(reference))
    ctx.calibration = open_calibration(Reader([{"x": r.standard_normal((2, 3, 5, 5)).astype(np.float32)}]),
                                       current, ctx.reference)
    (record,) = refit_layers(current, ctx, [LayerFit(current.graph.nodes[0])])
    assert record["status"] == "skipped" and "reference" in record["reason"]


def test_transposed_conv_patches_reproduce_the_op():
    """The Conv over the spread input with the flipped kernel equals the ConvTranspose."""
    from onnxopt.data.reconstruct import _flip, transposed_conv_patches
    from onnxopt.runtime import session

    r = np.random.default_rng(3)
    w = r.standard_normal((3, 4, 3, 3)).astype(np.float32)
    x = r.standard_normal((1, 3, 5, 6)).astype(np.float32)
    for attrs, out in (({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, [10, 12]),
                       ({"strides": [2, 1], "pads": [0, 1, 2, 0]}, [9, 7]), ({}, [7, 8])):
        model = make_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)],
                           [tensor("x", [1, 3, 5, 6])], [tensor("y", [1, 4] + out)], [init("w", w)])
        y = session(model).run(None, {"x": x})[0]
        node = load(model).graph.nodes[0]
        rows = transposed_conv_patches(node).rows(x)  # [N·H'·W', C·k·k]
        got = rows @ _flip(w).reshape(4, -1).T
        np.testing.assert_allclose(got.reshape(y.shape[2], y.shape[3], 4).transpose(2, 0, 1)[None], y,
                                   rtol=1e-4, atol=1e-4)


def test_a_perturbed_transposed_conv_is_fitted_back():
    r = np.random.default_rng(4)
    w = r.standard_normal((3, 4, 2, 2)).astype(np.float32)
    b = r.standard_normal(4).astype(np.float32)

    def model(wm, bm):
        return make_model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2])],
                          [tensor("x", [2, 3, 4, 4])], [tensor("y", [2, 4, 8, 8])], [init("w", wm), init("b", bm)])

    reference = load(model(w, b))
    current = load(model(w * 0.5, b - 1))
    batches = [{"x": r.standard_normal((2, 3, 4, 4)).astype(np.float32)} for _ in range(10)]
    ctx = PassContext(target=load_target("cpu"), reference=Reference(reference))
    ctx.calibration = open_calibration(Reader(batches), current, ctx.reference)
    (record,) = refit_layers(current, ctx, [LayerFit(current.graph.nodes[0])], ridge=1e-6)
    assert record["status"] == "refitted"
    np.testing.assert_allclose(constant_value(current.graph.nodes[0].inputs[1]), w, atol=5e-3)
    np.testing.assert_allclose(constant_value(current.graph.nodes[0].inputs[2]), b, atol=5e-3)
