"""fuse-conv-bn: Conv/ConvTranspose + inference BatchNormalization fold into the conv."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tests.real_models import real_model
from tests.graphs import conv_bn_relu, init, make_model, tensor
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import load
from onnxopt.ir.digest import model_digest as graph_digest
from onnxopt.pipeline.registry import get_pass
from onnxopt.target import load_target
from onnxopt.testing import assert_equivalent, op_histogram, run_pass

NP_TO_ONNX = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def conv_bn(op="Conv", dims=2, group=1, bias=True, dtype=np.float32, c_in=4, c_out=6, seed=0,
            bn_attrs=None, bn_outputs=("n",), extra_reader=False, bn_is_output=False) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose -> BatchNormalization -> Relu (or straight to y)."""
    r = np.random.default_rng(seed)
    k = (3,) * dims
    if op == "Conv":
        w_shape = (c_out, c_in // group, *k)
    else:
        w_shape = (c_in, c_out // group, *k)
    inits = [init("w", r.standard_normal(w_shape).astype(dtype))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", r.standard_normal(c_out).astype(dtype)))
        conv_in.append("b")
    inits += [init("s", r.uniform(0.5, 1.5, c_out).astype(dtype)), init("bb", r.standard_normal(c_out).astype(dtype)),
              init("m", r.standard_normal(c_out).astype(dtype)), init("v", r.uniform(0.5, 2, c_out).astype(dtype))]
    nodes = [helper.make_node(op, conv_in, ["c"], group=group, pads=[1] * (2 * dims), name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], list(bn_outputs), epsilon=1e-3,
                              **(bn_attrs or {}))]
    elem = NP_TO_ONNX[dtype]
    spatial = (5,) * dims
    outputs = [tensor("n" if bn_is_output else "y", [1, c_out, *spatial], elem)]
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["n"], ["y"]))
    if extra_reader:  # the conv output is also read by a Sigmoid: the BN must not be folded
        nodes.append(helper.make_node("Sigmoid", ["c"], ["z"]))
        outputs.append(tensor("z", [1, c_out, *spatial], elem))
    return make_model(nodes, [tensor("x", [1, c_in, *spatial], elem)], outputs, inits)


def applied(result) -> dict:
    """The rules that rewrote something, with their counts."""
    return {k: v for k, v in result.stats.items() if k != "skipped" and v}


def fused(proto, **kw):
    out, result = run_pass("fuse-conv-bn", proto, **kw)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def reference_outputs(proto, feeds):
    return ReferenceEvaluator(proto).run(None, feeds)


def assert_untouched(proto):
    """The pass reports no change and leaves the graph exactly as it was."""
    m = load(proto)
    before = graph_digest(m)
    result = get_pass("fuse-conv-bn")().run(m, PassContext(target=load_target("cpu")))
    assert not result.changed and result.stats["conv-bn"] == 0
    assert graph_digest(m) == before
    return result


CASES = {
    "conv2d": dict(),
    "conv2d-no-bias": dict(bias=False),
    "conv2d-grouped": dict(group=2),
    "conv2d-depthwise": dict(group=4, c_out=4),
    "conv1d": dict(dims=1),
    "conv3d": dict(dims=3),
    "convtranspose2d": dict(op="ConvTranspose"),
    "convtranspose2d-grouped": dict(op="ConvTranspose", group=2),
    "convtranspose1d-no-bias": dict(op="ConvTranspose", dims=1, bias=False),
    "convtranspose3d-grouped": dict(op="ConvTranspose", dims=3, group=2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_folds_and_keeps_outputs(case):
    proto = conv_bn(**CASES[case])
    op = CASES[case].get("op", "Conv")
    out, result = fused(proto)
    assert op_histogram(proto) == {op: 1, "BatchNormalization": 1, "Relu": 1}
    assert op_histogram(out) == {op: 1, "Relu": 1}
    assert result.changed and result.stats["conv-bn"] == 1
    assert sum(result.stats[r] for r in ("conv-add", "conv-sub", "conv-mul", "conv-div")) == 0
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] == "n"
    assert_equivalent(proto, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64], ids=["float16", "double"])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_weights_keep_their_dtype(dtype, op):
    # (onnx's reference ConvTranspose does not handle groups; grouped ones run in ORT above)
    proto = conv_bn(op=op, dtype=dtype, group=2 if op == "Conv" else 1)
    out, result = fused(proto)
    assert applied(result) == {'conv-bn': 1}
    elem = NP_TO_ONNX[dtype]
    assert {i.data_type for i in out.graph.initializer} == {elem}
    # onnxruntime's CPU Conv has no double kernel: compare with onnx's reference evaluator
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 5)).astype(dtype)
    (want,), (got,) = reference_outputs(proto, {"x": x}), reference_outputs(out, {"x": x})
    assert got.dtype == dtype
    tol = 2e-2 if dtype == np.float16 else 1e-10
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


