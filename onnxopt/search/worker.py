"""What a search worker holds and does: the model and the data, once; candidates, many times.

A worker process (or Ray actor) is made with the ``payload`` once: the original model's
bytes, the target, the calibration and evaluation batches and the metric. It writes the
calibration batches to a private temporary folder (one .npz per batch, so any batch shapes
work) and computes the original's outputs on the evaluation batches once. Then it runs
tasks, each named by a module-level function of this file so a process pool and Ray can
ship it:

- ``evaluate``: a candidate pipeline, run in full (``onnxopt.optimize`` with no floor: the
  search is the judge), measured: file size, latency against the original (interleaved in
  this worker, one thread), the metric's drop on the evaluation batches;
- ``layer_alone``: the model after a lossless prefix, one lossy pass run with every layer but
  one kept, its fidelity on calibration batches (``onnxopt.pipeline.sensitivity``).
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_STATE = None  # this process's WorkerState (process pools: set by the initializer)


class WorkerState:
    """The payload, unpacked once per worker."""

    def __init__(self, payload: dict):
        import onnx

        from onnxopt.measure.metrics import load_metric

        self.model_bytes: bytes = payload["model"]
        self.proto = onnx.load_from_string(self.model_bytes)
        self.target = payload["target"]
        self.metric = load_metric(payload["metric"]) if isinstance(payload["metric"], str) else payload["metric"]
        self.calibration_batches: list[dict] = payload["calibration"]
        self.evaluation: list[dict] = payload["evaluation"]
        self.threads = int(payload.get("threads", 1))
        self.folder = Path(tempfile.mkdtemp(prefix="onnxopt-search-"))
        atexit.register(shutil.rmtree, self.folder, True)
        self.calibration = None
        if self.calibration_batches:
            calib = self.folder / "calibration"
            calib.mkdir()
            for i, batch in enumerate(self.calibration_batches):
                np.savez(calib / f"{i:06d}.npz", **batch)
            self.calibration = str(calib)
        self._reference = None
        self._probe = None
        self._prefixes: dict[str, tuple] = {}
        self._prefix_models: dict[str, object] = {}

    # -- the original's outputs --------------------------------------------------------------
    def outputs(self, proto) -> list[dict[str, np.ndarray]]:
        from onnxopt import runtime

        sess = runtime.session(proto, None, self.threads, level="all")
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        return [dict(zip(names, sess.run(names, {k: v for k, v in b.items() if k in wanted}))) for b in self.evaluation]

    @property
    def reference(self) -> list[dict[str, np.ndarray]]:
        if self._reference is None:
            self._reference = self.outputs(self.proto)
        return self._reference

    @property
    def probe(self):
        """Fidelity on (up to 4) calibration batches, for sensitivities."""
        if self._probe is None:
            from onnxopt.measure.fidelity import FidelityProbe

            batches = (self.calibration_batches or self.evaluation)[:4]
            self._probe = FidelityProbe(self.proto, batches, f"{len(batches)} calibration batch(es)", None,
                                        self.threads)
        return self._probe


def initialize(payload: dict) -> None:
    """Process-pool initializer: unpack the payload once in this process."""
    global _STATE
    _STATE = WorkerState(payload)


def call(task: str, item: Any, state: WorkerState | None = None) -> Any:
    """Run task ``task`` (a function of this module) on ``item`` with this worker's state."""
    fn = TASKS[task]
    return fn(state if state is not None else _STATE, item)


