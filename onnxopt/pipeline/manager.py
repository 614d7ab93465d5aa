"""Run a resolved pipeline over a model: time, count, verify, roll back, invalidate.

For each pass: snapshot the model (graph and opset imports), run, compare a digest of the
model before and after (a pass that changed the model while reporting no change is caught
in every run, reported and treated as changed), then after a change check the graph is
still well formed, emits only ops the target allows (``capabilities.allowed_ops``) and,
under verify, that a lossless pass kept the outputs of its input in onnxruntime. A pass
that raises or breaks the model is rolled back to the snapshot, with what it put into the
context, and reported; ``strict`` makes that fatal (PassFailedError, exit 1, for a pass
that raised or lied; VerificationError, exit 3, for a pass that broke the model). Under a
fidelity floor (onnxopt.pipeline.floor), a lossy pass that leaves the model below it gives
its costliest layers back, or is rolled back. After a change, cached analyses and
activation statistics the pass does not preserve are dropped.

A ``fixed-point`` group (``onnxopt.pipeline.text``) runs its passes round after round until
a round changes nothing, at most ``max_rounds`` rounds. A pass that found nothing to do is
not run again until the model changes (the digest the manager takes anyway says so): the
last round costs a digest comparison per pass. Each run is a record, with its round number.
"""

