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
from onnxopt.measure.fidelity import FidelityProbe, Floor
from onnxopt.pipeline.floor import FloorKeeper
from onnxopt.pipeline.manager import PassManager, PassRecord
from onnxopt.pipeline.registry import get_pass
from onnxopt.pipeline.text import PassSpec, flatten, format_pipeline, resolve
from onnxopt.target import Target, load_target

logger = logging.getLogger(__name__)


class OptimizeResult:
    """The optimized model, what was done to it, and a way to write it.

    ``model`` (an onnx.ModelProto, with the provenance metadata) is built on first use;
    ``save`` without it writes the optimized graph straight to the file, weight by weight,
    so the model is never held twice in memory (the CLI saves this way)."""

    def __init__(self, model: Model | onnx.ModelProto, report: dict[str, Any],
                 records: list[PassRecord] | None = None, target: Target | None = None,
                 provenance: dict[str, str] | None = None, masks: dict[str, Any] | None = None):
        self._source = model if isinstance(model, Model) else None
        self._proto = model if isinstance(model, onnx.ModelProto) else None
        self.report = report
        self.records = records or []
        self.target = target
        self.provenance = provenance or {}
        self.masks = dict(masks or {})  # pruning masks by initializer name (True = kept)

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
    from onnxopt.target import WITHOUT_DATA_PIPELINE

    target = load_target(target)
    notes: list[str] = []
    text = pipeline if pipeline is not None else "default"
    if pipeline is None and not has_calibration and WITHOUT_DATA_PIPELINE in target.pipelines:
        text = WITHOUT_DATA_PIPELINE  # the target's own choice without data (gpu: float16)
        notes.append(f"no calibration data: ran target '{target.name}' pipeline '{WITHOUT_DATA_PIPELINE}' "
                     f"({target.pipelines[WITHOUT_DATA_PIPELINE]}); give --calibration for 'default'")
    specs = resolve(text, target.pipelines, target.passes)
    if not has_calibration:
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


def target_floor(target: Target) -> Floor:
    """The floor a target's [floor] table sets (none when it sets nothing)."""
    f = target.floor
    return Floor(f.get("min_snr_db"), f.get("min_cosine"), f.get("max_latency_ratio"))


def _probe(model: Model, ctx: PassContext, data: Any, held_back: list, held_from: str) -> FidelityProbe:
    """The batches the floor judges on: from the evaluation data, else held back from the
    calibration data, else made from the input specs."""
    from onnxopt.data.samples import generated_batch
    from onnxopt.measure.compare import read_batches

    if data is not None:  # labels and other arrays beside the inputs are left out
        batches = read_batches(data, model.template, max_batches=4)
        source = f"{len(batches)} batch(es) of the evaluation data"
    elif held_back:
        batches, source = held_back, held_from
    else:
        batches = [b for b in (generated_batch(model.graph, seed) for seed in (0, 1)) if b is not None]
        source = f"{len(batches)} batch(es) generated from the input specs"
    return FidelityProbe(ctx.reference.proto, batches, source, ctx.providers, ctx.threads)


