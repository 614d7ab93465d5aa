"""fuse-matmul-add: MatMul + Add (and Gemm without C + Add) become one Gemm where legal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tests.real_models import real_model
from tests.graphs import init, make_model, matmul_add, tensor
from onnx import helper

from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import load
from onnxopt.ir.digest import model_digest as graph_digest
from onnxopt.pipeline.registry import get_pass
from onnxopt.target import load_target
from onnxopt.testing import assert_equivalent, op_histogram, run_pass


def linear(x_shape=(4, 16), bias_shape=(8,), bias_first=False, pre=None, k=16, n=8, seed=0) -> onnx.ModelProto:
    """x -> [pre op] -> MatMul(w [k, n]) -> Add(b) -> y."""
    r = np.random.default_rng(seed)
    nodes, a = [], "x"
    if pre:
        nodes.append(helper.make_node(pre, ["x"], ["p"]))
        a = "p"
    nodes.append(helper.make_node("MatMul", [a, "w"], ["mm"]))
    nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["y"]))
    out_shape = list(x_shape[:-1]) + [n]
    return make_model(nodes, [tensor("x", list(x_shape))], [tensor("y", out_shape)],
                      [init("w", r.standard_normal((k, n)).astype(np.float32)),
                       init("b", r.standard_normal(bias_shape).astype(np.float32))])


def fused(proto):
    out, result = run_pass("fuse-matmul-add", proto)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def assert_untouched(proto):
    m = load(proto)
    before = graph_digest(m)
    result = get_pass("fuse-matmul-add")().run(m, PassContext(target=load_target("cpu")))
    assert not result.changed and result.stats["matmul-add"] == result.stats["gemm-add"] == 0
    assert graph_digest(m) == before
    return result


@pytest.mark.parametrize("bias_shape", [(8,), (1, 8), (), (4, 8), (4, 1)], ids=str)
def test_matmul_add_becomes_gemm(bias_shape):
    proto = linear(bias_shape=bias_shape)
    out, result = fused(proto)
    assert op_histogram(proto) == {"MatMul": 1, "Add": 1}
    assert op_histogram(out) == {"Gemm": 1}
    assert result.changed and result.stats == {"matmul-add": 1, "gemm-add": 0}
    assert list(out.graph.node[0].input) == ["x", "w", "b"] and out.graph.node[0].output[0] == "y"
    assert_equivalent(proto, out)


def test_bias_on_the_left_of_the_add():
    proto = linear(bias_first=True)
    out, result = fused(proto)
    assert op_histogram(out) == {"Gemm": 1}
    assert_equivalent(proto, out)


def test_shared_builder_and_symbolic_batch():
    out, _ = fused(matmul_add())
    assert op_histogram(out) == {"Gemm": 1}
    proto = linear(x_shape=("batch", 16))
    out, _ = fused(proto)
    assert op_histogram(out) == {"Gemm": 1}
    assert_equivalent(proto, out, feeds={"x": np.ones((3, 16), np.float32)})


def test_rank_from_shape_inference():
    """The MatMul input is an intermediate tensor without declared shape."""
    proto = linear(pre="Relu")
    assert not proto.graph.value_info
    out, result = fused(proto)
    assert op_histogram(out) == {"Relu": 1, "Gemm": 1}
    assert_equivalent(proto, out)


def test_rank_from_reshape_to_computed_shape():
    """Shape inference cannot tell a Reshape's dims from a computed shape, but its rank."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
             helper.make_node("Concat", ["batch", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    r = np.random.default_rng(4)
    proto = make_model(nodes, [tensor("x", ["n", 4, 2, 2])], [tensor("y", ["n", 8])],
                       [init("zero", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64)),
                        init("w", r.standard_normal((16, 8)).astype(np.float32)),
                        init("b", r.standard_normal(8).astype(np.float32))])
    out, result = fused(proto)
    assert result.stats["matmul-add"] == 1
    assert_equivalent(proto, out, feeds={"x": r.standard_normal((2, 4, 2, 2)).astype(np.float32)})


def test_two_layer_mlp_gives_two_gemms():
    r = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["m2"]), helper.make_node("Add", ["b2", "m2"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 6])], [tensor("y", [2, 3])],
                       [init("w1", r.standard_normal((6, 5)).astype(np.float32)), init("b1", r.standard_normal(5).astype(np.float32)),
                        init("w2", r.standard_normal((5, 3)).astype(np.float32)), init("b2", r.standard_normal(3).astype(np.float32))])
    out, result = fused(proto)
    assert op_histogram(out) == {"Gemm": 2, "Relu": 1} and result.stats["matmul-add"] == 2
    assert_equivalent(proto, out)


