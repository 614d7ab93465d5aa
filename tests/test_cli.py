"""The command line as a user meets it: help, the listing commands, inspect, exit codes.

Exit codes (DESIGN.md section 5): 0 done; 1 internal error (traceback shown); 2 bad input
or usage (one line, traceback only with --debug); 3 quality gate or verification failed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from tests import graphs
from tests.tools import load_tool
from onnxopt import Pass, PassResult
from onnxopt.pipeline import registry
from onnxopt.cli import main
from onnxopt.pipeline.text import format_pipeline, parse


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse's own --help / --version
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(graphs.conv_bn_relu().SerializeToString())
    return path


# -- help and version -------------------------------------------------------------------------------
def test_help_lists_commands_and_exit_codes(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for command in ("optimize", "inspect", "passes", "targets"):
        assert command in out
    assert "exit codes" in out and "3 quality gate" in out


@pytest.mark.parametrize("command,flags", [
    ("optimize", ["--target", "--pipeline", "--calibration", "--report", "--verify", "--strict", "--debug"]),
    ("inspect", ["--json"]),
    ("passes", ["--json"]),
    ("targets", ["--json"]),
])
def test_subcommand_help(capsys, command, flags):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0
    for flag in flags:
        assert flag in out


def test_version(capsys):
    from onnxopt import __version__

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"onnxopt {__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and "optimize" in out


@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "frobnicate"),
    (["optimize", "m.onnx"], "-o"),
    (["optimize", "m.onnx", "-o", "x.onnx", "--no-such-flag"], "--no-such-flag"),
    (["inspect"], "MODEL"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("onnxopt: error: ")
    assert needle in lines[0] and "Traceback" not in err


# -- passes and targets -------------------------------------------------------------------------------
def test_passes_lists_every_registered_pass(capsys):
    rc, out, _ = run(capsys, "passes")
    assert rc == 0
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert listed == set(registry.all_passes())
    for line in out.splitlines():
        if line and not line.startswith(" "):
            assert line.split()[1] in ("lossless", "lossy")


def test_passes_json_describes_options(capsys):
    rc, out, _ = run(capsys, "passes", "--json")
    assert rc == 0
    entries = {e["name"]: e for e in json.loads(out)}
    assert set(entries) == set(registry.all_passes())
    for name, e in entries.items():
        cls = registry.get_pass(name)
        assert e["summary"] == cls.summary() and e["summary"], name
        assert e["lossless"] is cls.lossless
        assert [o["name"] for o in e["options"]] == [s.name for s in cls.option_specs()]
        for o in e["options"]:
            assert o["help"] and "default" in o and o["type"], (name, o)


def test_targets_lists_builtins_with_their_pipelines(capsys):
    rc, out, _ = run(capsys, "targets")
    assert rc == 0
    for name in ("cpu", "gpu", "npu"):
        assert any(line.startswith(f"{name}:") for line in out.splitlines())
    assert out.count("lossless") >= 3 and out.count("default") >= 3


def test_targets_json_pipelines_parse_and_name_known_passes(capsys):
    from onnxopt.target import load_target

    rc, out, _ = run(capsys, "targets", "--json")
    assert rc == 0
    targets = json.loads(out)
    assert {t["name"] for t in targets} >= {"cpu", "gpu", "npu"}
    for t in targets:
        effective = load_target(t["name"])
        assert t["pipelines"] == effective.pipelines
        assert {"lossless", "default"} <= set(t["pipelines"])


def test_one_target_and_an_unknown_one(capsys):
    rc, out, _ = run(capsys, "targets", "npu", "--json")
    assert rc == 0 and [t["name"] for t in json.loads(out)] == ["npu"]
    rc, _, err = run(capsys, "targets", "tpu9000")
    assert rc == 2 and "tpu9000" in err and len(err.strip().splitlines()) == 1


# -- inspect ------------------------------------------------------------------------------------------
def test_inspect_text(capsys, model_file):
    rc, out, _ = run(capsys, "inspect", str(model_file))
    assert rc == 0
    assert str(model_file) in out and "nodes 3" in out
    assert "Conv 1" in out and "BatchNormalization 1" in out and "Relu 1" in out
    assert "input  x: float [1, 3, 8, 8]" in out


def test_inspect_json_matches_the_model(capsys, model_file):
    rc, out, _ = run(capsys, "inspect", str(model_file), "--json")
    assert rc == 0
    info = json.loads(out)
    model = onnx.load(str(model_file))
    assert info["nodes"] == len(model.graph.node)
    assert info["params"] == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert info["op_histogram"] == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert [i["name"] for i in info["inputs"]] == ["x"] and [o["name"] for o in info["outputs"]] == ["y"]
    assert info["file_bytes"] == model_file.stat().st_size


# -- optimize ------------------------------------------------------------------------------------------
def test_optimize_writes_model_report_and_summary(capsys, model_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    rc, stdout, err = run(capsys, "optimize", str(model_file), "-o", str(out), "--pipeline", "lossless",
                          "--report", str(report))
    assert rc == 0, err
    assert "nodes" in stdout and "pipeline" in stdout
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["output_bytes"] == out.stat().st_size
    assert data["pipeline"] == format_pipeline(parse(data["pipeline"]))  # canonical text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["onnxopt.pipeline"] == data["pipeline"] and meta["onnxopt.target"] == "cpu"
    onnx.checker.check_model(onnx.load(str(out)))


def test_quiet_prints_nothing(capsys, model_file, tmp_path):
    rc, stdout, err = run(capsys, "optimize", str(model_file), "-o", str(tmp_path / "o.onnx"), "-q",
                          "--pipeline", "lossless")
    assert rc == 0 and stdout == "" and err == ""


def test_debug_shows_the_traceback_of_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    rc, _, err = run(capsys, "optimize", str(bad), "-o", str(tmp_path / "o.onnx"), "--debug")
    assert rc == 2 and "Traceback" in err and "onnxopt: error:" in err


# -- exit codes 1 and 3 (toy passes, registered for one test only) ---------------------------------------------
class _RaisingPass(Pass):
    """Raise, as a buggy pass would."""

    name = "test-cli-raises"
    lossless = True

    def run(self, model, ctx) -> PassResult:
        raise RuntimeError("bug in the pass")


class _BreakingPass(Pass):
    """Remove the node that computes the graph output (breaks the model)."""

    name = "test-cli-breaks"
    lossless = True

    def run(self, model, ctx) -> PassResult:
        graph: gs.Graph = model.graph
        producer = graph.outputs[0].inputs[0]
        producer.outputs.clear()
        graph.nodes.remove(producer)
        return PassResult(changed=True, stats={})


@pytest.fixture
def toy_passes(monkeypatch):
    registry.all_passes()  # load the built-ins first so ours are additions
    for cls in (_RaisingPass, _BreakingPass):
        monkeypatch.setitem(registry._passes, cls.name, cls)


@pytest.mark.parametrize("pass_name,strict_code", [("test-cli-raises", 1), ("test-cli-breaks", 3)])
def test_failing_pass_rolled_back_or_fatal_with_strict(capsys, toy_passes, model_file, tmp_path, pass_name, strict_code):
    out = tmp_path / "o.onnx"
    rc, stdout, err = run(capsys, "optimize", str(model_file), "-o", str(out), "--pipeline", pass_name)
    assert rc == 0, err  # rolled back and reported, the model written unchanged
    assert "rolled back" in stdout
    onnx.checker.check_model(onnx.load(str(out)))
    out.unlink()
    rc, _, err = run(capsys, "optimize", str(model_file), "-o", str(out), "--pipeline", pass_name, "--strict")
    assert rc == strict_code, err
    assert pass_name in err and not out.exists()


# -- the scale generators, at test size (issue 8.4; the real sizes are in BENCHMARKS.md) -------------------
def _synthetic():
    return load_tool("make_synthetic_models")


def test_synthetic_chain_inspect_and_lossless(capsys, tmp_path):
    from onnxopt.measure import verify

    synth = _synthetic()
    src, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    src.write_bytes(synth.chain_model(600).SerializeToString())
    rc, text, _ = run(capsys, "inspect", str(src), "--json")
    assert rc == 0 and json.loads(text)["nodes"] == 600
    rc, _, err = run(capsys, "optimize", str(src), "-o", str(out), "-q", "--pipeline", "lossless")
    assert rc == 0, err
    result = onnx.load(str(out))
    assert len(result.graph.node) <= 400  # the 200 dead nodes at least are gone
    feeds, expected = verify.run(onnx.load(str(src)))
    assert not verify.compare_outputs(expected, verify.run(result, feeds)[1])


def test_synthetic_external_data_model_round_trip(capsys, tmp_path):
    from onnxopt.measure import verify

    synth = _synthetic()
    src = synth.big_model(tmp_path / "in" / "big.onnx", gigabytes=0.0001, side=64)  # 7 layers of 16 kB
    layer_bytes = 64 * 64 * 4
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    rc, text, _ = run(capsys, "inspect", str(src), "--json")
    assert rc == 0 and json.loads(text)["weight_bytes"] == 7 * layer_bytes
    rc, _, err = run(capsys, "optimize", str(src), "-o", str(out), "-q", "--pipeline", "lossless", "--external-data")
    assert rc == 0, err
    assert (out.parent / "big.onnx.data").stat().st_size == 7 * layer_bytes
    raw = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    feeds, expected = verify.run(onnx.load(str(src)))
    assert not verify.compare_outputs(expected, verify.run(onnx.load(str(out)), feeds)[1])


def test_model_over_the_protobuf_limit_is_written_with_external_data(capsys, tmp_path, monkeypatch):
    """The over-2-GB path at test size: the limit is lowered instead of the model grown."""
    import onnxopt.ir.storage
    from onnxopt.measure import verify

    monkeypatch.setattr(onnxopt.ir.storage, "_ONE_MESSAGE_LIMIT", 50_000)
    src = _synthetic().big_model(tmp_path / "in" / "big.onnx", gigabytes=0.0001, side=64)  # 7 x 16 kB
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    rc, _, err = run(capsys, "optimize", str(src), "-o", str(out), "-q", "--pipeline", "lossless")
    assert rc == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    raw = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    feeds, expected = verify.run(onnx.load(str(src)))
    assert not verify.compare_outputs(expected, verify.run(onnx.load(str(out)), feeds)[1])


# -- start-up: what each command imports ------------------------------------------------------
def _imports_after(args: list[str]) -> set[str]:
    import subprocess
    import sys

    code = ("import sys\nfrom onnxopt.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', *(m for m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'sympy') if m in sys.modules))"
            % (args,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("IMPORTED"))
    return set(line.split()[1:])


def test_help_imports_neither_onnx_nor_onnxruntime():
    assert _imports_after(["--help"]) == set()


@pytest.mark.parametrize("command", [["passes"], ["targets"], ["inspect", "MODEL"], ["inspect", "MODEL", "--json"],
                                     ["optimize", "MODEL", "-o", "OUT", "--pipeline", "lossless", "-q"]])
def test_commands_import_onnxruntime_only_to_evaluate(tmp_path, command):
    model = tmp_path / "m.onnx"
    onnx.save(graphs.dead_branch(), model)  # nothing to evaluate: the lossless pipeline needs no session
    args = [str(model) if a == "MODEL" else str(tmp_path / "o.onnx") if a == "OUT" else a for a in command]
    imported = _imports_after(args)
    assert "onnxruntime" not in imported and "sympy" not in imported
