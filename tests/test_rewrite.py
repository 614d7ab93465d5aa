"""The rewrite-rule engine (onnxopt/ir/rewrite.py) on toy rules: Relu(Relu(x)) -> Relu(x)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tests.graphs import make_model, tensor
from onnx import TensorProto, helper

import onnx_graphsurgeon as gs
from onnxopt.analysis.use_def import is_op, producer_op, single_use
from onnxopt.ir.names import fresh_name
from onnxopt.ir.rewrite import RewritePass, RewriteRule, RuleSet
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import load
from onnxopt.target import load_target
from onnxopt.testing import assert_equivalent, op_histogram


class FoldDoubleRelu(RewriteRule):
    """Relu(Relu(x)) -> Relu(x); refuses when the inner Relu has other readers."""

    name = "double-relu"
    root_ops = ("Relu",)

    def __init__(self):
        self.match_calls = 0

    def match(self, node, graph):
        self.match_calls += 1
        inner = producer_op(node, 0, "Relu")
        return {"inner": inner, "outer": node} if inner is not None and is_op(node, "Relu") else None

    def check(self, match, model, ctx):
        if not single_use(match["inner"].outputs[0], match["graph"]):
            return "inner Relu has other consumers"
        return None

    def rewrite(self, match, graph):
        fused = gs.Node("Relu", name=fresh_name(graph, "relu_fused"), inputs=[match["inner"].inputs[0]])
        take_outputs(match["outer"], fused)
        return [fused]


class DoubleReluPass(RewritePass):
    """Test pass: fold Relu chains."""

    name = "test-double-relu"
    rules = (FoldDoubleRelu(),)


def ctx():
    return PassContext(target=load_target("cpu"))


def relu_chain(n: int, extra_reader: bool = False) -> onnx.ModelProto:
    names = ["x"] + [f"r{i}" for i in range(1, n)] + ["y"]
    nodes = [helper.make_node("Relu", [a], [b], name=f"relu{i}") for i, (a, b) in enumerate(zip(names, names[1:]))]
    outputs = [tensor("y", [2, 3])]
    if extra_reader:  # r1 is read by an Add too, so relu0 cannot be folded into relu1
        nodes.append(helper.make_node("Add", ["r1", "x"], ["z"]))
        outputs.append(tensor("z", [2, 3]))
    return make_model(nodes, [tensor("x", [2, 3])], outputs)


def run(proto, rules=None, max_sweeps=10):
    m = load(proto)
    stats = RuleSet(rules or [FoldDoubleRelu()], max_sweeps=max_sweeps).apply(m, ctx())
    if stats.total:
        m.modified = True
    return m.to_proto(), stats


def test_chain_folds_to_one_relu_and_keeps_output_name():
    proto = relu_chain(4)
    out, stats = run(proto)
    assert op_histogram(proto) == {"Relu": 4}
    assert op_histogram(out) == {"Relu": 1}
    assert stats.applied["double-relu"] == 3
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.node[0].output[0] == "y"
    onnx.checker.check_model(out, full_check=True)
    assert_equivalent(proto, out)


def test_fixed_point_stops_after_a_quiet_sweep():
    _, stats = run(relu_chain(4))
    # the chain folds within the first sweep (new nodes are producers of later roots);
    # the second sweep finds nothing and ends the loop
    assert stats.sweeps == 2 and not stats.hit_limit


def test_shared_intermediate_is_refused_with_its_reason_and_left_intact():
    proto = relu_chain(2, extra_reader=True)
    out, stats = run(proto)
    assert stats.total == 0
    assert stats.skipped == {"double-relu: inner Relu has other consumers": 1}
    assert out.SerializeToString() == load(proto).to_proto().SerializeToString()


def test_partial_chain_folds_only_where_legal():
    proto = relu_chain(3, extra_reader=True)  # relu0 -> r1 (shared) -> relu1 -> relu2 -> y
    out, stats = run(proto)
    assert stats.applied["double-relu"] == 1  # relu1+relu2; relu0 stays for the Add
    assert op_histogram(out) == {"Relu": 2, "Add": 1}
    assert_equivalent(proto, out)


def test_match_is_only_tried_on_root_ops():
    nodes = [helper.make_node("Add", ["x", "x"], ["a0"])]
    for i in range(1, 20):
        nodes.append(helper.make_node("Add", [f"a{i - 1}", "x"], [f"a{i}"]))
    nodes += [helper.make_node("Relu", ["a19"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    rule = FoldDoubleRelu()
    _, stats = run(proto, [rule])
    assert stats.applied["double-relu"] == 1
    # sweep 1 sees both Relus, sweep 2 sees the fused one: never an Add
    assert rule.match_calls == 3


def test_rules_run_inside_if_branches():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t0"]), helper.make_node("Relu", ["t0"], ["t_out"])],
                               "then", [], [tensor("t_out", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [tensor("e_out", [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [2, 3])], [tensor("y", [2, 3])])
    out, stats = run(proto)
    assert stats.applied["double-relu"] == 1
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_out.node] == ["Relu"] and then_out.node[0].output[0] == "t_out"
    onnx.checker.check_model(out, full_check=True)
    for cond in (True, False):
        assert_equivalent(proto, out, feeds={"cond": np.array(cond), "x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)})


class ReluForever(RewriteRule):
    """A broken rule that always rewrites: the engine must stop it."""

    name = "relu-forever"
    root_ops = ("Relu",)

    def match(self, node, graph):
        return {"relu": node}

    def rewrite(self, match, graph):
        new = gs.Node("Relu", inputs=list(match["relu"].inputs))
        take_outputs(match["relu"], new)
        return [new]


def test_sweeps_are_bounded():
    out, stats = run(relu_chain(1), [ReluForever()], max_sweeps=3)
    assert stats.hit_limit and stats.sweeps == 3 and stats.applied["relu-forever"] == 3
    onnx.checker.check_model(out)


class DropOutput(RewriteRule):
    """A broken rule that removes the node writing a graph output."""

    name = "drop-output"
    root_ops = ("Relu",)

    def match(self, node, graph):
        return {"relu": node}

    def rewrite(self, match, graph):
        match["relu"].outputs.clear()


def test_rule_that_orphans_a_graph_output_is_an_error():
    with pytest.raises(RuntimeError, match="graph output 'y'"):
        run(relu_chain(1), [DropOutput()])


def test_rewrite_pass_reports_counts_and_changed():
    proto = relu_chain(3)
    m = load(proto)
    result = DoubleReluPass().run(m, ctx())
    assert result.changed and result.stats == {"double-relu": 2}
    result = DoubleReluPass().run(load(relu_chain(2, extra_reader=True)), ctx())
    assert not result.changed
    assert result.stats == {"double-relu": 0, "skipped": {"double-relu: inner Relu has other consumers": 1}}


def test_duplicate_rule_names_are_rejected():
    with pytest.raises(ValueError):
        RuleSet([FoldDoubleRelu(), FoldDoubleRelu()])


class ShapeReadingRule(FoldDoubleRelu):
    """Reads the shapes analysis in ``check`` (after an earlier rewrite of the same sweep)."""

    name = "shape-reading"
    analyses = ("shapes",)

    def __init__(self):
        super().__init__()
        self.seen = []

    def check(self, match, model, ctx):
        t = match["inner"].inputs[0]
        if t.shape is not None:  # declared: no need for the analysis
            self.seen.append(tuple(t.shape))
        else:
            info = ctx.analysis("shapes", model).get(t.name)
            self.seen.append(None if info is None else info.shape)
        return None


def test_listed_analyses_are_computed_while_the_graph_is_in_order():
    # two separate Relu pairs: the second check runs after the first rewrite, mid-sweep
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Neg", ["b"], ["c"]),
             helper.make_node("Relu", ["c"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    proto = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    rule = ShapeReadingRule()
    out, stats = run(proto, [rule])
    assert stats.applied["shape-reading"] == 2
    assert rule.seen == [(2, 3), (2, 3)]  # shape of "c" known although a rewrite came first
    assert_equivalent(proto, out)


def test_matches_never_reach_into_an_enclosing_graph():
    """The inner Relu of the pair lives in the main graph, the outer one in an If branch."""
    then_g = helper.make_graph([helper.make_node("Relu", ["r"], ["t_out"])], "then", [], [tensor("t_out", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [tensor("e_out", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    proto = make_model(nodes, [tensor("cond", [], TensorProto.BOOL), tensor("x", [2, 3])], [tensor("y", [2, 3])])
    out, stats = run(proto)
    assert stats.total == 0 and not stats.skipped
    onnx.checker.check_model(out, full_check=True)


def test_fresh_names_skip_every_name_in_use_in_the_model():
    m = load(relu_chain(3))  # tensors x, r1, r2, y; nodes relu0..relu2
    names = [fresh_name(m.graph, "r1"), fresh_name(m.graph, "relu0"), fresh_name(m.graph, "new")]
    assert names == ["r1_1", "relu0_1", "new"]
    out, _ = run(relu_chain(5))  # four rewrites name their nodes relu_fused, relu_fused_1, ...
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)