def test_3d_input_is_not_fused():
    result = assert_untouched(linear(x_shape=(2, 4, 16)))
    assert result.stats["skipped"] == {"matmul-add: MatMul input is not 2-D (Gemm needs 2-D)": 1}


def test_unknown_rank_is_not_fused():
    proto = linear()
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    result = assert_untouched(proto)
    assert result.stats["skipped"] == {"matmul-add: MatMul input rank unknown": 1}


def test_rows_of_bias_must_match_known_m():
    proto = linear(x_shape=("m", 16), bias_shape=(4, 8))
    result = assert_untouched(proto)
    assert result.stats["skipped"] == {"matmul-add: added constant has M rows but M is not known to match": 1}


def test_matmul_output_read_twice_is_not_fused():
    proto = linear()
    proto.graph.node.append(helper.make_node("Relu", ["mm"], ["z"]))
    proto.graph.output.append(tensor("z", [4, 8]))
    result = assert_untouched(proto)
    assert result.stats["skipped"] == {"matmul-add: MatMul output has other consumers": 1}


def test_non_constant_weight_or_bias_is_not_fused():
    proto = linear()
    b = proto.graph.initializer.pop()  # b
    proto.graph.input.append(tensor("b", list(b.dims)))
    assert assert_untouched(proto).stats["skipped"] == {"matmul-add: added tensor is not constant": 1}
    proto = linear()
    del proto.graph.initializer[0]  # w
    proto.graph.input.append(tensor("w", [16, 8]))
    assert assert_untouched(proto).stats["skipped"] == {"matmul-add: MatMul weight is not constant": 1}


def test_integer_matmul_is_not_fused():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 3], onnx.TensorProto.INT32)], [tensor("y", [2, 4], onnx.TensorProto.INT32)],
                       [init("w", np.ones((3, 4), np.int32)), init("b", np.arange(4, dtype=np.int32))])
    assert untouched_reason(proto) == "MatMul weight is not a float type"


def untouched_reason(proto):
    (reason,) = assert_untouched(proto).stats["skipped"]
    return reason.split(": ", 1)[1]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_without_c_plus_add(trans_b):
    r = np.random.default_rng(6)
    w = r.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], alpha=0.5, beta=3.0, transB=trans_b),
             helper.make_node("Add", ["g", "b"], ["y"])]
    proto = make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                       [init("w", w), init("b", r.standard_normal((1, 8)).astype(np.float32))])
    out, result = fused(proto)
    assert op_histogram(out) == {"Gemm": 1} and result.stats == {"matmul-add": 0, "gemm-add": 1}
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == 0.5
    assert_equivalent(proto, out)


def test_minilm_batched_matmuls_are_left_alone():
    proto = onnx.load(str(real_model("minilm_l6.onnx")))
    m = load(proto)
    result = get_pass("fuse-matmul-add")().run(m, PassContext(target=load_target("cpu")))
    assert result.stats["matmul-add"] == 0
    assert sum(result.stats["skipped"].values()) > 0
    assert set(result.stats["skipped"]) <= {"matmul-add: MatMul input is not 2-D (Gemm needs 2-D)",
                                             "matmul-add: MatMul weight is not constant",
                                             "matmul-add: added tensor is not constant"}


def test_ppocr_cls_classifier_head():
    lifted, _ = run_pass("lift-constants", str(real_model("ppocr_mobile_v2_cls.onnx")))
    out, result = fused(lifted)
    assert result.stats["matmul-add"] == 1
    assert op_histogram(out)["Gemm"] == op_histogram(lifted).get("Gemm", 0) + 1
    assert_equivalent(lifted, out)
