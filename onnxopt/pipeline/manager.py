"""Run a resolved pipeline over a model: time, count, verify, roll back, invalidate.

For each pass: snapshot the graph, run, then (if the pass reports a change) check the
graph is still well formed and, under verify, that a lossless pass kept the outputs of
its input in onnxruntime. A pass that raises or breaks the model is rolled back to the
snapshot and reported; ``strict`` makes that fatal (PassFailedError, exit 1, for a pass
that raised; VerificationError, exit 3, for a pass that broke the model).
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxopt.measure import verify
from onnxopt.pipeline.context import PassContext
from onnxopt.errors import OnnxoptError, PassFailedError, VerificationError
from onnxopt.ir.model import Model
from onnxopt.pipeline.text import PassSpec
from onnxopt.pipeline.registry import get_pass

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What happened to one pass of the pipeline (one row of the report)."""

    name: str
    options: dict[str, Any]
    status: str = "pending"  # changed | unchanged | rolled-back | failed | skipped
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    verified: str | None = None  # "equal" | "skipped: …" | None (not asked)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def count_nodes(graph: gs.Graph) -> int:
    """Nodes of the graph and of every subgraph inside it."""
    from onnxopt.ir.model import iter_graphs

    return sum(len(g.nodes) for g in iter_graphs(graph))


def count_params(graph: gs.Graph) -> int:
    """Elements of every constant tensor (initializers and Constant-node values)."""
    seen, total = set(), 0
    from onnxopt.ir.model import iter_graphs

    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    total += int(_volume(t.shape))
            if node.op == "Constant":
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        total += int(_volume(value.shape))
                    elif isinstance(value, (list, tuple)):
                        total += len(value)
                    elif isinstance(value, (int, float)):
                        total += 1
    return total


def _volume(shape) -> int:
    n = 1
    for d in shape or ():
        n *= int(d) if isinstance(d, int) else 1
    return n


def graph_digest(model: Model) -> str:
    """A hash of the model as it would be written (used to catch dishonest `changed`)."""
    from onnxopt.ir.graph_io import export_model

    proto = export_model(model.graph, model.template)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def structural_problem(graph: gs.Graph) -> str | None:
    """A cheap check after every change: every input produced or constant, no cycle.

    Linear in the graph's size: one walk checks that every node of the main graph reads
    only what graph inputs, constants or earlier nodes provide. Only when a pass left
    nodes out of order does graphsurgeon's (slower) toposort run, to reorder them or to
    find a cycle.
    """
    from onnxopt.ir.model import iter_graphs

    graphs = list(iter_graphs(graph))
    available = set()
    for sub in graphs:
        available.update(t.name for t in sub.inputs)
        for node in sub.nodes:
            available.update(t.name for t in node.outputs)
    for sub in graphs:
        for node in sub.nodes:
            for t in node.inputs:
                if t.name and not isinstance(t, gs.Constant) and t.name not in available:
                    return f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces"
    for out in graph.outputs:
        if not isinstance(out, gs.Constant) and out.name not in available:
            return f"graph output '{out.name}' is no longer produced"
    if not _in_order(graph):
        try:
            graph.toposort(recurse_subgraphs=False)
        except Exception as exc:
            return f"graph is no longer a DAG ({exc})"
        if not _in_order(graph):
            return "graph is no longer a DAG (its nodes cannot be ordered)"
    return None


def _in_order(graph: gs.Graph) -> bool:
    """True when each node of ``graph`` reads only tensors ready before it."""
    ready = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and id(t) not in ready and t.inputs:
                return False  # produced by a node of this graph that comes later (or a cycle)
        ready.update(id(t) for t in node.outputs)
    return True


