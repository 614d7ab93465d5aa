"""`onnxopt compare REF CAND`: fidelity, size, latency and memory of two models side by side.

Both models run in onnxruntime on the same inputs (DATA, or inputs made from the input
specs). Latency is measured in one process, the two sessions interleaved (A B B A …) after
a warm-up so that frequency scaling and cache state hit both alike; the median latency of
each and the median of the pairs' ratios are reported. Peak memory is measured in a fresh child process per model (VmHWM
minus the resident size before the session was made), since one process cannot tell two
sessions' allocations apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.measure import metrics as M
from onnxopt.measure.speed import pair_ratio
from onnxopt.errors import ModelError, UsageError

logger = logging.getLogger(__name__)


# -- inputs ------------------------------------------------------------------------------------
def read_batches(data, proto: onnx.ModelProto, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batches of model inputs from DATA (DESIGN.md section 5), via onnxopt.data.calibration.

    Arrays in the files that are not model inputs (labels, say) are allowed and left out.
    """
    from onnxopt.data.calibration import InputSpec, NpzSource, ReaderSource, _npz_shapes, input_specs

    # A dim stored as -1 (exporters write it for "any") is free, not a fixed size.
    specs = {n: InputSpec(n, s.dtype, None if s.shape is None else
                          tuple(None if isinstance(d, int) and d < 0 else d for d in s.shape))
             for n, s in input_specs(proto).items()}
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path] if path.is_file() else []
        extra = {n for f in files for n in _npz_shapes(f) if n not in specs}
        source = NpzSource(path, {**specs, **{n: InputSpec(n, None, None) for n in extra}})
    elif hasattr(data, "get_next"):
        source = ReaderSource(data, specs)
    else:
        raise UsageError(f"data must be an .npz file, a folder of them or a reader, not {type(data).__name__}")
    out = []
    for batch in source:
        out.append({k: v for k, v in batch.items() if k in specs})
        if max_batches and len(out) >= max_batches:
            break
    return out


def _sample_batch(proto: onnx.ModelProto, input_shapes: dict | None, seed: int) -> dict[str, np.ndarray]:
    from onnxopt.analysis.cost import with_input_shapes
    from onnxopt.measure.verify import CannotRun, sample_inputs, session

    try:
        return sample_inputs(session(with_input_shapes(proto, input_shapes or {})), seed)
    except CannotRun as exc:
        raise ModelError(f"cannot make inputs for the model: {exc} (give --data)") from None


# -- sessions ----------------------------------------------------------------------------------
def _session(proto_or_path, threads: int, optimize: bool = True, providers: list[str] | None = None):
    # Two sessions take turns: an idle session's pool must not spin-wait on the cores the
    # other one is timed on (with 2 threads on 2 cores that skewed ratios up to 20x).
    source = str(proto_or_path) if isinstance(proto_or_path, (str, os.PathLike)) else proto_or_path
    try:
        return runtime.session(source, providers, threads, level="all" if optimize else "disable",
                               spinning=False)
    except runtime.CannotRun as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}") from None


def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    try:
        values = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception as exc:
        raise ModelError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
    return {o.name: v for o, v in zip(sess.get_outputs(), values)}


def interleaved_latency(sess_a, sess_b, feeds: dict, runs: int = 20, warmup: int = 3,
                        budget_s: float = 20.0) -> tuple[list[float], list[float]]:
    """Seconds per run of each session, measured A B B A A B … after ``warmup`` runs each.

    Stops early (after at least 5 pairs) when ``budget_s`` is spent, so a slow model does
    not hold a benchmark for minutes.
    """
    for _ in range(warmup):
        _run(sess_a, feeds)
        _run(sess_b, feeds)
    times_a: list[float] = []
    times_b: list[float] = []
    started = time.perf_counter()
    for i in range(runs):
        order = ((sess_a, times_a), (sess_b, times_b)) if i % 2 == 0 else ((sess_b, times_b), (sess_a, times_a))
        for sess, sink in order:
            t = time.perf_counter()
            _run(sess, feeds)
            sink.append(time.perf_counter() - t)
        if i >= 4 and time.perf_counter() - started > budget_s:
            break
    return times_a, times_b


