"""Bad input never corrupts, hangs or escapes (issue 8.1).

Every case runs the real CLI entry point in-process (``onnxopt.cli.main``) and checks the
contract of DESIGN.md section 5: exit code 2, exactly one line ``onnxopt: error: …`` that
names the problem and the place, no traceback, no output file (nor temporary file) left
behind, and the input file unchanged. Two cases run the installed ``onnxopt`` executable
in a subprocess: the traceback-free check and SIGINT during a long run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import init, make_model, tensor
from onnxopt.cli import main

REPO = Path(__file__).resolve().parent.parent


# -- the contract ---------------------------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_rejected(capsys, argv: list[str], *needles: str, watch: list[Path] = (), output: Path | None = None):
    """Exit 2, one error line holding every needle, no traceback, no output, inputs unchanged."""
    before = {p: digest(p) for p in watch}
    folder = output.parent if output is not None else None
    listing = sorted(os.listdir(folder)) if folder is not None and folder.is_dir() else None
    rc, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    if output is not None:
        assert not output.exists(), "output written despite the error"
        if listing is not None:
            assert sorted(os.listdir(folder)) == listing, "temporary files left behind"
    for p in watch:
        assert digest(p) == before[p], f"{p} was modified"
    return lines[0]


def optimize_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["optimize", str(model), "-o", str(out), "-q", *extra]


def write(tmp_path: Path, name: str, model: onnx.ModelProto | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def raw_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()) -> onnx.ModelProto:
    """Like graphs.make_model but without the checker: these models are broken on purpose."""
    graph = helper.make_graph(nodes, "bad", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 8
    return model


def good_model() -> onnx.ModelProto:
    return make_model([helper.make_node("Add", ["x", "b"], ["y"], name="add")],
                      [tensor("x", [2, 3])], [tensor("y", [2, 3])], [init("b", np.ones(3, np.float32))])


X, Y = tensor("x", [2, 3]), tensor("y", [2, 3])


# -- files that are not models ----------------------------------------------------------------------
NOT_MODELS = {
    "empty.onnx": (b"", "empty"),
    "truncated.onnx": (good_model().SerializeToString()[:40], "not an ONNX model"),
    "random.onnx": (np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an ONNX model"),
    "notes.onnx": ("this is a text file,\nnot a model\n".encode(), "not an ONNX model"),
}


@pytest.mark.parametrize("command", ["optimize", "inspect"])
@pytest.mark.parametrize("name", sorted(NOT_MODELS))
def test_file_that_is_not_a_model(tmp_path, capsys, name, command):
    data, problem = NOT_MODELS[name]
    path = write(tmp_path, name, data)
    out = tmp_path / "out.onnx"
    argv = optimize_argv(path, out) if command == "optimize" else ["inspect", str(path)]
    assert_rejected(capsys, argv, problem, name, watch=[path], output=out)


def test_missing_input_file(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert_rejected(capsys, optimize_argv(tmp_path / "nope.onnx", out), "nope.onnx", "no such file", output=out)


# -- models that parse but are broken ----------------------------------------------------------------
def cycle():
    return raw_model([helper.make_node("Add", ["x", "r"], ["a"], name="loop_add"),
                      helper.make_node("Relu", ["a"], ["r"], name="loop_relu"),
                      helper.make_node("Identity", ["a"], ["y"], name="out")], [X], [Y])


def duplicate_output():
    return raw_model([helper.make_node("Relu", ["x"], ["a"], name="first"),
                      helper.make_node("Neg", ["x"], ["a"], name="second"),
                      helper.make_node("Identity", ["a"], ["y"], name="out")], [X], [Y])


def duplicate_initializer():
    return raw_model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [X], [Y],
                     [init("b", np.ones(3, np.float32)), init("b", np.zeros(3, np.float32))])


def output_shadows_input():
    return raw_model([helper.make_node("Relu", ["x"], ["x"], name="shadow"),
                      helper.make_node("Identity", ["x"], ["y"], name="out")], [X], [Y])


def dangling_input():
    return raw_model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")], [X], [Y])


def dangling_in_subgraph():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "ghost"], ["t"], name="inner_add")],
                               "then", [], [tensor("t", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")],
                               "else", [], [tensor("e", [2, 3])])
    return raw_model([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
                     [tensor("c", [], TensorProto.BOOL), X], [Y])


def newer_opset():
    return raw_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [X], [Y],
                     opset=onnx.defs.onnx_opset_version() + 5)


def unknown_op():
    return raw_model([helper.make_node("Frobnicate", ["x"], ["y"], name="frob")], [X], [Y])


def op_newer_than_model_opset():
    # Gelu entered the default domain at opset 20.
    return raw_model([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], [X], [Y], opset=13)


def initializer_shape_mismatch():
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    b.dims[:] = [4]
    return raw_model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [X], [Y], [b])


def typed_data_shape_mismatch():
    b = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[2, 3])
    b.float_data.extend([1.0, 2.0, 3.0])  # 3 values for 6 (helper.make_tensor would refuse)
    return raw_model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [X], [Y], [b])


def constant_attribute_mismatch():
    value = numpy_helper.from_array(np.ones(3, np.float32), "v")
    value.dims[:] = [2, 3]
    return raw_model([helper.make_node("Constant", [], ["k"], name="const", value=value),
                      helper.make_node("Add", ["x", "k"], ["y"], name="add")], [X], [Y])


BROKEN = {
    "cycle": (cycle, ["cycle", "loop_"]),
    "duplicate_output": (duplicate_output, ["'a'", "defined twice", "second"]),
    "duplicate_initializer": (duplicate_initializer, ["'b'", "defined twice"]),
    "output_shadows_input": (output_shadows_input, ["'x'", "defined twice", "shadow"]),
    "dangling_input": (dangling_input, ["'nowhere'", "'add'"]),
    "dangling_in_subgraph": (dangling_in_subgraph, ["'ghost'", "inner_add"]),
    "newer_opset": (newer_opset, ["opset", "newer than the installed onnx"]),
    "unknown_op": (unknown_op, ["Frobnicate", "'frob'"]),
    "op_newer_than_model_opset": (op_newer_than_model_opset, ["Gelu", "opset 13"]),
    "initializer_shape_mismatch": (initializer_shape_mismatch, ["initializer 'b'", "[4]"]),
    "typed_data_shape_mismatch": (typed_data_shape_mismatch, ["initializer 'b'", "[2, 3]"]),
    "constant_attribute_mismatch": (constant_attribute_mismatch, ["'const'", "[2, 3]"]),
}


@pytest.mark.parametrize("command", ["optimize", "inspect"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model(tmp_path, capsys, case, command):
    build, needles = BROKEN[case]
    path = write(tmp_path, f"{case}.onnx", build())
    out = tmp_path / "out.onnx"
    argv = optimize_argv(path, out, "--pipeline", "lossless") if command == "optimize" else ["inspect", str(path)]
    assert_rejected(capsys, argv, str(path), *needles, watch=[path], output=out)


def test_broken_model_through_python_api():
    from onnxopt import optimize
    from onnxopt.errors import ModelError

    with pytest.raises(ModelError, match="cycle"):
        optimize(cycle(), pipeline="lossless")


# -- custom ops pass through ------------------------------------------------------------------------
def test_custom_domain_op_passes_through_untouched(tmp_path, capsys):
    custom = helper.make_node("Blur", ["a"], ["b"], name="blur", domain="com.example", radius=3,
                              kernel=numpy_helper.from_array(np.arange(4, dtype=np.float32), "kern"))
    model = raw_model([helper.make_node("Identity", ["x"], ["a"], name="id"), custom,
                       helper.make_node("Relu", ["b"], ["y"], name="relu")], [X], [Y],
                      extra_opsets=[helper.make_opsetid("com.example", 1)])
    path, out = write(tmp_path, "custom.onnx", model), tmp_path / "out.onnx"
    before = digest(path)
    rc, _, err = run_cli(capsys, *optimize_argv(path, out, "--pipeline", "lossless"))
    assert rc == 0, err
    assert digest(path) == before
    result = onnx.load(str(out))
    [kept] = [n for n in result.graph.node if n.domain == "com.example"]
    assert kept.SerializeToString() == custom.SerializeToString() or (
        kept.op_type == "Blur" and list(kept.attribute) == list(custom.attribute))
    assert {(o.domain, o.version) for o in result.opset_import} >= {("com.example", 1)}
    assert run_cli(capsys, "inspect", str(path))[0] == 0


# -- external data: missing or escaping the model's folder ---------------------------------------------
def external_model(location: str) -> onnx.ModelProto:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="length", value="12")
    return raw_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [X], [Y], [w])


@pytest.fixture
def model_dir(tmp_path):
    """tmp/model/ for the model, tmp/outside/secret.bin beside it (a file it must not reach)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(np.arange(3, dtype=np.float32).tobytes())
    return tmp_path / "model"


