"""lowrank-matmul, lowrank-conv, separable-conv: exact at full rank, every Gemm and Conv form,
error falling with rank, accounting, data-aware whitening, refit, budgets, the speed gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.analysis.cost import model_cost
from onnxopt.data.statistics import Calibration
from onnxopt.errors import PipelineError
from onnxopt.ir.model import Reference, load
from onnxopt.measure import microbench, verify
from onnxopt.pipeline.context import PassContext
from onnxopt.target import load_target
from onnxopt.testing import op_histogram, run_pass
from tests.graphs import init, make_model, tensor

# no timing in tests (timed assertions do not belong here); the speed gate has its own tests
QUIET = {"speed_check": False, "check_model": False, "min_params": 0}
EXACT = {**QUIET, "min_saving": -100.0, "full_rank_energy": 0.0}  # allow a full-rank split


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path / "cache"))
    microbench.clear_memory_cache()


def _any_rank_target(name):
    """The named target with ranks not rounded (the cpu target rounds them to 8): these tests
    check exact ranks; test_ranks_are_rounded_to_the_targets_channel_multiple the rounding."""
    target = load_target(name)
    target.capabilities["channel_multiple"] = 1
    return target


@pytest.fixture(autouse=True)
def _exact_ranks(monkeypatch):
    import onnxopt.testing

    monkeypatch.setattr(onnxopt.testing, "load_target", _any_rank_target)


def rng(seed=0):
    return np.random.default_rng(seed)


def low_rank(k, n, rank, seed=0, noise=0.0):
    r = rng(seed)
    w = r.standard_normal((k, rank)) @ r.standard_normal((rank, n)) / np.sqrt(rank)
    return (w + noise * r.standard_normal((k, n))).astype(np.float32)


def matmul_add(k=32, n=24, w=None, rows=(4, 6)) -> onnx.ModelProto:
    """x[4, 6, K] -> MatMul(W) -> Add(b) -> Relu -> y."""
    w = low_rank(k, n, 8, noise=0.05) if w is None else w
    b = rng(1).standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["lin"], name="bias"),
             helper.make_node("Relu", ["lin"], ["y"])]
    return make_model(nodes, [tensor("x", [*rows, k])], [tensor("y", [*rows, n])], [init("w", w), init("b", b)])


def gemm(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(24,), k=32, n=24, m=5) -> onnx.ModelProto:
    w = low_rank(k, n, 8, noise=0.05)
    w = w.T.copy() if trans_b else w
    inputs, inits = ["x", "w"], [init("w", w)]
    if c_shape is not None:
        inputs.append("c")
        inits.append(init("c", rng(2).standard_normal(c_shape).astype(np.float32)))
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha,
                              beta=beta)]
    x_shape = [k, m] if trans_a else [m, k]
    return make_model(nodes, [tensor("x", x_shape)], [tensor("y", [m, n])], inits)


def conv(m=8, c=6, k=3, group=1, seed=3, bias=True, x_hw=(9, 11), **attrs) -> onnx.ModelProto:
    r = rng(seed)
    w = r.standard_normal((m, c // group, k, k)).astype(np.float32)
    inputs, inits = ["x", "w"], [init("w", w)]
    if bias:
        inputs.append("b")
        inits.append(init("b", r.standard_normal(m).astype(np.float32)))
    nodes = [helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[k, k], group=group, **attrs)]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2, c, *x_hw])], [tensor("y", None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model)
    return make_model(nodes, [tensor("x", [2, c, *x_hw])], list(inferred.graph.output), inits)


def feeds_for(proto, seed=5):
    return verify.sample_inputs(verify.session(proto), seed)


def rel_error(ref, cand, feeds=None) -> float:
    feeds, a = verify.run(ref, feeds)
    _, b = verify.run(cand, feeds)
    name = next(iter(a))
    return float(np.linalg.norm(a[name] - b[name]) ** 2 / np.linalg.norm(a[name]) ** 2)


def calibration_error(ref, cand, batches) -> float:
    """Relative squared output error over all the batches together."""
    num = den = 0.0
    for feeds in batches:
        _, a = verify.run(ref, feeds)
        _, b = verify.run(cand, feeds)
        name = next(iter(a))
        num += float(np.linalg.norm(a[name] - b[name]) ** 2)
        den += float(np.linalg.norm(a[name]) ** 2)
    return num / den


def with_calibration(proto, batches, target="cpu") -> PassContext:
    m = load(proto)
    cal = Calibration(source=batches, reference=Reference(m))
    return PassContext(target=_any_rank_target(target), calibration=cal, reference=Reference(m))


def layer_rows(result):
    return [r for r in result.stats["layers"] if "params" in r]


# -- MatMul / Gemm ---------------------------------------------------------------------------------
def test_matmul_at_full_rank_is_exact_and_keeps_the_bias_on_the_second_product():
    proto = matmul_add()
    out, result = run_pass("lowrank-matmul", proto, rank=24, **EXACT)
    assert result.changed and result.stats["split"] == 1
    assert op_histogram(out)["MatMul"] == 2
    verify_close(proto, out)
    nodes = {n.name: n for n in out.graph.node}
    second = next(n for n in out.graph.node if n.op_type == "MatMul" and n.output[0] == "mm")
    assert nodes["bias"].input[0] == second.output[0]  # the Add reads the second factor's product


def verify_close(ref, cand, rtol=1e-3, atol=1e-4):
    onnx.checker.check_model(cand, full_check=True)
    feeds, a = verify.run(ref)
    _, b = verify.run(cand, feeds)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, (24,)), (0, 1, 1.0, 1.0, (1, 24)), (1, 0, 0.5, 2.0, (24,)), (1, 1, 2.0, 0.5, ()),
    (0, 1, 1.5, 1.0, None), (0, 0, 1.0, 0.7, (5, 24))])
def test_gemm_forms_at_full_rank_are_exact(trans_a, trans_b, alpha, beta, c_shape):
    proto = gemm(trans_a, trans_b, alpha, beta, c_shape)
    out, result = run_pass("lowrank-matmul", proto, rank=24, **EXACT)
    assert result.changed and op_histogram(out) == {"Gemm": 2}
    verify_close(proto, out)


def test_batched_matmul_with_a_stacked_weight():
    w = np.stack([low_rank(16, 12, 4, seed=s) for s in range(3)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")]
    proto = make_model(nodes, [tensor("x", [3, 5, 16])], [tensor("y", [3, 5, 12])], [init("w", w)])
    out, result = run_pass("lowrank-matmul", proto, rank=4, **QUIET, full_rank_energy=0.0)
    assert result.changed
    row = layer_rows(result)[0]
    assert row["rank"] == 4 and row["params"] == [3 * 16 * 12, 3 * 4 * (16 + 12)]
    verify_close(proto, out)  # rank 4 weights: exact at rank 4


def test_error_falls_with_rank():
    proto = matmul_add(w=low_rank(32, 24, 24, noise=0.3))
    errors = []
    for rank in (2, 6, 12, 24):
        out, _ = run_pass("lowrank-matmul", proto, rank=rank, **EXACT)
        errors.append(rel_error(proto, out))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8 < errors[0]


def test_parameter_and_mac_accounting():
    proto = matmul_add(k=64, n=48)
    out, result = run_pass("lowrank-matmul", proto, rank=8, **QUIET, full_rank_energy=0.0)
    row = layer_rows(result)[0]
    rows = 4 * 6
    assert row["params"] == [64 * 48, 8 * (64 + 48)]
    assert row["macs"] == [rows * 64 * 48, rows * 8 * (64 + 48)]
    before, after = model_cost(proto), model_cost(out)
    assert before.params - after.params == 64 * 48 - 8 * (64 + 48)
    assert int(before.macs) - int(after.macs) == rows * (64 * 48 - 8 * (64 + 48))
    assert result.stats["params_ratio"] == pytest.approx(8 * (64 + 48) / (64 * 48), abs=1e-4)


def test_break_even_and_small_layers_are_left_alone_with_the_reason():
    proto = matmul_add(k=32, n=24)
    _, result = run_pass("lowrank-matmul", proto, rank=16, **QUIET, full_rank_energy=0.0)
    assert not result.changed
    assert "saves" in layer_rows(result)[0]["reason"]  # 16·56 > 0.9·32·24
    _, result = run_pass("lowrank-matmul", proto, rank=2, **{**QUIET, "min_params": 10_000})
    assert not result.changed and "too small" in result.stats["layers"][0]["reason"]


def test_full_rank_weights_are_left_alone_with_the_reason():
    proto = matmul_add(k=64, n=64, w=rng(4).standard_normal((64, 64)).astype(np.float32))
    _, result = run_pass("lowrank-matmul", proto, budget=0.5, **QUIET)
    assert not result.changed
    reason = layer_rows(result)[0]["reason"]
    assert reason.startswith("full rank in practice") and "of 64" in reason


def test_energy_picks_the_true_rank_of_a_low_rank_weight():
    proto = matmul_add(k=64, n=48, w=low_rank(64, 48, 6))
    out, result = run_pass("lowrank-matmul", proto, energy=0.999, **QUIET)
    assert layer_rows(result)[0]["rank"] == 6
    verify_close(proto, out)


def test_ranks_are_rounded_to_the_targets_channel_multiple():
    target = load_target("cpu")
    target.capabilities["channel_multiple"] = 8
    proto = matmul_add(k=64, n=48, w=low_rank(64, 48, 6))
    _, result = run_pass("lowrank-matmul", proto, ctx=PassContext(target=target), energy=0.999, **QUIET)
    assert layer_rows(result)[0]["rank"] == 8
    _, result = run_pass("lowrank-matmul", proto, ctx=PassContext(target=target), rank=3, **QUIET)
    assert layer_rows(result)[0]["rank"] == 8


def two_layers() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add -> Relu -> MatMul(W2) -> y: W1 compresses well, W2 does not."""
    w1 = low_rank(48, 64, 4, seed=1, noise=0.01)
    w2 = rng(2).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="easy"),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="hard")]
    return make_model(nodes, [tensor("x", [8, 48])], [tensor("y", [8, 32])],
                      [init("w1", w1), init("b1", np.zeros(64, np.float32)), init("w2", w2)])


