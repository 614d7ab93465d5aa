"""Calibration data readers and their errors, and how passes gather statistics requests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.data.statistics import Calibration, TensorRange, gather_requests, open_calibration
from onnxopt.pipeline.context import PassContext
from onnxopt.errors import CalibrationError
from onnxopt.ir.model import load
from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.text import PassSpec
from onnxopt.pipeline.registry import register_pass
from onnxopt.target import load_target
from tests.graphs import make_model, tensor


def relu_scale_model() -> onnx.ModelProto:
    """x[N,4] -> Relu -> r; r * 2 -> y (two tensors whose statistics are easy to predict)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "two"], ["y"])]
    return make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 4])],
                      [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def data(seed, n=3, batch=2):
    return np.random.default_rng(seed).standard_normal((n, batch, 4)).astype(np.float32)


def batches_of(cal: Calibration) -> list:
    return list(cal.source)


def test_npz_stack_single_batch_and_folder(tmp_path):
    model = load(relu_scale_model())
    np.savez(tmp_path / "stack.npz", x=data(0))  # (3, 2, 4): three batches
    np.savez(tmp_path / "one.npz", x=data(1)[0])  # (2, 4): one batch
    assert len(batches_of(open_calibration(tmp_path / "stack.npz", model))) == 3
    assert len(batches_of(open_calibration(tmp_path / "one.npz", model))) == 1
    folder = open_calibration(tmp_path, model)
    assert folder.source.count == 4 and len(batches_of(folder)) == 4


def test_reader_with_get_next_and_rewind():
    model = load(relu_scale_model())

    class Reader:
        def __init__(self):
            self.items = [{"x": b} for b in data(2)]
            self.i = 0

        def get_next(self):
            self.i += 1
            return self.items[self.i - 1] if self.i <= len(self.items) else None

        def rewind(self):
            self.i = 0

    cal = open_calibration(Reader(), model)
    first = cal.statistics(model, ["r"], histogram=False)
    assert first["r"].count == 3 * 2 * 4
    cal.cache.clear()  # force a second pass over the reader: it rewinds
    assert cal.statistics(model, ["r"], histogram=False)["r"].count == 24


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 4), np.float32)}, "'image' is not an input of the model"),
    ({"x": np.zeros((2, 4), np.float64)}, "input 'x' has dtype float64, the model wants float32"),
    ({"x": np.zeros((2, 5), np.float32)}, "input 'x' has shape (2, 5)"),
    ({"x": np.zeros((2, 2, 2, 4), np.float32)}, "input 'x' has rank 4"),
])
def test_bad_npz_names_the_input(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError) as err:
        cal = open_calibration(tmp_path / "bad.npz", load(relu_scale_model()))
        batches_of(cal)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_missing_file_and_missing_input(tmp_path):
    model = load(relu_scale_model())
    with pytest.raises(CalibrationError, match="no such calibration file"):
        open_calibration(tmp_path / "nope.npz", model)
    two_inputs = make_model([helper.make_node("Add", ["a", "b"], ["c"])], [tensor("a", [2]), tensor("b", [2])],
                            [tensor("c", [2])])
    np.savez(tmp_path / "a_only.npz", a=np.zeros(2, np.float32))
    with pytest.raises(CalibrationError, match="no data for input\\(s\\) 'b'"):
        open_calibration(tmp_path / "a_only.npz", load(two_inputs))