def test_external_data_inside_folder_loads(model_dir, capsys):
    (model_dir / "w.bin").write_bytes(np.arange(3, dtype=np.float32).tobytes())
    path, out = write(model_dir, "m.onnx", external_model("w.bin")), model_dir / "out.onnx"
    rc, _, err = run_cli(capsys, *optimize_argv(path, out, "--pipeline", "lossless"))
    assert rc == 0, err
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    np.testing.assert_array_equal(weights["w"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("kind", ["missing", "absolute", "dotdot", "symlink"])
@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_external_data_refused(model_dir, capsys, kind, command):
    secret = model_dir.parent / "outside" / "secret.bin"
    if kind == "missing":
        location, needles = "gone.bin", ["gone.bin", "missing"]
    elif kind == "absolute":
        location, needles = str(secret), ["absolute", "refused"]
    elif kind == "dotdot":
        location, needles = "../outside/secret.bin", ["..", "refused"]
    else:
        (model_dir / "link.bin").symlink_to(secret)
        location, needles = "link.bin", ["outside the model's folder", "refused"]
    path, out = write(model_dir, "m.onnx", external_model(location)), model_dir / "out.onnx"
    argv = optimize_argv(path, out) if command == "optimize" else ["inspect", str(path)]
    assert_rejected(capsys, argv, "'w'", *needles, watch=[path, secret], output=out)


# -- folding stays bounded ---------------------------------------------------------------------------
def huge_fold(op: str) -> onnx.ModelProto:
    """A constant subgraph whose folded value would be 10000 x 10000 float32 (400 MB)."""
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    if op == "ConstantOfShape":
        big = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="big", value=one)]
        inits = [init("shape", np.array([10000, 10000], np.int64))]
    elif op == "Expand":
        big = [helper.make_node("Expand", ["seed", "shape"], ["big"], name="big")]
        inits = [init("seed", np.ones((1, 1), np.float32)), init("shape", np.array([10000, 10000], np.int64))]
    else:
        big = [helper.make_node("Tile", ["seed", "reps"], ["big"], name="big")]
        inits = [init("seed", np.ones((10, 10), np.float32)), init("reps", np.array([1000, 1000], np.int64))]
    nodes = big + [helper.make_node("ReduceMax", ["big"], ["m"], name="max", keepdims=0),
                   helper.make_node("Add", ["x", "m"], ["y"], name="add")]
    return make_model(nodes, [X], [Y], inits)


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile"])
def test_folding_huge_constant_is_bounded(tmp_path, capsys, op):
    pipeline = "lossless,fold-constants"
    path, out = write(tmp_path, f"{op}.onnx", huge_fold(op)), tmp_path / "out.onnx"
    # ru_maxrss (the process's peak) sees onnxruntime's allocations too, which tracemalloc
    # does not; an unbounded fold of this model raises it by 400 MB or more.
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc, _, err = run_cli(capsys, *optimize_argv(path, out, "--pipeline", pipeline))
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert rc == 0, err
    assert growth_mb < 200, f"peak memory grew by {growth_mb:.0f} MB"
    assert out.stat().st_size < 1e6
    assert op in {n.op_type for n in onnx.load(str(out)).graph.node}