def test_budget_takes_the_savings_where_they_cost_least():
    proto = two_layers()
    out, result = run_pass("lowrank-matmul", proto, budget=0.6, **QUIET, full_rank_energy=0.0)
    rows = {r["node"]: r for r in layer_rows(result)}
    assert result.stats["budget_met"]
    assert result.stats["params_after"] <= 0.6 * result.stats["params_before"]
    assert rows["easy"]["action"] == "split" and rows["easy"]["rank"] < 16
    assert rel_error(proto, out) < 0.05


def damped_and_direct() -> onnx.ModelProto:
    """y = 0.001·(x A) + x B with A = B: the same spectrum, but A's error barely reaches y."""
    w = rng(6).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="damped"),
             helper.make_node("Mul", ["a", "s"], ["as"]),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="direct"),
             helper.make_node("Add", ["as", "b"], ["y"])]
    return make_model(nodes, [tensor("x", [16, 64])], [tensor("y", [16, 64])],
                      [init("wa", w), init("wb", w.copy()), init("s", np.array(0.001, np.float32))])


def test_sensitivity_spends_the_budget_where_the_outputs_do_not_see_it():
    proto = damped_and_direct()
    common = dict(budget=0.75, **QUIET, full_rank_energy=0.0)
    _, measured = run_pass("lowrank-matmul", proto, select="sensitivity", **common)
    rows = {r["node"]: r for r in layer_rows(measured)}
    assert measured.stats["sensitivity_runs"] > 0
    assert rows["damped"]["action"] == "split" and rows["direct"]["action"] == "kept"
    _, spectral = run_pass("lowrank-matmul", proto, select="spectrum", **common)
    rows = {r["node"]: r for r in layer_rows(spectral)}
    assert rows["damped"]["rank"] == rows["direct"]["rank"]  # blind to the damping: an even split


