"""fix-shapes: inputs fixed, shapes written through the graph, Shape folded afterwards; bad shapes refused."""

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.testing import assert_equivalent, op_histogram, run_pass

from tests.graphs import conv_bn_relu, make_model, shape_chain, tensor


def dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_fixes_an_input_and_writes_the_shapes_that_follow():
    proto = shape_chain()  # x[N, 3, 4] -> Shape/Gather/Concat -> Reshape -> y[N, 3, 4]
    out, result = run_pass("fix-shapes", proto, shapes=["x:2,3,4"])
    assert result.changed and result.stats["inputs_fixed"] == 1 and result.stats["still_dynamic"] == 0
    assert dims(out.graph.input[0]) == [2, 3, 4] and dims(out.graph.output[0]) == [2, 3, 4]
    assert {v.name for v in out.graph.value_info} >= {"s", "target"}
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    assert_equivalent(proto, out, {"x": x})


def test_then_the_lossless_pipeline_folds_the_shape_computation():
    proto = shape_chain()
    before = onnxopt.optimize(proto, pipeline="lossless").model
    after = onnxopt.optimize(proto, pipeline="lossless", input_shapes={"x": [2, 3, 4]}).model
    # symbolic folding makes the Reshape target a constant with 0/-1 for the free dims; with
    # the input fixed, the input and the output are static too
    assert op_histogram(before) == op_histogram(after) == {"Reshape": 1}
    static = [all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim) for v in (after.graph.input[0],)]
    assert static == [True] and not all(d.HasField("dim_value")
                                        for d in before.graph.input[0].type.tensor_type.shape.dim)


def test_without_shapes_only_propagates():
    proto = conv_bn_relu()  # static already: every shape is known from the input
    out, result = run_pass("fix-shapes", proto)
    assert result.stats["inputs_fixed"] == 0 and result.stats["still_dynamic"] == 0


@pytest.mark.parametrize("spec, message", [
    ("y:1,3,4", r"no graph input named 'y' \(inputs: x\)"),
    ("x:2,3", r"input 'x' has rank 3 .* the shape given has 2 dims"),
    ("x:2,5,4", r"input 'x' has 3 at dim 1 in the model; the shape given says 5"),
    ("x:two", r"expected NAME:D1,D2"),
])
def test_bad_shapes_are_refused_with_the_reason(spec, message):
    with pytest.raises(UsageError, match=message):
        run_pass("fix-shapes", shape_chain(), shapes=[spec])


def test_cli_input_shape_unknown_input_exits_2(tmp_path, capsys):
    from onnxopt.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(shape_chain(), src)
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--pipeline", "lossless",
                 "--input-shape", "nope:1,3,4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error:") and "'nope'" in err and not (tmp_path / "o.onnx").exists()


def test_dims_written_only_where_inference_knows_them():
    # NonZero's output length depends on the data: it stays dynamic, the rest is fixed
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonZero", ["r"], ["y"])]
    proto = make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", [2, "K"], onnx.TensorProto.INT64)])
    out, result = run_pass("fix-shapes", proto, shapes=["x:2,4"])
    assert result.changed and result.stats["still_dynamic"] == 1 and result.stats["still_dynamic_examples"] == ["y"]
    assert dims(out.graph.input[0]) == [2, 4]