# -- tasks ---------------------------------------------------------------------------------
def evaluate(state: WorkerState, item: dict) -> dict:
    """Build candidate ``item['pipeline']`` and measure it (see the module docstring)."""
    from onnxopt.measure import metrics as M
    from onnxopt.measure.fidelity import Floor
    from onnxopt.measure.speed import compare_speed
    from onnxopt.optimize import optimize

    started = time.perf_counter()
    out = {"id": item.get("id"), "pipeline": item["pipeline"]}
    try:
        start, pipeline = state.proto, item["pipeline"]
        if item.get("prefix"):  # the lossless prefix is the same for every candidate: built once here
            start, pipeline = _prefix_model(state, item["prefix"]), item["rest"]
        result = optimize(start, target=state.target, pipeline=pipeline, calibration=state.calibration,
                          floor=Floor())
        proto = result.model
        out["size"] = len(proto.SerializeToString())
        got = state.outputs(proto)
        ref_all, cand_all = M.join_batches(state.reference), M.join_batches(got)
        stats = M.stats_by_output(ref_all, cand_all)
        fid = M.evaluate(state.metric, stats, ref_all, cand_all)
        out["drop"], out["value"] = float(fid.drop), fid.value
        speed = compare_speed(state.proto, proto, state.evaluation[0], None, 1, runs=int(item.get("runs", 400)),
                              budget_s=float(item.get("budget_s", 4.0)))
        out["latency_ratio"], out["ms"] = float(speed.ratio), float(speed.ms_b)
        out["rolled_back"] = [p["name"] for p in result.report["passes"] if p["status"] in ("failed", "rolled-back")]
        if not math.isfinite(out["drop"]):
            out["error"] = "the metric is not finite"
    except Exception as exc:  # noqa: BLE001  (a candidate that fails is a result, not a crash)
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def layer_alone(state: WorkerState, item: dict) -> dict:
    """Fidelity of the model after ``item['prefix']`` with pass ``item['pass']`` (its
    ``options``) run with every layer but ``item['layer']`` kept."""
    from onnxopt.ir.model import Model, Reference
    from onnxopt.pipeline.context import PassContext
    from onnxopt.pipeline.registry import get_pass

    prefix_model, calibration = _prefix(state, item["prefix"], item["pass"], item["options"])
    model = Model(prefix_model)
    ctx = PassContext(target=_target(state), calibration=calibration, reference=Reference(Model(state.proto)))
    cls = get_pass(item["pass"])
    options = dict(item["options"])
    options[cls.keep_option] = list(options.get(cls.keep_option, [])) + list(item["keep"])
    try:
        cls(**options).run(model, ctx)
        fid = state.probe.measure(model.export())
        return {"layer": item["layer"], "snr_db": fid.snr_db, "cosine": fid.cosine, "output": fid.output}
    except Exception as exc:  # noqa: BLE001
        return {"layer": item["layer"], "snr_db": -math.inf, "cosine": 0.0, "output": "", "error": str(exc)[:300]}


def _target(state: WorkerState):
    from onnxopt.target import load_target

    return load_target(state.target)


def _prefix_model(state: WorkerState, prefix: str):
    """The original model after the lossless ``prefix`` (built once per worker)."""
    if prefix not in state._prefix_models:
        from onnxopt.optimize import optimize

        state._prefix_models[prefix] = optimize(state.proto, target=state.target, pipeline=prefix).model
    return state._prefix_models[prefix]


def _prefix(state: WorkerState, prefix: str, pass_name: str, options: dict):
    """The model after the lossless ``prefix`` and a Calibration holding what ``pass_name``
    asks of it (computed once per prefix and pass in this worker)."""
    key = f"{prefix}|{pass_name}|{sorted(options.items())}"
    if key not in state._prefixes:
        from onnxopt.data.statistics import Calibration
        from onnxopt.data.calibration import open_source
        from onnxopt.ir.model import Model, Reference
        from onnxopt.pipeline.context import PassContext
        from onnxopt.pipeline.registry import get_pass

        proto = _prefix_model(state, prefix) if prefix else state.proto
        model = Model(proto)
        calibration = None
        if state.calibration is not None:
            calibration = Calibration(open_source(state.calibration, model), reference=Reference(Model(state.proto)),
                                      threads=state.threads)
            cls = get_pass(pass_name)
            ask = getattr(cls, "calibration_requests", None)
            if ask is not None:  # warm the statistics every trial of this pass reads
                ctx = PassContext(target=_target(state), calibration=calibration)
                calibration.reduce(model, cls(**options).calibration_requests(model, ctx))
        state._prefixes[key] = (proto, calibration)
    return state._prefixes[key]


TASKS = {"evaluate": evaluate, "layer_alone": layer_alone}
