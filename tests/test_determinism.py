"""The same input, pipeline and data give byte-identical output (issue 8.5).

In one process (two runs back to back) and across processes with different hash seeds,
since set and dict iteration over strings follows PYTHONHASHSEED and is the usual way a
pass becomes nondeterministic (names, node order, initializer order).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import graphs
from onnxopt.cli import main
from onnxopt.pipeline.registry import all_passes, builtin_names


def _optimize_bytes(tmp_path: Path, model: onnx.ModelProto | Path, name: str, *extra: str) -> bytes:
    src = model if isinstance(model, Path) else tmp_path / "in.onnx"
    if not isinstance(model, Path):
        src.write_bytes(model.SerializeToString())
    out = tmp_path / name
    assert main(["optimize", str(src), "-o", str(out), "-q", *extra]) == 0
    return out.read_bytes()


def _every_lossless_pass() -> str:
    builtins = builtin_names()  # not the toy passes other test files register
    return ",".join(sorted(n for n, c in all_passes().items() if c.lossless and n in builtins))


@pytest.mark.parametrize("builder", graphs.BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("pipeline", ["lossless", "every-lossless-pass"])
def test_same_run_twice_in_one_process(tmp_path, builder, pipeline):
    text = _every_lossless_pass() if pipeline == "every-lossless-pass" else pipeline
    model = builder()
    first = _optimize_bytes(tmp_path, model, "a.onnx", "--pipeline", text)
    second = _optimize_bytes(tmp_path, model, "b.onnx", "--pipeline", text)
    assert first == second


def test_fuzz_graphs_twice_in_one_process(tmp_path):
    from tests.test_fuzz import random_model

    text = _every_lossless_pass()
    for seed in range(3):
        model = random_model(seed, 12)
        assert _optimize_bytes(tmp_path, model, "a.onnx", "--pipeline", text) == \
            _optimize_bytes(tmp_path, model, "b.onnx", "--pipeline", text), f"seed {seed}"


def test_quantization_with_the_same_data_is_deterministic(tmp_path):
    model = graphs.conv_bn_relu()
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((8, 1, 3, 8, 8)).astype(np.float32))
    # the speed floor times the model on this machine: a measured choice is not reproducible
    args = ("--pipeline", "lossless,quantize-static", "--calibration", str(data), "--max-latency-ratio", "off")
    assert _optimize_bytes(tmp_path, model, "a.onnx", *args) == _optimize_bytes(tmp_path, model, "b.onnx", *args)


def _run_in_fresh_process(src: Path, out: Path, hash_seed: str, pipeline: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(src), "-o", str(out), "-q",
                    "--pipeline", pipeline], check=True, env=env, capture_output=True, timeout=300)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_across_processes_with_different_hash_seeds(tmp_path):
    from tests.test_fuzz import random_model

    src = tmp_path / "in.onnx"
    src.write_bytes(random_model(7, 14).SerializeToString())
    pipeline = _every_lossless_pass()
    digests = {_run_in_fresh_process(src, tmp_path / f"out{seed}.onnx", seed, pipeline) for seed in ("1", "2")}
    assert len(digests) == 1
