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


def source_files() -> set[str]:
    """Every module of the core and the pass library, and every target file, as the wheel
    must name them."""
    core = {p.relative_to(REPO).as_posix() for p in (REPO / "onnxopt").rglob("*.py")}
    passes = {f"onnxopt/passes/{p.name}" for p in (REPO / "passes").glob("*.py")}
    targets = {f"onnxopt/targets/{p.name}" for p in (REPO / "targets").glob("*.toml")}
    return core | passes | targets


def test_wheel_holds_every_module_and_target(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_files()
    assert len([n for n in expected if n.startswith("onnxopt/") and "/" in n[len("onnxopt/"):]]) > 20
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    assert {"onnxopt/targets/cpu.toml", "onnxopt/targets/gpu.toml", "onnxopt/targets/npu.toml"} <= names
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


def test_bare_pytest_and_python_m_pytest_collect_the_same_tests():
    """Both ways of running the suite from the repository root find every test file, and
    the test helpers load under one name (tests.graphs), not twice."""
    counts = []
    for command in (["pytest"], [sys.executable, "-m", "pytest"]):
        proc = subprocess.run(command + ["--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout[-2000:]
        counts.append({line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("tests/")})
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")}
    assert counts[0] == counts[1] == files
