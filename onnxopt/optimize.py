"""The one call behind `onnxopt optimize` and `onnxopt.optimize(...)`."""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx

from onnxopt import __version__
from onnxopt.pipeline.context import PassContext
from onnxopt.ir.model import Model, Reference, add_provenance, load, save
from onnxopt.ir.graphs import count_nodes, count_params
from onnxopt.pipeline.manager import PassManager, PassRecord
from onnxopt.pipeline.text import PassSpec, format_pipeline, resolve
from onnxopt.target import Target, load_target

logger = logging.getLogger(__name__)


class OptimizeResult:
    """The optimized model, what was done to it, and a way to write it.

    ``model`` (an onnx.ModelProto, with the provenance metadata) is built on first use;
    ``save`` without it writes the optimized graph straight to the file, weight by weight,
    so the model is never held twice in memory (the CLI saves this way)."""

    def __init__(self, model: Model | onnx.ModelProto, report: dict[str, Any],
                 records: list[PassRecord] | None = None, target: Target | None = None,
                 provenance: dict[str, str] | None = None):
        self._source = model if isinstance(model, Model) else None
        self._proto = model if isinstance(model, onnx.ModelProto) else None
        self.report = report
        self.records = records or []
        self.target = target
        self.provenance = provenance or {}

    @property
    def model(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = self._source.to_proto()
            add_provenance(self._proto, **self.provenance)
        return self._proto

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write the model atomically (external data when asked or over 2 GB)."""
        if self._proto is not None or self._source is None:
            return save(self.model, path, external_data=external_data)
        return self._source.save(path, external_data=external_data, **self.provenance)


def plan(target: str | os.PathLike | Target = "cpu", pipeline: str | list[PassSpec] | None = None,
         has_calibration: bool = False) -> tuple[Target, list[PassSpec], list[str]]:
    """(target, resolved specs, notes): the pipeline a run would execute."""
    target = load_target(target)
    notes: list[str] = []
    text = pipeline if pipeline is not None else "default"
    specs = resolve(text, target.pipelines, target.passes)
    if not has_calibration:
        from onnxopt.pipeline.registry import get_pass

        needing = [s.name for s in specs if not s.is_group and get_pass(s.name).needs_calibration]
        if needing:
            if pipeline is None:  # the default pipeline: drop what needs data, and say so
                specs = [s for s in specs if s.name not in needing]
                notes.append(f"no calibration data: skipped {', '.join(needing)} "
                             "(static quantization needs --calibration)")
            else:
                from onnxopt.errors import CalibrationError

                raise CalibrationError(f"pass(es) {', '.join(needing)} need calibration data "
                                       "(--calibration DATA or calibration=…)")
    return target, specs, notes


def optimize(model: str | os.PathLike | onnx.ModelProto | Model, target: str | os.PathLike | Target = "cpu",
             pipeline: str | list[PassSpec] | None = None, calibration: Any = None,
             verify: bool = False, strict: bool = False, progress: bool = False,
             seed: int = 0) -> OptimizeResult:
    """Optimize ``model`` for ``target`` with ``pipeline`` (a name from the target or text).

    ``calibration`` is an .npz path, a folder of them, or an object with ``get_next()``.
    Returns an OptimizeResult with ``.model`` (onnx.ModelProto), ``.report`` and ``.save()``.
    The input (file or proto) is never modified.
    """
    started = time.perf_counter()
    target, specs, notes = plan(target, pipeline, has_calibration=calibration is not None)
    m = load(model)
    reference = Reference(m)
    calib = None
    if calibration is not None:
        from onnxopt.data.statistics import open_calibration

        calib = open_calibration(calibration, m, reference, threads=target.runtime.intra_op_threads)
    ctx = PassContext(target=target, calibration=calib, reference=reference, seed=seed)
    ctx.notes.extend(notes)
    for note in notes:
        logger.warning(note)
    before = {"nodes": count_nodes(m.graph), "params": count_params(m.graph)}
    manager = PassManager(specs, verify=verify, strict=strict, progress=progress)
    # The imported graph is hundreds of thousands of long-lived objects on big models;
    # freezing them keeps the cyclic collector from rescanning them during every pass.
    gc.freeze()
    try:
        records = manager.run(m, ctx)
    finally:
        gc.unfreeze()
    pipeline_text = format_pipeline(specs)
    provenance = dict(version=__version__, pipeline=pipeline_text, target=target.name,
                      source_sha256=m.source_sha256, **ctx.metadata)
    report = {
        "onnxopt_version": __version__,
        "target": target.name,
        "pipeline": pipeline_text,
        "source": str(m.path) if m.path else None,
        "source_sha256": m.source_sha256,
        "before": before,
        "after": {"nodes": count_nodes(m.graph), "params": count_params(m.graph)},
        "passes": [r.to_json() for r in records],
        "notes": list(ctx.notes),
        "chosen": dict(ctx.metadata),  # what "auto" settings found on this machine and chose
        "providers": ctx.resolved_providers,
        "seconds": time.perf_counter() - started,
    }
    return OptimizeResult(m, report=report, records=records, target=target, provenance=provenance)
