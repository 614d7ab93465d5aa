"""onnxopt.ir.surgery: graph order helpers."""

from onnx import helper

from onnxopt.ir.model import load
from onnxopt.ir.surgery import dependency_levels
from tests.graphs import make_model, tensor


def test_dependency_levels_put_a_layer_after_every_chosen_layer_upstream():
    # a -> b -> c, and d beside b reading a; e reads c and d
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Relu", ["a"], ["b"], name="b"),
             helper.make_node("Relu", ["b"], ["c"], name="c"), helper.make_node("Relu", ["a"], ["d"], name="d"),
             helper.make_node("Add", ["c", "d"], ["y"], name="e")]
    m = load(make_model(nodes, [tensor("x", [2])], [tensor("y", [2])]))
    by_name = {n.name: n for n in m.graph.nodes}
    chosen = ["e", "c", "a", "d"]  # not in graph order; b is not chosen
    levels = dependency_levels(m.graph, chosen, lambda name: by_name[name])
    assert levels == [["a"], ["c", "d"], ["e"]]