class PassManager:
    """Runs resolved PassSpecs in order on one model."""

    def __init__(self, specs: list[PassSpec], verify: bool = False, strict: bool = False,
                 verify_inputs: dict | None = None, progress: bool = False):
        self.specs = specs
        self.verify = verify
        self.strict = strict
        self.verify_inputs = verify_inputs
        self.progress = progress
        self.records: list[PassRecord] = []
        self._reference: tuple[dict, dict] | None = None  # (feeds, outputs) of the last good state
        self._snapshot: gs.Graph | None = None  # a copy of the graph as it was before the pass
        self._snapshot_of: gs.Graph | None = None  # the live graph that copy was taken of
        self._counts: tuple | None = None  # (graph, nodes, params) as last counted

    def run(self, model: Model, ctx: PassContext) -> list[PassRecord]:
        from tqdm import tqdm

        functions = len(model.template.functions)
        if functions and self.specs:
            # graph_io carries local functions over unchanged; say so instead of staying silent.
            ctx.notes.append(f"{functions} local function(s) left unchanged: passes rewrite the graph "
                             "and its If/Loop/Scan bodies, not function bodies")
        bar = tqdm(self.specs, desc="passes", unit="pass", disable=not self.progress, leave=False)
        for index, spec in enumerate(bar):
            bar.set_postfix_str(spec.name)
            if ctx.calibration is not None:  # one streamed run for consecutive calibrating passes
                from onnxopt.data.calibration import gather_requests

                gather_requests(self.specs, index, model, ctx, self.progress)
            self.records.append(self._run_one(spec, model, ctx))
        bar.close()
        return self.records

    # -- one pass --------------------------------------------------------------------------
    def _run_one(self, spec: PassSpec, model: Model, ctx: PassContext) -> PassRecord:
        cls = get_pass(spec.name)
        pass_ = cls(**spec.options)
        record = PassRecord(spec.name, dict(spec.options))
        if self._counts is None or self._counts[0] is not model.graph:
            self._counts = (model.graph, count_nodes(model.graph), count_params(model.graph))
        record.nodes_before, record.params_before = self._counts[1:]
        # A snapshot stays valid while passes report no change: copy only after a change.
        if self._snapshot is None or self._snapshot_of is not model.graph:
            self._snapshot, self._snapshot_of = model.graph.copy(), model.graph
        snapshot = self._snapshot
        was_modified = model.modified
        digest_before = graph_digest(model) if self.verify else None
        if self.verify and cls.lossless and self._reference is None:
            self._reference = self._outputs(model)

        start = time.perf_counter()
        try:
            result = pass_.run(model, ctx)
        except OnnxoptError:
            self._restore(model, snapshot, was_modified, ctx)
            raise  # bad input found by the pass: the user's problem, not the pass's
        except Exception as exc:
            record.seconds = time.perf_counter() - start
            self._restore(model, snapshot, was_modified, ctx)
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.warning("pass %s raised and was rolled back: %s", spec.name, record.error)
            logger.debug("%s", traceback.format_exc())
            if self.strict:
                raise PassFailedError(f"pass '{spec.name}' raised {type(exc).__name__}: {exc}") from exc
            record.nodes_after, record.params_after = record.nodes_before, record.params_before
            return record
        record.seconds = time.perf_counter() - start
        record.stats = dict(result.stats)
        changed = bool(result.changed)

        if self.verify:
            digest_after = graph_digest(model)
            if digest_after != digest_before and not changed:
                record.stats["dishonest_changed"] = "reported no change but changed the graph"
                logger.warning("pass %s reported no change but changed the graph", spec.name)
                changed = True

        problem = structural_problem(model.graph) if changed else None
        if changed and problem is None and self.verify:
            problem = self._verify_change(model, cls.lossless, record)
        if problem is not None:
            self._restore(model, snapshot, was_modified, ctx)
            record.status, record.error = "rolled-back", problem
            logger.warning("pass %s broke the model and was rolled back: %s", spec.name, problem)
            if self.strict:
                raise VerificationError(f"pass '{spec.name}' broke the model: {problem}")
        elif changed:
            model.modified = True
            self._snapshot = None
            record.status = "changed"
            ctx.invalidate(cls.preserves)
        else:
            record.status = "unchanged"
        if record.status == "changed":  # counting walks every node: only after a change
            self._counts = (model.graph, count_nodes(model.graph), count_params(model.graph))
        record.nodes_after, record.params_after = self._counts[1:]
        return record

    def _restore(self, model: Model, snapshot: gs.Graph, was_modified: bool, ctx: PassContext) -> None:
        model.graph = snapshot
        self._snapshot = None  # the snapshot is the live graph now
        model.modified = was_modified
        ctx.invalidate()

    def _outputs(self, model: Model):
        try:
            return verify.run(model.to_proto() if not model.modified else _export(model),
                              self.verify_inputs)
        except verify.CannotRun as exc:
            return ("skipped", str(exc))

    def _verify_change(self, model: Model, lossless: bool, record: PassRecord) -> str | None:
        """Check the changed model: valid ONNX, and equal outputs for a lossless pass."""
        proto = _export(model)
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            return f"onnx checker: {str(exc).splitlines()[0]}"
        if not lossless:
            record.verified = "skipped: lossy pass (fidelity is measured on the whole run)"
            self._reference = None
            return None
        ref = self._reference
        if ref is None or ref[0] == "skipped":
            record.verified = f"skipped: {ref[1] if ref else 'no reference'}"
            return None
        feeds, expected = ref
        try:
            _, got = verify.run(proto, feeds)
        except verify.CannotRun as exc:
            return f"onnxruntime can no longer run the model: {exc}"
        mismatches = verify.compare_outputs(expected, got)
        if mismatches:
            return "; ".join(map(str, mismatches[:3]))
        record.verified = "equal"
        return None


def _export(model: Model) -> onnx.ModelProto:
    from onnxopt.ir.graph_io import export_model

    return export_model(model.graph, model.template)