from __future__ import annotations

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
from onnxopt.ir.digest import model_digest
from onnxopt.ir.graphs import count_nodes, count_params, op_types
from onnxopt.ir.model import Model, ModelState
from onnxopt.ir.validate import structural_problem
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
    fidelity: dict | None = None  # a lossy pass under a fidelity floor: what it was measured at
    round: int | None = None  # the round of its fixed-point group (None outside groups)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class PassManager:
    """Runs resolved PassSpecs in order on one model."""

    def __init__(self, specs: list[PassSpec], verify: bool = False, strict: bool = False,
                 verify_inputs: dict | None = None, progress: bool = False, floor_keeper=None):
        self.specs = specs
        self.floor_keeper = floor_keeper  # onnxopt.pipeline.floor.FloorKeeper, or None
        self.verify = verify
        self.strict = strict
        self.verify_inputs = verify_inputs
        self.progress = progress
        self.records: list[PassRecord] = []
        self._reference: tuple[dict, dict] | None = None  # (feeds, outputs) of the last good state
        self._snapshot: ModelState | None = None  # the model as it was before the pass
        self._snapshot_of: gs.Graph | None = None  # the live graph that snapshot was taken of
        self._digest: tuple[gs.Graph, str] | None = None  # (graph, its digest) as last taken
        self._counts: tuple | None = None  # (graph, nodes, params) as last counted
        self._ops: tuple | None = None  # (digest, op types) as last seen
        self._journal: list[PassSpec] | None = None  # passes run since the snapshot (in groups)
        self._in_group = 0

    def run(self, model: Model, ctx: PassContext) -> list[PassRecord]:
        from tqdm import tqdm

        functions = len(model.template.functions)
        if functions and self.specs:
            # graph_io carries local functions over unchanged; say so instead of staying silent.
            ctx.notes.append(f"{functions} local function(s) left unchanged: passes rewrite the graph "
                             "and its If/Loop/Scan bodies, not function bodies")
        if ctx.calibration is not None:
            ctx.calibration.providers = ctx.providers
        bar = tqdm(self.specs, desc="passes", unit="pass", disable=not self.progress, leave=False)
        for index, spec in enumerate(bar):
            bar.set_postfix_str(spec.name)
            if spec.is_group:
                self._run_group(spec, model, ctx)
                continue
            if ctx.calibration is not None:  # one streamed run for a block of calibrating passes
                from onnxopt.data.statistics import gather_requests

                gather_requests(self.specs, index, model, ctx, self.progress)
            self.records.append(self._run_one(spec, model, ctx))
        bar.close()
        return self.records

    # -- fixed-point groups ----------------------------------------------------------------
    def _run_group(self, group: PassSpec, model: Model, ctx: PassContext) -> bool:
        """Run ``group``'s passes round after round until none changes the model; returns
        whether any did."""
        from onnxopt.pipeline.text import GROUPS

        max_rounds = int(group.options.get("max_rounds", GROUPS[group.name]["max_rounds"][1]))
        self._in_group += 1
        try:
            return self._rounds(group, max_rounds, model, ctx)
        finally:
            self._in_group -= 1
            if not self._in_group and self._journal is not None:
                # outside groups a snapshot is valid only if nothing changed since it
                if self._journal:
                    self._snapshot = None
                self._journal = None

    def _rounds(self, group: PassSpec, max_rounds: int, model: Model, ctx: PassContext) -> bool:
        # index in the body -> digest of the model a run of it left unchanged (a pass that
        # changed the model may change more when run again: it always runs in the next round)
        idle: dict[int, object] = {}
        changed_any = False
        for round_ in range(1, max_rounds + 1):
            changed = False
            for i, spec in enumerate(group.body):
                if idle.get(i) == self._current_digest(model):
                    continue  # it found nothing to do in this very model already
                if spec.is_group:
                    did = self._run_group(spec, model, ctx)
                else:
                    record = self._run_one(spec, model, ctx)
                    record.round = round_
                    if record.status != "skipped" or round_ == 1:
                        self.records.append(record)
                    did = record.status == "changed"
                changed |= did
                if did:
                    idle.pop(i, None)
                else:
                    idle[i] = self._current_digest(model)
            changed_any |= changed
            if not changed:
                return changed_any
        if any(idle.get(i) != self._current_digest(model) for i in range(len(group.body))):
            note = f"{group.name}: stopped after max_rounds={max_rounds} with passes still changing the model"
            ctx.notes.append(note)
            logger.info(note)
        return changed_any

    def _op_types(self, model: Model) -> set[str]:
        """Op types of every graph of the model (default domain and others), as last seen."""
        digest = self._current_digest(model)
        if self._ops is None or self._ops[0] != digest:
            self._ops = (digest, {op for _, op in op_types(model.graph)})
        return self._ops[1]

    def _current_digest(self, model: Model):
        if self._digest is None or self._digest[0] is not model.graph:
            self._digest = (model.graph, model_digest(model))
        return self._digest[1]

    # -- one pass --------------------------------------------------------------------------
    def _run_one(self, spec: PassSpec, model: Model, ctx: PassContext) -> PassRecord:
        cls = get_pass(spec.name)
        pass_ = cls(**spec.options)
        record = PassRecord(spec.name, dict(spec.options))
        if cls.requires_ops and not (cls.requires_ops & self._op_types(model)):
            # nothing it could change: not run (no snapshot, no digest)
            record.status = "skipped"
            record.stats = {"reason": "none of " + ", ".join(sorted(cls.requires_ops)) + " in the model"}
            if self._counts is None or self._counts[0] is not model.graph:
                self._counts = (model.graph, count_nodes(model.graph), count_params(model.graph))
            record.nodes_before = record.nodes_after = self._counts[1]
            record.params_before = record.params_after = self._counts[2]
            return record
        if self._counts is None or self._counts[0] is not model.graph:
            self._counts = (model.graph, count_nodes(model.graph), count_params(model.graph))
        record.nodes_before, record.params_before = self._counts[1:]
        # A snapshot stays valid while passes leave the model as it was (the digest proves
        # it): copy only after a change. Inside a fixed-point group it stays valid across
        # changes too, with the passes that changed the model since in a journal: a rollback
        # restores it and replays them (passes are deterministic), so a group of lossless
        # passes costs one graph copy, not one per change.
        if self._snapshot is None or (self._journal is None and self._snapshot_of is not model.graph):
            self._snapshot, self._snapshot_of = model.snapshot(), model.graph
            self._journal = [] if self._in_group else None
        snapshot = self._snapshot
        if self._digest is None or self._digest[0] is not model.graph:
            self._digest = (model.graph, model_digest(model))
        digest_before = self._digest[1]
        allowed = set(ctx.target.capabilities.allowed_ops)
        ops_before = op_types(model.graph) if allowed else set()
        ctx_state = ctx.checkpoint()
        if self.verify and cls.lossless and self._reference is None:
            self._reference = self._outputs(model, ctx)

        start = time.perf_counter()
        try:
            result = pass_.run(model, ctx)
        except OnnxoptError:
            self._restore(model, snapshot, digest_before, ctx, ctx_state)
            raise  # bad input found by the pass: the user's problem, not the pass's
        except Exception as exc:
            record.seconds = time.perf_counter() - start
            self._restore(model, snapshot, digest_before, ctx, ctx_state)
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

        digest_after = model_digest(model)
        if digest_after != digest_before and not changed:
            # A pass that changes the model and says it did not would let stale analyses and
            # statistics through: treat it as changed, and say so.
            record.stats["dishonest_changed"] = "reported no change but changed the model"
            logger.warning("pass %s reported no change but changed the model", spec.name)
            if self.strict:
                self._restore(model, snapshot, digest_before, ctx, ctx_state)
                raise PassFailedError(f"pass '{spec.name}' reported no change but changed the model")
            changed = True

        problem = structural_problem(model.graph) if changed else None
        if changed and problem is None and allowed:
            problem = _disallowed_ops(op_types(model.graph) - ops_before, allowed, ctx.target.name)
        if changed and problem is None and self.verify:
            problem = self._verify_change(model, cls.lossless, record, ctx)
        if changed and problem is None and not cls.lossless and self.floor_keeper is not None:
            problem = self.floor_keeper.enforce(cls, dict(spec.options), model, ctx, snapshot, record)
            digest_after = model_digest(model)  # the floor may have rerun the pass
        if problem is not None:
            self._restore(model, snapshot, digest_before, ctx, ctx_state)
            record.status, record.error = "rolled-back", problem
            logger.warning("pass %s was rolled back: %s", spec.name, problem)
            if self.strict:
                raise VerificationError(f"pass '{spec.name}' broke the model: {problem}")
        elif changed:
            model.modified = True
            if self._journal is not None:
                self._journal.append(spec)
            else:
                self._snapshot = None
            self._digest = (model.graph, digest_after)
            record.status = "changed"
            ctx.invalidate(cls.preserves)
        else:
            record.status = "unchanged"
        if record.status == "changed":  # counting walks every node: only after a change
            self._counts = (model.graph, count_nodes(model.graph), count_params(model.graph))
        record.nodes_after, record.params_after = self._counts[1:]
        return record

    def _restore(self, model: Model, snapshot: ModelState, digest: str, ctx: PassContext, ctx_state) -> None:
        model.restore(snapshot)
        journal = self._journal or []
        self._snapshot = self._journal = None  # the snapshot is the live model now
        if journal:  # bring the snapshot to the state before the failed pass
            notes = list(ctx.notes)
            for spec in journal:
                ctx.invalidate()
                get_pass(spec.name)(**spec.options).run(model, ctx)
            ctx.notes[:] = notes
            replayed = model_digest(model)
            if replayed != digest:
                logger.warning("replaying %d pass(es) after a rollback did not give the same model", len(journal))
            digest = replayed
        self._digest = (model.graph, digest)
        ctx.rollback(ctx_state)

    def _outputs(self, model: Model, ctx: PassContext):
        try:
            return verify.run(model.to_proto(), self.verify_inputs, providers=ctx.providers, threads=ctx.threads)
        except verify.CannotRun as exc:
            return ("skipped", str(exc))

    def _verify_change(self, model: Model, lossless: bool, record: PassRecord, ctx: PassContext) -> str | None:
        """Check the changed model: valid ONNX, and equal outputs for a lossless pass."""
        proto = model.export()
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
            _, got = verify.run(proto, feeds, providers=ctx.providers, threads=ctx.threads)
        except verify.CannotRun as exc:
            return f"onnxruntime can no longer run the model: {exc}"
        mismatches = verify.compare_outputs(expected, got)
        if mismatches:
            return "; ".join(map(str, mismatches[:3]))
        record.verified = "equal"
        return None


def _disallowed_ops(new_ops: set[tuple[str, str]], allowed: set[str], target: str) -> str | None:
    """The reason to refuse a pass that emitted ops outside the target's allowed_ops."""
    bad = sorted(op if not domain else f"{domain}:{op}" for domain, op in new_ops
                 if op not in allowed and f"{domain}:{op}" not in allowed)
    if not bad:
        return None
    return (f"emits {', '.join(bad)}, which target '{target}' does not run "
            "(capabilities.allowed_ops)")
