"""If, Loop, Scan and local functions: optimized inside correctly, or left alone; never broken
(issue 8.3).

Each model puts work for the lossless passes *inside* the subgraph or function (Identity,
Constant, dead nodes, Conv+BatchNormalization, MatMul+Add, duplicate nodes) and reads
outer-scope tensors from it, which is where a pass that forgets about scopes breaks things
(removing an outer tensor a body still reads, renaming it, folding it away). Every lossless
pass alone, and the `lossless` pipeline, must keep the model valid and its outputs equal in
onnxruntime for feeds that take every branch. When the pipeline leaves a subgraph or
function as it was, the test only asks that it is intact.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.real_models import real_model
from tests.graphs import init, make_model, tensor
from onnxopt.measure import verify
from onnxopt.optimize import optimize
from onnxopt.pipeline.registry import all_passes, builtin_names
from onnxopt.testing import run_pass

R = np.random.default_rng(11)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _conv_bn(prefix: str, src: str, dst: str) -> tuple[list, list]:
    nodes = [helper.make_node("Conv", [src, f"{prefix}w"], [f"{prefix}c"], name=f"{prefix}conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", [f"{prefix}c", f"{prefix}s", f"{prefix}b", f"{prefix}m", f"{prefix}v"],
                              [dst], name=f"{prefix}bn")]
    inits = [init(f"{prefix}w", f32(3, 3, 3, 3)), init(f"{prefix}s", R.uniform(0.5, 1.5, 3).astype(np.float32)),
             init(f"{prefix}b", f32(3)), init(f"{prefix}m", f32(3)), init(f"{prefix}v", R.uniform(0.5, 2, 3).astype(np.float32))]
    return nodes, inits


def if_model() -> onnx.ModelProto:
    """If: the then branch holds Conv+BN (its own weights), an Identity and a dead Relu; the
    else branch a Constant and a duplicated Mul; both read the outer tensor `pre` and the outer
    initializer `shift`."""
    conv_bn, conv_inits = _conv_bn("t_", "pre", "t_bn")
    then_g = helper.make_graph(
        conv_bn + [helper.make_node("Identity", ["t_bn"], ["t_id"], name="t_identity"),
                   helper.make_node("Relu", ["t_id"], ["t_dead"], name="t_dead"),
                   helper.make_node("Add", ["t_id", "shift"], ["t_out"], name="t_add")],
        "then", [], [tensor("t_out", [1, 3, 4, 4])], initializer=conv_inits)
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["e_k"], name="e_const", value_float=2.0),
         helper.make_node("Mul", ["pre", "e_k"], ["e_m1"], name="e_mul1"),
         helper.make_node("Mul", ["pre", "e_k"], ["e_m2"], name="e_mul2"),
         helper.make_node("Add", ["e_m1", "e_m2"], ["e_sum"], name="e_add"),
         helper.make_node("Add", ["e_sum", "shift"], ["e_out"], name="e_shift")],
        "else", [], [tensor("e_out", [1, 3, 4, 4])])
    nodes = [helper.make_node("Identity", ["x"], ["pre"], name="pre"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [1, 3, 4, 4])],
                      [tensor("y", [1, 3, 4, 4])], [init("shift", f32(3, 1, 1))])


def if_feeds() -> list[dict]:
    x = f32(1, 3, 4, 4)
    return [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}]


def loop_model() -> onnx.ModelProto:
    """Loop: a carried state updated by MatMul+Add (weights outside the body), an Identity,
    a Constant, a dead node, and a scan output; the trip count comes from an input."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="b_cond"),
         helper.make_node("MatMul", ["v_in", "W"], ["b_mm"], name="b_matmul"),
         helper.make_node("Add", ["b_mm", "B"], ["b_add"], name="b_add"),
         helper.make_node("Identity", ["b_add"], ["b_id"], name="b_identity"),
         helper.make_node("Constant", [], ["b_half"], name="b_const", value_float=0.5),
         helper.make_node("Mul", ["b_id", "b_half"], ["v_out"], name="b_mul"),
         helper.make_node("Neg", ["b_mm"], ["b_dead"], name="b_dead"),
         helper.make_node("Relu", ["v_out"], ["scan_out"], name="b_relu")],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", [2, 4])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", [2, 4]), tensor("scan_out", [2, 4])])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["v_final", "scans"], name="loop", body=body)]
    return make_model(nodes, [tensor("trips", [], TensorProto.INT64), tensor("x", [2, 4])],
                      [tensor("v_final", [2, 4]), tensor("scans", ["n", 2, 4])],
                      [init("W", f32(4, 4)), init("B", f32(4))])


