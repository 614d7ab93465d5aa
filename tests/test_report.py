"""optimize --report (JSON, HTML), the before/after table and the accuracy gate."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest

from onnxopt.cli import main
from onnxopt.errors import UsageError
from onnxopt.measure.report import require_matplotlib, summary_rows

def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def paths(tmp_path, digits_model):
    """The digits CNN, an output path and the first 16 test images (few, to keep tests fast)."""
    import numpy as np

    from tests.real_models import EXAMPLES

    with np.load(EXAMPLES / "digits_test.npz") as full:
        data = tmp_path / "test16.npz"
        np.savez(data, image=full["image"][:16], label=full["label"][:16])
    return digits_model, tmp_path / "out.onnx", data


def test_json_report_has_pipeline_passes_costs_fidelity_and_latency(paths, tmp_path, capsys):
    model, out, data = paths
    report_path = tmp_path / "r.json"
    code, stdout, _ = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless",
                           "--report", str(report_path), "--data", str(data), "--metric", "top1"], capsys)
    assert code == 0 and out.exists()
    r = json.loads(report_path.read_text())
    assert r["pipeline"] and r["passes"] and all("seconds" in p and "status" in p for p in r["passes"])
    # the data's batch (16 images) fixes the shapes, so the counts are numbers
    assert r["input_shapes"] == {"image": [16, 1, 8, 8]}
    for side in ("before", "after"):
        assert isinstance(r[side]["macs"], int)
        assert r[side]["activation_peak_bytes"] > 0 and r[side]["latency_ms"] > 0
    # lossless folds the 4 BatchNorms (4 x (16+32+32+32) values) and drops the Dropout's ratio
    assert r["before"]["params"] == 57227 and r["after"]["params"] == 57227 - 448 - 1
    assert r["before"]["macs"] == 16 * 1524352  # test_cost's hand count per image
    fid = r["fidelity"]
    assert fid["outputs"]["logits"]["top1"] == 1.0 and fid["metric"]["drop"] == 0.0
    assert r["input_bytes"] > 0 and r["output_bytes"] > 0
    # the table printed at the end shows the measured rows
    for label in ("nodes", "params", "file bytes", "MACs", "activation mem", "latency ms", "fidelity"):
        assert label in stdout


def test_plain_run_prints_the_short_table_without_measuring(paths, capsys):
    model, out, _ = paths
    code, stdout, _ = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless"], capsys)
    assert code == 0
    assert re.search(r"^nodes\s+20\s+\d+", stdout, re.M) and "latency" not in stdout
    code, stdout, _ = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless", "-q"], capsys)
    assert code == 0 and stdout == ""


def test_html_report_is_self_contained_with_plots(paths, tmp_path, capsys):
    model, out, data = paths
    page = tmp_path / "r.html"
    code, _, _ = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless",
                      "--report", str(page), "--data", str(data)], capsys)
    assert code == 0
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3  # per-layer, size breakdown, fidelity
    assert "src='http" not in text and "<link" not in text
    embedded = re.search(r"<script type='application/json' id='onnxopt-report'>(.*)</script>", text, re.S)
    assert json.loads(embedded.group(1).replace("<\\/", "</"))["after"]["params"] == 57227 - 448 - 1


def test_html_without_matplotlib_says_how_to_install(paths, tmp_path, capsys, monkeypatch):
    model, out, _ = paths
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'onnxopt\[report\]'"):
        require_matplotlib()
    code, _, err = run(["optimize", str(model), "-o", str(out), "--report", str(tmp_path / "r.html")], capsys)
    assert code == 2 and "matplotlib" in err and not out.exists()


def test_failed_gate_exits_3_and_writes_nothing(paths, tmp_path, capsys, monkeypatch):
    model, out, data = paths
    (tmp_path / "always_worse.py").write_text(textwrap.dedent("""
        def metric(reference, candidate):
            assert reference["logits"].shape == (16, 10)
            return 0.3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    report_path = tmp_path / "r.json"
    code, stdout, err = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless", "--data", str(data),
                             "--metric", "always_worse:metric", "--max-accuracy-drop", "0.1",
                             "--report", str(report_path)], capsys)
    assert code == 3 and "exceeds --max-accuracy-drop 0.1" in err
    assert not out.exists() and not report_path.exists()
    assert "FAILED" in stdout
    sys.modules.pop("always_worse", None)
    code, _, _ = run(["optimize", str(model), "-o", str(out), "--pipeline", "lossless", "--data", str(data),
                      "--max-accuracy-drop", "1e-6"], capsys)
    assert code == 0 and out.exists()  # lossless: folding BN into Conv moves only float rounding


def test_summary_rows_show_ratios_and_symbolic_counts():
    rows = summary_rows({"before": {"nodes": 20, "params": 100, "macs": "48*N"},
                         "after": {"nodes": 10, "params": 50, "macs": "24*N"},
                         "input_bytes": 1000, "output_bytes": 500})
    table = {r[0]: r[1:] for r in rows}
    assert table["nodes"] == ("20", "10", "0.50x")
    assert table["file bytes"] == ("1,000", "500", "0.50x")
    assert table["MACs"] == ("48*N", "24*N", "-")
    assert "latency ms" not in table
