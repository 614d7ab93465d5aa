"""prune-channels: exact surgery on every dependency pattern, expected cuts, refusals, refit."""

import numpy as np
import onnx
import pytest

from onnxopt.analysis.channel_groups import channel_graph, kept_count
from onnxopt.analysis.cost import model_cost
from onnxopt.errors import CalibrationError
from onnxopt.ir.model import Reference, load
from onnxopt.pipeline.context import PassContext
from onnxopt.runtime import session
from onnxopt.target import load_target
from onnxopt.testing import assert_valid_and_equivalent, run_pass
from tests import pruning_graphs as pg


@pytest.fixture(scope="module")
def any_width(tmp_path_factory):
    """A cpu target that keeps any channel count (the built-in rounds to 8)."""
    path = tmp_path_factory.mktemp("targets") / "any.toml"
    path.write_text('schema = 1\nname = "any-width"\nextends = "cpu"\n[capabilities]\nchannel_multiple = 1\n')
    return str(path)


def _removal(cg, ratio):
    """The classes prune-channels removes at ``ratio`` when the chosen ones score lowest: the
    first ones of every prunable group (of every block for grouped convs)."""
    removed = set()
    for g in cg.groups:
        if not g.prunable:
            continue
        if g.blocks is not None:
            per = len(g.blocks[0])
            for block in g.blocks:
                removed.update(int(c) for c in block[:per - kept_count(per, ratio)])
        else:
            removed.update(int(c) for c in g.classes[:len(g.classes) - kept_count(len(g.classes), ratio)])
    return removed


