"""convert-float16: low-precision compute with float32 edges, block lists and few Casts."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import if_subgraph, init, make_model, matmul_add, rng, tensor
from onnxopt.measure import verify
from onnxopt.errors import PipelineError
from onnxopt.testing import op_histogram, run_pass


def elem_types(model) -> dict[str, int]:
    g = model.graph
    out = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        out[vi.name] = vi.type.tensor_type.elem_type
    return out


def close_to_float(model, out, feeds, tol=2e-2):
    _, ref = verify.run(model, feeds)
    _, got = verify.run(out, feeds)
    for name, value in ref.items():
        assert got[name].dtype == value.dtype, name
        assert np.abs(got[name] - value).max() <= tol * max(1.0, np.abs(value).max()), name


def test_matmul_add_keeps_float32_edges_with_two_casts():
    model = matmul_add()
    out, result = run_pass("convert-float16", model)
    onnx.checker.check_model(out, full_check=True)
    assert result.changed and result.stats["converted"] == 2 and result.stats["casts"] == 2
    assert op_histogram(out) == {"Cast": 2, "MatMul": 1, "Add": 1}
    types = elem_types(out)
    assert types["x"] == TensorProto.FLOAT and types["y"] == TensorProto.FLOAT
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.FLOAT16}
    close_to_float(model, out, {"x": rng(1).standard_normal((4, 16)).astype(np.float32)})


def test_without_keep_io_the_interface_becomes_float16_and_no_cast_is_needed():
    out, result = run_pass("convert-float16", matmul_add(), keep_io=False)
    assert result.stats["casts"] == 0 and "Cast" not in op_histogram(out)
    types = elem_types(out)
    assert types["x"] == TensorProto.FLOAT16 and types["y"] == TensorProto.FLOAT16
    _, got = verify.run(out, {"x": np.ones((4, 16), np.float16)})
    assert got["y"].dtype == np.float16


def fan_out_model() -> onnx.ModelProto:
    """h = x @ w read by two Softmax and one Relu; the Softmaxes get blocked in a test."""
    r = rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Softmax", ["h"], ["s1"], axis=-1),
             helper.make_node("Softmax", ["h"], ["s2"], axis=0),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Add", ["s1", "s2"], ["s"]),
             helper.make_node("Add", ["s", "r"], ["y"])]
    return make_model(nodes, [tensor("x", [4, 8])], [tensor("y", [4, 6])],
                      [init("w", r.standard_normal((8, 6)).astype(np.float32))])


def test_blocked_ops_share_one_cast_per_tensor_and_direction():
    model = fan_out_model()
    out, result = run_pass("convert-float16", model, block_ops=["Softmax"])
    # x->f16, h->f32 (shared by both Softmaxes), s1 and s2 -> f16 for the Add, y -> f32
    assert result.stats["casts"] == 5 and result.stats["kept_float32"] == 2
    softmax_inputs = {n.input[0] for n in out.graph.node if n.op_type == "Softmax"}
    assert len(softmax_inputs) == 1
    close_to_float(model, out, {"x": rng(3).standard_normal((4, 8)).astype(np.float32)})


def test_keep_nodes_by_name():
    model = fan_out_model()
    model.graph.node[3].name = "relu"
    out, result = run_pass("convert-float16", model, keep_nodes=["relu"])
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert elem_types(out).get(relu.output[0], TensorProto.FLOAT) == TensorProto.FLOAT
    close_to_float(model, out, {"x": rng(4).standard_normal((4, 8)).astype(np.float32)})


def test_constants_beyond_float16_are_clamped_with_a_warning(caplog):
    big = np.array([1e6, -3e5, 2.0, np.inf], np.float32)
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    model = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])], [init("c", big)])
    with caplog.at_level(logging.WARNING, logger="onnxopt.passes.convert_float16"):
        out, result = run_pass("convert-float16", model)
    assert result.stats["clamped"] == 2
    assert any("clamped" in r.message for r in caplog.records)
    c = numpy_helper.to_array(next(i for i in out.graph.initializer if i.data_type == TensorProto.FLOAT16))
    np.testing.assert_array_equal(c, np.array([65504, -65504, 2, np.inf], np.float16))


def test_resize_scales_stay_float32():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="nearest")]
    model = make_model(nodes, [tensor("x", [1, 1, 2, 2])], [tensor("y", [1, 1, 4, 4])],
                       [init("scales", np.array([1, 1, 2, 2], np.float32))])
    out, result = run_pass("convert-float16", model)
    onnx.checker.check_model(out, full_check=True)
    assert elem_types(out)["scales"] == TensorProto.FLOAT
    resize = next(n for n in out.graph.node if n.op_type == "Resize")
    assert elem_types(out).get(resize.input[0]) != TensorProto.FLOAT  # the data input is float16
    close_to_float(model, out, {"x": rng(5).standard_normal((1, 1, 2, 2)).astype(np.float32)})


def test_constant_nodes_and_casts_to_float_follow():
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.full(3, 0.5, np.float32))),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["nf", "k"], ["y"])]
    model = make_model(nodes, [tensor("n", [3], TensorProto.INT64)], [tensor("y", [3])])
    out, result = run_pass("convert-float16", model)
    cast = next(n for n in out.graph.node if n.op_type == "Cast" and n.input[0] == "n")
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT16  # int -> f16 directly
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_type == TensorProto.FLOAT16
    close_to_float(model, out, {"n": np.array([1, 2, 3], np.int64)})


def test_subgraph_reads_keep_float32():
    model = if_subgraph()
    out, result = run_pass("convert-float16", model)
    onnx.checker.check_model(out)
    for cond in (True, False):
        close_to_float(model, out, {"cond": np.array(cond), "x": rng(6).standard_normal((2, 3)).astype(np.float32)})


def test_bfloat16_needs_a_target_that_has_it():
    with pytest.raises(PipelineError, match="bfloat16"):
        run_pass("convert-float16", matmul_add(), target="cpu", dtype="bfloat16")
    out, result = run_pass("convert-float16", matmul_add(), target="gpu", dtype="bfloat16")
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.BFLOAT16}
    assert result.stats["clamped"] == 0


def test_no_float_no_change():
    nodes = [helper.make_node("Add", ["a", "b"], ["c"])]
    model = make_model(nodes, [tensor("a", [2], TensorProto.INT64), tensor("b", [2], TensorProto.INT64)],
                       [tensor("c", [2], TensorProto.INT64)])
    out, result = run_pass("convert-float16", model)
    assert not result.changed


def test_minilm_runs_in_float16_on_the_cpu():
    from tests.real_models import real_model

    path = real_model("minilm_l6.onnx")
    out, result = run_pass("convert-float16", str(path))
    assert result.stats["converted"] > 300 and result.stats["casts"] <= 2
    ids = rng(3).integers(1000, 5000, size=(1, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    _, ref = verify.run(onnx.load(str(path)), feeds)
    _, got = verify.run(out, feeds)
    assert got["last_hidden_state"].dtype == np.float32
    a, b = ref["last_hidden_state"].ravel(), got["last_hidden_state"].ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_a_node_reading_out_of_range_constants_stays_float32_unless_it_clamps():
    """BatchNormalization with a variance of 1e6: clamping it would quadruple the output."""
    var = np.array([1e6, 4.0], np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 2, 3])], [tensor("y", [1, 2, 3])],
                       [init("s", np.ones(2, np.float32)), init("b", np.zeros(2, np.float32)),
                        init("m", np.zeros(2, np.float32)), init("v", var)])
    out, result = run_pass("convert-float16", model)
    assert result.stats["kept_for_range"] == 1 and result.stats["clamped"] == 0
    assert elem_types(out)["v"] == TensorProto.FLOAT
    x = (rng(7).standard_normal((1, 2, 3)) * 1000).astype(np.float32)
    close_to_float(model, out, {"x": x}, tol=1e-2)
    out, result = run_pass("convert-float16", model, clamp_ops=["BatchNormalization"])
    assert result.stats["clamped"] == 1  # asked to clamp: it does, and the result moves
    _, got = verify.run(out, {"x": x})
    _, ref = verify.run(model, {"x": x})
    assert np.abs(got["y"] - ref["y"]).max() > 0.5 * np.abs(ref["y"]).max()
