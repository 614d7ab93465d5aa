"""align-channels on tiny graphs: zero channels added exactly, left alone where it cannot be exact."""

import numpy as np
import pytest
from onnx import helper

from onnxopt.pipeline.context import PassContext
from onnxopt.target import load_target
from onnxopt.testing import assert_valid_and_equivalent, op_histogram, plain_bytes, run_pass

from tests.graphs import init, make_model, rng, tensor


def ctx(multiple=8):
    t = load_target("cpu")
    t.capabilities["channel_multiple"] = multiple
    t.capabilities["aligned_channels"] = True  # hardware that needs it, as the npu target says
    return PassContext(target=t)


def weights_shapes(proto):
    return {i.name: tuple(i.dims) for i in proto.graph.initializer}


def conv_chain(mid=6, with_bn=True, depthwise=True, affine=True, activation="Sigmoid"):
    """x[1,3,8,8] -> Conv(3->mid) -> [BN] -> act -> [Mul c, Add c] -> [depthwise 3x3] -> Conv(mid->8) -> y."""
    r = rng(10)
    inits = [init("w0", r.standard_normal((mid, 3, 3, 3)).astype(np.float32)),
             init("b0", r.standard_normal(mid).astype(np.float32)),
             init("w1", r.standard_normal((8, mid, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1])]
    last = "c0"
    if with_bn:
        inits += [init("s", r.uniform(0.5, 1.5, mid).astype(np.float32)),
                  init("bb", r.standard_normal(mid).astype(np.float32)),
                  init("m", r.standard_normal(mid).astype(np.float32)),
                  init("v", r.uniform(0.5, 2, mid).astype(np.float32))]
        nodes.append(helper.make_node("BatchNormalization", [last, "s", "bb", "m", "v"], ["bn"]))
        last = "bn"
    nodes.append(helper.make_node(activation, [last], ["act"]))
    last = "act"
    if affine:
        inits += [init("k", r.uniform(0.5, 2, (mid, 1, 1)).astype(np.float32)),
                  init("c", r.standard_normal((1, mid, 1, 1)).astype(np.float32))]
        nodes += [helper.make_node("Mul", [last, "k"], ["mul"]), helper.make_node("Add", ["c", "mul"], ["add"])]
        last = "add"
    if depthwise:
        inits += [init("wd", r.standard_normal((mid, 1, 3, 3)).astype(np.float32)),
                  init("bd", r.standard_normal(mid).astype(np.float32))]
        nodes.append(helper.make_node("Conv", [last, "wd", "bd"], ["dw"], group=mid, pads=[1, 1, 1, 1]))
        last = "dw"
    nodes += [helper.make_node("MaxPool", [last], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Conv", ["p", "w1"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 4, 4])], inits)


def test_conv_chain_is_padded_exactly_through_bn_activation_affine_depthwise_and_pool():
    proto = conv_chain()
    out, result = run_pass("align-channels", proto, ctx=ctx(8))
    assert result.changed and result.stats["layers_padded"] == 1 and result.stats["channels_added"] == 2
    shapes = weights_shapes(out)
    conv0, dw, conv1 = [n for n in out.graph.node if n.op_type == "Conv"]
    assert shapes[conv0.input[1]] == (8, 3, 3, 3) and shapes[conv0.input[2]] == (8,)
    assert shapes[dw.input[1]] == (8, 1, 3, 3) and helper.get_attribute_value(dw.attribute[0]) == 8
    assert shapes[conv1.input[1]] == (8, 8, 1, 1)
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert all(shapes[name] == (8,) for name in bn.input[1:])
    assert_valid_and_equivalent(proto, out)


def test_a_second_run_changes_nothing():
    out, _ = run_pass("align-channels", conv_chain(), ctx=ctx(8))
    _, again = run_pass("align-channels", out, ctx=ctx(8))
    assert not again.changed


def dense_chain(op="Gemm", hidden=10):
    """x[4,16] -> Gemm/MatMul+Add (16->hidden) -> Relu -> Gemm/MatMul (hidden->8) -> Tanh -> y."""
    r = rng(11)
    inits = [init("w0", r.standard_normal((16, hidden)).astype(np.float32)),
             init("b0", r.standard_normal(hidden).astype(np.float32)),
             init("w1", r.standard_normal((hidden, 8)).astype(np.float32))]
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["mm"]), helper.make_node("Add", ["mm", "b0"], ["h"])]
    nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node(op, ["r", "w1"], ["o"]),
              helper.make_node("Tanh", ["o"], ["y"])]
    return make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 8])], inits)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_dense_layers_are_padded_exactly(op):
    proto = dense_chain(op)
    out, result = run_pass("align-channels", proto, ctx=ctx(8))
    assert result.changed and result.stats["channels_added"] == 6
    shapes = weights_shapes(out)
    first, second = [n for n in out.graph.node if n.op_type == op]
    assert shapes[first.input[1]] == (16, 16) and shapes[second.input[1]] == (16, 8)
    assert_valid_and_equivalent(proto, out)


