"""The fidelity and speed floor of a run (onnxopt/pipeline/floor.py): graphs built to break
int8 get their costly layers back and meet the floor; int8 that runs slower stays float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.data.calibration import hold_back
from onnxopt.measure.fidelity import Floor
from onnxopt.testing import assert_equivalent
from tests.graphs import init, make_model, rng, tensor


def log_after_matmul() -> onnx.ModelProto:
    """A benign layer, then x @ W -> square -> + 1e-8 -> Log: int8 rounds small powers to 0
    and Log blows them up (the mel power spectrum of an audio front end)."""
    r = rng(20)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["f"], name="front"),
             helper.make_node("MatMul", ["f", "w"], ["h"], name="mel"),
             helper.make_node("Mul", ["h", "h"], ["p"], name="power"),
             helper.make_node("Add", ["p", "eps"], ["pe"], name="floor_add"),
             helper.make_node("Log", ["pe"], ["y"], name="log")]
    return make_model(nodes, [tensor("x", ["batch", 32])], [tensor("y", ["batch", 16])],
                      [init("w0", (r.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)),
                       init("w", r.standard_normal((32, 16)).astype(np.float32)),
                       init("eps", np.array(1e-8, np.float32))])


def concat_of_different_scales() -> onnx.ModelProto:
    """A detector head: scores in [0, 1] concatenated with boxes in the hundreds, split again."""
    r = rng(21)
    nodes = [helper.make_node("MatMul", ["x", "ws"], ["s_logit"], name="score_fc"),
             helper.make_node("Sigmoid", ["s_logit"], ["scores"], name="sigmoid"),
             helper.make_node("MatMul", ["x", "wb"], ["boxes"], name="box_fc"),
             helper.make_node("Concat", ["scores", "boxes"], ["head"], axis=1, name="concat"),
             helper.make_node("Split", ["head", "sizes"], ["score_out", "box_out"], axis=1, name="split")]
    return make_model(nodes, [tensor("x", ["batch", 16])], [tensor("score_out", ["batch", 8]),
                                                            tensor("box_out", ["batch", 4])],
                      [init("ws", r.standard_normal((16, 8)).astype(np.float32)),
                       init("wb", r.standard_normal((16, 4)).astype(np.float32) * 150),
                       init("sizes", np.array([8, 4], np.int64))])


def data(model: onnx.ModelProto, batches: int = 10, seed: int = 0) -> dict:
    name = model.graph.input[0].name
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return {name: np.random.default_rng(seed).standard_normal((batches, 8, width)).astype(np.float32)}


def npz(tmp_path, model, name="calib.npz", **kw):
    path = tmp_path / name
    np.savez(path, **data(model, **kw))
    return str(path)


def test_log_after_matmul_gets_its_costly_layers_back_and_meets_the_floor(tmp_path):
    model = log_after_matmul()
    calib = npz(tmp_path, model)
    plain = onnxopt.optimize(model, pipeline="quantize-static", calibration=calib, floor=Floor(min_snr_db=-1000))
    (p,) = plain.report["passes"]
    assert p["fidelity"]["after_pass"]["snr_db"] == "-inf" or p["fidelity"]["after_pass"]["snr_db"] < 20
    held = onnxopt.optimize(model, pipeline="quantize-static", calibration=calib, floor=Floor(min_snr_db=15))
    (p,) = held.report["passes"]
    assert p["status"] == "changed"
    fid = p["fidelity"]
    assert fid["final"]["snr_db"] == "inf" or fid["final"]["snr_db"] >= 15
    assert fid["kept"] and set(fid["kept"]) <= {"mel", "power", "floor_add"}  # the benign layer stays int8
    assert fid["data"] == "2 batch(es) held back from the calibration data"
    assert any("kept as they were to hold the fidelity floor" in n for n in held.report["notes"])
    ops = [n.op_type for n in held.model.graph.node]
    assert "QuantizeLinear" in ops  # not everything was given back


def test_a_floor_that_cannot_hold_rolls_the_pass_back_and_says_why(tmp_path):
    model = log_after_matmul()
    # a floor no quantized model can reach while anything stays quantized: even keeping all
    # layers, the Q/DQ of the graph input remains, so the pass is undone with the reason
    result = onnxopt.optimize(model, pipeline="quantize-static", calibration=npz(tmp_path, model),
                              floor=Floor(min_cosine=1.0))
    (p,) = result.report["passes"]
    if p["status"] == "changed":  # everything given back happens to be exact: then it is float
        assert_equivalent(model, result.model)
    else:
        assert p["status"] == "rolled-back" and "below the fidelity floor" in p["error"]
        assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul", "Mul", "Add", "Log"]


def test_concat_of_different_scales_keeps_its_own_scales(tmp_path):
    model = concat_of_different_scales()
    calib = npz(tmp_path, model)
    unified = onnxopt.optimize(model, pipeline="quantize-static{unify_max_ratio=1e9}", calibration=calib,
                               floor=Floor(min_snr_db=-1000))
    split = onnxopt.optimize(model, pipeline="quantize-static", calibration=calib, floor=Floor(min_snr_db=-1000))
    before = unified.report["passes"][0]["fidelity"]["after_pass"]
    after = split.report["passes"][0]["fidelity"]["after_pass"]
    assert before["worst_output"] == "score_out" and before["snr_db"] < 25
    assert after["snr_db"] > before["snr_db"] + 15
    assert split.report["passes"][0]["stats"]["unified_left_float"] == 1
    # and with one shared scale forced, the floor gives the costly layers back instead
    held = onnxopt.optimize(model, pipeline="quantize-static{unify_max_ratio=1e9}", calibration=calib,
                            floor=Floor(min_snr_db=35))
    fid = held.report["passes"][0]["fidelity"]
    assert fid["kept"] and (fid["final"]["snr_db"] == "inf" or fid["final"]["snr_db"] >= 35)


def test_quantize_dynamic_gives_back_the_layer_fed_by_an_outlier_channel():
    """Two MatMuls; the second reads an activation with a 300x outlier channel, so quantizing
    it costs far more: under a cosine floor, only that one goes back to float."""
    r = rng(12)
    g = np.ones(64, np.float32)
    g[3] = 300.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="calm"),
             helper.make_node("Mul", ["h", "g"], ["hg"]),
             helper.make_node("MatMul", ["hg", "w2"], ["y"], name="loud")]
    model = make_model(nodes, [tensor("x", ["batch", 64])], [tensor("y", ["batch", 16])],
                       [init("w1", r.standard_normal((64, 64)).astype(np.float32)), init("g", g),
                        init("w2", r.standard_normal((64, 16)).astype(np.float32))])
    result = onnxopt.optimize(model, pipeline="quantize-dynamic{min_elements=1,smooth=false}",
                              floor=Floor(min_cosine=0.9999))
    fid = result.report["passes"][0]["fidelity"]
    assert fid["kept"] == ["loud"] and fid["final"]["cosine"] >= 0.9999
    assert fid["data"] == "2 batch(es) generated from the input specs"
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulInteger") == 1


def tiny_convs_between_float_ops(n: int = 24) -> onnx.ModelProto:
    """1x1 convs of one channel, each between two float-only ops: int8 adds a Q and a DQ
    around every conv and saves nothing."""
    nodes, inits = [], []
    x = "x"
    for i in range(n):
        inits.append(init(f"w{i}", np.full((1, 1, 1, 1), 0.9, np.float32)))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Sin", [f"c{i}"], [f"s{i}"], name=f"sin{i}")]
        x = f"s{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return make_model(nodes, [tensor("x", [1, 1, 64, 64])], [tensor("y", [1, 1, 64, 64])], inits)


def test_int8_that_runs_slower_than_float_stays_float(tmp_path):
    model = tiny_convs_between_float_ops()
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((6, 1, 1, 64, 64)).astype(np.float32))
    result = onnxopt.optimize(model, pipeline="quantize-static", calibration=str(path),
                              floor=Floor(max_latency_ratio=1.0))
    (p,) = result.report["passes"]
    speed = p["fidelity"]["speed"]
    assert speed["latency_ratio"] > 1.0  # measured slower (by a wide margin on any machine)
    assert p["status"] == "rolled-back" and "above the speed floor" in p["error"]
    assert "QuantizeLinear" not in [n.op_type for n in result.model.graph.node]


def test_the_target_sets_the_floor_and_the_report_says_where_the_data_came_from(tmp_path):
    model = log_after_matmul()
    target = tmp_path / "t.toml"
    target.write_text('schema = 1\nname = "strict"\nextends = "cpu"\n[floor]\nmin_snr_db = 15.0\n')
    result = onnxopt.optimize(model, target=str(target), calibration=npz(tmp_path, model),
                              data=npz(tmp_path, model, "eval.npz", seed=1))  # its default pipeline
    explicit = onnxopt.optimize(model, target=str(target), pipeline="quantize-static",
                                calibration=npz(tmp_path, model))
    assert explicit.report["floor"] == {"min_snr_db": None, "min_cosine": None, "max_latency_ratio": None}
    assert result.report["floor"]["min_snr_db"] == 15.0
    assert result.report["floor"]["data"] == "4 batch(es) of the evaluation data"
    (p,) = [p for p in result.report["passes"] if p["name"] == "quantize-static"]
    fid = p["fidelity"]
    assert {"floor", "data", "after_pass", "trials", "sensitivity_trials", "seconds"} <= set(fid)
    if p["status"] == "changed":
        assert {"kept", "final"} <= set(fid)
    else:  # on these batches even three of the four layers kept do not hold the floor
        assert p["status"] == "rolled-back" and "at most 75%" in p["error"]


def test_hold_back_splits_without_overlap():
    batches = [{"x": np.full((1,), i, np.float32)} for i in range(10)]
    rest, held, source = hold_back(batches, wanted=4)
    assert [b["x"][0] for b in held] == [8, 9] and source == "2 batch(es) held back from the calibration data"
    assert [b["x"][0] for b in rest] == list(range(8)) and rest.count == 8
    one, held, source = hold_back(batches[:1])
    assert len(held) == 1 and "calibrated on too" in source


@pytest.mark.parametrize("text, message", [
    ("[floor]\nmin_cosine = 1.5\n", "a cosine lies between -1 and 1"),
    ("[floor]\nmax_latency_ratio = 0.0\n", "must be above 0"),
    ("[floor]\nmin_snr = 20.0\n", "unknown key 'min_snr'; did you mean 'min_snr_db'"),
])
def test_bad_floor_values_are_refused_at_load(tmp_path, text, message):
    from onnxopt.errors import TargetError
    from onnxopt.target import load_target

    p = tmp_path / "t.toml"
    p.write_text('schema = 1\nname = "t"\nextends = "cpu"\n' + text)
    with pytest.raises(TargetError, match=message):
        load_target(p)


def test_cli_floor_flags(tmp_path, capsys):
    import json

    from onnxopt.cli import main

    model = log_after_matmul()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    report = tmp_path / "r.json"
    rc = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--pipeline", "quantize-static",
               "--calibration", npz(tmp_path, model), "--min-snr-db", "30", "--max-latency-ratio", "off",
               "--report", str(report), "-q"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["floor"]["min_snr_db"] == 30.0 and data["floor"]["max_latency_ratio"] is None
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--min-snr-db", "x"]) == 2
    capsys.readouterr()