def loop_feeds() -> list[dict]:
    x = f32(2, 4)
    return [{"trips": np.array(3, np.int64), "x": x}, {"trips": np.array(0, np.int64), "x": x}]


def scan_model() -> onnx.ModelProto:
    """Scan (opset 9+ form): running sum over the first axis, with an Identity, a duplicate
    Add and an outer initializer inside the body."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "row"], ["s1"], name="s_add1"),
         helper.make_node("Add", ["acc_in", "row"], ["s2"], name="s_add2"),
         helper.make_node("Mul", ["s1", "scale"], ["s_scaled"], name="s_mul"),
         helper.make_node("Identity", ["s2"], ["acc_out"], name="s_identity"),
         helper.make_node("Add", ["s_scaled", "s2"], ["row_out"], name="s_out")],
        "scan_body", [tensor("acc_in", [3]), tensor("row", [3])], [tensor("acc_out", [3]), tensor("row_out", [3])])
    nodes = [helper.make_node("Scan", ["init", "seq"], ["acc", "rows"], name="scan", body=body, num_scan_inputs=1)]
    return make_model(nodes, [tensor("init", [3]), tensor("seq", [5, 3])], [tensor("acc", [3]), tensor("rows", [5, 3])],
                      [init("scale", np.array([0.5, 1.0, 2.0], np.float32))])


def function_model() -> onnx.ModelProto:
    """A local function (called twice) with an Identity, a Constant and a dead node inside."""
    func = helper.make_function(
        "local", "ScaledRelu", ["a"], ["out"],
        [helper.make_node("Identity", ["a"], ["f_id"]),
         helper.make_node("Constant", [], ["f_k"], value_float=3.0),
         helper.make_node("Mul", ["f_id", "f_k"], ["f_m"]),
         helper.make_node("Neg", ["f_m"], ["f_dead"]),
         helper.make_node("Relu", ["f_m"], ["out"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [helper.make_node("ScaledRelu", ["x"], ["h"], name="call1", domain="local"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
             helper.make_node("ScaledRelu", ["h2"], ["y"], name="call2", domain="local")]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("b", f32(3))])
    model = helper.make_model(graph, functions=[func],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def nested_model() -> onnx.ModelProto:
    """An If inside a Loop body; the inner branches read the loop's carried value and an
    initializer of the main graph two scopes up."""
    then_g = helper.make_graph([helper.make_node("Identity", ["v_in"], ["t_id"], name="in_t_id"),
                                helper.make_node("Add", ["t_id", "bias"], ["t_out"], name="in_t_add")],
                               "then", [], [tensor("t_out", [4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["v_in", "bias"], ["e_out"], name="in_e_sub")],
                               "else", [], [tensor("e_out", [4])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="b_cond"),
         helper.make_node("If", ["flag"], ["v_out"], name="inner_if", then_branch=then_g, else_branch=else_g)],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", [4])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", [4])])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)]
    return make_model(nodes, [tensor("trips", [], TensorProto.INT64), tensor("flag", [], TensorProto.BOOL),
                              tensor("x", [4])], [tensor("y", [4])], [init("bias", f32(4))])


def nested_feeds() -> list[dict]:
    x = f32(4)
    return [{"trips": np.array(2, np.int64), "flag": np.array(f), "x": x} for f in (True, False)]


CASES = {
    "if": (if_model, if_feeds),
    "loop": (loop_model, loop_feeds),
    "scan": (scan_model, lambda: [{"init": f32(3), "seq": f32(5, 3)}]),
    "function": (function_model, lambda: [{"x": f32(2, 3)}]),
    "nested": (nested_model, nested_feeds),
}


def assert_same_outputs(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds_list: list[dict], what: str) -> None:
    onnx.checker.check_model(cand, full_check=True)
    for feeds in feeds_list:
        _, expected = verify.run(ref, feeds)
        _, got = verify.run(cand, feeds)
        problems = verify.compare_outputs(expected, got)
        assert not problems, f"{what}, feeds {sorted(feeds)}: {problems[:2]}"


def lossless_passes() -> list[str]:
    # Built-ins only: other test files register toy passes that break models on purpose.
    names = builtin_names()
    return sorted(name for name, cls in all_passes().items() if cls.lossless and name in names)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_lossless_pass_keeps_control_flow_working(case):
    build, feeds = CASES[case]
    model = build()
    for name in lossless_passes():
        out, _ = run_pass(name, model)
        assert_same_outputs(model, out, feeds(), f"{name} on the {case} model")


def _subgraphs_and_functions(model: onnx.ModelProto) -> list[bytes]:
    found = []

    def walk(graph):
        for node in graph.node:
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    found.append(g.SerializeToString(deterministic=True))
                    walk(g)

    walk(model.graph)
    return found + [f.SerializeToString(deterministic=True) for f in model.functions]


def every_lossless_pass() -> str:
    """All registered lossless passes as one pipeline (the `lossless` pipeline grows towards it)."""
    return ",".join(lossless_passes())


@pytest.mark.parametrize("pipeline", ["lossless", "every-lossless-pass"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lossless_pipeline_keeps_control_flow_working(case, pipeline):
    build, feeds = CASES[case]
    model = build()
    result = optimize(model, pipeline=every_lossless_pass() if pipeline == "every-lossless-pass" else pipeline)
    assert_same_outputs(model, result.model, feeds(), f"lossless pipeline on the {case} model")
    assert not [p for p in result.report["passes"] if p["status"] in ("failed", "rolled-back")], result.report["passes"]
    # Bodies and functions are still there (inlined or dropped would change the structure
    # callers rely on); whether each was optimized is reported below.
    before = _subgraphs_and_functions(model)
    after = _subgraphs_and_functions(result.model)
    assert len(after) == len(before)


def _nodes_inside(model: onnx.ModelProto) -> int:
    total = sum(len(f.node) for f in model.functions)

    def walk(graph):
        nonlocal total
        for node in graph.node:
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    total += len(g.node)
                    walk(g)

    walk(model.graph)
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_subgraphs_are_optimized_or_the_report_says_why(case):
    """Each model hides nodes inside its bodies that some lossless pass removes in a main
    graph (Identity, dead, duplicate, constant): they go, or a note explains."""
    model = CASES[case][0]()
    result = optimize(model, pipeline=every_lossless_pass())
    if _nodes_inside(result.model) < _nodes_inside(model):
        return
    notes = " ".join(result.report["notes"]).lower()
    assert any(word in notes for word in ("subgraph", "function", "body")), (
        f"{case}: nothing inside the bodies/functions was optimized and no note says why "
        f"(notes: {result.report['notes']})")


def test_real_model_with_if_keeps_outputs():
    path = real_model("silero_vad_16k_op15.onnx")
    model = onnx.load(str(path))
    result = optimize(model, pipeline="lossless")
    rng = np.random.default_rng(0)
    feeds = [{"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
              "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(sr, np.int64)} for sr in (16000, 8000)]
    # sr=8000 takes the other branch of the model's If nodes (with 256-sample input).
    feeds[1]["input"] = feeds[1]["input"][:, :256]
    assert_same_outputs(model, result.model, feeds, "lossless pipeline on silero_vad_16k_op15")