def residual_add():
    """Conv(3->6) and Conv(3->6) added (two activations): padding one needs the other padded too."""
    r = rng(12)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Conv", ["x", "wb"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Conv", ["s", "wc"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 8, 4, 4])],
                      [init("wa", r.standard_normal((6, 3, 1, 1)).astype(np.float32)),
                       init("wb", r.standard_normal((6, 3, 1, 1)).astype(np.float32)),
                       init("wc", r.standard_normal((8, 6, 1, 1)).astype(np.float32))])


@pytest.mark.parametrize("build, reason", [
    (residual_add, "passes Add with another branch"),
    (lambda: conv_chain(mid=6, activation="Log"), "passes Log"),
])
def test_left_alone_where_padding_is_not_exact(build, reason):
    proto = build()
    out, result = run_pass("align-channels", proto, ctx=ctx(8))
    assert not result.changed and reason in result.stats["skipped"]
    assert out.SerializeToString() == plain_bytes(proto)


def test_channels_that_reach_a_graph_output_are_the_interface():
    proto = dense_chain("Gemm", hidden=16)  # only the last layer (8 of 8) and nothing unaligned
    r = rng(13)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"])]
    head = make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 10])],
                      [init("w", r.standard_normal((16, 10)).astype(np.float32))])
    for model in (proto, head):
        _, result = run_pass("align-channels", model, ctx=ctx(8))
        assert not result.changed
    assert result.stats["skipped"] == {"reaches a graph output": 1}


def test_no_multiple_no_change():
    proto = conv_chain()
    out, result = run_pass("align-channels", proto)  # the cpu target needs no aligned channels
    assert not result.changed and out.SerializeToString() == plain_bytes(proto)
    assert op_histogram(out) == op_histogram(proto)


def test_option_overrides_the_target():
    _, result = run_pass("align-channels", conv_chain(), multiple=4)
    assert result.changed and result.stats["multiple"] == 4 and result.stats["channels_added"] == 2


@pytest.mark.parametrize("name, shape", [("ppocr_mobile_v2_cls.onnx", [1, 3, 48, 192]),
                                         ("ppocr_v4_det.onnx", [1, 3, 64, 64])])
def test_real_models_keep_their_outputs(name, shape):
    """After the lossless pipeline (BatchNorms fused), at the npu's alignment of 32."""
    import onnxopt

    from tests.real_models import real_model

    lossless = onnxopt.optimize(str(real_model(name)), pipeline="lossless").model
    out, result = run_pass("align-channels", lossless, ctx=ctx(32))
    assert result.changed and result.stats["layers_padded"] > 0
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    assert_valid_and_equivalent(lossless, out, {lossless.graph.input[0].name: x}, rtol=1e-3, atol=1e-4)


def hard_swish_and_se(se=False):
    """Conv(3->6) -> x * HardSigmoid(x) (hard-swish) [-> * Sigmoid(Conv(GAP(x))) from another
    layer: a squeeze-excitation branch] -> Conv(6->8)."""
    r = rng(14)
    inits = [init("w0", r.standard_normal((6, 3, 1, 1)).astype(np.float32)),
             init("w1", r.standard_normal((8, 6, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("HardSigmoid", ["a"], ["hs"]),
             helper.make_node("Mul", ["a", "hs"], ["h"])]
    last = "h"
    if se:
        inits.append(init("ws", r.standard_normal((6, 6, 1, 1)).astype(np.float32)))
        nodes += [helper.make_node("GlobalAveragePool", ["h"], ["g"]), helper.make_node("Conv", ["g", "ws"], ["gs"]),
                  helper.make_node("Sigmoid", ["gs"], ["gate"]), helper.make_node("Mul", ["h", "gate"], ["se"])]
        last = "se"
    nodes.append(helper.make_node("Conv", [last, "w1"], ["y"]))
    return make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 8, 4, 4])], inits)


def test_hard_swish_is_followed_and_a_squeeze_excitation_branch_stops_it():
    proto = hard_swish_and_se()
    out, result = run_pass("align-channels", proto, ctx=ctx(8))
    assert result.changed and result.stats["layers_padded"] == 1
    assert_valid_and_equivalent(proto, out)
    # with SE, the Mul by the gate meets another layer's output: that layer would need padding too
    se = hard_swish_and_se(se=True)
    _, result = run_pass("align-channels", se, ctx=ctx(8))
    assert result.stats["skipped"].get("passes Mul with another branch", 0) >= 1