def optimize(model: str | os.PathLike | onnx.ModelProto | Model, target: str | os.PathLike | Target = "cpu",
             pipeline: str | list[PassSpec] | None = None, calibration: Any = None,
             verify: bool = False, strict: bool = False, progress: bool = False,
             seed: int = 0, data: Any = None, floor: Floor | None = None,
             input_shapes: dict[str, list[int]] | None = None,
             masks: str | os.PathLike | dict | None = None) -> OptimizeResult:
    """Optimize ``model`` for ``target`` with ``pipeline`` (a name from the target or text).

    ``calibration`` is an .npz path, a folder of them, or an object with ``get_next()``.
    ``data`` (same forms) is evaluation data: the floor judges lossy passes on a few of its
    batches. ``floor`` bounds every lossy pass; by default the target's [floor] table bounds
    its default pipeline, and other pipelines run without one (``Floor()``: no floor).
    ``input_shapes`` ({name: dims}, `--input-shape`) fixes input shapes first (the
    ``fix-shapes`` pass); a target with ``static_shapes`` refuses a model whose inputs stay
    dynamic. The run ends with `onnxopt check` against the target (``report["check"]``).
    Returns an OptimizeResult with ``.model`` (onnx.ModelProto), ``.report`` and ``.save()``.
    ``masks`` (an .npz path or a dict, initializer name -> bool array, True = kept) are
    pruning masks of an earlier run that the pruning passes respect; ``.masks`` of the
    result holds the masks this run's pruning passes left.
    The input (file, proto or Model) is never modified.
    """
    started = time.perf_counter()
    target, specs, notes = plan(target, pipeline, has_calibration=calibration is not None)
    m = model.copy() if isinstance(model, Model) else load(model)
    if input_shapes:
        shapes = [f"{name}:{','.join(map(str, dims))}" for name, dims in input_shapes.items()]
        specs = [PassSpec("fix-shapes", {"shapes": shapes})] + specs
    if target.capabilities.get("static_shapes"):
        require_static_inputs(m, target, input_shapes or {})
    reference = Reference(m)
    if floor is None:  # the target's floor holds its own pipeline; a pipeline asked for by name holds none
        floor = target_floor(target) if pipeline in (None, "default") else Floor()
    lossy = floor and any(not get_pass(s.name).lossless for s in flatten(specs))
    held_back: list = []
    held_from = ""
    calib = None
    if calibration is not None:
        from onnxopt.data.calibration import hold_back, open_source
        from onnxopt.data.statistics import Calibration

        source = open_source(calibration, m)
        if lossy and data is None:  # the floor is judged on batches calibration does not see
            source, held_back, held_from = hold_back(source)
        calib = Calibration(source=source, reference=reference, threads=target.runtime.intra_op_threads)
    ctx = PassContext(target=target, calibration=calib, reference=reference, seed=seed,
                      masks=load_masks(masks) if masks is not None else {})
    ctx.notes.extend(notes)
    for note in notes:
        logger.warning(note)
    keeper = None
    if lossy:
        keeper = FloorKeeper(floor, lambda: _probe(m, ctx, data, held_back, held_from))
    before = {"nodes": count_nodes(m.graph), "params": count_params(m.graph)}
    manager = PassManager(specs, verify=verify, strict=strict, progress=progress, floor_keeper=keeper)
    # The imported graph is hundreds of thousands of long-lived objects on big models;
    # freezing them keeps the cyclic collector from rescanning them during every pass.
    gc.freeze()
    try:
        records = manager.run(m, ctx)
    finally:
        gc.unfreeze()
    from onnxopt.analysis.target_check import check_model

    check = check_model(m, target)  # what the target still cannot run, reported
    if not check.conforms:
        ctx.notes.append(f"check: {check.summary()} (onnxopt check OUT --target {target.name} lists them)")
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
        "floor": floor.to_json() | ({"data": keeper.probe.source} if keeper and keeper.probed else {}),
        "chosen": dict(ctx.metadata),  # what "auto" settings found on this machine and chose
        "providers": ctx.resolved_providers,
        "check": check.to_json(),
        "seconds": time.perf_counter() - started,
    }
    return OptimizeResult(m, report=report, records=records, target=target, provenance=provenance,
                          masks=dict(ctx.pruned_masks))


def require_static_inputs(m: Model, target: Target, input_shapes: dict[str, list[int]]) -> None:
    """A target that needs static shapes refuses a model whose inputs stay dynamic, naming
    each such input and the flag that fixes it."""
    from onnxopt.analysis.shapes import is_static
    from onnxopt.analysis.target_check import dynamic_input
    from onnxopt.errors import UsageError

    dynamic = [f"input '{t.name}': {dynamic_input(t.name, input_shapes.get(t.name, t.shape))}"
               for t in m.graph.inputs if not is_static(input_shapes.get(t.name, t.shape))]
    if dynamic:
        raise UsageError(f"target '{target.name}' needs static shapes (capabilities.static_shapes): "
                         + "; ".join(dynamic) + " (input_shapes= in the Python API)")


def load_masks(source: str | os.PathLike | dict) -> dict:
    """Pruning masks from an .npz file (arrays keyed by initializer name) or a dict."""
    import numpy as np

    from onnxopt.errors import UsageError

    if isinstance(source, dict):
        return {str(k): np.asarray(v).astype(bool) for k, v in source.items()}
    try:
        with np.load(source, allow_pickle=False) as data:
            return {k: data[k].astype(bool) for k in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{source}: cannot read pruning masks ({exc})") from None


def save_masks(masks: dict, path: str | os.PathLike) -> Path:
    """Write masks as an .npz (arrays keyed by initializer name) atomically."""
    import numpy as np

    from onnxopt.errors import OutputError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v, dtype=bool) for k, v in masks.items()})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write masks ({exc.strerror or exc})") from None
    return path
