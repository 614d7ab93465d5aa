"""Micro-benchmarks: is model B faster than model A on these inputs, on this machine?

A pass that trades accuracy for speed must know that the trade pays: a low-rank split
that saves 20 % of the MACs can run slower as two GEMMs, a quantized layer can be slower
than float on a CPU without the right dot products. ``MicroBenchmark.compare(a, b, feeds)``
times both in onnxruntime on the given providers and threads (1 by default: the figure
least disturbed by other load), interleaved A B B A … after a warm-up so that frequency
changes and cache state hit both alike (``onnxopt.measure.speed.compare_speed``),
and returns the medians and the median of the pairs' ratios.

Results are cached under a key the caller gives (for a layer: its op, shapes, attributes
and the variant), together with the providers, threads, onnxruntime version and CPU: in
memory for the process, and, with a ``cache_dir``, in a JSON file there, so a second run on
the same machine decides the same way without timing again (``onnxopt.user_cache.user_cache_dir()``
is the user's cache folder). Without a key nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.hardware import cpu_model

logger = logging.getLogger(__name__)

CACHE_FILE = "microbench.json"
_MEMORY: dict[str, "Timing"] = {}  # process-wide: every MicroBenchmark shares it


@dataclass(frozen=True)
class Timing:
    """Median seconds per run of A and of B, and the median of B/A over the interleaved pairs."""

    a_seconds: float
    b_seconds: float
    ratio: float
    runs: int
    cached: bool = False

    @property
    def b_faster(self) -> bool:
        return self.ratio < 1.0


class MicroBenchmark:
    """Times pairs of models in onnxruntime; see the module docstring."""

    def __init__(self, providers: list[str] | None = None, threads: int = 1, runs: int = 15, warmup: int = 3,
                 budget_s: float = 5.0, cache_dir: str | os.PathLike | None = None):
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads = threads
        self.runs, self.warmup, self.budget_s = runs, warmup, budget_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timed = 0  # comparisons actually timed (not served from a cache)
        self._disk: dict[str, dict] | None = None

    # -- cache ---------------------------------------------------------------------------------
    def cache_key(self, key: Any) -> str:
        """A stable digest of the caller's key and everything else a timing depends on."""
        import onnxruntime as ort

        text = json.dumps([key, self.providers, self.threads, ort.__version__, cpu_model()],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _disk_entries(self) -> dict[str, dict]:
        if self._disk is None:
            self._disk = {}
            if self.cache_dir is not None:
                try:
                    self._disk = json.loads((self.cache_dir / CACHE_FILE).read_text())
                except (OSError, ValueError):
                    self._disk = {}
        return self._disk

    def _store(self, digest: str, timing: Timing) -> None:
        _MEMORY[digest] = timing
        if self.cache_dir is None:
            return
        entries = self._disk_entries()
        entries[digest] = asdict(timing)
        try:  # best effort: a read-only or full disk only costs the next run a timing
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{CACHE_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.cache_dir / CACHE_FILE)
        except OSError as exc:
            logger.debug("micro-benchmark cache not written: %s", exc)

    def lookup(self, key: Any) -> Timing | None:
        """The cached timing for ``key``, or None."""
        digest = self.cache_key(key)
        if digest in _MEMORY:
            return _MEMORY[digest]
        found = self._disk_entries().get(digest)
        if found is not None:
            try:
                timing = Timing(**{**found, "cached": True})
            except TypeError:
                return None
            _MEMORY[digest] = timing
            return timing
        return None

    # -- timing --------------------------------------------------------------------------------
    def compare(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray],
                key: Any = None) -> Timing:
        """Time ``a`` against ``b`` on ``feeds`` (cached under ``key`` when given). Raises
        ``onnxopt.runtime.CannotRun`` when onnxruntime cannot load or run either."""
        if key is not None:
            hit = self.lookup(key)
            if hit is not None:
                return Timing(hit.a_seconds, hit.b_seconds, hit.ratio, hit.runs, cached=True)
        from onnxopt.measure.speed import compare_speed

        speed = compare_speed(a, b, feeds, self.providers, self.threads, runs=self.runs, budget_s=self.budget_s,
                              warmup=self.warmup)
        timing = Timing(speed.ms_a / 1e3, speed.ms_b / 1e3, speed.ratio, speed.runs)
        self.timed += 1
        if key is not None:
            self._store(self.cache_key(key), timing)
        return timing


def clear_memory_cache() -> None:
    """Forget every timing held in memory (tests)."""
    _MEMORY.clear()
