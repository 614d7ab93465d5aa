"""onnxopt.measure.weight_sensitivity: output error with replaced weights, one session for all."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxopt.measure.weight_sensitivity import WeightSensitivity
from tests.graphs import init, make_model, tensor

R = np.random.default_rng(0)
W1 = R.standard_normal((8, 6)).astype(np.float32)
W2 = R.standard_normal((6, 4)).astype(np.float32)


def two_layers():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("ArgMax", ["y"], ["label"], axis=-1)]
    return make_model(nodes, [tensor("x", [5, 8])], [tensor("y", [5, 4]), tensor("label", [5, 1], 7)],
                      [init("w1", W1), init("w2", W2)])


BATCHES = [{"x": R.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]


def test_original_weights_give_zero_error_and_changes_give_the_relative_error():
    probe = WeightSensitivity(two_layers(), ["w1", "w2"], BATCHES)
    assert probe.error({}) == 0.0
    assert probe.error({"w2": W2}) == 0.0
    scaled = probe.error({"w2": W2 * 1.1})  # y grows by 10 %: relative squared error 0.01
    assert scaled == pytest.approx(0.01, rel=1e-4)
    assert probe.error({"w1": W1 * 0.5}) > 0
    assert probe.runs == 3 * 4  # one run per batch and call


def test_unknown_or_absent_weights():
    probe = WeightSensitivity(two_layers(), ["w1", "nope"], BATCHES)
    assert probe.weights == ["w1"]
    with pytest.raises(KeyError):
        probe.error({"w2": W2})
