"""The `lossless` pipeline never changes a result of the ONNX node conformance suite.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` (generated from the
installed onnx) that onnxruntime passes as it is must still pass after
``onnxopt.optimize(model, target="cpu", pipeline="lossless")``: optimize must not raise,
the model must load and run, and its outputs must match the suite's expected outputs
with the suite's own comparison. The harness is tools/conformance.py (also a CLI).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from tests.tools import load_tool

harness = load_tool("conformance")


def lossless(model: onnx.ModelProto):
    result = onnxopt.optimize(model, target="cpu", pipeline="lossless")
    return result.model, harness.pass_problems(result.report)


def _report(result, kinds=("crashes", "mismatches")) -> str:
    lines = [result.summary()]
    for kind in kinds:
        lines += [f"{kind.upper()} {name}: {err}" for name, err in sorted(getattr(result, kind).items())]
    if result.input_modified:
        lines.append("INPUT MODIFIED: " + " ".join(sorted(result.input_modified)))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cases():
    return harness.load_cases()


@pytest.fixture(scope="module")
def lossless_result(cases):
    """The whole suite through the lossless pipeline, once for the tests below."""
    return harness.run_suite(cases, {"lossless": lossless})["lossless"]


def test_lossless_pipeline_keeps_every_onnxruntime_passing_case(cases, lossless_result):
    result = lossless_result
    # The suite must actually have been exercised (not skipped by an ORT problem).
    assert len(result.ort_passing) > 0.75 * len(cases), result.summary()
    assert not result.crashes and not result.mismatches and not result.input_modified, _report(result)


def test_no_lossless_pass_raises_or_is_rolled_back_on_the_suite(lossless_result):
    # The manager's rollback keeps results right; a pass that needed it is still a bug.
    assert not lossless_result.notes, _report(lossless_result, kinds=("notes",))


def test_harness_catches_a_wrong_result(cases):
    """The comparison is not vacuous: a transform that changes a result is reported."""
    picked = [c for c in cases if c.name in ("test_relu", "test_abs", "test_identity_sequence")]

    def negate_first_output(model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        graph = out.graph
        if graph.output[0].type.WhichOneof("value") != "tensor_type":
            raise RuntimeError("only tensors")
        name = graph.output[0].name
        for node in graph.node:
            node.output[:] = [o + "_pre" if o == name else o for o in node.output]
        graph.node.append(onnx.helper.make_node("Neg", [name + "_pre"], [name]))
        return out

    result = harness.run_suite(picked, {"broken": negate_first_output})["broken"]
    assert len(result.ort_passing) == 3
    assert sorted(result.mismatches) == ["test_abs", "test_relu"]
    assert list(result.crashes) == ["test_identity_sequence"]


def test_optimize_from_a_path_and_save(tmp_path, cases):
    case = next(c for c in cases if c.name == "test_conv_with_strides_padding")
    src = tmp_path / "model.onnx"
    onnx.save(case.model, src)
    before = src.read_bytes()
    result = onnxopt.optimize(src, target="cpu", pipeline="lossless")
    out = tmp_path / "model.opt.onnx"
    result.save(out)
    assert src.read_bytes() == before
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    harness.run_case(saved, case)
    inputs, expected = case.data_sets[0]
    got = harness.make_session(saved).run(None, {"x": inputs[0], "W": inputs[1]})
    np.testing.assert_allclose(got[0], expected[0], rtol=case.rtol, atol=case.atol)