def test_layers_left_alone_are_out_of_the_budget():
    """A big full-rank layer cannot be split: the budget applies to the small low-rank one,
    which is not driven to rank 1 to pay for the giant."""
    big = rng(3).standard_normal((96, 96)).astype(np.float32)
    small = low_rank(64, 48, 8, seed=4, noise=0.02)
    nodes = [helper.make_node("MatMul", ["x", "big"], ["h"], name="giant"),
             helper.make_node("MatMul", ["x2", "small"], ["y2"], name="small")]
    proto = make_model(nodes, [tensor("x", [4, 96]), tensor("x2", [4, 64])],
                       [tensor("h", [4, 96]), tensor("y2", [4, 48])], [init("big", big), init("small", small)])
    _, result = run_pass("lowrank-matmul", proto, budget=0.5, **QUIET, select="spectrum")
    rows = {r["node"]: r for r in layer_rows(result)}
    assert rows["giant"]["reason"].startswith("full rank in practice")
    assert result.stats["budget_base"] == 64 * 48 and result.stats["budget_met"]
    assert rows["small"]["action"] == "split" and rows["small"]["rank"] >= 8


def test_budget_on_macs():
    proto = two_layers()
    _, result = run_pass("lowrank-matmul", proto, budget=0.7, budget_on="macs", **QUIET, full_rank_energy=0.0)
    assert result.stats["macs_ratio"] <= 0.7


