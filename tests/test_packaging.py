"""The wheel holds the pass library and the target files, and a plain install imports them."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed: {proc.stderr[-3000:]}")
    (whl,) = out.glob("onnxopt-*.whl")
    return whl


def test_wheel_holds_passes_and_targets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    passes = {p.name for p in (REPO / "passes").glob("*.py")}
    targets = {p.name for p in (REPO / "targets").glob("*.toml")}
    assert passes and {f"onnxopt/passes/{n}" for n in passes} <= names
    assert {"cpu.toml", "gpu.toml", "npu.toml"} <= targets
    assert {f"onnxopt/targets/{n}" for n in targets} <= names
    assert "onnxopt/cli.py" in names and "onnxopt/analysis/shapes.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "onnxopt = onnxopt.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_plain_install_imports_passes_and_targets(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import onnxopt, onnxopt.passes; from onnxopt.target import load_target; "
            "print(onnxopt.__file__); print(sorted(onnxopt.all_passes())[:1]); print(load_target('npu').name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(site))  # the installed copy, not the source tree
    assert lines[2] == "npu"
