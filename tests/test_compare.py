"""compare: two models that differ by a known amount; metrics; the gate; DATA reading."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
from onnx import helper

from onnxopt.measure import metrics as M
from onnxopt.cli import main
from onnxopt.measure.compare import compare, interleaved_latency, read_batches, _session
from onnxopt.errors import UsageError
from tests.graphs import init, make_model, tensor

# Rows whose argmax flips when 1.5 is added to class 2: rows 0 and 1 flip, 2 and 3 do not.
X = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 0, 0]], np.float32)


def scaled_and_shifted(scale: float, shift: float):
    """scaled = x * scale; logits = x + [0, 0, shift]."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["scaled"]), helper.make_node("Add", ["x", "c"], ["logits"])]
    return make_model(nodes, [tensor("x", ["N", 3])], [tensor("scaled", ["N", 3]), tensor("logits", ["N", 3])],
                      [init("s", np.float32(scale)), init("c", np.array([0, 0, shift], np.float32))])


@pytest.fixture
def pair(tmp_path):
    import onnx

    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(scaled_and_shifted(1.0, 0.0), ref)
    onnx.save(scaled_and_shifted(1.1, 1.5), cand)
    data = tmp_path / "data.npz"
    np.savez(data, x=X, label=np.array([0, 1, 2, 0]))  # label: not an input, allowed
    return ref, cand, data


def test_known_differences_are_measured(pair):
    ref, cand, data = pair
    r = compare(ref, cand, data=data, latency=False, memory=False)
    scaled, logits = r["outputs"]["scaled"], r["outputs"]["logits"]
    # x*1.1 vs x: same direction (cosine 1), noise = 0.01 * signal -> exactly 20 dB.
    assert scaled["cosine"] == pytest.approx(1.0, abs=1e-7)
    assert scaled["snr_db"] == pytest.approx(20.0, abs=1e-4)
    assert scaled["max_abs"] == pytest.approx(0.5, rel=1e-5) and "top1" in scaled
    # logits: class 2 shifted by 1.5 -> 2 of 4 rows change their argmax.
    assert logits["top1"] == 0.5
    assert logits["max_abs"] == pytest.approx(1.5) and logits["mean_abs"] == pytest.approx(1.5 / 3)
    assert r["batches"] == 1 and r["input_shapes"] == {"x": [4, 3]}
    assert r["metric"]["metric"] == "cosine"


def test_identical_models_have_no_drop(pair):
    ref, _, data = pair
    r = compare(ref, ref, data=data, metric="snr", max_drop=0.0, latency=False, memory=False)
    assert r["outputs"]["scaled"]["snr_db"] == math.inf
    assert r["gate"] == {"max_drop": 0.0, "drop": 0.0, "passed": True}


# logits is the worse output for all three: 2 of 4 argmaxes flip; noise 4 * 1.5² = 9 against
# a signal of 1+1+1+25 = 28 (the scaled output's ratio is only 0.01); mse 1.5² / 3.
@pytest.mark.parametrize("metric,drop", [("top1", 0.5), ("snr", 9 / 28), ("mse", 1.5 ** 2 / 3)])
def test_builtin_metrics_take_the_worst_output(pair, metric, drop):
    ref, cand, data = pair
    r = compare(ref, cand, data=data, metric=metric, latency=False, memory=False)
    assert r["metric"]["drop"] == pytest.approx(drop, rel=1e-4)
    assert r["metric"]["output"] == "logits"


def test_cli_gate_exits_3_when_the_drop_is_too_big(pair, capsys):
    ref, cand, data = pair
    args = ["compare", str(ref), str(cand), "--data", str(data), "--metric", "top1", "--no-latency", "--no-memory"]
    assert main(args + ["--max-drop", "0.4"]) == 3
    assert "top1 drop 0.5 exceeds --max-drop 0.4" in capsys.readouterr().err
    assert main(args + ["--max-drop", "0.5"]) == 0
    assert "gate: drop 0.5 <= max 0.5: passed" in capsys.readouterr().out


def test_user_metric_gets_outputs_and_may_return_task_scores(pair, tmp_path, monkeypatch):
    ref, cand, data = pair
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        import numpy as np
        LABELS = np.array([0, 1, 2, 0])

        def accuracy(reference, candidate):
            acc = lambda out: float(np.mean(np.argmax(out["logits"], -1) == LABELS))
            return acc(reference), acc(candidate)

        def constant_drop(reference, candidate):
            return 0.25
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = compare(ref, cand, data=data, metric="my_task:accuracy", latency=False, memory=False)
    assert r["metric"] == {"metric": "my_task:accuracy", "value": 0.5, "drop": 0.5,
                           "reference": 1.0, "candidate": 0.5}
    r = compare(ref, cand, data=data, metric="my_task:constant_drop", max_drop=0.2, latency=False, memory=False)
    assert r["metric"]["drop"] == 0.25 and r["gate"]["passed"] is False
    sys.modules.pop("my_task", None)


def test_bad_metric_names_are_usage_errors(pair, capsys):
    with pytest.raises(UsageError, match="unknown metric 'cosin'"):
        M.load_metric("cosin")
    with pytest.raises(UsageError, match="cannot import module"):
        M.load_metric("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="has no function"):
        M.load_metric("math:no_such_function")
    ref, cand, data = pair
    assert main(["compare", str(ref), str(cand), "--metric", "bogus"]) == 2
    assert main(["compare", str(ref), "missing.onnx"]) == 2


def test_stacked_npz_gives_one_batch_per_leading_index(pair, tmp_path):
    import onnx

    ref, _, _ = pair
    stacked = tmp_path / "stacked.npz"
    np.savez(stacked, x=np.stack([X, X * 2, X * 3]))
    batches = read_batches(stacked, onnx.load(ref))
    assert len(batches) == 3 and batches[2]["x"].tolist() == (X * 3).tolist()
    assert len(read_batches(stacked, onnx.load(ref), max_batches=2)) == 2


def test_top1_is_only_for_classifier_like_outputs():
    assert M.is_classifier_like(np.zeros((4, 10), np.float32))
    probs = np.full((1, 5, 4), 0.25, np.float32)
    assert M.is_classifier_like(probs)  # [N, T, C] rows of probabilities (CTC output)
    assert not M.is_classifier_like(np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32))
    assert not M.is_classifier_like(np.zeros((1, 1, 8, 8), np.float32))
    assert "top1" not in M.output_stats(np.ones((1, 1, 4, 4)), np.ones((1, 1, 4, 4)))


def test_latency_is_interleaved_with_as_many_runs_each(pair):
    ref, cand, _ = pair
    a, b = _session(ref, 1), _session(cand, 1)
    times_a, times_b = interleaved_latency(a, b, {"x": X}, runs=6, warmup=1)
    assert len(times_a) == len(times_b) == 6 and all(t > 0 for t in times_a + times_b)


def test_full_comparison_measures_sizes_latency_and_memory(pair):
    ref, cand, data = pair
    r = compare(ref, cand, data=data, runs=5)
    for side in ("reference", "candidate"):
        assert r[side]["file_bytes"] > 0 and r[side]["latency_ms"] > 0
        assert r[side]["peak_rss_bytes"] > r[side]["session_memory_bytes"] >= 0
    assert r["latency_ratio"] > 0 and r["latency_runs"] == 5