# -- output paths -------------------------------------------------------------------------------------
def test_output_folder_missing(tmp_path, capsys):
    path = write(tmp_path, "m.onnx", good_model())
    out = tmp_path / "no" / "such" / "out.onnx"
    assert_rejected(capsys, optimize_argv(path, out), "does not exist", str(out.parent), watch=[path])
    assert not (tmp_path / "no").exists()


def test_output_is_a_folder(tmp_path, capsys):
    path = write(tmp_path, "m.onnx", good_model())
    assert_rejected(capsys, optimize_argv(path, tmp_path), "folder", watch=[path])


def test_output_would_overwrite_input(tmp_path, capsys):
    path = write(tmp_path, "m.onnx", good_model())
    assert_rejected(capsys, optimize_argv(path, path), "overwrite the input", watch=[path])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only-mode folder")
def test_output_folder_not_writable(tmp_path, capsys):
    path = write(tmp_path, "m.onnx", good_model())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_rejected(capsys, optimize_argv(path, locked / "out.onnx"), "writ", watch=[path],
                        output=locked / "out.onnx")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_output_folder_where_nothing_can_be_created(tmp_path, capsys):
    # Nobody, root included, can create a file in /proc: the real "not writable" case here.
    path = write(tmp_path, "m.onnx", good_model())
    assert_rejected(capsys, optimize_argv(path, Path("/proc/onnxopt-out.onnx")), "/proc", "write",
                    watch=[path])


