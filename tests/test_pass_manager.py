"""The pass manager: records, rollback of passes that raise or break, verify, strict, analyses."""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from onnxopt import Pass, PassResult, option, register_pass
from onnxopt.cli import main
from onnxopt.pipeline.context import PassContext, register_analysis
from onnxopt.errors import PassFailedError, VerificationError
from onnxopt.ir.model import load
from onnxopt.pipeline.manager import PassManager
from onnxopt.pipeline.text import PassSpec
from onnxopt.target import load_target

from tests.graphs import const_chain, matmul_add


@register_pass("test-raise")
class RaisePass(Pass):
    """Deletes a node, then raises (a buggy pass)."""

    def run(self, model, ctx):
        model.graph.nodes.pop()
        raise RuntimeError("boom")


@register_pass("test-break")
class BreakPass(Pass):
    """Removes the producer of the graph output (leaves the graph broken)."""

    def run(self, model, ctx):
        model.graph.nodes.pop()
        return PassResult(True, {})


@register_pass("test-wrong-math")
class WrongMathPass(Pass):
    """Claims to be lossless but scales every float initializer by 2."""

    def run(self, model, ctx):
        for t in model.graph.tensors().values():
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32:
                t.values = t.values * 2
        return PassResult(True, {})


@register_pass("test-liar")
class LiarPass(Pass):
    """Renames a node but reports no change."""

    def run(self, model, ctx):
        model.graph.nodes[0].name = "renamed"
        return PassResult(False, {})


@register_pass("test-silent-wipe")
class SilentWipePass(Pass):
    """Deletes every node and reports no change (the worst kind of liar)."""

    def run(self, model, ctx):
        model.graph.nodes.clear()
        return PassResult(False, {})


@register_pass("test-opset-then-raise")
class OpsetThenRaisePass(Pass):
    """Imports a newer opset and a contrib domain, records a choice, then raises."""

    def run(self, model, ctx):
        model.require_opset("", 21)
        model.require_opset("com.microsoft", 1)
        ctx.metadata["test_choice"] = "made"
        raise RuntimeError("after the opset change")


@register_pass("test-emit-custom")
class EmitCustomPass(Pass):
    """Appends a Relu on the graph output (an op the test target does not allow)."""

    def run(self, model, ctx):
        out = model.graph.outputs[0]
        relu_out = gs.Variable("relu_out", dtype=np.float32)
        model.graph.nodes.append(gs.Node("Relu", "extra_relu", inputs=[out], outputs=[relu_out]))
        model.graph.outputs = [relu_out]
        return PassResult(True, {})


CALLS = []


@register_analysis("test-counter")
def _count(model, ctx):
    CALLS.append(1)
    return len(CALLS)


@register_pass("test-use-analysis")
class UseAnalysisPass(Pass):
    """Reads the test analysis; changes the graph when asked."""

    @dataclass
    class Options:
        change: bool = option(False, "change the graph")

    def run(self, model, ctx):
        ctx.analysis("test-counter", model)
        if self.options.change:
            model.graph.nodes[0].name = model.graph.nodes[0].name + "_"
        return PassResult(self.options.change, {})


def run(specs, proto=None, **kw):
    model = load(proto or matmul_add())
    ctx = PassContext(target=load_target("cpu"))
    records = PassManager([PassSpec(s) if isinstance(s, str) else s for s in specs], **kw).run(model, ctx)
    return model, records


def test_records_time_and_counts():
    model, (rec,) = run(["lift-constants"], const_chain())
    assert rec.status == "changed" and rec.stats == {"lifted": 2}
    assert rec.nodes_before == 4 and rec.nodes_after == 2
    assert rec.params_before == rec.params_after == 8
    assert rec.seconds >= 0


def test_raising_pass_is_rolled_back():
    model, (rec, after) = run(["test-raise", "eliminate-dead-code"])
    assert rec.status == "failed" and "boom" in rec.error
    assert len(model.graph.nodes) == 2  # the popped node is back
    assert after.status == "unchanged"


def test_breaking_pass_is_rolled_back_even_without_verify():
    model, (rec,) = run(["test-break"])
    assert rec.status == "rolled-back" and "no longer produced" in rec.error
    assert len(model.graph.nodes) == 2 and not model.modified


def test_strict_makes_failures_fatal():
    with pytest.raises(PassFailedError, match="boom"):
        run(["test-raise"], strict=True)
    with pytest.raises(VerificationError, match="broke the model"):
        run(["test-break"], strict=True)