def test_cli_bad_calibration_exits_2_naming_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(relu_scale_model(), path)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4), np.int64))
    proc = subprocess.run([sys.executable, "-m", "onnxopt", "optimize", str(path), "-o", str(tmp_path / "o.onnx"),
                           "--pipeline", "quantize-static", "--calibration", str(tmp_path / "bad.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "input 'x' has dtype int64" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_streamed_statistics_equal_numpy(tmp_path):
    model = load(relu_scale_model())
    stack = data(3, n=5)
    np.savez(tmp_path / "c.npz", x=stack)
    cal = open_calibration(tmp_path / "c.npz", model)
    stats = cal.statistics(model, ["r", "y", "x"])
    relu = np.maximum(stack, 0)
    assert stats["r"].min == 0 and stats["r"].max == pytest.approx(relu.max())
    assert stats["y"].max == pytest.approx(2 * relu.max())
    assert stats["x"].min == pytest.approx(stack.min())
    assert stats["y"].count == stack.size
    assert cal.runs == 1 and cal.batches == 5
    # cached: asking again does not run the data again
    cal.statistics(model, ["r"])
    assert cal.runs == 1


class CalibrationProbePass(Pass):
    """Test pass: asks statistics for the tensor named by its option."""

    lossless = False
    needs_calibration = True
    preserves = frozenset({"statistics"})  # it changes nothing

    @dataclass
    class Options:
        tensor: str = "r"

    def calibration_requests(self, model, ctx):
        return [TensorRange(self.options.tensor, histogram=False)]

    def run(self, model, ctx) -> PassResult:
        stats = ctx.calibration.statistics(model, [self.options.tensor], histogram=False)
        ctx.notes.append(f"{self.options.tensor}:{stats[self.options.tensor].max:.6f}")
        return PassResult(changed=False)


@pytest.fixture
def probe_pass():
    """Register the probe pass for one test only (other tests run every registered pass)."""
    from onnxopt.pipeline import registry

    register_pass("test-calibration-probe")(CalibrationProbePass)
    yield CalibrationProbePass
    registry._passes.pop("test-calibration-probe", None)


def test_consecutive_calibrating_passes_share_one_run(tmp_path, probe_pass):
    np.savez(tmp_path / "c.npz", x=data(4))
    result = onnxopt.optimize(relu_scale_model(), pipeline="test-calibration-probe{tensor=r},"
                              "test-calibration-probe{tensor=y}", calibration=str(tmp_path / "c.npz"))
    assert len(result.report["notes"]) == 2
    model = load(relu_scale_model())
    ctx = PassContext(target=load_target("cpu"), calibration=open_calibration(str(tmp_path / "c.npz"), model))
    specs = [PassSpec("test-calibration-probe", {"tensor": "r"}), PassSpec("test-calibration-probe", {"tensor": "y"})]
    gather_requests(specs, 0, model, ctx)
    assert {r.name for r in ctx.calibration.pending} == {"r", "y"}
    CalibrationProbePass(tensor="r").run(model, ctx)
    CalibrationProbePass(tensor="y").run(model, ctx)
    assert ctx.calibration.runs == 1


def test_default_pipeline_without_data_skips_static_quantization():
    result = onnxopt.optimize(relu_scale_model(), target="cpu")
    assert all(p["name"] != "quantize-static" for p in result.report["passes"])
    assert any("static quantization needs --calibration" in n for n in result.report["notes"])


def test_memory_of_statistics_does_not_grow_with_samples():
    # the state kept per tensor is a fixed-size histogram whatever the number of batches
    stats = TensorRange("t")
    r = np.random.default_rng(0)
    stats.add(r.standard_normal(1000).astype(np.float32))
    size = stats.hist.nbytes
    for _ in range(50):
        stats.add(r.standard_normal(1000).astype(np.float32))
    assert stats.hist.nbytes == size and stats.count == 51000


def test_stacked_npz_is_streamed_batch_by_batch_with_the_same_values(tmp_path):
    model = load(relu_scale_model())
    stack = data(5, n=6)
    np.savez(tmp_path / "plain.npz", x=stack)
    np.savez_compressed(tmp_path / "zipped.npz", x=stack)
    for name in ("plain.npz", "zipped.npz"):
        got = batches_of(open_calibration(tmp_path / name, model))
        assert len(got) == 6
        for i, batch in enumerate(got):
            np.testing.assert_array_equal(batch["x"], stack[i])
