"""quantize-static: Q/DQ placement per target, scales by hand, round trip in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxopt.measure import verify
from onnxopt.data.statistics import open_calibration
from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import load
from onnxopt.target import load_target
from onnxopt.testing import op_histogram, run_pass
from tests.graphs import init, make_model, tensor

R = np.random.default_rng(7)
X = R.standard_normal((4, 1, 2, 5, 5)).astype(np.float32)  # four batches of one image


def conv_relu(opset=17) -> onnx.ModelProto:
    """x -> Conv(3 out channels, bias) -> Relu -> y."""
    r = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 3, 5, 5])],
                      [init("w", r.standard_normal((3, 2, 3, 3)).astype(np.float32)),
                       init("b", r.standard_normal(3).astype(np.float32))], opset=opset)


def residual() -> onnx.ModelProto:
    """x -> Conv1 -> Relu -> r; r -> Conv2 -> c2; Add(c2, r) -> y."""
    r = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r"], ["y"], name="skip_add")]
    return make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 2, 5, 5])],
                      [init("w1", r.standard_normal((2, 2, 3, 3)).astype(np.float32)),
                       init("b1", r.standard_normal(2).astype(np.float32)),
                       init("w2", r.standard_normal((2, 2, 3, 3)).astype(np.float32)),
                       init("b2", r.standard_normal(2).astype(np.float32))])


def branches_concat() -> onnx.ModelProto:
    """x -> ConvA, ConvB -> Concat -> Sigmoid -> y: Concat needs one scale."""
    r = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]),
             helper.make_node("Conv", ["x", "wb"], ["bb"]),
             helper.make_node("Concat", ["a", "bb"], ["cat"], axis=1),
             helper.make_node("Sigmoid", ["cat"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 4, 5, 5])],
                      [init("wa", r.standard_normal((2, 2, 1, 1)).astype(np.float32)),
                       init("wb", 5 * r.standard_normal((2, 2, 1, 1)).astype(np.float32))])


def gemm_matmul() -> onnx.ModelProto:
    """x[1,6] -> Gemm(transB, bias) -> MatMul(constant) -> y."""
    r = np.random.default_rng(4)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("MatMul", ["g", "m"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 6])], [tensor("y", [1, 3])],
                      [init("w", r.standard_normal((4, 6)).astype(np.float32)),
                       init("b", r.standard_normal(4).astype(np.float32)),
                       init("m", r.standard_normal((4, 3)).astype(np.float32))])


def quantize(proto, target="cpu", data=None, **options):
    data = {"x": X if data is None else data}
    model = load(proto)
    calib = open_calibration(_Reader(data), model)
    ctx = PassContext(target=load_target(target), calibration=calib)
    out, result = run_pass("quantize-static", proto, target=target, ctx=ctx, **options)
    onnx.checker.check_model(out)
    return out, result


class _Reader:
    def __init__(self, data):
        self.items = [dict(zip(data, values)) for values in zip(*data.values())]
        self.i = 0

    def get_next(self):
        self.i += 1
        return self.items[self.i - 1] if self.i <= len(self.items) else None

    def rewind(self):
        self.i = 0


def inits(proto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def q_params(proto, tensor_name):
    """(scale, zero point) of the QuantizeLinear reading ``tensor_name``."""
    values = inits(proto)
    (node,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor_name]
    # a uint8 zero point of 0 is left out (QuantizeLinear's default)
    return values[node.input[1]], values[node.input[2]] if len(node.input) > 2 else np.uint8(0)


def dq_of(proto, consumer_op, index):
    """(q, scale, zero point, axis) of the DequantizeLinear feeding input ``index`` of the
    first ``consumer_op`` node."""
    values = inits(proto)
    node = next(n for n in proto.graph.node if n.op_type == consumer_op)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[index])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    q, scale = values.get(dq.input[0]), values[dq.input[1]]
    # a left-out zero point is 0 (symmetric weights, int32 bias)
    zp = values[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, q.dtype)
    return q, scale, zp, axis


def run(proto, feed, optimize=False):
    sess = verify.session(proto, optimize=optimize)
    return sess.run(None, feed)[0]


def snr_db(ref, got):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))


def test_cpu_conv_relu_placement_and_scales_by_hand():
    proto = conv_relu()
    out, result = quantize(proto)
    assert result.changed
    assert op_histogram(out) == {"QuantizeLinear": 2, "DequantizeLinear": 4, "Conv": 1}  # Relu folded
    assert result.stats["activations_folded"] == 1
    # input: asymmetric uint8 over [min, max] of the calibration data
    sx, zx = q_params(out, "x")
    assert sx == pytest.approx((X.max() - X.min()) / 255, rel=1e-6)
    assert zx.dtype == np.uint8 and zx == np.round(-X.min() / sx)
    # output of Conv+Relu: range [0, max] -> zero point 0 (Q clamps negatives like Relu)
    ref = np.stack([run(proto, {"x": b}) for b in X])
    sy, zy = q_params(out, next(n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "x"))
    assert zy == 0 and sy == pytest.approx(ref.max() / 255, rel=1e-5)
    # weights: per-channel symmetric int8 on axis 0, scale = max|w_c| / 127
    w = inits(proto)["w"]
    q, sw, zw, axis = dq_of(out, "Conv", 1)
    assert q.dtype == np.int8 and axis == 0 and not zw.any()
    np.testing.assert_allclose(sw, np.abs(w).reshape(3, -1).max(1) / 127, rtol=1e-6)
    # bias: int32, scale = input scale * weight scale
    qb, sb, zb, axis_b = dq_of(out, "Conv", 2)
    assert qb.dtype == np.int32 and axis_b == 0
    np.testing.assert_allclose(sb, sx * sw, rtol=1e-6)
    np.testing.assert_array_equal(qb, np.round(inits(proto)["b"] / (sx * sw)).astype(np.int32))
    # the graph output keeps its name and runs in onnxruntime, unfused and fused
    assert [o.name for o in out.graph.output] == ["y"]
    got = run(out, {"x": X[0]})
    assert snr_db(ref[0], got) > 30
    assert snr_db(ref[0], run(out, {"x": X[0]}, optimize=True)) > 30


def test_per_tensor_weights_option():
    out, _ = quantize(conv_relu(), per_channel=False)
    q, sw, zw, axis = dq_of(out, "Conv", 1)
    assert axis is None and sw.shape == () and sw == pytest.approx(np.abs(inits(conv_relu())["w"]).max() / 127)


def test_concat_inputs_and_output_share_one_scale():
    out, _ = quantize(branches_concat())
    scales = {name: q_params(out, name)[0] for name in ("a", "bb", "cat")}
    assert scales["a"] == scales["bb"] == scales["cat"]
    ref = run(branches_concat(), {"x": X[0]})
    assert snr_db(ref, run(out, {"x": X[0]})) > 30


def test_gemm_bias_and_matmul_weight_axes():
    data = R.standard_normal((3, 1, 6)).astype(np.float32)
    out, result = quantize(gemm_matmul(), data=data)
    _, sw, _, axis = dq_of(out, "Gemm", 1)
    assert axis == 0 and sw.shape == (4,)  # transB: output channels on axis 0
    qb, sb, _, _ = dq_of(out, "Gemm", 2)
    assert qb.dtype == np.int32 and result.stats["biases_quantized"] == 1
    _, sm, _, axis_m = dq_of(out, "MatMul", 1)
    assert axis_m == 1 and sm.shape == (3,)  # MatMul weight (K, N): channels are columns
    ref = run(gemm_matmul(), {"x": data[0]})
    assert snr_db(ref, run(out, {"x": data[0]})) > 25


def test_gpu_places_qdq_on_conv_and_residual_add_inputs_only():
    out, result = quantize(residual(), target="gpu")
    hist = op_histogram(out)
    assert hist["Relu"] == 1 and hist["Add"] == 1  # nothing folded: TensorRT fuses itself
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "r", "c2"}  # Conv inputs and both Add inputs; not the output y
    for name in quantized:
        scale, zp = q_params(out, name)
        assert zp.dtype == np.int8 and zp == 0  # symmetric int8 activations
    assert "y" in [o.name for o in out.graph.output]
    assert result.stats["biases_quantized"] == 0  # bias_bits = 0: TensorRT keeps float bias
    assert snr_db(run(residual(), {"x": X[0]}), run(out, {"x": X[0]})) > 25


def test_npu_leaves_no_float_island():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=1)]
    proto = make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 2, 5, 5])],
                       [init("w", np.random.default_rng(5).standard_normal((2, 2, 1, 1)).astype(np.float32))])
    out, _ = quantize(proto, target="npu")
    produced = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for name in node.input:  # every float input of a compute node is dequantized int8
            assert name in inits(out) or produced[name].op_type == "DequantizeLinear", (node.op_type, name)
    assert run(out, {"x": X[0]}).shape == (1, 2, 5, 5)


def test_opset_11_model_is_raised_for_per_channel_and_loads():
    proto = conv_relu(opset=11)
    out, result = quantize(proto)
    assert out.opset_import[0].version == 13
    assert "opset 11 -> 13" in result.stats["opset"]
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert snr_db(run(proto, {"x": X[0]}), sess.run(None, {"x": X[0]})[0]) > 30


def test_opset_11_per_tensor_stays_at_11():
    out, _ = quantize(conv_relu(opset=11), per_channel=False)
    assert out.opset_import[0].version == 11
    assert all(not n.attribute for n in out.graph.node if n.op_type == "DequantizeLinear")


def test_percentile_clips_an_outlier_that_minmax_keeps():
    data = np.random.default_rng(8).standard_normal((40, 1, 2, 5, 5)).astype(np.float32)
    data[0, 0, 0, 0, 0] = 40.0  # one outlier among 2000 values
    s_minmax, _ = q_params(quantize(conv_relu(), data=data, calibration="minmax")[0], "x")
    s_pct, _ = q_params(quantize(conv_relu(), data=data, calibration="percentile", percentile=99.0)[0], "x")
    s_ent, _ = q_params(quantize(conv_relu(), data=data, calibration="entropy")[0], "x")
    assert s_minmax == pytest.approx((40.0 - data.min()) / 255, rel=1e-6)
    assert s_pct < s_minmax / 4 and s_ent < s_minmax


def test_int8_activations_option_and_exclude():
    out, _ = quantize(conv_relu(), activation_dtype="int8")
    _, zx = q_params(out, "x")
    assert zx.dtype == np.int8
    out, result = quantize(residual(), exclude_nodes=["skip_add"])
    add = next(n for n in out.graph.node if n.op_type == "Add")
    produced = {o: n.op_type for n in out.graph.node for o in n.output}
    assert produced[add.output[0]] == "Add" and add.output[0] == "y"  # its output is not quantized
    assert result.stats["activations_folded"] == 1  # the Relu after Conv1 still folds


def test_without_calibration_the_pass_says_what_it_needs():
    from onnxopt.errors import CalibrationError

    with pytest.raises(CalibrationError, match="needs calibration data"):
        run_pass("quantize-static", conv_relu())


def test_sixteen_bit_activations_raise_the_opset_to_21():
    out, result = quantize(conv_relu(), target="npu", activation_dtype="uint16")
    assert out.opset_import[0].version == 21 and "17 -> 21" in result.stats["opset"]
    sx, zx = q_params(out, "x")
    assert zx.dtype == np.uint16 and sx == pytest.approx((X.max() - X.min()) / 65535, rel=1e-6)
    assert snr_db(run(conv_relu(), {"x": X[0]}), run(out, {"x": X[0]})) > 40


def test_reduce_range_uses_seven_bit_weights():
    out, result = quantize(conv_relu(), reduce_range="on")
    q, sw, _, _ = dq_of(out, "Conv", 1)
    assert np.abs(q).max() == 63 and "reduce_range" in result.stats["weights"]
    w = inits(conv_relu())["w"]
    np.testing.assert_allclose(sw, np.abs(w).reshape(3, -1).max(1) / 63, rtol=1e-6)


def test_relu_on_integers_is_never_folded():
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=onnx.TensorProto.INT32),
             helper.make_node("Add", ["xi", "one"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=onnx.TensorProto.FLOAT)]
    proto = make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 2, 5, 5])],
                       [init("one", np.array(1, np.int32))])
    out, result = quantize(proto)
    assert op_histogram(out)["Relu"] == 1 and result.stats["activations_folded"] == 0
    np.testing.assert_array_equal(run(proto, {"x": X[0]}), run(out, {"x": X[0]}))


def test_an_already_quantized_model_is_left_alone():
    out, _ = quantize(conv_relu())
    again, result = quantize(out)
    assert not result.changed and result.stats["skipped"] == "the model is already quantized"
    assert op_histogram(again) == op_histogram(out)


def test_gemm_bias_of_shape_1_by_n_is_quantized_along_its_last_axis():
    r = np.random.default_rng(9)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"])]
    proto = make_model(nodes, [tensor("x", [3, 2])], [tensor("y", [3, 4])],
                       [init("w", r.standard_normal((2, 4)).astype(np.float32)),
                        init("b", r.standard_normal((1, 4)).astype(np.float32))])
    data = r.standard_normal((2, 3, 2)).astype(np.float32)
    out, result = quantize(proto, data=data)
    qb, sb, _, axis = dq_of(out, "Gemm", 2)
    assert qb.shape == (1, 4) and sb.shape == (4,) and axis == 1 and result.stats["biases_quantized"] == 1
    assert snr_db(run(proto, {"x": data[0]}), run(out, {"x": data[0]})) > 25