def test_one_selection_mode_at_a_time():
    with pytest.raises(PipelineError, match="one of rank, rank_ratio and budget"):
        run_pass("lowrank-matmul", matmul_add(), rank=4, budget=0.5)
    with pytest.raises(PipelineError, match="budget"):
        run_pass("lowrank-matmul", matmul_add(), budget=1.5)


def test_activation_products_are_not_candidates():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    proto = make_model(nodes, [tensor("a", [4, 8]), tensor("b", [8, 4])], [tensor("y", [4, 4])])
    _, result = run_pass("lowrank-matmul", proto, **QUIET)
    assert not result.changed and result.stats["layers"] == []


# -- data-aware factorization and refit ----------------------------------------------------------------
def correlated_batches(k, count, seed, rows=(4, 6)):
    r = rng(seed)
    mix = r.standard_normal((k, k)) * np.logspace(0, -2.5, k)[:, None]
    basis = rng(99).standard_normal((k, k)) * np.logspace(0, -2.5, k)[:, None]
    return [{"x": (r.standard_normal((*rows, k)) @ (basis + 0.1 * mix)).astype(np.float32)} for _ in range(count)]


def test_data_aware_split_beats_plain_svd_on_correlated_inputs():
    proto = matmul_add(k=48, n=40, w=rng(5).standard_normal((48, 40)).astype(np.float32))
    calib, held_out = correlated_batches(48, 6, seed=1), correlated_batches(48, 1, seed=2)[0]
    plain, _ = run_pass("lowrank-matmul", proto, rank=6, **QUIET, full_rank_energy=0.0)
    aware, result = run_pass("lowrank-matmul", proto, ctx=with_calibration(proto, calib), rank=6, refit=False,
                             **QUIET, full_rank_energy=0.0)
    assert layer_rows(result)[0]["whitened"] is True
    assert rel_error(proto, aware, held_out) < 0.5 * rel_error(proto, plain, held_out)


def test_too_few_calibration_rows_fall_back_to_plain_svd():
    proto = matmul_add(k=48, n=40)
    calib = correlated_batches(48, 1, seed=1, rows=(2, 3))  # 6 rows for 48 input dimensions
    _, result = run_pass("lowrank-matmul", proto, ctx=with_calibration(proto, calib), rank=6, refit=False,
                         **QUIET, full_rank_energy=0.0)
    row = layer_rows(result)[0]
    assert row["whitened"] is False and row["whitening"] == "plain SVD: 6 calibration rows for 48 input dimensions"


