"""smooth-quant (passes/smooth_quant.py) and the smoothing shared with quantize-dynamic."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.measure.compare import compare
from onnxopt.measure.fidelity import Floor
from onnxopt.testing import assert_valid_and_equivalent, check_pass_contract, run_pass
from tests.graphs import init, make_model, rng, tensor


def layernorm_into_matmuls(residual: bool = False) -> onnx.ModelProto:
    """x -> LayerNorm (one channel's gain 40x the rest) -> two MatMuls (+ a residual Add)."""
    r = rng(31)
    gain = np.ones(32, np.float32)
    gain[5] = 40.0
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("Shape", ["n"], ["shape"]),
             helper.make_node("MatMul", ["n", "wq"], ["q"]), helper.make_node("MatMul", ["n", "wk"], ["k"]),
             helper.make_node("Add", ["q", "k"], ["y"])]
    outputs = [tensor("y", ["b", 8, 16]), tensor("shape", [3], onnx.TensorProto.INT64)]
    if residual:
        nodes.append(helper.make_node("Add", ["n", "x"], ["res"]))
        outputs.append(tensor("res", ["b", 8, 32]))
    return make_model(nodes, [tensor("x", ["b", 8, 32])], outputs,
                      [init("g", gain), init("b", r.standard_normal(32).astype(np.float32) * 0.1),
                       init("wq", r.standard_normal((32, 16)).astype(np.float32) * 0.2),
                       init("wk", r.standard_normal((32, 16)).astype(np.float32) * 0.2)])


def relu_mlp() -> onnx.ModelProto:
    r = rng(32)
    w1 = r.standard_normal((16, 32)).astype(np.float32)
    w1[:, 3] *= 30  # one hidden channel far larger than the rest
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    return make_model(nodes, [tensor("x", ["b", 16])], [tensor("y", ["b", 8])],
                      [init("w1", w1), init("b1", r.standard_normal(32).astype(np.float32)),
                       init("w2", r.standard_normal((32, 8)).astype(np.float32) * 0.1)])


def data(tmp_path, shape, name="c.npz", seed=0):
    path = tmp_path / name
    np.savez(path, x=np.random.default_rng(seed).standard_normal((6,) + shape).astype(np.float32))
    return str(path)


@pytest.mark.parametrize("builder", [layernorm_into_matmuls, relu_mlp])
def test_smooth_quant_folds_into_the_producer_and_is_lossless(builder):
    model = builder()
    out, result = run_pass("smooth-quant", model)
    assert result.changed and result.stats["smoothed_folded"] == 1 and result.stats["smoothed_mul"] == 0
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]  # nothing inserted
    assert_valid_and_equivalent(model, out, rtol=1e-4, atol=1e-4)


def test_a_residual_reader_needs_a_mul_which_is_off_by_default():
    model = layernorm_into_matmuls(residual=True)
    _, result = run_pass("smooth-quant", model)
    assert not result.changed
    out, result = run_pass("smooth-quant", model, insert_mul=True)
    assert result.stats["smoothed_mul"] == 1
    assert [n.op_type for n in out.graph.node].count("Mul") == 1
    assert_valid_and_equivalent(model, out, rtol=1e-4, atol=1e-4)


def test_even_activations_are_left_alone():
    r = rng(33)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["b", 16])],
                       [tensor("y", ["b", 8])], [init("w", r.standard_normal((16, 8)).astype(np.float32))])
    _, result = run_pass("smooth-quant", model)  # a graph input: no producer, no Mul
    assert not result.changed


def test_smooth_quant_contract():
    check_pass_contract(onnxopt.get_pass("smooth-quant"), [layernorm_into_matmuls(), relu_mlp()])


@pytest.mark.parametrize("builder, shape", [(layernorm_into_matmuls, (2, 8, 32)), (relu_mlp, (8, 16))])
def test_smooth_quant_makes_static_int8_better(tmp_path, builder, shape):
    model = builder()
    calib, evaluation = data(tmp_path, shape), data(tmp_path, shape, "e.npz", seed=1)
    snr = {}
    for pipeline in ("quantize-static", "smooth-quant,quantize-static"):
        result = onnxopt.optimize(model, pipeline=pipeline, calibration=calib, floor=Floor())
        outputs = compare(model, result.model, data=evaluation, latency=False, memory=False)["outputs"]
        snr[pipeline] = outputs["y"]["snr_db"]
    assert snr["smooth-quant,quantize-static"] > snr["quantize-static"] + 3


def test_quantize_dynamic_uses_the_shared_smoothing_and_folds_when_it_can():
    model = layernorm_into_matmuls()
    out, result = run_pass("quantize-dynamic", model, min_elements=1)
    assert result.stats["smoothed"] == 1
    assert "Mul" not in [n.op_type for n in out.graph.node if n.name.endswith("_smooth")]


def test_smooth_quant_on_a_real_model_is_lossless():
    from tests.real_models import real_model

    path = real_model("ppocr_mobile_v2_cls.onnx")
    result = onnxopt.optimize(str(path), pipeline="lossless,smooth-quant{min_outlier=0}", verify=True)
    p = result.report["passes"][-1]
    assert p["status"] == "changed" and p["verified"] == "equal" and p["stats"]["smoothed_folded"] >= 5