def test_bn_writing_a_graph_output_keeps_the_name():
    proto = conv_bn(bn_is_output=True)
    out, result = fused(proto)
    assert op_histogram(out) == {"Conv": 1}
    assert out.graph.node[0].output[0] == "n" and [o.name for o in out.graph.output] == ["n"]
    assert_equivalent(proto, out)


def test_bn_output_read_twice_still_folds():
    proto = conv_bn()
    proto.graph.node.append(helper.make_node("Neg", ["n"], ["z"]))
    proto.graph.output.append(tensor("z", [1, 6, 5, 5]))
    out, result = fused(proto)
    assert applied(result) == {'conv-bn': 1}
    assert_equivalent(proto, out)


def test_conv_output_shared_with_another_reader_is_not_folded():
    result = assert_untouched(conv_bn(extra_reader=True))
    assert result.stats["skipped"] == {"conv-bn: conv output has other consumers": 1}


def test_training_mode_bn_is_not_folded():
    proto = conv_bn(bn_attrs={"training_mode": 1}, bn_outputs=("n", "running_mean", "running_var"))
    result = assert_untouched(proto)
    assert result.stats["skipped"] == {"conv-bn: BatchNormalization is not in inference form": 1}


def test_non_constant_weight_is_not_folded():
    proto = conv_bn()
    w = next(i for i in proto.graph.initializer if i.name == "w")
    proto.graph.initializer.remove(w)
    proto.graph.input.append(tensor("w", list(w.dims)))
    result = assert_untouched(proto)
    assert result.stats["skipped"] == {"conv-bn: conv weight is not constant": 1}


def test_shared_weight_initializer_is_not_mutated():
    """Two convs read one weight; only the one followed by BN is folded."""
    proto = conv_bn()
    proto.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["c2"], pads=[1, 1, 1, 1]))
    proto.graph.output.append(tensor("c2", [1, 6, 5, 5]))
    out, result = fused(proto)
    assert applied(result) == {'conv-bn': 1}
    names = {i.name for i in out.graph.initializer}
    assert "w" in names and len(names) == 4  # w, b for the plain conv + fused weight and bias
    assert_equivalent(proto, out)


def test_folds_inside_if_branch():
    body = conv_bn()
    then_g = helper.make_graph(list(body.graph.node), "then", [], [tensor("y", [1, 6, 5, 5])],
                               initializer=list(body.graph.initializer))
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"]),
                                helper.make_node("Pad", ["e", "pads"], ["e_out"])], "else", [],
                               [tensor("e_out", [1, 6, 5, 5])],
                               initializer=[init("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    proto = make_model([helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)],
                       [tensor("cond", [], TensorProto.BOOL), tensor("x", [1, 4, 5, 5])], [tensor("out", [1, 6, 5, 5])])
    out, result = fused(proto)
    assert applied(result) == {'conv-bn': 1}
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_out.node] == ["Conv", "Relu"]
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 5)).astype(np.float32)
    assert_equivalent(proto, out, feeds={"cond": np.array(True), "x": x})


def test_second_run_changes_nothing():
    out, _ = fused(conv_bn_relu())
    again, result = run_pass("fuse-conv-bn", out)
    assert not result.changed