def test_report_folder_missing_writes_nothing(tmp_path, capsys):
    path, out = write(tmp_path, "m.onnx", good_model()), tmp_path / "out.onnx"
    assert_rejected(capsys, optimize_argv(path, out, "--report", str(tmp_path / "gone" / "r.json")),
                    "does not exist", watch=[path], output=out)


# -- calibration data ---------------------------------------------------------------------------------
# A pipeline that reads the values, not just the names and shapes, of the data.
CALIBRATED = "lossless,quantize-static"


def conv_model() -> onnx.ModelProto:
    r = np.random.default_rng(4)
    return make_model([helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                       helper.make_node("Relu", ["c"], ["y"], name="relu")],
                      [tensor("images", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])],
                      [init("w", r.standard_normal((4, 3, 3, 3)).astype(np.float32))])


def _images(n=4, **kw):
    return np.random.default_rng(5).standard_normal((n, 1, 3, 8, 8)).astype(kw.get("dtype", np.float32))


BAD_CALIBRATION = {
    "wrong_name": ({"pixels": _images()}, ["pixels"]),
    "wrong_dtype": ({"images": _images().astype(np.int32)}, ["images", "int32"]),
    "wrong_shape": ({"images": _images()[:, :, :, :5]}, ["images", "shape"]),
    "nan_values": ({"images": np.where(_images() > 1.5, np.nan, _images())}, ["images", "NaN"]),
    "inf_values": ({"images": np.where(_images() > 1.5, np.inf, _images())}, ["images", "Inf"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_bad_calibration_data(tmp_path, capsys, case):
    arrays, needles = BAD_CALIBRATION[case]
    path, out = write(tmp_path, "m.onnx", conv_model()), tmp_path / "out.onnx"
    data = tmp_path / "calib.npz"
    np.savez(data, **arrays)
    assert_rejected(capsys, optimize_argv(path, out, "--calibration", str(data), "--pipeline", CALIBRATED), *needles,
                    watch=[path, data], output=out)


def test_good_calibration_data_is_accepted(tmp_path, capsys):
    # The control for the cases above: the same model and layout, valid values.
    path, out = write(tmp_path, "m.onnx", conv_model()), tmp_path / "out.onnx"
    data = tmp_path / "calib.npz"
    np.savez(data, images=_images())
    rc, _, err = run_cli(capsys, *optimize_argv(path, out, "--calibration", str(data), "--pipeline", CALIBRATED))
    assert rc == 0, err


# -- targets and pipelines ----------------------------------------------------------------------------
BAD_TARGETS = {
    "unknown_key": ('schema = 1\nname = "t"\nextends = "cpu"\n[capabilities]\nfloat61 = true\n',
                    ["float61", "capabilities", "float16"]),
    "wrong_type": ('schema = 1\nname = "t"\nextends = "cpu"\n[runtime]\nintra_op_threads = "eight"\n',
                   ["intra_op_threads", "integer"]),
    "unknown_top_key": ('schema = 1\nname = "t"\nextends = "cpu"\npipeline = "lossless"\n', ["pipeline"]),
    "not_toml": ('schema = = 1\n', ["t.toml"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_target_file(tmp_path, capsys, case):
    text, needles = BAD_TARGETS[case]
    target = tmp_path / "t.toml"
    target.write_text(text)
    path, out = write(tmp_path, "m.onnx", good_model()), tmp_path / "out.onnx"
    assert_rejected(capsys, optimize_argv(path, out, "--target", str(target)), "t.toml", *needles,
                    watch=[path, target], output=out)


def test_unknown_target_name(tmp_path, capsys):
    path, out = write(tmp_path, "m.onnx", good_model()), tmp_path / "out.onnx"
    assert_rejected(capsys, optimize_argv(path, out, "--target", "tpu9000"), "tpu9000", watch=[path], output=out)


BAD_PIPELINES = {
    "unknown_pass": ("lossless,eliminate-dead-cod", ["eliminate-dead-cod", "eliminate-dead-code"]),
    "unknown_option": ("eliminate-dead-code{agressive=true}", ["agressive"]),
    "bad_option_value": ("quantize-dynamic{per_channel=maybe}", ["per_channel", "maybe"]),
    "unclosed_brace": ("eliminate-dead-code{", ["pipeline"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PIPELINES))
def test_bad_pipeline(tmp_path, capsys, case):
    text, needles = BAD_PIPELINES[case]
    path, out = write(tmp_path, "m.onnx", good_model()), tmp_path / "out.onnx"
    assert_rejected(capsys, optimize_argv(path, out, "--pipeline", text), *needles, watch=[path], output=out)


# -- the real executable: no traceback; SIGINT leaves nothing behind -------------------------------------
def onnxopt_command() -> list[str]:
    exe = Path(sys.executable).parent / "onnxopt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "onnxopt.cli"]


def test_executable_reports_bad_input_in_one_line(tmp_path):
    path = write(tmp_path, "cycle.onnx", cycle())
    out = tmp_path / "out.onnx"
    proc = subprocess.run(onnxopt_command() + ["optimize", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("onnxopt: error: ") and "cycle" in proc.stderr
    assert not out.exists()


def test_sigint_during_a_long_run_leaves_no_output(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from make_synthetic_models import chain_model
    finally:
        sys.path.remove(str(REPO / "tools"))
    path = write(tmp_path, "chain.onnx", chain_model(30000))
    before = digest(path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    # An interrupt during `import` is Python's, not ours: wait past the start-up time (measured
    # on this machine now), then interrupt while the model (seconds of work) is being optimized.
    start = time.perf_counter()
    subprocess.run(onnxopt_command() + ["--version"], capture_output=True, check=True, timeout=120)
    startup = time.perf_counter() - start
    proc = subprocess.Popen(onnxopt_command() + ["optimize", str(path), "-o", str(out), "--pipeline", "lossless"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(startup + 1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived; nothing to check")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(out.parent.iterdir()) == [], "partial output left behind"
    assert digest(path) == before
