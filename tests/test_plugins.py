"""Third-party passes through the entry-point group `onnxopt.passes`, installed for real."""

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest

from tests.graphs import dead_branch

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "onnxopt-demo-plugin"
version = "0.1"

[project.entry-points."onnxopt.passes"]
count-relus = "onnxopt_demo_plugin:CountRelusPass"
broken-plugin = "onnxopt_demo_plugin_missing:Nothing"
"""

PLUGIN_MODULE = '''
"""A plugin pass: counts Relu nodes and renames nothing."""
from dataclasses import dataclass

from onnxopt import Pass, PassResult, option


class CountRelusPass(Pass):
    """Count Relu nodes (a demo plugin)."""

    @dataclass
    class Options:
        op: str = option("Relu", "op type to count")

    def run(self, model, ctx):
        n = sum(1 for node in model.graph.nodes if node.op == self.options.op)
        return PassResult(changed=False, stats={"count": n})
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "onnxopt_demo_plugin.py").write_text(PLUGIN_MODULE)
    site = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the demo plugin: {proc.stderr[-2000:]}")
    return site


def cli(site, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "onnxopt", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_plugin_pass_is_listed_and_broken_plugin_warns(plugin_site):
    proc = cli(plugin_site, "passes", "--json")
    assert proc.returncode == 0, proc.stderr
    passes = {p["name"]: p for p in json.loads(proc.stdout)}
    assert passes["count-relus"]["summary"] == "Count Relu nodes (a demo plugin)."
    assert passes["count-relus"]["options"][0]["name"] == "op"
    assert "eliminate-dead-code" in passes
    assert "broken-plugin" in proc.stderr and "failed to load" in proc.stderr


def test_plugin_pass_runs_in_a_pipeline(plugin_site, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(dead_branch(), model)
    report = tmp_path / "r.json"
    proc = cli(plugin_site, "optimize", str(model), "-o", str(tmp_path / "o.onnx"),
               "--pipeline", "lossless,count-relus{op=Add}", "--report", str(report), "-q")
    assert proc.returncode == 0, proc.stderr
    records = {p["name"]: p for p in json.loads(report.read_text())["passes"]}
    assert records["count-relus"]["stats"] == {"count": 1}  # one Add; the dead Relu is gone


def test_asking_for_the_broken_plugin_is_an_error(plugin_site, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(dead_branch(), model)
    proc = cli(plugin_site, "optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--pipeline", "broken-plugin")
    assert proc.returncode == 2
    assert "broken-plugin" in proc.stderr and "Traceback" not in proc.stderr


def test_plugin_clashing_with_a_builtin_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "onnxopt-clash"
        version = "0.1"
        [project.entry-points."onnxopt.passes"]
        eliminate-dead-code = "onnxopt_clash:X"
    """))
    (src / "onnxopt_clash.py").write_text("X = None\n")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)],
                   check=True, capture_output=True)
    proc = cli(site, "passes")
    assert proc.returncode == 2 and "clashes with a built-in" in proc.stderr
