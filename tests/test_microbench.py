"""onnxopt.measure.microbench: what is timed, what is cached, where (no timed assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from onnxopt.measure import microbench
from onnxopt.measure.microbench import MicroBenchmark, Timing
from onnxopt.runtime import CannotRun
from onnxopt.user_cache import user_cache_dir
from tests.graphs import init, make_model, tensor


@pytest.fixture(autouse=True)
def _fresh_memory():
    microbench.clear_memory_cache()
    yield
    microbench.clear_memory_cache()


def matmul(k: int = 16, n: int = 8) -> object:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [4, k])],
                      [tensor("y", [4, n])], [init("w", w)])


FEEDS = {"x": np.ones((4, 16), np.float32)}


def test_compare_times_both_models_and_reports_medians_and_ratio():
    bench = MicroBenchmark(runs=5, warmup=1)
    t = bench.compare(matmul(), matmul(), FEEDS)
    assert t.a_seconds > 0 and t.b_seconds > 0 and t.ratio > 0
    assert 5 >= t.runs >= 1 and not t.cached and bench.timed == 1


def test_results_are_cached_in_memory_under_the_key():
    bench = MicroBenchmark(runs=3, warmup=1)
    first = bench.compare(matmul(), matmul(), FEEDS, key=("matmul", 16, 8))
    again = MicroBenchmark(runs=3, warmup=1).compare(matmul(), matmul(), FEEDS, key=("matmul", 16, 8))
    assert again.cached and again.ratio == first.ratio and bench.timed == 1
    other = bench.compare(matmul(), matmul(), FEEDS, key=("matmul", 16, 9))
    assert not other.cached and bench.timed == 2
    bench.compare(matmul(), matmul(), FEEDS)  # no key: timed every time
    bench.compare(matmul(), matmul(), FEEDS)
    assert bench.timed == 4


def test_the_key_holds_providers_threads_and_machine():
    a = MicroBenchmark(["CPUExecutionProvider"], threads=1).cache_key("k")
    assert a == MicroBenchmark(["CPUExecutionProvider"], threads=1).cache_key("k")
    assert a != MicroBenchmark(["CPUExecutionProvider"], threads=2).cache_key("k")
    assert a != MicroBenchmark(["CUDAExecutionProvider", "CPUExecutionProvider"], threads=1).cache_key("k")
    assert a != MicroBenchmark(threads=1).cache_key("other")


def test_disk_cache_survives_the_process_and_tolerates_damage(tmp_path):
    bench = MicroBenchmark(runs=3, warmup=1, cache_dir=tmp_path)
    first = bench.compare(matmul(), matmul(), FEEDS, key="layer")
    stored = json.loads((tmp_path / microbench.CACHE_FILE).read_text())
    assert list(stored.values())[0]["ratio"] == first.ratio
    microbench.clear_memory_cache()  # as a new process would start
    fresh = MicroBenchmark(cache_dir=tmp_path)
    hit = fresh.lookup("layer")
    assert hit is not None and hit.cached and hit.ratio == first.ratio and fresh.timed == 0
    (tmp_path / microbench.CACHE_FILE).write_text("{not json")
    microbench.clear_memory_cache()
    damaged = MicroBenchmark(runs=3, warmup=1, cache_dir=tmp_path)
    assert damaged.lookup("layer") is None
    damaged.compare(matmul(), matmul(), FEEDS, key="layer")  # re-timed and written again
    assert json.loads((tmp_path / microbench.CACHE_FILE).read_text())


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path / "x"))
    assert user_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ONNXOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "onnxopt"


def test_a_model_that_cannot_run_raises_cannot_run():
    with pytest.raises(CannotRun):
        MicroBenchmark(runs=2, warmup=1).compare(matmul(), matmul(), {"x": np.ones((4, 3), np.float32)})


def test_timing_says_which_side_is_faster():
    assert Timing(2.0, 1.0, 0.5, 5).b_faster and not Timing(1.0, 2.0, 2.0, 5).b_faster
