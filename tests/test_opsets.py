"""The one opset-raise policy (onnxopt/ir/opsets.py): reviewed revisions, converter, refusals."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.ir.model import load
from onnxopt.ir.opsets import raise_blockers, raise_opset
from onnxopt.testing import assert_equivalent
from tests.graphs import gelu_erf, init, make_model, tensor


@pytest.mark.parametrize("node,blocked", [
    (helper.make_node("Split", ["x"], ["a", "b"], axis=0), "Split: needs 'split' or 'num_outputs' from opset 18"),
    (helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=0), None),
    (helper.make_node("ReduceMean", ["x"], ["a"]), None),
    (helper.make_node("GridSample", ["x", "x"], ["a"], mode="bilinear"),
     "GridSample: mode 'bilinear' was renamed in opset 20"),
    (helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT), None),
])
def test_blockers_per_node(node, blocked):
    graph = helper.make_graph([node], "g", [tensor("x", [4])], [helper.make_tensor_value_info("a", 0, None)],
                              [init("sizes", np.array([2, 2], np.int64))])
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    blockers = raise_blockers(model, 20)
    assert (list(blockers) == [blocked]) if blocked else not blockers


def test_ops_without_a_revision_in_between_do_not_block():
    # Mul, Add, Div, Erf have no schema revision between 16 and 20: the model means the same.
    assert not raise_blockers(load(gelu_erf(opset=16)), 20)


def squeeze_at(opset: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Squeeze", ["x"], ["s"], axes=[0]), helper.make_node("Relu", ["s"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [4])], opset=opset)


def test_an_unreviewed_revision_blocks_a_direct_raise():
    blockers = raise_blockers(load(squeeze_at(11)), 13)
    assert "Squeeze-13: revision not reviewed" in blockers and "Relu-13: revision not reviewed" in blockers


def test_without_conversion_the_opset_stays_and_the_reason_is_given():
    model = load(squeeze_at(11))
    raised, why = raise_opset(model, 13, convert=False)
    assert not raised and "Squeeze-13" in why and model.opset == 11


def test_the_version_converter_rewrites_changed_ops():
    proto = squeeze_at(11)
    model = load(proto)
    raised, how = raise_opset(model, 13)
    assert raised and "converted" in how and model.opset == 13
    out = model.export()
    assert out.opset_import[0].version == 13
    squeeze = next(n for n in out.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2 and not squeeze.attribute  # axes moved to an input at 13
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(proto, out)


def test_local_functions_block_a_direct_raise():
    proto = gelu_erf(opset=16)
    proto.functions.append(helper.make_function("custom", "f", ["a"], ["b"],
                                                [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 16)]))
    assert "model has local functions (their opset imports would disagree)" in raise_blockers(load(proto), 20)