_MEMORY_PROBE = r"""
import json, sys, resource
import numpy as np, onnxruntime as ort

def status(key):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None

path, feeds_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
with np.load(feeds_path, allow_pickle=False) as f:
    feeds = {k: f[k] for k in f.files}
before = status("VmRSS")
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
names = {i.name for i in sess.get_inputs()}
sess.run(None, {k: v for k, v in feeds.items() if k in names})
peak = status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": before, "peak_rss": peak}))
"""


def session_peak_memory(model_path: str | os.PathLike, feeds: dict[str, np.ndarray],
                        threads: int = 1) -> dict[str, int | None]:
    """Peak resident memory of a fresh process that loads the model and runs it once.

    ``session_bytes`` is the peak minus the process's resident size just before the session
    was made (Python, numpy, onnxruntime and the inputs): what the model itself costs.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model_path), str(feeds_path),
                               str(threads)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        logger.warning("memory probe failed: %s", proc.stderr.strip().splitlines()[-1:] or proc.returncode)
        return {"peak_rss": None, "session_bytes": None}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out.get("baseline_rss")
    return {"peak_rss": out["peak_rss"],
            "session_bytes": out["peak_rss"] - base if base is not None and out["peak_rss"] else None}


# -- the comparison ----------------------------------------------------------------------------
def _as_proto_and_path(model, tmp: Path, label: str) -> tuple[onnx.ModelProto, Path]:
    from onnxopt.ir.model import load

    if isinstance(model, onnx.ModelProto):
        path = tmp / f"{label}.onnx"
        from onnxopt.ir.model import save

        save(model, path)
        return model, path
    path = Path(model)
    m = load(path)
    return m.to_proto(), path


def compare(reference, candidate, data=None, metric: str | Callable = "cosine",
            max_drop: float | None = None, threads: int = 1, runs: int = 20,
            latency: bool = True, memory: bool = True, max_batches: int | None = None,
            input_shapes: dict | None = None, seed: int = 0,
            progress: bool = False, providers: list[str] | None = None) -> dict[str, Any]:
    """Compare two models (paths or ModelProtos); a JSON-ready dict (see `onnxopt compare`).

    ``providers``: onnxruntime execution providers to run on (default CPU); the caller
    resolves them (``onnxopt.runtime.resolve_providers``).

    ``result["gate"]["passed"]`` is False when ``max_drop`` is given and the metric's drop
    exceeds it.
    """
    metric_fn = M.load_metric(metric) if isinstance(metric, str) else metric
    with tempfile.TemporaryDirectory(prefix="onnxopt-compare-") as tmp:
        ref_proto, ref_path = _as_proto_and_path(reference, Path(tmp), "reference")
        cand_proto, cand_path = _as_proto_and_path(candidate, Path(tmp), "candidate")
        if data is not None:
            batches = read_batches(data, ref_proto, max_batches)
            source = str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__
        else:
            batches = [_sample_batch(ref_proto, input_shapes, seed)]
            source = f"random inputs from the input specs (seed {seed})"
        ref_inputs = {i.name for i in ref_proto.graph.input} - {t.name for t in ref_proto.graph.initializer}
        cand_inputs = {i.name for i in cand_proto.graph.input} - {t.name for t in cand_proto.graph.initializer}
        if ref_inputs != cand_inputs:
            raise ModelError(f"the models have different inputs: {sorted(ref_inputs)} vs {sorted(cand_inputs)}")
        sess_ref = _session(ref_path, threads, providers=providers)
        sess_cand = _session(cand_path, threads, providers=providers)
        ref_outs, cand_outs = [], []
        iterator = batches
        if progress:
            from tqdm import tqdm

            iterator = tqdm(batches, desc="compare", unit="batch", leave=False)
        for feeds in iterator:
            ref_outs.append(_run(sess_ref, feeds))
            cand_outs.append(_run(sess_cand, feeds))
        missing = set(ref_outs[0]) - set(cand_outs[0])
        if missing:
            raise ModelError(f"the candidate lacks output(s) {', '.join(sorted(missing))}")
        ref_all, cand_all = M.join_batches(ref_outs), M.join_batches(cand_outs)
        stats = M.stats_by_output(ref_all, cand_all)
        result: dict[str, Any] = {
            "reference": {"path": str(reference) if not isinstance(reference, onnx.ModelProto) else None,
                          "file_bytes": ref_path.stat().st_size},
            "candidate": {"path": str(candidate) if not isinstance(candidate, onnx.ModelProto) else None,
                          "file_bytes": cand_path.stat().st_size},
            "data": source, "batches": len(batches), "threads": threads,
            "providers": list(sess_ref.get_providers()),
            "input_shapes": {k: list(np.shape(v)) for k, v in batches[0].items()},
            "outputs": stats,
        }
        result["size_ratio"] = result["candidate"]["file_bytes"] / max(1, result["reference"]["file_bytes"])
        fid = M.evaluate(metric_fn, stats, ref_all, cand_all)
        result["metric"] = fid.to_json()
        if max_drop is not None:
            result["gate"] = {"max_drop": max_drop, "drop": fid.drop, "passed": bool(fid.drop <= max_drop)}
        if latency:
            a, b = interleaved_latency(sess_ref, sess_cand, batches[0], runs=runs)
            med_a, med_b = statistics.median(a), statistics.median(b)
            result["reference"]["latency_ms"] = med_a * 1e3
            result["candidate"]["latency_ms"] = med_b * 1e3
            result["latency_ratio"] = pair_ratio(a, b) if med_a > 0 else math.nan
            result["latency_runs"] = len(a)
        del sess_ref, sess_cand
        if memory:
            for side, path in (("reference", ref_path), ("candidate", cand_path)):
                mem = session_peak_memory(path, batches[0], threads)
                result[side]["peak_rss_bytes"] = mem["peak_rss"]
                result[side]["session_memory_bytes"] = mem["session_bytes"]
    return result


def format_comparison(result: dict) -> str:
    """The human-readable table `onnxopt compare` prints."""
    from onnxopt.analysis.cost import human

    lines = [f"data: {result['data']} ({result['batches']} batch(es)); threads {result['threads']}"]
    lines.append(f"{'output':<28}{'cosine':>10}{'SNR dB':>9}{'max abs':>11}{'mean abs':>11}{'top1':>7}")
    for name, s in result["outputs"].items():
        if "cosine" not in s:
            lines.append(f"{name[:27]:<28}  {s.get('error') or ('equal' if s.get('equal') else 'differs')}")
            continue
        top1 = f"{s['top1']:.3f}" if "top1" in s else "-"
        lines.append(f"{name[:27]:<28}{s['cosine']:>10.6f}{s['snr_db']:>9.1f}{s['max_abs']:>11.3g}"
                     f"{s['mean_abs']:>11.3g}{top1:>7}")
    ref, cand = result["reference"], result["candidate"]
    lines.append(f"{'':<22}{'reference':>14}{'candidate':>14}{'ratio':>8}")
    lines.append(f"{'file size':<22}{human(ref['file_bytes'], 'B'):>14}{human(cand['file_bytes'], 'B'):>14}"
                 f"{result['size_ratio']:>7.2f}x")
    if "latency_ratio" in result:
        lines.append(f"{'latency (median)':<22}{ref['latency_ms']:>11.3f} ms{cand['latency_ms']:>11.3f} ms"
                     f"{result['latency_ratio']:>7.2f}x")
    if ref.get("session_memory_bytes") is not None and cand.get("session_memory_bytes") is not None:
        ratio = cand["session_memory_bytes"] / max(1, ref["session_memory_bytes"])
        lines.append(f"{'session peak memory':<22}{human(ref['session_memory_bytes'], 'B'):>14}"
                     f"{human(cand['session_memory_bytes'], 'B'):>14}{ratio:>7.2f}x")
    m = result["metric"]
    text = f"metric {m['metric']}: value {m['value']:.6g}, drop {m['drop']:.6g}"
    if "reference" in m:
        text += f" (reference {m['reference']:.6g}, candidate {m['candidate']:.6g})"
    lines.append(text)
    if "gate" in result:
        g = result["gate"]
        lines.append(f"gate: drop {g['drop']:.6g} {'<=' if g['passed'] else '>'} max {g['max_drop']:g}: "
                     + ("passed" if g["passed"] else "FAILED"))
    return "\n".join(lines)
