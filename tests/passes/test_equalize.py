"""equalize (passes/equalize.py): cross-layer equalization, lossless, on chains it may touch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.measure.fidelity import Floor
from onnxopt.testing import assert_valid_and_equivalent, check_pass_contract, run_pass
from tests.graphs import init, make_model, rng, tensor
from tests.real_models import real_model


def chain(activation: str = "Relu", depthwise: bool = True) -> onnx.ModelProto:
    """Conv → act → (depthwise Conv → act) → Conv with uneven channel ranges."""
    r = rng(11)
    spread = np.exp(r.uniform(-3, 3, (8, 1, 1, 1))).astype(np.float32)  # channel ranges over ~2.5 decades
    nodes, inits = [], [init("w1", (r.standard_normal((8, 4, 3, 3)) * spread).astype(np.float32)),
                        init("b1", r.standard_normal(8).astype(np.float32))]
    act_inputs = {"PRelu": lambda i: [f"s{i}"]}.get(activation, lambda i: [])
    extra = {"LeakyRelu": {"alpha": 0.1}}.get(activation, {})

    def act(src, dst, i):
        nodes.append(helper.make_node(activation, [src] + act_inputs(i), [dst], **extra))
        if activation == "PRelu":
            inits.append(init(f"s{i}", (r.uniform(0.05, 0.3, (8, 1, 1))).astype(np.float32)))

    nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]))
    act("c1", "a1", 1)
    last = "a1"
    if depthwise:
        inits += [init("wd", r.standard_normal((8, 1, 3, 3)).astype(np.float32)),
                  init("bd", r.standard_normal(8).astype(np.float32))]
        nodes.append(helper.make_node("Conv", ["a1", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=8))
        act("cd", "a2", 2)
        last = "a2"
    inits += [init("w2", r.standard_normal((6, 8, 1, 1)).astype(np.float32)), init("b2", np.zeros(6, np.float32))]
    nodes.append(helper.make_node("Conv", [last, "w2", "b2"], ["y"]))
    return make_model(nodes, [tensor("x", [2, 4, 8, 8])], [tensor("y", [2, 6, 8, 8])], inits)


def mlp_with_bias_add() -> onnx.ModelProto:
    r = rng(12)
    w1 = (r.standard_normal((16, 32)) * np.exp(r.uniform(-2, 2, 32))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1)]
    return make_model(nodes, [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                      [init("w1", w1), init("b1", r.standard_normal(32).astype(np.float32)),
                       init("w2", r.standard_normal((8, 32)).astype(np.float32))])


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", "PRelu"])
def test_equalize_is_lossless_and_evens_the_ranges(activation):
    model = chain(activation)
    out, result = run_pass("equalize", model)
    assert result.changed and result.stats["pairs"] == 2
    assert result.stats["largest_scale"] > 2
    assert_valid_and_equivalent(model, out, rtol=1e-4, atol=1e-4)


def test_equalize_through_a_bias_add_into_a_gemm():
    model = mlp_with_bias_add()
    out, result = run_pass("equalize", model)
    assert result.changed and result.stats["pairs"] == 1
    assert_valid_and_equivalent(model, out, rtol=1e-4, atol=1e-4)


def test_equalize_leaves_a_non_homogeneous_activation_alone():
    model = chain("Sigmoid", depthwise=False)
    _, result = run_pass("equalize", model)
    assert not result.changed and result.stats["pairs"] == 0


def test_equalize_contract():
    check_pass_contract(onnxopt.get_pass("equalize"), [chain(), mlp_with_bias_add()])


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_helps_per_tensor_int8(tmp_path, depthwise):
    model = chain(depthwise=depthwise)
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((6, 2, 4, 8, 8)).astype(np.float32))
    from onnxopt.measure.compare import compare

    snr = {}
    for pipeline in ("quantize-static{per_channel=false}", "equalize,quantize-static{per_channel=false}"):
        result = onnxopt.optimize(model, pipeline=pipeline, calibration=str(path), floor=Floor())
        outputs = compare(model, result.model, data=str(path), latency=False, memory=False)["outputs"]
        snr[pipeline] = outputs["y"]["snr_db"]
    assert snr["equalize,quantize-static{per_channel=false}"] > snr["quantize-static{per_channel=false}"] + 0.5


def test_equalize_on_a_real_model_is_lossless():
    path = real_model("ppocr_mobile_v2_cls.onnx")
    result = onnxopt.optimize(str(path), pipeline="lossless,equalize", verify=True)
    p = result.report["passes"][-1]
    assert p["status"] == "changed" and p["verified"] == "equal" and p["stats"]["pairs"] >= 10
