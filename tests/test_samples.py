"""Sample inputs for passes without data (onnxopt/data/samples.py)."""

import numpy as np
from onnx import TensorProto, helper

from onnxopt.data.samples import sample_batches
from onnxopt.data.statistics import Calibration
from onnxopt.ir.model import load
from onnxopt.pipeline.context import PassContext
from onnxopt.target import load_target
from tests.graphs import init, make_model, matmul_add, rng, tensor


def test_samples_look_like_a_padded_token_batch():
    vocab = rng(1).standard_normal((50, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["vocab", "ids"], ["e"]),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [tensor("ids", ["b", "s"], TensorProto.INT64), tensor("mask", ["b", "s"], TensorProto.INT64)],
                       [tensor("e", ["b", "s", 8]), tensor("mf", ["b", "s"])], [init("vocab", vocab)])
    (feeds,), source = sample_batches(load(model), PassContext(target=load_target("cpu")))
    assert source == "generated from the input specs"
    ids, mask = feeds["ids"], feeds["mask"]
    assert ids.shape == mask.shape == (16, 64)
    assert ids.max() < 50 and len(np.unique(ids)) > 10
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(ids == 0, (mask == 0) | (ids == 0))  # padding in both at once
    assert (mask == 0).any() and np.all(np.diff(mask, axis=1) <= 0)  # right-padded


def test_samples_prefer_calibration_batches():
    model = load(matmul_add())
    batch = {"x": np.full((4, 16), 3.0, np.float32)}
    ctx = PassContext(target=load_target("cpu"), calibration=Calibration(source=[batch]))
    feeds, source = sample_batches(model, ctx)
    assert feeds[0]["x"][0, 0] == 3.0 and source == "calibration data"
