"""`onnxopt check`: each reason it can give has a tiny model that triggers it; exit codes 0/3/2;
`optimize` ends with the check and refuses dynamic inputs for a static-shape target."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.analysis.target_check import REASONS, check_model
from onnxopt.cli import main
from onnxopt.errors import UsageError
from onnxopt.target import load_target

from tests.graphs import conv_bn_relu, init, make_model, rng, tensor

DIGITS = "examples/digits_cnn.onnx"


def target(tmp_path, text, base="npu"):
    p = tmp_path / "t.toml"
    p.write_text(f'schema = 1\nname = "t"\nextends = "{base}"\n' + text)
    return load_target(p)


def reasons(result):
    return [(f.reason, f.op) for f in result.findings]


def qdq_matmul(per_channel=False, weight_dtype=np.uint8):
    """x -> Q(uint8) -> DQ -> MatMul(DQ(weight)) -> Q -> DQ -> y: an integer MatMul in QDQ form."""
    r = rng(20)
    w = r.integers(0, 255, (4, 6)).astype(weight_dtype) if weight_dtype == np.uint8 else \
        r.integers(-127, 127, (4, 6)).astype(weight_dtype)
    scale = np.full(6, 0.01, np.float32) if per_channel else np.array(0.01, np.float32)
    zero = np.zeros(6 if per_channel else (), weight_dtype)
    dq_w = helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], **({"axis": 1} if per_channel else {}))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]), dq_w,
             helper.make_node("MatMul", ["xf", "wf"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    return make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 6])],
                      [init("w", w), init("ws", scale), init("wz", zero), init("s", np.array(0.05, np.float32)),
                       init("z", np.array(128, np.uint8))])


# -- one tiny model per reason -----------------------------------------------------------------
def test_conforming_integer_model_passes_the_npu():
    result = check_model(qdq_matmul(), "npu")
    assert result.conforms, result.format()


def test_unsupported_op():
    model = make_model([helper.make_node("Erf", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    result = check_model(model, "npu")
    assert ("unsupported-op", "Erf") in reasons(result)
    assert "capabilities.allowed_ops" in result.findings[0].detail


def test_float_compute_and_a_float_model_exits_3(capsys):
    result = check_model(conv_bn_relu(), "npu")
    assert {r for r, _ in reasons(result)} == {"float-compute"} and len(result.findings) == 3
    assert main(["check", DIGITS, "--target", "npu"]) == 3
    out = capsys.readouterr().out
    assert "float-compute" in out and "dynamic-shape" in out and "--input-shape image:1,1,8,8" in out


def test_dynamic_shape_names_the_input_and_the_flag_and_the_node_where_it_starts():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonZero", ["r"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", [2, "K"], TensorProto.INT64)])
    t = load_target("npu")
    t.capabilities["allowed_ops"] = []  # only shapes matter here
    t.capabilities["integer_only"] = False
    t.capabilities["tensor_types"] = []
    result = check_model(model, t)
    assert [(f.reason, f.node) for f in result.findings] == [("dynamic-shape", "input 'x'")]
    assert "--input-shape x:1,4" in result.findings[0].detail
    fixed = check_model(model, t, input_shapes={"x": [3, 4]})
    assert [(f.reason, f.op) for f in fixed.findings] == [("dynamic-shape", "NonZero")]


@pytest.mark.parametrize("build, rules, expect", [
    (lambda: make_model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic")], [tensor("x", [1, 1, 2, 2])],
                        [tensor("y", [1, 1, 4, 4])], [init("sc", np.array([1, 1, 2, 2], np.float32))]),
     "", "mode = 'cubic'; the target takes 'nearest', 'linear'"),
    (lambda: make_model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["x", "z", "s"], ["y"])],
                        [tensor("x", [4])], [tensor("y", [4])], [init("z", np.array([0], np.int64))]),
     "", "input 2 's' is computed at run time"),
    (lambda: make_model([helper.make_node("Gather", ["x", "i"], ["y"])], [tensor("x", [4])], [tensor("y", [2])],
                        [init("i", np.array([0, -1], np.int64))]),
     "", "holds negative values"),
    (lambda: qdq_matmul(per_channel=True), "", "per-channel scales (6)"),
    (lambda: make_model([helper.make_node("Softmax", ["x"], ["y"], axis=0)], [tensor("x", [2, 3])],
                        [tensor("y", [2, 3])]),
     '[capabilities.ops.Softmax.attributes]\naxis = [-1]\n', "axis = 0"),
])
def test_unsupported_attribute(tmp_path, build, rules, expect):
    t = target(tmp_path, rules)
    t.capabilities["integer_only"] = False  # the attribute alone
    result = check_model(build(), t)
    found = [f for f in result.findings if f.reason == "unsupported-attribute"]
    assert len(found) == 1 and expect in found[0].detail, result.format()


def test_softmax_on_the_last_axis_passes_either_spelling(tmp_path):
    t = target(tmp_path, '[capabilities.ops.Softmax.attributes]\naxis = [-1]\n', base="cpu")
    for axis in (1, -1):
        model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], [tensor("x", [2, 3])],
                           [tensor("y", [2, 3])])
        assert check_model(model, t).conforms


def test_unaligned_channels_and_the_interface_exemption():
    r = rng(21)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w1"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 5, 4, 4])],
                       [init("w0", r.standard_normal((6, 3, 1, 1)).astype(np.float32)),
                        init("w1", r.standard_normal((5, 6, 1, 1)).astype(np.float32))])
    t = load_target("cpu")
    t.capabilities["channel_multiple"] = 4
    assert check_model(model, t).conforms  # a multiple where kernels are fast, not a requirement
    t.capabilities["aligned_channels"] = True
    result = check_model(model, t)
    assert [(f.reason, f.node) for f in result.findings] == [("unaligned-channels", "node writing 'a'")]
    assert "6 output channels, not a multiple of 4" in result.findings[0].detail  # 5 is the output's own


def test_unsupported_type(tmp_path):
    t = target(tmp_path, '[capabilities]\ntensor_types = ["int8", "int32"]\n'
                         '[capabilities.ops.MatMul]\ninput_types = ["int8"]\nper_channel_weights = true\n')
    result = check_model(qdq_matmul(), t)
    kinds = reasons(result)
    assert ("unsupported-type", "QuantizeLinear") in kinds and ("unsupported-type", "MatMul") in kinds
    matmul = [f.detail for f in result.findings if f.op == "MatMul"]
    assert any("MatMul takes int8" in d for d in matmul) and any("computes on uint8" in d for d in matmul)


def test_every_reason_is_covered_above():
    assert set(REASONS) == {"unsupported-op", "unsupported-attribute", "float-compute", "dynamic-shape",
                            "unaligned-channels", "unsupported-type"}


def test_subgraph_nodes_are_checked_and_say_where():
    then_g = helper.make_graph([helper.make_node("Erf", ["x"], ["t"])], "then", [], [tensor("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor("e", [2])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [tensor("c", [], TensorProto.BOOL), tensor("x", [2])], [tensor("y", [2])])
    t = load_target("cpu")
    t.capabilities["allowed_ops"] = ["If", "Neg"]
    result = check_model(model, t)
    assert [(f.reason, f.op, f.graph) for f in result.findings] == [("unsupported-op", "Erf", "then")]


# -- the command -------------------------------------------------------------------------------
def test_cli_json_and_exit_codes(tmp_path, capsys):
    path = tmp_path / "q.onnx"
    onnx.save(qdq_matmul(), path)
    assert main(["check", str(path), "--target", "npu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["conforms"] is True and data["target"] == "npu" and data["findings"] == []
    assert main(["check", str(path), "--target", "npu", "--json", "--input-shape", "x:2,4"]) == 0
    capsys.readouterr()
    onnx.save(conv_bn_relu(), path)
    assert main(["check", str(path), "--target", "npu", "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"float-compute": 3} and data["findings"][0]["op"] == "Conv"


@pytest.mark.parametrize("argv, message", [
    (["check", "missing.onnx", "--target", "npu"], "no such model file"),
    (["check", DIGITS, "--target", "npx"], "did you mean 'npu'"),
    (["check", DIGITS, "--target", "npu", "--input-shape", "image:1,x"], "expected NAME:D1,D2"),
    (["check", DIGITS, "--target", "npu", "--input-shape", "img:1,1,8,8"], "unknown input(s) img"),
])
def test_cli_bad_input_exits_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error:") and message in err and err.count("\n") == 1


# -- optimize ------------------------------------------------------------------------------------
def test_optimize_refuses_a_dynamic_model_for_a_static_shape_target():
    with pytest.raises(UsageError, match=r"target 'npu' needs static shapes .*input 'image'.*"
                                         r"--input-shape image:1,1,8,8"):
        onnxopt.optimize(DIGITS, target="npu", calibration="examples/digits_calib.npz")


def test_optimize_ends_with_the_check_and_reports_what_stayed_unsupported():
    result = onnxopt.optimize(DIGITS, target="npu", input_shapes={"image": [8, 1, 8, 8]})  # no data: float
    check = result.report["check"]
    assert check["conforms"] is False and set(check["counts"]) == {"float-compute"}
    assert any(n.startswith("check: ") and "float-compute" in n for n in result.report["notes"])
    quantized = onnxopt.optimize(DIGITS, target="npu", input_shapes={"image": [8, 1, 8, 8]},
                                 calibration="examples/digits_calib.npz")
    assert quantized.report["check"]["conforms"] is True
    assert not any(n.startswith("check: ") for n in quantized.report["notes"])
