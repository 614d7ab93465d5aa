"""quantize-weights: block-wise int4/int8 weight-only quantization (MatMulNBits, opset-21 DQ)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import init, make_model, rng, tensor
from onnxopt.measure import verify
from onnxopt.errors import PipelineError
from onnxopt.ir.model import load
from onnxopt.passes.quantize_weights import pack_low_first, quantize_blocks, unpack_low_first
from onnxopt.testing import op_histogram, run_pass


def matmul_bias(k=40, n=6, opset=17, seed=0) -> onnx.ModelProto:
    """x[3, K] @ W[K, N] + b; K = 40 is not a multiple of the block size (16 or 32)."""
    r = rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    return make_model(nodes, [tensor("x", [3, k])], [tensor("y", [3, n])],
                      [init("w", r.standard_normal((k, n)).astype(np.float32)),
                       init("b", r.standard_normal(n).astype(np.float32))], opset=opset)


def weights_of(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits["w"], inits["b"]


def test_pack_low_first_by_hand_and_odd_sizes():
    np.testing.assert_array_equal(pack_low_first(np.array([1, 2, 3]), 4), [0x21, 0x03])
    np.testing.assert_array_equal(pack_low_first(np.array([[15, 0], [7, 8]]), 4), [[0x0F], [0x87]])
    codes = rng(1).integers(0, 16, size=(3, 5, 7))
    packed = pack_low_first(codes, 4)
    assert packed.shape == (3, 5, 4)
    np.testing.assert_array_equal(unpack_low_first(packed, 4, 7), codes)
    np.testing.assert_array_equal(pack_low_first(np.array([200, 3]), 8), [200, 3])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_error_within_half_a_step(bits, symmetric):
    w = rng(2).standard_normal((40, 6)).astype(np.float32)
    q = quantize_blocks(w, bits, 16, symmetric)
    assert q.codes.shape == (6, 3, 16) and q.scales.shape == (6, 3)
    assert q.codes.min() >= 0 and q.codes.max() <= 2 ** bits - 1
    back = q.dequantize()
    assert back.shape == w.shape
    step = np.repeat(q.scales.T, 16, axis=0)[:40]  # [K, N] scale of each weight
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    # symmetric: the largest magnitude of each block is exact
    if symmetric:
        blocks = np.abs(np.pad(w, ((0, 8), (0, 0)))).reshape(3, 16, 6).max(1).T
        np.testing.assert_allclose(q.scales, blocks / (2 ** (bits - 1) - 1), rtol=1e-6)


def test_mse_clipping_never_worse_than_round_to_nearest():
    w = rng(3).standard_normal((64, 8)).astype(np.float32)
    w[5, 2] = 9.0  # an outlier makes clipping pay in its block
    rtn = quantize_blocks(w, 4, 32, False, "rtn").dequantize()
    mse = quantize_blocks(w, 4, 32, False, "mse").dequantize()
    assert ((mse - w) ** 2).sum() < ((rtn - w) ** 2).sum()


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_matmulnbits_runs_and_matches_the_dequantized_weight(bits, symmetric):
    model = matmul_bias()
    out, result = run_pass("quantize-weights", model, min_elements=1, block_size=16, bits=bits, symmetric=symmetric)
    onnx.checker.check_model(out)
    assert op_histogram(out) == {"MatMulNBits": 1}  # the bias Add went into the node
    node = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["K"] == 40 and attrs["N"] == 6 and attrs["bits"] == bits and attrs["block_size"] == 16
    assert (len(node.input) > 3 and node.input[3] != "") == (not symmetric)  # zero points only when asymmetric
    w, b = weights_of(model)
    x = rng(4).standard_normal((3, 40)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    want = x @ quantize_blocks(w, bits, 16, symmetric).dequantize() + b
    np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-4)
    # 3 blocks of 16 (K padded 40 -> 48) per column: codes, float scales, packed zero points
    expected = 6 * 3 * 16 * bits // 8 + 6 * 3 * 4 + (0 if symmetric else 6 * 2)
    assert result.stats["weight_bytes_after"] == expected and result.stats["weight_bytes_before"] == 960


def test_standard_form_raises_opset_to_21_and_stores_int4():
    model = matmul_bias(opset=17)
    out, result = run_pass("quantize-weights", model, min_elements=1, block_size=16, format="standard")
    onnx.checker.check_model(out, full_check=True)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert op_histogram(out) == {"DequantizeLinear": 1, "MatMul": 1, "Add": 1}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 16}
    inits = {i.name: i for i in out.graph.initializer}
    wq = inits[dq.input[0]]
    assert wq.data_type == TensorProto.INT4 and list(wq.dims) == [40, 6]
    assert len(wq.raw_data) == 120  # 240 int4 values, two a byte
    assert list(inits[dq.input[1]].dims) == [3, 6]  # ceil(40 / 16) blocks x N
    w, b = weights_of(model)
    x = rng(5).standard_normal((3, 40)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    want = x @ quantize_blocks(w, 4, 16, False).dequantize() + b
    np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-4)


def test_standard_form_on_a_non_contrib_target():
    out, result = run_pass("quantize-weights", matmul_bias(opset=21), target="npu", min_elements=1,
                           block_size=16, bits=8)
    assert result.stats["format"] == "standard" and "MatMulNBits" not in op_histogram(out)


def old_upsample_model() -> onnx.ModelProto:
    r = rng(6)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Upsample", ["mm"], ["y"], scales=[1.0, 2.0], mode="nearest")]
    return make_model(nodes, [tensor("x", [2, 32])], [tensor("y", [2, 16])],
                      [init("w", r.standard_normal((32, 8)).astype(np.float32))], opset=7)


def test_standard_form_converts_an_old_opset_through_the_version_converter():
    model = old_upsample_model()  # Upsample changed meaning after opset 7: needs the converter
    out, result = run_pass("quantize-weights", model, min_elements=1, block_size=16, format="standard")
    assert result.changed and "converted" in result.stats["opset"]
    assert "Upsample" not in op_histogram(out) and op_histogram(out)["DequantizeLinear"] == 1
    x = rng(8).standard_normal((2, 32)).astype(np.float32)
    _, got = verify.run(out, {"x": x})
    assert got["y"].shape == (2, 16)


def test_standard_form_declines_when_the_opset_cannot_be_raised(monkeypatch):
    import onnxopt.passes.quantize_weights as qw

    monkeypatch.setattr(qw, "raise_opset", lambda model, version: (False, "converter failed"))
    model = old_upsample_model()
    out, result = run_pass("quantize-weights", model, min_elements=1, block_size=16, format="standard")
    assert not result.changed and result.stats["declined"] == "converter failed"
    assert out.SerializeToString() == load(model).to_proto().SerializeToString()


def test_gemm_with_transposed_weight_and_bias():
    r = rng(7)
    w = r.standard_normal((6, 32)).astype(np.float32)  # [N, K]
    c = r.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", [3, 32])], [tensor("y", [3, 6])], [init("w", w), init("c", c)])
    x = r.standard_normal((3, 32)).astype(np.float32)
    want = x @ quantize_blocks(w.T, 4, 16, False).dequantize() + c
    for fmt in ("contrib", "standard"):
        out, result = run_pass("quantize-weights", model, min_elements=1, block_size=16, format=fmt)
        assert result.stats["quantized"] == 1
        _, got = verify.run(out, {"x": x})
        np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-4)


def test_target_limits_are_errors():
    with pytest.raises(PipelineError, match="int4"):
        run_pass("quantize-weights", matmul_bias(opset=21), target="npu", min_elements=1, block_size=16)
    with pytest.raises(PipelineError, match="contrib_ops"):
        run_pass("quantize-weights", matmul_bias(), target="npu", min_elements=1, block_size=16,
                 bits=8, format="contrib")


def test_bad_block_size_and_untouched_models():
    with pytest.raises(PipelineError, match="power of two"):
        run_pass("quantize-weights", matmul_bias(), block_size=24)
    model = matmul_bias()
    out, result = run_pass("quantize-weights", model)  # 240 weights < min_elements
    assert not result.changed
    assert out.SerializeToString() == load(model).to_proto().SerializeToString()


def test_minilm_int4_shrinks_weights_sevenfold():
    from tests.real_models import real_model

    path = real_model("minilm_l6.onnx")
    out, result = run_pass("quantize-weights", str(path))
    assert result.stats["quantized"] == 36
    assert result.stats["weight_bytes_after"] * 6 < result.stats["weight_bytes_before"]
    ids = rng(3).integers(1000, 5000, size=(1, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    _, ref = verify.run(onnx.load(str(path)), feeds)
    _, got = verify.run(out, feeds)
    a, b = ref["last_hidden_state"].mean(1)[0], got["last_hidden_state"].mean(1)[0]
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95
