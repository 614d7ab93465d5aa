"""refit (passes/refit.py): quantized layers refitted to the original layer by layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.measure.compare import compare
from onnxopt.measure.fidelity import Floor
from tests.graphs import init, make_model, rng, tensor


def conv_chain(groups: int = 1) -> onnx.ModelProto:
    """Conv -> Relu -> Conv (``groups``) -> Relu -> depthwise Conv -> 1x1 Conv, with biases."""
    r = rng(5)
    c = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=groups, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=16, name="depthwise"),
             helper.make_node("Conv", ["cd", "w3", "b3"], ["y"], name="conv3")]
    return make_model(nodes, [tensor("x", ["n", c, 10, 10])], [tensor("y", ["n", 6, 10, 10])], [
        init("w1", (r.standard_normal((16, c, 3, 3)) * 0.3).astype(np.float32)),
        init("b1", (r.standard_normal(16) * 0.1).astype(np.float32)),
        init("w2", (r.standard_normal((16, 16 // groups, 3, 3)) * 0.2).astype(np.float32)),
        init("b2", (r.standard_normal(16) * 0.1).astype(np.float32)),
        init("wd", (r.standard_normal((16, 1, 3, 3)) * 0.5).astype(np.float32)),
        init("bd", (r.standard_normal(16) * 0.1).astype(np.float32)),
        init("w3", (r.standard_normal((6, 16, 1, 1)) * 0.3).astype(np.float32)),
        init("b3", np.zeros(6, np.float32))])


def mlp(k: int = 64) -> onnx.ModelProto:
    r = rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")]
    return make_model(nodes, [tensor("x", ["n", k])], [tensor("y", ["n", 24])],
                      [init("w1", r.standard_normal((k, 48)).astype(np.float32)),
                       init("w2", r.standard_normal((24, 48)).astype(np.float32)),
                       init("b2", r.standard_normal(24).astype(np.float32))])


def correlated(tmp_path, shape, name, batches=10, seed=0) -> str:
    """Batches whose channels (axis 1 of a batch) are mixed, the same way for every seed (one
    distribution): correlated inputs are what makes GPTQ pay off."""
    c = shape[1]
    base = np.random.default_rng(seed).standard_normal((batches,) + tuple(shape)).astype(np.float32)
    mix = rng(99).standard_normal((c, c)).astype(np.float32) * 0.7 + np.eye(c, dtype=np.float32)
    x = np.moveaxis(np.moveaxis(base, 2, -1) @ mix, -1, 2)
    path = tmp_path / name
    np.savez(path, x=x)
    return str(path)


def snr(model, result, data) -> float:
    out = compare(model, result.model, data=data, latency=False, memory=False)["outputs"]
    return min(o["snr_db"] for o in out.values())


def optimize(model, pipeline, calib):
    return onnxopt.optimize(model, pipeline=pipeline, calibration=calib, floor=Floor(), strict=True)


def test_refit_after_static_int8_recovers_fidelity_and_keeps_the_int8_form(tmp_path):
    model = conv_chain(groups=2)
    calib = correlated(tmp_path, (4, 8, 10, 10), "c.npz")
    data = correlated(tmp_path, (4, 8, 10, 10), "e.npz", batches=3, seed=1)
    plain = optimize(model, "quantize-static{per_channel=false}", calib)
    refit = optimize(model, "quantize-static{per_channel=false},refit", calib)
    stats = refit.report["passes"][-1]["stats"]
    assert stats["layers"] == 4 and stats["refit"] >= 3 and stats["check_error_ratio"] < 0.9
    assert snr(model, refit, data) > snr(model, plain, data) + 0.5
    onnx.checker.check_model(refit.model, full_check=True)
    ops = sorted(n.op_type for n in refit.model.graph.node)
    assert ops == sorted(n.op_type for n in plain.model.graph.node)  # the same int8 graph, new values
    inits = {t.name: t for t in refit.model.graph.initializer}
    dq_inputs = [inits[n.input[0]] for n in refit.model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    kinds = {t.data_type for t in dq_inputs}
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.INT32 in kinds  # int8 weights, int32 biases


@pytest.mark.parametrize("form, symmetric", [("standard", False), ("contrib", False), ("contrib", True)])
def test_refit_of_int4_blocked_weights(tmp_path, form, symmetric):
    model = mlp()
    calib = correlated(tmp_path, (64, 64), "c.npz")
    data = correlated(tmp_path, (64, 64), "e.npz", batches=3, seed=1)
    pipeline = f"quantize-weights{{format={form},block_size=16,min_elements=1,symmetric={symmetric}}}"
    plain = optimize(model, pipeline, calib)
    refit = optimize(model, pipeline + ",refit", calib)
    assert refit.report["passes"][-1]["stats"]["refit"] == 2
    assert snr(model, refit, data) > snr(model, plain, data) + 1.0
    if form == "standard":
        types = {t.data_type for t in refit.model.graph.initializer}
        assert onnx.TensorProto.INT4 in types or onnx.TensorProto.UINT4 in types
    else:
        assert [n.op_type for n in refit.model.graph.node].count("MatMulNBits") == 2


@pytest.mark.parametrize("form", ["standard", "contrib"])
def test_refit_after_dynamic_int8(tmp_path, form):
    model = mlp()
    calib = correlated(tmp_path, (64, 64), "c.npz")
    pipeline = f"quantize-dynamic{{min_elements=1,smooth=false,format={form}}}"
    result = optimize(model, pipeline + ",refit", calib)
    stats = result.report["passes"][-1]["stats"]
    assert stats["layers"] == 2 and stats["refit"] >= 1 and stats["check_error_ratio"] < 1.0
    onnx.checker.check_model(result.model)


def test_held_back_check_undoes_a_refit_that_does_not_generalize(tmp_path):
    """Fitting data spans 4 directions of the input, held-back data all of them: rounding
    tuned to the first is worse on the second, so the layer stays as it was."""
    r = rng(8)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [tensor("x", ["n", 32])],
                       [tensor("y", ["n", 32])], [init("w", r.standard_normal((32, 32)).astype(np.float32))])
    basis = r.standard_normal((4, 32)).astype(np.float32)
    fit = r.standard_normal((8, 64, 4)).astype(np.float32) @ basis
    held = r.standard_normal((2, 64, 32)).astype(np.float32) * 3
    path = tmp_path / "c.npz"
    np.savez(path, x=np.concatenate([fit, held]))
    result = optimize(model, "quantize-weights{format=standard,block_size=16,min_elements=1},refit{holdout=0.2}",
                      str(path))
    p = result.report["passes"][-1]
    assert p["status"] == "unchanged" and p["stats"]["groups_current_gptq_teacher"][0] == 1


def test_refit_leaves_layers_no_lossy_pass_changed(tmp_path):
    model = mlp()
    calib = correlated(tmp_path, (64, 64), "c.npz")
    result = optimize(model, "refit", calib)
    assert result.report["passes"][0]["status"] == "unchanged"
    assert result.report["passes"][0]["stats"]["layers"] == 0


def test_refit_needs_calibration():
    from onnxopt.errors import CalibrationError

    with pytest.raises(CalibrationError):
        onnxopt.optimize(mlp(), pipeline="refit")


def test_refit_finds_the_teacher_of_tensors_equalize_and_smooth_quant_rescaled(tmp_path):
    """Rescaled tensors are renamed (they no longer hold the original's values) and recorded
    with their factor, so every layer still has its teacher, scaled to match."""
    model = conv_chain()
    calib = correlated(tmp_path, (4, 8, 10, 10), "c.npz")
    data = correlated(tmp_path, (4, 8, 10, 10), "e.npz", batches=3, seed=1)
    plain = optimize(model, "equalize,smooth-quant{min_outlier=0},quantize-static", calib)
    refit = optimize(model, "equalize,smooth-quant{min_outlier=0},quantize-static,refit", calib)
    assert plain.report["passes"][0]["status"] == "changed"
    stats = refit.report["passes"][-1]["stats"]
    assert stats["with_teacher"] == stats["layers"] == 4
    assert snr(model, refit, data) > snr(model, plain, data)