def test_refit_pairs_the_students_activations_with_the_teachers_outputs():
    proto = two_layers()
    calib = [{"x": rng(10 + i).standard_normal((8, 48)).astype(np.float32)} for i in range(8)]
    common = dict(rank=8, **QUIET, full_rank_energy=0.0, data_aware=False, min_saving=-1.0)
    plain, _ = run_pass("lowrank-matmul", proto, ctx=with_calibration(proto, calib), refit=False, **common)
    refit, result = run_pass("lowrank-matmul", proto, ctx=with_calibration(proto, calib), refit=True,
                             refit_ridge=1e-4, **common)
    assert result.stats["refit"] == 2
    assert [r["refit"] for r in layer_rows(result)] == ["refit", "refit"]
    # in the calibration data's own terms the refit can only help
    assert calibration_error(proto, refit, calib) < calibration_error(proto, plain, calib)


# -- Conv --------------------------------------------------------------------------------------------
CONV_CASES = [
    ("channel", {}), ("channel", {"strides": [2, 2]}), ("channel", {"pads": [1, 0, 2, 1]}),
    ("channel", {"dilations": [2, 1], "pads": [2, 1, 2, 1]}), ("channel", {"group": 2}),
    ("channel", {"group": 3, "strides": [2, 1], "pads": [1, 1, 1, 1]}), ("channel", {"auto_pad": "SAME_UPPER"}),
    ("spatial", {}), ("spatial", {"strides": [2, 3], "pads": [1, 2, 0, 1]}),
    ("spatial", {"dilations": [2, 2], "pads": [2, 2, 2, 2]}), ("spatial", {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("spatial", {"auto_pad": "VALID"}),
    ("tucker2", {}), ("tucker2", {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("tucker2", {"dilations": [1, 2], "pads": [1, 2, 1, 2]}), ("tucker2", {"auto_pad": "SAME_UPPER"}),
    ("separable", {}), ("separable", {"strides": [2, 1], "pads": [0, 1, 1, 0], "dilations": [2, 1]}),
]


@pytest.mark.parametrize("method,attrs", CONV_CASES, ids=[f"{m}-{'-'.join(a) or 'plain'}" for m, a in CONV_CASES])
def test_conv_splits_are_exact_at_full_rank(method, attrs):
    attrs = dict(attrs)
    group = attrs.pop("group", 1)
    proto = conv(m=12, group=group, **attrs)
    name, opts = ("separable-conv", {"max_multiplier": 9}) if method == "separable" else \
        ("lowrank-conv", {"method": method})
    out, result = run_pass(name, proto, rank=1000, **EXACT, **opts)  # clamped to the full rank
    assert result.changed, result.stats
    verify_close(proto, out, atol=1e-3)
    expected = {"channel": 2, "spatial": 2, "tucker2": 3, "separable": 2}[method]
    assert op_histogram(out) == {"Conv": expected}


def test_conv_without_bias_and_one_by_one_kernels():
    proto = conv(k=1, m=16, c=12, bias=False)
    out, result = run_pass("lowrank-conv", proto, method="tucker2", rank=12, **EXACT)
    assert result.changed and layer_rows(result)[0]["method"] == "channel"  # a 1×1 conv is a matmul
    verify_close(proto, out)
    _, result = run_pass("separable-conv", proto, **QUIET)
    assert not result.changed and "pointwise" in result.stats["layers"][0]["reason"]


def test_conv_left_alone_with_reasons():
    depthwise = conv(m=6, c=6, group=6)
    _, result = run_pass("lowrank-conv", depthwise, **QUIET)
    assert "depthwise" in result.stats["layers"][0]["reason"]
    _, result = run_pass("lowrank-conv", conv(group=2), method="spatial", **QUIET)
    assert "group=1" in result.stats["layers"][0]["reason"]


def test_conv_mac_accounting():
    proto = conv(m=16, c=12, x_hw=(10, 10), pads=[1, 1, 1, 1])
    out, result = run_pass("lowrank-conv", proto, rank=4, **QUIET, full_rank_energy=0.0)
    row = layer_rows(result)[0]
    positions = 2 * 10 * 10
    assert row["macs"] == [positions * 16 * 12 * 9, positions * (4 * 12 * 9 + 16 * 4)]
    assert int(model_cost(proto).macs) - int(model_cost(out).macs) == row["macs"][0] - row["macs"][1]


def test_spatial_mac_accounting_counts_the_first_conv_at_full_width():
    proto = conv(m=16, c=12, x_hw=(10, 12), strides=[2, 2])
    _, result = run_pass("lowrank-conv", proto, method="spatial", rank=4, **QUIET, full_rank_energy=0.0)
    row = layer_rows(result)[0]
    # kh×1 at stride (2, 1): 4 × 6 rows of 12 columns; 1×kw at stride (1, 2): 4 × 5 positions
    assert row["macs"][1] == 2 * 4 * 12 * 4 * 12 * 3 + 2 * 4 * 5 * 16 * 4 * 3


def conv_batches(c, count, seed, hw=(9, 11)):
    r = rng(seed)
    base = rng(77).standard_normal((c, c)) * np.logspace(0, -2, c)[:, None]
    out = []
    for _ in range(count):
        z = r.standard_normal((2, c, *hw))
        out.append({"x": np.einsum("nchw,cd->ndhw", z, base).astype(np.float32)})
    return out


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_data_aware_conv_splits_beat_plain_ones(method):
    proto = conv(m=16, c=12, pads=[1, 1, 1, 1])
    calib, held_out = conv_batches(12, 4, seed=1), conv_batches(12, 1, seed=2)[0]
    rank = {"channel": 6, "spatial": 8, "tucker2": 4}[method]
    common = dict(method=method, rank=rank, **QUIET, full_rank_energy=0.0, refit=False, min_saving=-1.0)
    plain, _ = run_pass("lowrank-conv", proto, **common)
    aware, result = run_pass("lowrank-conv", proto, ctx=with_calibration(proto, calib), **common)
    assert layer_rows(result)[0]["whitened"]
    assert rel_error(proto, aware, held_out) < rel_error(proto, plain, held_out)


@pytest.mark.parametrize("method,group", [("channel", 1), ("channel", 2), ("spatial", 1), ("tucker2", 1)])
def test_conv_refit_lowers_the_calibration_error(method, group):
    proto = conv(m=16, c=12, group=group, pads=[1, 1, 1, 1], strides=[1, 2])
    calib = conv_batches(12, 3, seed=4)
    rank = {"channel": 3, "spatial": 6, "tucker2": 4}[method]
    common = dict(method=method, rank=rank, **QUIET, full_rank_energy=0.0, min_saving=-1.0)
    before, _ = run_pass("lowrank-conv", proto, ctx=with_calibration(proto, calib), refit=False, **common)
    after, result = run_pass("lowrank-conv", proto, ctx=with_calibration(proto, calib), refit=True,
                             refit_ridge=1e-6, **common)
    assert result.stats["refit"] == 1
    assert calibration_error(proto, after, calib) < calibration_error(proto, before, calib)


def test_separable_conv_chooses_the_multiplier_by_energy():
    r = rng(8)
    # each input channel's kernels are scaled copies of one 3×3 pattern: multiplier 1 is exact
    pattern = r.standard_normal((6, 1, 3, 3))
    w = (r.standard_normal((10, 6, 1, 1)) * pattern.transpose(1, 0, 2, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    proto = make_model(nodes, [tensor("x", [1, 6, 7, 7])], [tensor("y", [1, 10, 7, 7])], [init("w", w)])
    out, result = run_pass("separable-conv", proto, **QUIET)
    row = layer_rows(result)[0]
    assert row["rank"] == 1 and row["params"][1] == 6 * 9 + 10 * 6
    verify_close(proto, out)
    g = {n.op_type + str(n.attribute[0].i if n.attribute and n.attribute[0].name == "group" else "")
         for n in out.graph.node}
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i == 6 for a in n.attribute) for n in out.graph.node), g


# -- speed gate ---------------------------------------------------------------------------------------
def _fake_compare(ratio):
    def compare(self, a, b, feeds, key=None):
        # the models handed over are the one-layer original and split, runnable as they are
        verify.run(a, feeds)
        verify.run(b, feeds)
        return microbench.Timing(1.0, ratio, ratio, 3)
    return compare


def test_a_split_slower_than_its_layer_is_left_alone(monkeypatch):
    monkeypatch.setattr(microbench.MicroBenchmark, "compare", _fake_compare(1.2))
    proto = two_layers()
    _, result = run_pass("lowrank-matmul", proto, rank=4, check_model=False, full_rank_energy=0.0, min_params=0)
    assert not result.changed
    for row in layer_rows(result):
        assert row["reason"].startswith("slower when split") and "1.20x" in row["reason"]


def test_the_budget_is_allocated_again_without_slow_splits(monkeypatch):
    calls = []

    def compare(self, a, b, feeds, key=None):
        calls.append(key)
        slow = key[2][-1] == 48  # the first layer's split is slow, the second's fast
        return microbench.Timing(1.0, 1.1 if slow else 0.5, 1.1 if slow else 0.5, 3)

    monkeypatch.setattr(microbench.MicroBenchmark, "compare", compare)
    _, result = run_pass("lowrank-matmul", two_layers(), budget=0.8, check_model=False, full_rank_energy=0.0, min_params=0)
    rows = {r["node"]: r for r in layer_rows(result)}
    assert rows["easy"]["action"] == "kept" and "slower" in rows["easy"]["reason"]
    assert rows["hard"]["action"] == "split" and rows["hard"]["speed_ratio"] == 0.5
    assert all(k[0] == "dense" for k in calls)


def test_the_whole_model_check_undoes_every_split(monkeypatch):
    monkeypatch.setattr(microbench.MicroBenchmark, "compare", _fake_compare(0.5))
    proto = two_layers()
    out, result = run_pass("lowrank-matmul", proto, rank=4, full_rank_energy=0.0, min_params=0)
    assert result.changed and result.stats["model_latency_ratio"] == 0.5

    monkeypatch.setattr(microbench.MicroBenchmark, "compare",
                        lambda self, a, b, feeds, key=None: microbench.Timing(1.0, 0.5 if key else 1.05,
                                                                              0.5 if key else 1.05, 3))
    out, result = run_pass("lowrank-matmul", proto, rank=4, full_rank_energy=0.0, min_params=0)
    assert not result.changed  # run_pass checks the model is as it was
    assert all("undone" in r["reason"] for r in layer_rows(result))


def test_stats_say_what_it_cost_on_sample_data():
    proto = two_layers()
    _, result = run_pass("lowrank-matmul", proto, rank=4, **QUIET, full_rank_energy=0.0)
    assert 0 < result.stats["sample_cosine"] < 1
    assert result.stats["sample_data"] == "generated from the input specs"


def test_a_real_model_through_optimize(tmp_path):
    from tests.real_models import real_model

    import onnxopt

    path = real_model("ppocr_v4_rec.onnx")
    result = onnxopt.optimize(path, pipeline="lossless,lowrank-matmul{rank_ratio=0.25,speed_check=false,"
                                             "check_model=false,full_rank_energy=0}")
    stats = result.report["passes"][-1]["stats"]
    assert stats["split"] > 0 and stats["params_after"] < stats["params_before"]
    onnx.checker.check_model(result.model)
    feeds = {"x": rng(0).uniform(-1, 1, (1, 3, 48, 320)).astype(np.float32)}
    _, out = verify.run(result.model, feeds)
    assert np.isfinite(next(iter(out.values()))).all()
