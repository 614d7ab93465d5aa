"""Cost model: MACs/FLOPs of each op on tiny graphs against hand counts; weights; memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.analysis.cost import Poly, model_cost, parse_input_shapes, weight_infos
from onnxopt.analysis.memory import activation_memory
from onnxopt.errors import UsageError
from tests.graphs import init, make_model, tensor


def one_node(op, inputs, outputs, inits=(), opset=17, domain="", **attrs) -> onnx.ModelProto:
    """A one-node model; inputs/outputs are (name, shape) pairs, outputs may have shape None."""
    node = helper.make_node(op, [n for n, _ in inputs] + [t.name for t in inits],
                            [n for n, _ in outputs], domain=domain or None, **attrs)
    graph = helper.make_graph([node], "g", [tensor(n, s) for n, s in inputs],
                              [tensor(n, s) for n, s in outputs], initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def w(name, *shape):
    return init(name, np.ones(shape, np.float32))


def only(model, **kw):
    report = model_cost(model, memory=False, **kw)
    (node,) = report.nodes
    return node


# -- MACs of each op, counted by hand ----------------------------------------------------------
def test_conv_counts_output_times_kernel_times_input_channels():
    # Y [1,4,8,8] (pads 1): 256 outputs, each 3 channels x 3x3 = 27 MACs; bias adds 256 FLOPs.
    m = one_node("Conv", [("x", [1, 3, 8, 8])], [("y", None)], [w("W", 4, 3, 3, 3), w("B", 4)],
                 pads=[1, 1, 1, 1])
    n = only(m)
    assert (n.category, n.macs, n.flops) == ("conv", Poly(256 * 27), Poly(2 * 256 * 27 + 256))


def test_depthwise_conv_counts_one_channel_per_group():
    # group 4, no padding: Y [1,4,6,6] = 144 outputs x (1 channel x 3x3).
    m = one_node("Conv", [("x", [1, 4, 8, 8])], [("y", None)], [w("W", 4, 1, 3, 3)], group=4)
    assert only(m).macs == Poly(144 * 9)


def test_conv_transpose_counts_input_times_kernel_times_output_channels():
    # 32 input elements, each scattered into 3 output channels x 3x3.
    m = one_node("ConvTranspose", [("x", [1, 2, 4, 4])], [("y", None)], [w("W", 2, 3, 3, 3)], strides=[2, 2])
    assert only(m).macs == Poly(32 * 27)


def test_batched_matmul_counts_output_times_inner_dim():
    m = one_node("MatMul", [("a", [2, 5, 8])], [("y", None)], [w("B", 8, 6)])
    n = only(m)
    assert (n.category, n.macs, n.flops) == ("matmul", Poly(2 * 5 * 6 * 8), Poly(2 * 480))


def test_gemm_with_trans_a_and_bias():
    m = one_node("Gemm", [("a", [8, 5])], [("y", None)], [w("B", 8, 6), w("C", 6)], transA=1)
    n = only(m)
    assert (n.macs, n.flops) == (Poly(5 * 6 * 8), Poly(2 * 240 + 30))


def test_attention_op_of_opset_23_counts_both_products():
    # Q [1,2,4,8], K/V [1,2,6,8]: Q·Kᵀ 2*4*6*8 = 384 MACs, P·V another 384.
    m = one_node("Attention", [("q", [1, 2, 4, 8]), ("k", [1, 2, 6, 8]), ("v", [1, 2, 6, 8])],
                 [("y", [1, 2, 4, 8])], opset=23)
    n = only(m)
    assert (n.category, n.macs) == ("attention", Poly(768))


def test_attention_pattern_of_matmul_softmax_matmul_is_tagged():
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Div", ["s", "scale"], ["s2"]),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    m = make_model(nodes, [tensor("q", [1, 2, 4, 8]), tensor("kt", [1, 2, 8, 4]), tensor("v", [1, 2, 4, 8])],
                   [tensor("y", [1, 2, 4, 8])], [init("scale", np.float32(2.0))])
    report = model_cost(m, memory=False)
    assert report.attention_patterns == 1
    cats = {n.op + str(i): n.category for i, n in enumerate(report.nodes)}
    assert cats == {"MatMul0": "attention", "Div1": "elementwise", "Softmax2": "softmax", "MatMul3": "attention"}
    assert report.by_category["attention"] == Poly(2 * 2 * 4 * 4 * 8)
    softmax = report.nodes[2]
    assert (softmax.macs, softmax.flops) == (Poly(0), Poly(3 * 32))


def test_matmul_with_a_weight_is_not_attention():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"]),
             helper.make_node("MatMul", ["p", "V"], ["y"])]
    m = make_model(nodes, [tensor("x", [4, 8])], [tensor("y", [4, 8])], [w("W", 8, 4), w("V", 4, 8)])
    report = model_cost(m, memory=False)
    assert report.attention_patterns == 0
    assert {n.category for n in report.nodes if n.op == "MatMul"} == {"matmul"}


@pytest.mark.parametrize("op,attrs,x,macs,flops", [
    ("Add", {}, [2, 3], 0, 6),
    ("Relu", {}, [2, 3], 0, 6),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [1, 1, 4, 4], 0, 4 * 4),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [1, 1, 4, 4], 16, 32),
    ("GlobalAveragePool", {}, [1, 3, 4, 4], 48, 96),
    ("LayerNormalization", {}, [2, 5], 30, 2 * 30 + 2 * 10),
    ("ReduceMean", {"keepdims": 1}, [2, 5], 10, 20),
])
def test_elementwise_pooling_normalization(op, attrs, x, macs, flops):
    extra = [("x2", x)] if op == "Add" else []
    inits = [w("scale", 5)] if op == "LayerNormalization" else []
    m = one_node(op, [("x", x)] + extra, [("y", None)], inits, **attrs)
    n = only(m)
    assert (n.macs, n.flops) == (Poly(macs), Poly(flops)), n


def test_batch_normalization_is_one_mac_per_element():
    m = one_node("BatchNormalization", [("x", [1, 3, 4, 4])], [("y", None)],
                 [w("s", 3), w("b", 3), w("mu", 3), w("var", 3)])
    assert only(m).macs == Poly(48)


def test_lstm_counts_input_and_recurrent_products_per_step():
    # seq 5, batch 1, input 4, hidden 3: per step W (12x4) + R (12x3) = 84 MACs.
    m = one_node("LSTM", [("x", [5, 1, 4])], [("y", None)], [w("W", 1, 12, 4), w("R", 1, 12, 3)], hidden_size=3)
    n = only(m)
    assert (n.category, n.macs) == ("recurrent", Poly(5 * 84))


def test_data_movement_costs_nothing():
    m = one_node("Transpose", [("x", [2, 3])], [("y", None)], perm=[1, 0])
    assert (only(m).macs, only(m).flops) == (Poly(0), Poly(0))


# -- symbolic and unknown dims -----------------------------------------------------------------
def test_symbolic_dims_stay_symbols_and_input_shapes_resolve_them():
    m = one_node("MatMul", [("a", ["N", 8])], [("y", None)], [w("B", 8, 6)])
    report = model_cost(m)
    assert report.macs == Poly({("N",): 48}) and str(report.macs) == "48*N"
    assert report.symbols == ["N"] and report.to_json()["macs"] == "48*N"
    # activations: a [N,8] and y [N,6] floats live together
    assert report.memory.peak == Poly({("N",): 4 * 14})
    resolved = model_cost(m, input_shapes={"a": [3, 8]})
    assert resolved.macs == Poly(144) and resolved.to_json()["macs"] == 144
    assert resolved.memory.to_json()["peak_bytes"] == 3 * 14 * 4


def test_runtime_shape_becomes_a_named_symbol():
    # A Reshape to a runtime shape: the MatMul's rows are a symbol made by shape inference.
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [4, 8]), tensor("shape", [2], TensorProto.INT64)],
                              [tensor("y", None)], [w("W", 8, 6)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = model_cost(m, memory=False)
    (sym,) = report.symbols
    assert report.macs == Poly({(sym,): 48})


def test_feeds_resolve_what_inference_cannot_by_observing_a_run():
    # The reshape target is a runtime input: only a run tells that r is [2, 16].
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [4, 8]), tensor("shape", [2], TensorProto.INT64)],
                              [tensor("y", None)], [w("W", 16, 6)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.ones((4, 8), np.float32), "shape": np.array([2, 16], np.int64)}
    report = model_cost(m, feeds=feeds)
    assert report.macs == Poly(2 * 6 * 16) and not report.symbols
    # step 0 (Reshape): x 128 + shape 16 + r 128 = 272; step 1 (MatMul): r 128 + y 48 = 176
    assert report.memory.peak == Poly(272) and report.memory.at_node == "Reshape"


def test_unknown_rank_makes_the_node_uncounted_not_zero():
    m = one_node("MatMul", [("a", None)], [("y", None)], [w("B", 8, 6)])
    report = model_cost(m)
    assert report.unknown == ["MatMul"] and report.macs == Poly(0)
    assert report.to_json()["uncounted_nodes"] == ["MatMul"]
    assert report.memory.unsized  # a and y have no size


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1,3,8,8", "ids=1x128"]) == {"x": [1, 3, 8, 8], "ids": [1, 128]}
    with pytest.raises(UsageError, match="NAME:D1"):
        parse_input_shapes(["x:1,a"])
    m = one_node("Relu", [("x", [2, 3])], [("y", None)])
    with pytest.raises(UsageError, match="unknown input"):
        model_cost(m, input_shapes={"nope": [1]})
    with pytest.raises(UsageError, match="rank 2"):
        model_cost(m, input_shapes={"x": [1, 2, 3]})


# -- weights -----------------------------------------------------------------------------------
def test_int4_weights_count_half_a_byte_and_zeros_count_as_sparsity():
    q = helper.make_tensor("q", TensorProto.INT4, [2, 5], [1, 0, -1, 2, 0, 0, 3, 0, 1, 0])
    dense = numpy_helper.from_array(np.array([[0, 1], [0, 0]], np.float32), "d")
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["wq"], axis=0),
             helper.make_node("MatMul", ["x", "wq"], ["y1"]),
             helper.make_node("Add", ["y1", "d2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [1, 2])], [tensor("y", None)],
                              [q, numpy_helper.from_array(np.ones(2, np.float32), "s"), dense,
                               numpy_helper.from_array(np.zeros((1, 5), np.float32), "d2")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    infos = {i.name: i for i in weight_infos(m)}
    assert (infos["q"].params, infos["q"].bytes, infos["q"].bits, infos["q"].kind) == (10, 5, 4.0, "quantized")
    assert (infos["d"].bytes, infos["d"].zeros, infos["d"].sparsity) == (16, 3, 0.75)


def test_matmul_nbits_counts_logical_weights_and_packed_bytes():
    # N=6, K=16, 4 bits, block 16: B packed [6, 1, 8] uint8 = 48 bytes for 96 weights.
    packed = numpy_helper.from_array(np.zeros((6, 1, 8), np.uint8), "B")
    scales = numpy_helper.from_array(np.ones(6, np.float32), "S")
    m = one_node("MatMulNBits", [("a", [2, 16])], [("y", [2, 6])], [packed, scales], domain="com.microsoft",
                 K=16, N=6, bits=4, block_size=16)
    infos = {i.name: i for i in weight_infos(m)}
    assert (infos["B"].params, infos["B"].bytes, infos["B"].bits) == (96, 48, 4.0)
    assert only(m).macs == Poly(2 * 16 * 6)


def test_sparse_initializer_counts_dense_params_and_stored_bytes():
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([1, 7], np.int64), "S_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "S"], ["y"])], "g", [tensor("x", [1, 4])],
                              [tensor("y", None)], sparse_initializer=[sparse])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (info,) = weight_infos(m)
    assert (info.kind, info.params, info.bytes, info.zeros) == ("sparse", 16, 2 * 4 + 2 * 8, 14)


def test_constant_node_values_are_weights():
    m = make_model([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((3, 3), np.float32))),
                    helper.make_node("MatMul", ["x", "c"], ["y"])], [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    report = model_cost(m)
    assert (report.params, report.weight_bytes) == (9, 36)
    assert report.memory.weights == 36


# -- activation memory -------------------------------------------------------------------------
def test_activation_memory_of_a_chain_matches_a_hand_count():
    # x -> Relu a -> Relu b; y = a + b (float32, 100 elements = 400 bytes each).
    # step 0 Relu:  x, a        = 800
    # step 1 Relu:  a, b        = 800   (x is dead after step 0)
    # step 2 Add:   a, b, y     = 1200  <- peak
    # step 3 Relu:  y, z        = 800
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"), helper.make_node("Relu", ["a"], ["b"], name="r1"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add"), helper.make_node("Relu", ["y"], ["z"], name="r2")]
    m = make_model(nodes, [tensor("x", [1, 100])], [tensor("z", [1, 100])])
    inferred = onnx.shape_inference.infer_shapes(m)
    mem = activation_memory(inferred.graph, None, weight_bytes=123)
    assert mem.peak == Poly(1200) and mem.at_node == "add"
    assert {n for n, _ in mem.live} == {"a", "b", "y"}
    assert mem.total == Poly(1323) and mem.unsized == []


def test_graph_output_stays_live_to_the_end():
    # a is a graph output, so it is still live when the big tensor c is made at the last step.
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("Concat", ["b", "b"], ["c"], axis=0)]
    m = make_model(nodes, [tensor("x", [10])], [tensor("a", [10]), tensor("c", [20])])
    mem = activation_memory(onnx.shape_inference.infer_shapes(m).graph)
    # step 2: a (40) + b (40) + c (80); x died at step 1
    assert mem.peak == Poly(160)


def test_real_model_digits_cnn_costs(digits_model):
    report = model_cost(onnx.load(digits_model), input_shapes={"image": [1, 1, 8, 8]})
    # Hand count from examples/README.md's architecture (8x8 input, 3x3 convs, padding 1):
    # conv1 1->16: 64*16*9; conv2 16->32: 64*32*144; two residual convs 32->32: 2*64*32*288;
    # gemm 512->64 and 64->10.
    conv = 64 * 16 * 9 + 64 * 32 * 144 + 2 * 64 * 32 * 288
    assert report.by_category["conv"] == Poly(conv)
    assert report.by_category["matmul"] == Poly(512 * 64 + 64 * 10)
    assert report.params == 57227 and not report.unknown