def test_digits_cnn(digits_model):
    lifted, _ = run_pass("lift-constants", str(digits_model))
    out, result = fused(lifted)
    assert result.stats["conv-bn"] == op_histogram(lifted).get("BatchNormalization", 0) > 0
    assert "BatchNormalization" not in op_histogram(out)
    assert_equivalent(lifted, out)


def test_ppocr_cls_all_batchnorms_fold():
    lifted, _ = run_pass("lift-constants", str(real_model("ppocr_mobile_v2_cls.onnx")))
    out, result = fused(lifted)
    assert result.stats["conv-bn"] == op_histogram(lifted)["BatchNormalization"] == 35
    assert_equivalent(lifted, out, rtol=1e-3, atol=1e-4)


def test_shared_builder_grouped_convtranspose_without_bias():
    from tests.graphs import convtranspose_bn_grouped

    proto = convtranspose_bn_grouped()
    out, result = fused(proto)
    assert op_histogram(out) == {"ConvTranspose": 1} and applied(result) == {'conv-bn': 1}
    assert_equivalent(proto, out)


def conv_add(op="Conv", bias=True, addend_shape=(1, 6, 1, 1), addend_first=False, seed=3, binary="Add") -> onnx.ModelProto:
    """x -> Conv/ConvTranspose [+ bias] -> Add (or Mul) of a constant -> y."""
    r = np.random.default_rng(seed)
    w_shape = (6, 4, 3, 3) if op == "Conv" else (4, 6, 3, 3)
    inits = [init("w", r.standard_normal(w_shape).astype(np.float32)),
             init("a", r.standard_normal(addend_shape).astype(np.float32))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", r.standard_normal(6).astype(np.float32)))
        conv_in.append("b")
    nodes = [helper.make_node(op, conv_in, ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(binary, ["a", "c"] if addend_first else ["c", "a"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 6, 5, 5])], inits)


@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(addend_shape=(6, 1, 1)), dict(addend_shape=()),
                                dict(addend_shape=(1,)), dict(addend_first=True),
                                dict(op="ConvTranspose", bias=False)], ids=str)
def test_per_channel_add_becomes_the_bias(kw):
    proto = conv_add(**kw)
    out, result = fused(proto)
    assert op_histogram(out) == {kw.get("op", "Conv"): 1}
    assert applied(result) == {'conv-add': 1}
    assert out.graph.node[0].output[0] == "y" and len(out.graph.node[0].input) == 3
    assert_equivalent(proto, out)


@pytest.mark.parametrize("shape,reason", [((1, 6, 6, 6), "constant is not per channel"),
                                          ((6,), "constant is not per channel"),  # along W
                                          ((1, 1, 6, 1, 1), "constant has a higher rank than the conv output")],
                         ids=str)
def test_add_that_is_not_per_channel_is_left_alone(shape, reason):
    out_shape = list(np.broadcast_shapes((1, 6, 6, 6), shape))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "a"], ["y"])]
    proto = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", out_shape)],
                       [init("w", np.ones((6, 4, 3, 3), np.float32)), init("a", np.ones(shape, np.float32))])
    assert assert_untouched(proto).stats["skipped"] == {f"conv-add: {reason}": 1}


@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(addend_shape=()), dict(addend_first=True),
                                dict(op="ConvTranspose"), dict(op="ConvTranspose", addend_shape=(6, 1, 1))], ids=str)
def test_per_channel_mul_scales_weights_and_bias(kw):
    proto = conv_add(binary="Mul", **kw)
    out, result = fused(proto)
    assert op_histogram(out) == {kw.get("op", "Conv"): 1}
    assert applied(result) == {'conv-mul': 1}
    assert out.graph.node[0].output[0] == "y"
    assert_equivalent(proto, out)


def test_mul_by_a_non_constant_is_left_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["c", "x2"], ["y"])]
    proto = make_model(nodes, [tensor("x", [1, 4, 6, 6]), tensor("x2", [1, 6, 6, 6])], [tensor("y", [1, 6, 6, 6])],
                       [init("w", np.ones((6, 4, 3, 3), np.float32))])
    assert assert_untouched(proto).stats["skipped"] == {"conv-mul: multiplier is not constant": 1}


