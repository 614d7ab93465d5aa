"""The accuracy-aware search (onnxopt/search): sensitivity, give-back, optuna, the Pareto
front, local worker processes and Ray, and the command line around it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.errors import QualityGateError
from onnxopt.search import Knob, register_knob, search
from onnxopt.search import space
from tests.graphs import init, make_model, rng, tensor


def mlp() -> onnx.ModelProto:
    """Three layers; the middle one reads a 300x outlier channel, so int8 hurts it most."""
    r = rng(40)
    g = np.ones(32, np.float32)
    g[3] = 300.0
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Mul", ["a1", "g"], ["m"], name="gain"),
             helper.make_node("Gemm", ["m", "w2", "b2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3")]
    return make_model(nodes, [tensor("x", ["n", 32])], [tensor("y", ["n", 10])], [
        init("w1", r.standard_normal((32, 32)).astype(np.float32) * 0.3), init("b1", np.zeros(32, np.float32)),
        init("g", g), init("w2", r.standard_normal((32, 32)).astype(np.float32) * 0.02),
        init("b2", np.zeros(32, np.float32)), init("w3", r.standard_normal((32, 10)).astype(np.float32) * 0.3),
        init("b3", np.zeros(10, np.float32))])


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    r = np.random.default_rng(0)
    calib, evaluation = tmp_path / "c.npz", tmp_path / "e.npz"
    np.savez(calib, x=r.standard_normal((6, 16, 32)).astype(np.float32))
    np.savez(evaluation, x=r.standard_normal((3, 16, 32)).astype(np.float32))
    return str(path), str(calib), str(evaluation)


def run(files, **kw):
    model, calib, evaluation = files
    args = dict(max_drop=1e-4, metric="cosine", data=evaluation, calibration=calib, trials=2, workers=1)
    args.update(kw)
    return search(model, **args)


def test_search_gives_back_the_sensitive_layer_and_returns_a_front(files):
    found = run(files)
    rep = found.report
    sens = rep["sensitivity"][0]
    assert sens["pass"] == "quantize-static" and sens["layers"][0]["layer"] == "fc2"  # most sensitive first
    assert rep["give_back"] is not None and rep["give_back"] >= 1
    assert rep["front"] and all(c["drop"] <= 1e-4 for c in rep["front"])
    assert rep["chosen"] in rep["front"] and "fc2" in rep["chosen"]["pipeline"]
    onnx.checker.check_model(found.result.model)
    assert rep["evaluations"] >= 3 and all("pipeline" in c for c in rep["candidates"])
    assert {"calibration", "per_channel", "equalize", "refit", "quantizers"} <= set(rep["knobs"])


def test_sensitivity_is_cached_on_disk(files):
    first = run(files, trials=0)
    second = run(files, trials=0)
    assert not first.report["sensitivity"][0]["cached"] and second.report["sensitivity"][0]["cached"]
    assert first.report["sensitivity"][0]["layers"] == second.report["sensitivity"][0]["layers"]


def test_an_impossible_budget_exits_3_naming_the_closest(files):
    with pytest.raises(QualityGateError, match="closest: drop"):
        run(files, max_drop=-1.0, trials=0)


def test_search_in_worker_processes(files):
    found = run(files, workers=2, trials=2)
    assert found.report["executor"] == "2 local process(es)" and found.report["front"]


def test_search_on_a_local_ray_instance(files):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'onnxopt[ray]')")
    found = run(files, workers=2, trials=0, executor="ray")
    assert "Ray actor" in found.report["executor"] and found.report["front"]


def test_a_registered_knob_is_searched(files):
    knob = register_knob(Knob("test_fold_identity", (False, True), lambda plan: True,
                              lambda plan, value: plan.before.append(onnxopt.PassSpec("eliminate-identity"))
                              if value else None))
    try:
        found = run(files, trials=3)
        assert found.report["knobs"]["test_fold_identity"] == [False, True]
    finally:
        space.KNOBS.pop(knob.name)


def test_cli_search_writes_the_chosen_model_and_an_html_report(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from onnxopt.cli import main

    model, calib, evaluation = files
    out, page = tmp_path / "o.onnx", tmp_path / "r.html"
    rc = main(["optimize", model, "-o", str(out), "--calibration", calib, "--data", evaluation,
               "--max-accuracy-drop", "0.0001", "--search", "--search-trials", "1", "--workers", "1",
               "--report", str(page)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "Pareto front" in text.out and out.exists()
    html = page.read_text()
    assert "Search: Pareto front" in html and "Sensitivity: quantize-static" in html
    data = json.loads(html.split("id='onnxopt-report'>")[1].split("</script>")[0].replace("<\\/", "</"))
    assert data["search"]["chosen"]["drop"] <= 1e-4


@pytest.mark.parametrize("args, message", [
    (["--search", "--max-accuracy-drop", "0.01"], "--search needs"),
    (["--executor", "ray"], "go with --search"),
    (["--workers", "2"], "go with --search"),
])
def test_cli_search_usage_errors(files, tmp_path, capsys, args, message):
    from onnxopt.cli import main

    model, calib, _ = files
    rc = main(["optimize", model, "-o", str(tmp_path / "o.onnx"), "--calibration", calib] + args)
    assert rc == 2 and message in capsys.readouterr().err


def test_structural_knobs_scale_pruning_and_low_rank():
    from onnxopt.optimize import plan as plan_pipeline
    from onnxopt.target import load_target

    _, specs, _ = plan_pipeline(load_target("cpu"), "lossless,prune-channels{ratio=0.4},"
                                "lowrank-matmul{budget=0.6},quantize-dynamic", has_calibration=True)
    plan = space.split(specs)
    knobs = space.knobs_for(plan, has_calibration=True)
    assert knobs["prune_scale"][0] == 1.0 and knobs["lowrank_scale"][0] == 1.0
    half = space.build(plan, space.Candidate({"prune_scale": 0.5, "lowrank_scale": 0.5}), [])
    assert half.lossy_pass("prune-channels").options["ratio"] == 0.2
    assert half.lossy_pass("lowrank-matmul").options["budget"] == 0.8  # keeps more
    none = space.build(plan, space.Candidate({"prune_scale": 0.0, "lowrank_scale": 0.0}), [])
    assert [s.name for s in none.lossy] == ["quantize-dynamic"]
    assert plan.lossy_pass("prune-channels").options["ratio"] == 0.4  # the base plan is untouched
