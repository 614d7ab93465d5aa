"""--export-masks and --masks: masks leave and enter a run through the CLI, written atomically."""

import numpy as np

from onnxopt.cli import main
from onnxopt.optimize import optimize
from tests import pruning_graphs as pg


def run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_export_then_respect(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(pg.chain().SerializeToString())
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    rc, err = run(capsys, "optimize", str(src), "-o", str(tmp_path / "o1.onnx"), "-q",
                  "--pipeline", "prune-magnitude{sparsity=0.4,storage=dense}", "--export-masks", str(first))
    assert rc == 0, err
    masks = dict(np.load(first))
    assert len(masks) == 2 and all(abs(np.mean(~m) - 0.4) < 0.02 for m in masks.values())
    rc, err = run(capsys, "optimize", str(src), "-o", str(tmp_path / "o2.onnx"), "-q", "--masks", str(first),
                  "--pipeline", "prune-magnitude{sparsity=0.7,storage=dense}", "--export-masks", str(second))
    assert rc == 0, err
    for name, m in dict(np.load(second)).items():
        assert not (m & ~masks[name]).any()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_bad_masks_file_exits_2_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(pg.chain().SerializeToString())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    out, exported = tmp_path / "o.onnx", tmp_path / "e.npz"
    rc, err = run(capsys, "optimize", str(src), "-o", str(out), "--masks", str(bad),
                  "--pipeline", "prune-magnitude", "--export-masks", str(exported))
    assert rc == 2 and err.startswith("onnxopt: error:") and "bad.npz" in err and err.count("\n") == 1
    assert not out.exists() and not exported.exists()


def test_failed_gate_writes_no_masks(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(pg.chain().SerializeToString())
    exported = tmp_path / "e.npz"
    rc, _ = run(capsys, "optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-q",
                "--pipeline", "prune-magnitude{sparsity=0.9}", "--export-masks", str(exported),
                "--max-accuracy-drop", "0.0000001")
    assert rc == 3 and not exported.exists()


def test_api_takes_and_returns_masks():
    result = optimize(pg.chain(), pipeline="prune-magnitude{sparsity=0.5,storage=dense}")
    again = optimize(pg.chain(), pipeline="prune-magnitude{sparsity=0.6,storage=dense}", masks=result.masks)
    assert set(again.masks) == set(result.masks)
    assert all(not (again.masks[k] & ~result.masks[k]).any() for k in result.masks)