def test_bn_after_conv_add_folds_too():
    proto = conv_add()
    proto.graph.node[1].output[0] = "c2"
    r = np.random.default_rng(7)
    proto.graph.node.append(helper.make_node("BatchNormalization", ["c2", "s", "bb", "m", "v"], ["y"]))
    proto.graph.initializer.extend([init("s", r.uniform(0.5, 1.5, 6).astype(np.float32)), init("bb", r.standard_normal(6).astype(np.float32)),
                                    init("m", r.standard_normal(6).astype(np.float32)), init("v", r.uniform(0.5, 2, 6).astype(np.float32))])
    out, result = fused(proto)
    assert op_histogram(out) == {"Conv": 1} and applied(result) == {'conv-bn': 1, 'conv-add': 1}
    assert_equivalent(proto, out)


# -- per-channel Sub/Div after the conv, scale/shift before it ------------------------------
def conv_then(op: str, value, group=1, pads=(1, 1, 1, 1), before=False, c_in=4, c_out=6, rank_value=4):
    """x -> [op before] -> Conv -> [op after] -> y, op with a per-channel constant."""
    r = np.random.default_rng(3)
    channels = c_in if before else c_out
    const = np.asarray(value(channels) if callable(value) else value, np.float32)
    if const.ndim == 1 and rank_value == 4:
        const = const.reshape(1, -1, 1, 1)
    inits = [init("w", r.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32)),
             init("b", r.standard_normal(c_out).astype(np.float32)), init("k", const)]
    if before:
        nodes = [helper.make_node(op, ["x", "k"], ["xe"]),
                 helper.make_node("Conv", ["xe", "w", "b"], ["y"], group=group, pads=list(pads))]
    else:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=group, pads=list(pads)),
                 helper.make_node(op, ["c", "k"], ["y"])]
    out_hw = 5 + sum(pads) // 2 - 2
    return make_model(nodes, [tensor("x", [1, c_in, 5, 5])], [tensor("y", [1, c_out, out_hw, out_hw])], inits)


def per_channel(n):
    return np.linspace(0.5, 2.0, n)


@pytest.mark.parametrize("op,rule", [("Sub", "conv-sub"), ("Div", "conv-div")])
def test_sub_and_div_after_the_conv_fold(op, rule):
    proto = conv_then(op, per_channel)
    out, result = fused(proto)
    assert result.stats[rule] == 1 and op_histogram(out) == {"Conv": 1}
    assert_equivalent(proto, out, rtol=1e-4, atol=1e-5)


def test_div_by_a_zero_is_refused():
    proto = conv_then("Div", lambda n: np.where(np.arange(n) == 2, 0.0, 1.0))
    out, result = fused(proto)
    assert not result.changed and result.stats["skipped"] == {"conv-div: divisor has a zero": 1}


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("group,c_out", [(1, 6), (2, 6), (4, 4)], ids=["dense", "grouped", "depthwise"])
def test_scale_before_the_conv_folds_into_its_input_channels(op, group, c_out):
    proto = conv_then(op, per_channel, group=group, c_out=c_out, before=True)
    out, result = fused(proto)
    assert result.stats["scale-into-conv"] == 1 and op_histogram(out) == {"Conv": 1}
    assert_equivalent(proto, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_shift_before_the_conv_folds_only_without_padding(op):
    padded = conv_then(op, per_channel, before=True)
    out, result = fused(padded)
    assert not result.changed
    assert result.stats["skipped"] == {"shift-into-conv: the conv pads its input (the border would not see "
                                       "the shift)": 1}
    unpadded = conv_then(op, per_channel, before=True, pads=(0, 0, 0, 0), group=2)
    out, result = fused(unpadded)
    assert result.stats["shift-into-conv"] == 1 and op_histogram(out) == {"Conv": 1}
    assert_equivalent(unpadded, out, rtol=1e-4, atol=1e-4)


def test_constant_along_the_width_is_not_per_channel():
    # a [C] constant broadcasts along the last axis (W), not the channels, even when W == C
    proto = conv_then("Mul", per_channel(5), rank_value=1, c_out=5)
    out, result = fused(proto)
    assert not result.changed and result.stats["skipped"] == {"conv-mul: constant is not per channel": 1}