def _feeds(model, seed=0):
    r = np.random.default_rng(seed)
    return {i.name: r.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.parametrize("name", sorted(pg.PATTERNS))
def test_removing_zero_channels_is_exact(name, any_width):
    model = pg.PATTERNS[name]()
    cg = channel_graph(load(model))
    removed = _removal(cg, 0.5)
    assert removed, "the pattern has something to prune"
    zeroed = pg.zero_channels(model, cg, removed)
    pruned, result = run_pass("prune-channels", zeroed, any_width, ratio=0.5, criterion="l1", refit="off")
    assert result.changed and result.stats["pruned_groups"] >= 1
    assert_valid_and_equivalent(zeroed, pruned, _feeds(model))  # same outputs, same output shapes
    assert model_cost(pruned).params < model_cost(zeroed).params


def test_chain_params_and_macs_cut_by_the_expected_amounts(any_width):
    model = pg.chain()
    pruned, result = run_pass("prune-channels", model, any_width, ratio=0.5, criterion="l2", refit="off")
    before, after = model_cost(model), model_cost(pruned)
    # conv1 3->8 (k3, bias) becomes 3->4; BN 8 -> 4 (4 params each); conv2 8->4 becomes 4->4
    removed = 4 * 3 * 9 + 4 + 4 * 4 + 4 * 4 * 9
    assert int(before.params) - int(after.params) == removed == result.stats["params_removed"]
    # MACs: conv1 3*9*8*36 -> 3*9*4*36, BN 8*36 -> 4*36, conv2 8*9*4*36 -> 4*9*4*36
    assert int(before.macs) - int(after.macs) == 3 * 9 * 4 * 36 + 4 * 36 + 4 * 9 * 4 * 36
    assert [d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 6, 6]


@pytest.mark.parametrize("name", sorted(pg.REFUSALS))
def test_must_not_fire(name, any_width):
    builder, reason = pg.REFUSALS[name]
    model = builder()
    _, result = run_pass("prune-channels", model, any_width, ratio=0.5, refit="off")
    assert not result.changed  # run_pass also checks the model was left alone
    text = " ".join(result.stats["left_alone_reasons"] + result.stats["layers_skipped"])
    assert reason in text


def test_channel_multiple_of_the_target():
    model = pg.chain()  # 8 channels
    _, result = run_pass("prune-channels", model, target="npu", ratio=0.5, refit="off")
    assert not result.changed and "fewer than channel_multiple 32" in " ".join(result.stats["left_alone_reasons"])
    b = pg.Builder(30)
    b.conv(b.node("Relu", [b.conv("x", 3, 24)]), 24, 4)
    wide = b.model([pg.tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 4])
    pruned, result = run_pass("prune-channels", wide, target="gpu", ratio=0.3, refit="off")
    conv1 = [t for t in pruned.graph.initializer if len(t.dims) == 4 and t.dims[1] == 3][0]
    assert conv1.dims[0] == 16 and result.stats["channel_multiple"] == 8  # 24*0.7 = 16.8 -> 16


def test_per_layer_ratio_and_bad_entries(any_width):
    model = pg.concat()
    cg = channel_graph(load(model))
    six = [g for g in cg.groups if len(g.classes) == 6][0].producers[0]
    pruned, result = run_pass("prune-channels", model, any_width, ratio=0.5, refit="off", per_layer=[f"{six}=0"])
    assert result.stats["pruned_groups"] == 1
    from onnxopt.errors import PipelineError

    with pytest.raises(PipelineError, match="NAME=RATIO"):
        run_pass("prune-channels", model, per_layer=["conv"])


def _calibrated_ctx(model, target, batches=8, seed=1):
    from onnxopt.data.statistics import open_calibration

    m = load(model)
    r = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = [{model.graph.input[0].name: r.standard_normal(shape).astype(np.float32)} for _ in range(batches)]

    class Reader:
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    ctx = PassContext(target=load_target(target), reference=Reference(m))
    ctx.calibration = open_calibration(Reader(), m, ctx.reference)
    return m, ctx


def _error(ref, cand, feeds):
    a, b = session(ref).run(None, feeds)[0], session(cand).run(None, feeds)[0]
    return float(np.sum((a - b) ** 2) / np.sum(a ** 2))


def test_refit_of_the_consumer_lowers_the_error(any_width):
    model = pg.chain()
    feeds = _feeds(model, seed=5)
    plain, _ = run_pass("prune-channels", model, any_width, ratio=0.5, criterion="l2", refit="off")
    m, ctx = _calibrated_ctx(model, any_width, batches=16)
    from onnxopt.pipeline.registry import get_pass

    result = get_pass("prune-channels")(ratio=0.5, criterion="l2", refit="on").run(m, ctx)
    assert result.stats["refit"]["refitted"] == 1
    refitted = m.export()
    onnx.checker.check_model(refitted)
    assert _error(model, refitted, feeds) < 0.7 * _error(model, plain, feeds)


@pytest.mark.parametrize("criterion", ["activation", "taylor", "bn-scale", "l1"])
def test_every_criterion_runs_and_prunes(criterion, any_width):
    model = pg.chain()
    m, ctx = _calibrated_ctx(model, any_width)
    from onnxopt.pipeline.registry import get_pass

    result = get_pass("prune-channels")(ratio=0.5, criterion=criterion, refit="off").run(m, ctx)
    assert result.changed and result.stats["channels_removed"] == 4
    assert_valid_and_equivalent(m.export(), m.export(), _feeds(model))


def test_data_criteria_need_calibration():
    with pytest.raises(CalibrationError, match="criterion=activation"):
        run_pass("prune-channels", pg.chain(), criterion="activation")


def test_activation_prefers_the_channels_that_carry_signal(any_width):
    """Two channels of conv1 never fire (ReLU of a large negative bias): activation removes
    them though their weights are the largest."""
    model = pg.chain()
    w = [t for t in model.graph.initializer if len(t.dims) == 4 and t.dims[0] == 8][0]
    from onnx import numpy_helper

    a = numpy_helper.to_array(w).copy()
    a[:2] *= 50.0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    beta = [t for t in model.graph.initializer if t.name.startswith("be")][0]
    b = numpy_helper.to_array(beta).copy()
    b[:2] = -1e4
    beta.CopyFrom(numpy_helper.from_array(b, beta.name))
    m, ctx = _calibrated_ctx(model, any_width)
    from onnxopt.pipeline.registry import get_pass

    get_pass("prune-channels")(ratio=0.25, criterion="activation", refit="off").run(m, ctx)
    out = m.export()
    conv1 = [t for t in out.graph.initializer if len(t.dims) == 4 and t.dims[1] == 3][0]
    kept = numpy_helper.to_array(conv1)
    assert kept.shape[0] == 6 and np.abs(kept).max() < 50 * 0.3 * 5  # the two big rows are gone


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_stay_valid_with_their_output_shapes(seed, any_width):
    """The fuzz generator's random DAGs (Conv, MatMul, Gemm, BN, residual adds, Concat,
    Split, Reshape, Transpose, …) pruned at any width: valid, runnable, same output shapes."""
    from onnxopt.measure import verify
    from tests.test_fuzz import random_model

    model = random_model(seed, 12)
    feeds, expected = verify.run(model)
    pruned, _ = run_pass("prune-channels", model, any_width, ratio=0.5, criterion="l2", refit="off")
    onnx.checker.check_model(pruned)
    _, got = verify.run(pruned, feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
