"""quantize-dynamic: int8 weights with run-time activation quantization, on tiny graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.graphs import init, make_model, matmul_add, rng, tensor
from onnxopt.measure import verify
from onnxopt.errors import PipelineError
from onnxopt.ir.model import load
from onnxopt.passes.quantize_dynamic import symmetric_int8
from onnxopt.testing import op_histogram, run_pass


def dynamic_quantize_ref(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear then dequantize, as the ONNX spec defines it."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return ((q - zp) * scale).astype(np.float32)


def two_matmuls_same_input() -> onnx.ModelProto:
    r = rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"])]
    return make_model(nodes, [tensor("x", [3, 8])], [tensor("a", [3, 4]), tensor("b", [3, 6])],
                      [init("w1", r.standard_normal((8, 4)).astype(np.float32)),
                       init("w2", r.standard_normal((8, 6)).astype(np.float32))])


def test_scales_by_hand():
    w = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    q, s = symmetric_int8(w, axis=1)
    np.testing.assert_allclose(s, [1 / 127, 4 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q, [[127, -64], [64, 127]])
    q, s = symmetric_int8(w, axis=None)
    np.testing.assert_allclose(s, 4 / 127, rtol=1e-6)
    np.testing.assert_array_equal(q, [[32, -64], [16, 127]])
    q, s = symmetric_int8(w, axis=1, reduce_range=True)
    np.testing.assert_allclose(s, [1 / 63, 4 / 63], rtol=1e-6)
    assert np.abs(q).max() == 63
    _, s = symmetric_int8(np.zeros((2, 2), np.float32), axis=1)  # an all-zero channel keeps scale 1
    np.testing.assert_array_equal(s, [1.0, 1.0])


@pytest.mark.parametrize("per_channel", [True, False])
def test_standard_form_matches_the_quantized_math(per_channel):
    model = matmul_add()
    out, result = run_pass("quantize-dynamic", model, min_elements=1, per_channel=per_channel, reduce_range="off")
    onnx.checker.check_model(out)
    assert result.changed and result.stats["matmul"] == 1
    hist = op_histogram(out)
    assert hist == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 2, "Add": 1}
    x = rng(9).standard_normal((4, 16)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    b = onnx.numpy_helper.to_array(model.graph.initializer[1])
    q, s = symmetric_int8(w, 1 if per_channel else None)
    expected = dynamic_quantize_ref(x) @ (q.astype(np.float32) * s) + b
    np.testing.assert_allclose(got["y"], expected, rtol=1e-4, atol=1e-4)
    _, ref = verify.run(model, {"x": x})
    assert not np.allclose(got["y"], ref["y"], atol=1e-6)  # it did quantize
    assert np.abs(got["y"] - ref["y"]).max() < 0.1 * np.abs(ref["y"]).max()


def test_reduce_range_on_gives_7_bit_weights():
    out, result = run_pass("quantize-dynamic", matmul_add(), min_elements=1, reduce_range="on")
    assert result.stats["reduce_range"] is True
    wq = next(i for i in out.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2)
    assert np.abs(onnx.numpy_helper.to_array(wq)).max() == 63
    _, off = run_pass("quantize-dynamic", matmul_add(), min_elements=1, reduce_range="off")
    assert off.stats["reduce_range"] is False


def test_contrib_form_folds_the_bias_and_runs():
    model = matmul_add()
    out, result = run_pass("quantize-dynamic", model, min_elements=1, format="contrib", reduce_range="off")
    assert op_histogram(out) == {"DynamicQuantizeMatMul": 1}
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    x = rng(9).standard_normal((4, 16)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    std, _ = run_pass("quantize-dynamic", model, min_elements=1, reduce_range="off")
    _, want = verify.run(std, {"x": x})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-4)


def test_contrib_form_needs_a_target_with_contrib_ops():
    with pytest.raises(PipelineError, match="contrib_ops"):
        run_pass("quantize-dynamic", matmul_add(), target="npu", min_elements=1, format="contrib")


def test_one_activation_quantizer_shared_by_its_consumers():
    out, result = run_pass("quantize-dynamic", two_matmuls_same_input(), min_elements=1)
    hist = op_histogram(out)
    assert hist["DynamicQuantizeLinear"] == 1 and hist["MatMulInteger"] == 2 and "MatMul" not in hist


def test_small_weights_and_activation_products_are_left_alone():
    # Default min_elements (1024) skips the 16x8 weight: no change, same bytes.
    model = matmul_add()
    out, result = run_pass("quantize-dynamic", model)
    assert not result.changed
    assert out.SerializeToString() == load(model).to_proto().SerializeToString()
    nodes = [helper.make_node("MatMul", ["x", "y"], ["z"])]
    act = make_model(nodes, [tensor("x", [2, 3]), tensor("y", [3, 4])], [tensor("z", [2, 4])])
    _, result = run_pass("quantize-dynamic", act, min_elements=1)
    assert not result.changed


def test_keep_float_by_node_name():
    model = two_matmuls_same_input()
    model.graph.node[0].name = "first"
    out, result = run_pass("quantize-dynamic", model, min_elements=1, keep_float=["first"])
    hist = op_histogram(out)
    assert hist["MatMul"] == 1 and hist["MatMulInteger"] == 1


def test_gemm_with_transposed_weight():
    r = rng(6)
    w = r.standard_normal((5, 8)).astype(np.float32)  # [N, K], transB
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", [3, 8])], [tensor("y", [3, 5])],
                       [init("w", w), init("c", r.standard_normal(5).astype(np.float32))])
    out, result = run_pass("quantize-dynamic", model, min_elements=1)
    assert result.stats["gemm"] == 1 and "Gemm" not in op_histogram(out)
    x = r.standard_normal((3, 8)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    _, ref = verify.run(model, {"x": x})
    assert np.abs(got["y"] - ref["y"]).max() < 0.05 * np.abs(ref["y"]).max()


def test_conv_becomes_conv_integer_when_asked():
    r = rng(7)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                       [init("w", r.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                        init("b", r.standard_normal(4).astype(np.float32))])
    _, untouched = run_pass("quantize-dynamic", model, min_elements=1)
    assert not untouched.changed  # Conv is not in the default op_types
    out, result = run_pass("quantize-dynamic", model, min_elements=1, op_types=["Conv"])
    assert op_histogram(out)["ConvInteger"] == 1 and "Conv" not in op_histogram(out)
    x = r.standard_normal((1, 3, 6, 6)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    _, ref = verify.run(model, {"x": x})
    assert np.abs(got["y"] - ref["y"]).max() < 0.05 * np.abs(ref["y"]).max()


def test_embedding_table_per_row_int8():
    table = rng(8).standard_normal((64, 32)).astype(np.float32)
    table[3] *= 100  # one loud row must not coarsen the others (per-row scales)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"])]
    model = make_model(nodes, [tensor("ids", [2, 5], TensorProto.INT64)], [tensor("e", [2, 5, 32])],
                       [init("table", table)])
    out, result = run_pass("quantize-dynamic", model, min_elements=1)
    assert result.stats["gather"] == 1
    table_q = [i for i in out.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(table_q) == 1 and list(table_q[0].dims) == [64, 32]
    ids = np.array([[0, 1, 2, 4, 5], [6, 7, 8, 9, 10]], np.int64)
    _, got = verify.run(out, {"ids": ids})
    row_step = np.abs(table).max(1) / 127
    assert np.all(np.abs(got["e"] - table[ids]) <= row_step[ids][..., None] / 2 + 1e-6)


def outlier_channel_model() -> onnx.ModelProto:
    """x * g (one channel 60x the others, like a LayerNorm gain) feeding a MatMul."""
    r = rng(10)
    g = np.ones(64, np.float32)
    g[7] = 60.0
    nodes = [helper.make_node("Mul", ["x", "g"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    return make_model(nodes, [tensor("x", ["batch", 64])], [tensor("y", ["batch", 32])],
                      [init("g", g), init("w", r.standard_normal((64, 32)).astype(np.float32))])


def test_outlier_smoothing_inserts_one_mul_and_cuts_the_error():
    model = outlier_channel_model()
    plain, r0 = run_pass("quantize-dynamic", model, min_elements=1, smooth=False)
    smooth, r1 = run_pass("quantize-dynamic", model, min_elements=1)
    assert r0.stats["smoothed"] == 0 and r1.stats["smoothed"] == 1
    assert op_histogram(smooth)["Mul"] == op_histogram(plain)["Mul"] + 1
    x = rng(11).standard_normal((16, 64)).astype(np.float32)
    _, ref = verify.run(model, {"x": x})
    _, a = verify.run(plain, {"x": x})
    _, b = verify.run(smooth, {"x": x})
    err_plain = np.linalg.norm(a["y"] - ref["y"])
    err_smooth = np.linalg.norm(b["y"] - ref["y"])
    assert err_smooth < 0.6 * err_plain


def test_minilm_keeps_embedding_cosine(tmp_path):
    """The real model: every weight MatMul quantized, outputs stay close to float."""
    from tests.real_models import real_model

    path = real_model("minilm_l6.onnx")
    out, result = run_pass("quantize-dynamic", str(path))
    assert result.stats["matmul"] == 36 and result.stats["smoothed"] > 0
    ids = rng(3).integers(1000, 5000, size=(2, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    _, ref = verify.run(onnx.load(str(path)), feeds)
    _, got = verify.run(out, feeds)
    a, b = ref["last_hidden_state"].mean(1), got["last_hidden_state"].mean(1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99