def test_verify_catches_a_lossless_pass_that_changes_outputs():
    model, (rec,) = run(["test-wrong-math"], verify=True)
    assert rec.status == "rolled-back" and "max abs error" in rec.error
    _, (rec,) = run(["lift-constants"], const_chain(), verify=True)
    assert rec.status == "changed" and rec.verified == "equal"


@pytest.mark.parametrize("verify", [False, True])
def test_a_pass_that_lies_about_changed_is_caught_in_every_run(verify):
    model, (rec,) = run(["test-liar"], verify=verify)
    assert rec.status == "changed" and "dishonest_changed" in rec.stats and model.modified
    assert model.graph.nodes[0].name == "renamed"


def test_a_liar_that_breaks_the_model_is_caught_and_rolled_back():
    model, (rec,) = run(["test-silent-wipe"])
    assert rec.stats["dishonest_changed"] == "reported no change but changed the model"
    assert rec.status == "rolled-back" and "no longer produced" in rec.error
    assert [n.op for n in model.graph.nodes] == ["MatMul", "Add"] and not model.modified


def test_strict_makes_a_lie_fatal():
    with pytest.raises(PassFailedError, match="reported no change but changed the model"):
        run(["test-liar"], strict=True)


def test_a_lie_invalidates_cached_analyses():
    CALLS.clear()
    run([PassSpec("test-use-analysis"), PassSpec("test-liar"), PassSpec("test-use-analysis")])
    assert len(CALLS) == 2


def test_check_pass_contract_catches_a_liar():
    from onnxopt.testing import check_pass_contract, run_pass

    for liar in (LiarPass, SilentWipePass):
        with pytest.raises(AssertionError, match="reported no change but changed the model"):
            check_pass_contract(liar, [matmul_add()])
        with pytest.raises(AssertionError, match="reported no change"):
            run_pass(liar, matmul_add())


def test_rollback_restores_opset_imports_and_context_choices():
    model, (rec,) = run(["test-opset-then-raise"])
    assert rec.status == "failed"
    assert model.opset_import == [("", 17)] and model.opset == 17 and model.graph.opset == 17
    proto = model.to_proto()
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    result = onnxopt.optimize(matmul_add(), pipeline="test-opset-then-raise")
    assert result.report["chosen"] == {}
    assert "test_choice" not in {p.key for p in result.model.metadata_props}


def test_a_pass_emitting_ops_the_target_does_not_allow_is_rolled_back(tmp_path):
    target = tmp_path / "t.toml"
    target.write_text('schema = 1\nname = "tiny"\nextends = "cpu"\n[capabilities]\n'
                      'allowed_ops = ["MatMul", "Add"]\n')
    result = onnxopt.optimize(matmul_add(), target=str(target), pipeline="test-emit-custom")
    (rec,) = result.report["passes"]
    assert rec["status"] == "rolled-back" and "emits Relu" in rec["error"] and "allowed_ops" in rec["error"]
    target.write_text('schema = 1\nname = "tiny"\nextends = "cpu"\n[capabilities]\n'
                      'allowed_ops = ["MatMul", "Add", "Relu"]\n')
    result = onnxopt.optimize(matmul_add(), target=str(target), pipeline="test-emit-custom")
    assert result.report["passes"][0]["status"] == "changed"


def test_analyses_cached_until_a_change():
    CALLS.clear()
    run([PassSpec("test-use-analysis"), PassSpec("test-use-analysis")])
    assert len(CALLS) == 1  # second pass used the cache
    CALLS.clear()
    run([PassSpec("test-use-analysis", {"change": True}), PassSpec("test-use-analysis")])
    assert len(CALLS) == 2  # the change invalidated it


def test_cli_strict_exit_codes(tmp_path, capsys):
    import onnx

    p = tmp_path / "m.onnx"
    onnx.save(matmul_add(), p)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(p), "-o", str(out), "--pipeline", "test-raise", "--strict"]) == 1
    assert main(["optimize", str(p), "-o", str(out), "--pipeline", "test-wrong-math", "--verify", "--strict"]) == 3
    assert not out.exists()
    assert main(["optimize", str(p), "-o", str(out), "--pipeline", "test-wrong-math", "--verify", "-q"]) == 0
    assert out.exists()
    capsys.readouterr()


