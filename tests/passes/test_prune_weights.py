"""prune-magnitude and prune-nm: sparsity, masks in and out, sparse storage, target gating."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.errors import PipelineError, TargetError, UsageError
from onnxopt.ir.model import load
from onnxopt.pipeline.context import PassContext
from onnxopt.pipeline.registry import get_pass
from onnxopt.runtime import session
from onnxopt.target import load_target
from tests import pruning_graphs as pg


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2}


def run(model, name, target="cpu", masks=None, **options):
    m = load(model)
    ctx = PassContext(target=load_target(target), masks=masks or {})
    result = get_pass(name)(**options).run(m, ctx)
    m.modified = True
    return m.to_proto(), result, ctx


def test_layer_scope_zeroes_the_smallest_half_of_each_weight():
    model = pg.chain()
    out, result, ctx = run(model, "prune-magnitude", sparsity=0.5, storage="dense")
    before, after = weights(model), weights(out)
    for name, w in before.items():
        p = after[name]
        assert abs(np.mean(p == 0) - 0.5) < 0.02
        kept = np.abs(w[p != 0])
        assert kept.min() >= np.abs(w[p == 0]).max()  # the smallest went
        assert np.array_equal(ctx.pruned_masks[name], p != 0)
    assert result.stats["weights"] == 2 and result.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    sizes = result.stats["weight_storage"]  # dense storage: same bytes, much smaller compressed
    assert sizes["bytes_after"] == sizes["bytes_before"] and sizes["gzip_after"] < 0.75 * sizes["gzip_before"]


def test_global_scope_normalizes_per_layer():
    b = pg.Builder(40)
    h = b.node("Relu", [b.conv("x", 3, 8)])
    b.conv(h, 8, 4)
    model = b.model([pg.tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 4])
    big = [t for t in model.graph.initializer if len(t.dims) == 4 and t.dims[1] == 3][0]
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1000, big.name))
    out, result, _ = run(model, "prune-magnitude", sparsity=0.5, scope="global", storage="dense")
    per_layer = [np.mean(w == 0) for w in weights(out).values()]
    assert all(0.2 < s < 0.8 for s in per_layer)  # a 1000x scale does not decide who is pruned
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_given_masks_stay_pruned_and_schedule_rounds():
    model = pg.chain()
    first, _, ctx1 = run(model, "prune-magnitude", sparsity=0.3, storage="dense")
    masks = dict(ctx1.pruned_masks)
    out, _, ctx2 = run(model, "prune-magnitude", masks=masks, sparsity=0.6, storage="dense")
    for name, mask in masks.items():
        assert not (ctx2.pruned_masks[name] & ~mask).any()  # nothing removed comes back
        assert np.mean(~ctx2.pruned_masks[name]) == pytest.approx(0.6, abs=0.02)
    _, result, _ = run(model, "prune-magnitude", schedule=[0.2, 0.4, 0.7], storage="dense")
    assert result.stats["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_mask_of_the_wrong_shape_is_an_error_naming_the_weight():
    model = pg.chain()
    name = next(iter(weights(model)))
    with pytest.raises(UsageError, match=name):
        run(model, "prune-magnitude", masks={name: np.ones((2, 2), bool)})


def test_sparse_storage_round_trips_and_runs():
    model = pg.flatten_gemm()
    out, result, _ = run(model, "prune-magnitude", sparsity=0.9, storage="auto")
    assert result.stats["stored_sparse"] >= 1 and len(out.graph.sparse_initializer) >= 1
    onnx.checker.check_model(out)
    dense, _, _ = run(model, "prune-magnitude", sparsity=0.9, storage="dense")
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(session(out).run(None, {"x": x})[0], session(dense).run(None, {"x": x})[0])
    assert len(out.SerializeToString()) < len(dense.SerializeToString())
    again = load(out)  # a second pass leaves sparse weights alone
    assert get_pass("prune-magnitude")(sparsity=0.9).run(again, PassContext(target=load_target("cpu"))).changed is False


def test_auto_storage_keeps_half_sparse_weights_dense():
    """At 50% zeros the dense form compresses better than index lists: auto keeps it dense."""
    out, result, _ = run(pg.flatten_gemm(), "prune-magnitude", sparsity=0.5)
    assert result.stats["stored_sparse"] == 0 and not out.graph.sparse_initializer


def test_bad_options():
    with pytest.raises(PipelineError, match="increasing values"):
        run(pg.chain(), "prune-magnitude", schedule=[0.5, 0.2])
    with pytest.raises(PipelineError, match="op_types"):
        run(pg.chain(), "prune-magnitude", op_types=["Relu"])


def test_nm_keeps_n_of_every_m_along_the_reduction_axis():
    b = pg.Builder(41)
    h = b.node("Relu", [b.conv("x", 8, 8)])
    b.matmul(b.node("Transpose", [h], perm=[0, 2, 3, 1]), 8, 4)
    model = b.model([pg.tensor("x", [1, 8, 4, 4])], "y", [1, 4, 4, 4])
    out, result, ctx = run(model, "prune-nm", target="gpu")
    w = weights(out)
    conv = [v for v in w.values() if v.ndim == 4][0]
    groups = np.moveaxis(conv, 1, -1).reshape(-1, 4)  # input channels in runs of 4
    assert ((groups != 0).sum(1) <= 2).all()
    mat = [v for v in w.values() if v.ndim == 2][0]  # [K, N]: groups of 4 along K
    assert ((np.moveaxis(mat, 0, -1).reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert result.stats["pattern"] == "2:4" and result.stats["sparsity"] == pytest.approx(0.5)


def test_nm_is_refused_for_a_target_that_does_not_accelerate_it():
    for target in ("cpu", "npu"):
        with pytest.raises(TargetError, match=r"capabilities.nm_sparsity") as err:
            run(pg.chain(), "prune-nm", target=target)
        assert err.value.exit_code == 2
    with pytest.raises(TargetError, match="1:4"):
        run(pg.chain(), "prune-nm", target="gpu", n=1, m=4)


def test_nm_skips_weights_whose_reduction_axis_does_not_divide():
    _, result, _ = run(pg.chain(), "prune-nm", target="gpu")  # conv1 reads 3 channels
    assert any("not a multiple of 4" in s for s in result.stats["skipped"])


def test_weights_in_constant_nodes_are_counted_not_pruned():
    model = pg.chain()
    w = model.graph.initializer[0]
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [w.name], value=w))
    del model.graph.initializer[0]
    _, result, _ = run(model, "prune-magnitude", sparsity=0.5, storage="dense")
    assert result.stats["left_in_constant_nodes"] == 1 and result.stats["weights"] == 1


def _calibrated(model, batches=16, seed=1):
    from onnxopt.data.statistics import open_calibration
    from onnxopt.ir.model import Reference

    m = load(model)
    r = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = [{model.graph.input[0].name: r.standard_normal(shape).astype(np.float32)} for _ in range(batches)]

    class Reader:  # read again for every level of the refit
        def __init__(self):
            self.rewind()

        def rewind(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    ctx = PassContext(target=load_target("cpu"), reference=Reference(m))
    ctx.calibration = open_calibration(Reader(), m, ctx.reference)
    return m, ctx


def _relative_error(ref, cand, seed=7):
    shape = [d.dim_value for d in ref.graph.input[0].type.tensor_type.shape.dim]
    feeds = {ref.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    a, b = session(ref).run(None, feeds)[0], session(cand).run(None, feeds)[0]
    return float(np.sum((a - b) ** 2) / np.sum(a ** 2))


def _pruned(model, **options):
    m, ctx = _calibrated(model)
    result = get_pass("prune-magnitude")(**options).run(m, ctx)
    m.modified = True
    return m.to_proto(), result, ctx


@pytest.mark.parametrize("builder", [pg.chain, pg.ffn])
def test_refit_keeps_the_zeros_and_makes_up_for_them(builder):
    model = builder()
    plain, _, _ = _pruned(model, sparsity=0.6, refit="off")
    refit, result, ctx = _pruned(model, sparsity=0.6, refit="on")
    assert result.stats["refit"].get("refitted", 0) >= 1
    after = weights(refit)
    for name, mask in ctx.pruned_masks.items():
        assert not after[name][~mask].any()  # every dropped weight is still zero
    assert result.stats["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert _relative_error(model, refit) < 0.8 * _relative_error(model, plain)


def test_rounds_with_refit_in_between_rank_the_refitted_weights():
    model = pg.ffn()
    one_shot, _, _ = _pruned(model, sparsity=0.7, refit="on")
    rounds, result, _ = _pruned(model, schedule=[0.35, 0.55, 0.7], refit="on")
    assert result.stats["sparsity"] == pytest.approx(0.7, abs=0.02)
    assert sum(result.stats["refit"].values()) >= 3  # refits in every round
    assert not np.allclose(weights(one_shot)[next(iter(weights(one_shot)))],
                           weights(rounds)[next(iter(weights(rounds)))])


def test_refit_on_needs_calibration_data():
    from onnxopt.errors import CalibrationError

    with pytest.raises(CalibrationError, match="refit=on"):
        run(pg.chain(), "prune-magnitude", refit="on")