def test_api_result_and_report():
    result = onnxopt.optimize(const_chain(), pipeline="lossless")
    assert result.report["before"]["nodes"] == 4 and result.report["after"]["nodes"] < 4
    assert [p["name"] for p in result.report["passes"]][:1] == ["lift-constants"]
    assert result.report["pipeline"] == {p.key: p.value for p in result.model.metadata_props}["onnxopt.pipeline"]


def test_rollbacks_stay_right_when_snapshots_are_reused():
    # unchanged passes share one snapshot; each rollback must still restore the graph
    model, records = run(["eliminate-identity", "test-raise", "eliminate-dead-code", "test-break", "test-raise"])
    assert [r.status for r in records] == ["unchanged", "failed", "unchanged", "rolled-back", "failed"]
    assert [n.op for n in model.graph.nodes] == ["MatMul", "Add"] and not model.modified
    model, records = run(["lift-constants", "test-raise", "eliminate-identity"], const_chain())
    assert [r.status for r in records] == ["changed", "failed", "unchanged"]
    assert [n.op for n in model.graph.nodes] == ["Mul", "Add"]


# -- fixed-point groups ----------------------------------------------------------------------
@register_pass("test-rename-until")
class RenameUntilPass(Pass):
    """Appends '_' to the first node's name until it has ``times`` of them (lossless: names only)."""

    lossless = True

    @dataclass
    class Options:
        times: int = option(3, "how many underscores to reach")

    def run(self, model, ctx):
        node = model.graph.nodes[0]
        if node.name.count("_") >= self.options.times:
            return PassResult(False, {})
        node.name += "_"
        return PassResult(True, {})


def test_fixed_point_repeats_until_a_round_changes_nothing():
    from onnxopt.pipeline.text import resolve

    specs = resolve("fixed-point(test-rename-until{times=3},eliminate-dead-code)")
    model, records = run(specs, const_chain())
    names = [(r.name, r.round, r.status) for r in records]
    # rounds 1-3 rename; round 4 renames nothing. eliminate-dead-code runs in rounds 1-3 (the
    # model changed after it each time) and is skipped in round 4: the model is the one it left.
    assert names[-1] == ("test-rename-until", 4, "unchanged")
    assert [n for n in names if n[0] == "eliminate-dead-code"] == [("eliminate-dead-code", k, "unchanged")
                                                                 for k in (1, 2, 3)]
    assert model.graph.nodes[0].name.count("_") == 3


def test_fixed_point_stops_at_max_rounds_and_says_so():
    from onnxopt.pipeline.text import resolve

    specs = resolve("fixed-point{max_rounds=2}(test-rename-until{times=9})")
    model = load(const_chain())
    ctx = PassContext(target=load_target("cpu"))
    records = PassManager(specs).run(model, ctx)
    assert [r.round for r in records] == [1, 2]
    assert any("max_rounds=2" in note for note in ctx.notes)


def test_lossless_pipelines_are_fixed_points():
    for name in ("cpu", "gpu", "npu"):
        text = load_target(name).pipelines["lossless"]
        assert "fixed-point(" in text and "eliminate-dead-code" in text


def test_a_pass_whose_ops_are_absent_is_not_run():
    # lift-constants needs Constant nodes; matmul_add has none: skipped, with the reason
    model, (rec,) = run(["lift-constants"])
    assert rec.status == "skipped" and rec.stats == {"reason": "none of Constant in the model"}
    model, (rec,) = run(["lift-constants"], const_chain())
    assert rec.status == "changed"


@register_pass("test-raise-late")
class RaiseLatePass(Pass):
    """Renames every node, then raises (a buggy pass that leaves edits behind)."""

    lossless = True

    def run(self, model, ctx):
        for node in model.graph.nodes:
            node.name = "garbage"
        raise RuntimeError("late boom")


def test_rollback_in_a_group_replays_the_passes_before_it():
    from onnxopt.pipeline.text import resolve

    # inside a group one snapshot serves every pass: after the failure the model is what
    # the passes before it made of it (Constants lifted, then one rename), nothing more
    specs = resolve("fixed-point(lift-constants,test-rename-until{times=1},test-raise-late)")
    model, records = run(specs, const_chain())
    statuses = [(r.name, r.status) for r in records]
    assert ("test-raise-late", "failed") in statuses and ("lift-constants", "changed") in statuses
    assert [n.op for n in model.graph.nodes] == ["Mul", "Add"]  # lifted
    assert model.graph.nodes[0].name.count("_") >= 1 and "garbage" not in [n.name for n in model.graph.nodes]
