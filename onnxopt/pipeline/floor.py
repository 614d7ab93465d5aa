"""The fidelity floor: no lossy pass leaves the model worse than the run's floor.

After a lossy pass changed the model, the pass manager asks ``FloorKeeper.enforce``. The
model is measured on the probe's batches (``onnxopt.measure.fidelity``); when it is below the
floor and the pass can leave layers alone (its ``keep_option``), the layers that cost most
go back to what they were, fewest first, until the floor holds:

1. ranking (one capture run of the model after the pass, and each layer alone): a layer's
   cost is the error it adds by itself, its output there against the original layer run in
   float on the very inputs it saw there; then the first ``measured`` layers of that
   ranking are measured as the issue of interest is: the whole model with that one layer
   kept (a log after a MatMul amplifies an error a local estimate cannot see);
2. search: the pass runs again from the model before it with the top 1, 2, 4, … layers
   kept, each result measured, then a bisection between the last two counts finds the
   fewest that hold the floor.

On a target that computes in integer only (``capabilities.integer_only``) no layer can go
back to float and a timing here says nothing of the hardware: the fidelity is measured and
reported, nothing more.

When keeping up to ``max_kept_fraction`` (three quarters) of its layers does not hold, or
the pass has no such option, the pass is rolled back and the reason is reported: a pass
that must leave most of the model as it was is not worth its overhead, and a later pass
(dynamic int8 after static) may do better on what it leaves.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from onnxopt import runtime
from onnxopt.data.capture import Capture, capturable
from onnxopt.errors import OnnxoptError
from onnxopt.ir.graphs import node_key
from onnxopt.ir.model import ModelState
from onnxopt.measure.fidelity import FidelityProbe, Floor
from onnxopt.pipeline.sensitivity import LayerTrials, Trial, describe, fewest, rank_by_own_error

logger = logging.getLogger(__name__)


class FloorKeeper:
    """Holds lossy passes to ``floor`` on ``probe``'s batches (see the module docstring)."""

    def __init__(self, floor: Floor, probe_factory, max_trials: int = 14, measured: int = 24,
                 max_kept_fraction: float = 0.75):
        self.floor = floor
        # Past this share of its layers kept as they were, a pass is not worth its Q/DQ
        # overhead (and a later pass may do better on what it leaves): it is rolled back.
        self.max_kept_fraction = max_kept_fraction
        self._probe_factory = probe_factory  # () -> FidelityProbe, built on first use
        self._probe: FidelityProbe | None = None
        self.max_trials = max_trials  # runs of the search for the fewest layers to keep
        self.measured = measured  # layers whose sensitivity is measured, not estimated

    @property
    def probed(self) -> bool:
        """Whether a pass was judged (the probe exists)."""
        return self._probe is not None

    @property
    def probe(self) -> FidelityProbe:
        if self._probe is None:
            self._probe = self._probe_factory()
        return self._probe

    def enforce(self, cls: type, options: dict, model, ctx, before: ModelState, record) -> str | None:
        """Hold the model a lossy pass left to the floor: fidelity first (giving layers back),
        then speed for a pass that promises it. Returns None (the model meets the floor,
        possibly after layers were given back) or the reason to roll the pass back."""
        start = time.perf_counter()
        report: dict[str, Any] = {"floor": self.floor.describe(), "data": self.probe.source}
        record.fidelity = report
        trials = LayerTrials(cls, options, model, ctx, before, self.probe.measure)
        kept: list[str] = []
        problem = None
        if ctx.target.capabilities.get("integer_only"):
            # the hardware computes in integer only: no layer can go back to float, and this
            # machine's timing says nothing of it; the fidelity is measured and said
            if self.floor.fidelity_bound:
                measured = trials.fidelity()
                report["after_pass"] = measured.to_json()
                if not self.floor.holds(measured):
                    ctx.notes.append(f"{cls.name}: {describe(measured)} is below the fidelity floor "
                                     f"({self.floor.describe()}); target '{ctx.target.name}' computes in "
                                     "integer only, so no layer went back to float")
            report["seconds"] = round(time.perf_counter() - start, 2)
            return None
        if self.floor.fidelity_bound:
            problem, kept = self._hold_fidelity(trials, record, report)
        if problem is None and cls.promises_speed and self.floor.max_latency_ratio is not None:
            problem = self._hold_speed(trials, record, report, kept)
        report["seconds"] = round(time.perf_counter() - start, 2)
        return problem

    # -- fidelity ----------------------------------------------------------------------------
    def _hold_fidelity(self, trials: LayerTrials, record, report) -> tuple[str | None, list]:
        cls, options, model, ctx, before = trials.cls, trials.options, trials.model, trials.ctx, trials.before
        first = trials.fidelity()
        report["after_pass"] = first.to_json()
        if self.floor.holds(first):
            return None, []
        below = f"{describe(first)} is below the fidelity floor ({self.floor.describe()})"
        if cls.keep_option is None:
            return below, []
        after = model.snapshot()
        model.restore(before.copy())
        candidates = [k for k in cls(**options).layers(model, ctx) if k]
        if not candidates:
            model.restore(after)
            return below, []
        ranked = rank_by_own_error(candidates, model, after, self.probe)
        # the first layers of the ranking, measured: the fidelity with each one alone kept
        measured = {}
        for key in ranked[:self.measured]:
            alone = trials.run([key])
            measured[key] = alone.fidelity.snr_db if alone is not None else -math.inf
        ranked = sorted(measured, key=lambda k: -measured[k]) + ranked[self.measured:]
        report["sensitivity_trials"] = len(measured)
        tried: dict[int, Trial | None] = {}

        def holds(k: int) -> bool:
            if k not in tried:
                tried[k] = trials.run(ranked[:k])
            return tried[k] is not None and self.floor.holds(tried[k].fidelity)

        most = max(1, int(self.max_kept_fraction * len(ranked)))
        good = fewest(holds, most, self.max_trials)
        report["trials"] = len(tried)
        if good is None:
            model.restore(after)
            best = max((r.fidelity for r in tried.values() if r is not None), key=lambda f: f.snr_db,
                       default=first)
            return (f"{below}, and keeping {max(tried)} of {len(ranked)} layers as they were (at most "
                    f"{self.max_kept_fraction:.0%}) still gives {describe(best)}"), []
        chosen = tried[good]
        trials.accept(chosen, record)
        report["kept"] = ranked[:good]
        report["final"] = chosen.fidelity.to_json()
        ctx.notes.append(f"{cls.name}: {good} of {len(ranked)} layer(s) kept as they were to hold the "
                         f"fidelity floor ({self.floor.describe()}): {describe(chosen.fidelity)}")
        ctx.metadata[f"floor.{cls.name}"] = f"{good} layer(s) kept for fidelity (measured on {self.probe.source})"
        return None, ranked[:good]

    # -- speed -------------------------------------------------------------------------------
    def _hold_speed(self, trials: LayerTrials, record, report, kept) -> str | None:
        """The model must not be slower than before the pass (``max_latency_ratio``): regions
        of layers that cost more in Q/DQ transitions than they save go back, worst first."""
        cls, options, model, ctx, before = trials.cls, trials.options, trials.model, trials.ctx, trials.before
        before_proto = model.copy(before).export()
        speed = self._speed(before_proto, model)
        report["speed"] = speed.to_json() if speed else None
        if speed is None or self.floor.fast_enough(speed.ratio):
            return None
        limit = self.floor.max_latency_ratio
        after = model.snapshot()
        model.restore(before.copy())
        base = dict(options)
        base[cls.keep_option] = list(base.get(cls.keep_option, [])) + kept if cls.keep_option else []
        regions = self._regions(cls(**base).layers(model, ctx), model, ctx) if cls.keep_option else []
        report["regions"] = len(regions)
        tried: dict[int, tuple[Trial, Any] | None] = {}

        def fast(j: int) -> bool:
            if j not in tried:
                keep = kept + [k for region in regions[:j] for k in region]
                result = trials.run(keep)
                tried[j] = None if result is None else (result, self._speed(before_proto, model))
            got = tried[j]
            return got is not None and got[1] is not None and self.floor.fast_enough(got[1].ratio) \
                and (not self.floor.fidelity_bound or self.floor.holds(got[0].fidelity))

        good = fewest(fast, len(regions), max(4, self.max_trials // 2)) if regions else None
        report["speed_trials"] = len(tried)
        total = sum(len(r) for r in regions) + len(kept)
        given = len(kept) + sum(len(r) for r in regions[:good]) if good is not None else total
        if good is None or good == len(regions) or given > self.max_kept_fraction * total:
            model.restore(after)  # (nearly) every region float: the pass does not pay here
            return (f"the model runs {speed.ratio:.2f}x the time it took before the pass, above the speed "
                    f"floor ({limit:g}x), and no large enough part of the pass pays for itself on this target")
        chosen, chosen_speed = tried[good]
        trials.accept(chosen, record)
        given_back = [k for region in regions[:good] for k in region]
        report["kept_for_speed"] = given_back
        report["speed_final"] = chosen_speed.to_json()
        report["final"] = chosen.fidelity.to_json()
        ctx.notes.append(f"{cls.name}: {len(given_back)} layer(s) in {good} region(s) kept as they were: "
                         f"quantized they ran slower ({speed.ratio:.2f}x → {chosen_speed.ratio:.2f}x)")
        # a measured choice: this machine's timing decided it, so the model says so
        ctx.metadata[f"floor.{cls.name}"] = (f"{len(kept) + len(given_back)} layer(s) kept: {len(given_back)} "
                                             f"for speed, measured here at {speed.ratio:.2f}x quantized")
        return None

    def _speed(self, before_proto, model):
        from onnxopt.measure.speed import compare_speed

        try:
            return compare_speed(before_proto, model.export(), self.probe.batches[0], self.probe.providers)
        except runtime.CannotRun as exc:
            logger.debug("cannot time the model: %s", exc)
            return None

    def _regions(self, layers: list[str], model, ctx) -> list[list[str]]:
        """The layers that run quantized, grouped into regions (layers joined directly or
        through ops Q/DQ moves through), ordered by compute per element crossing their
        border, least first: a region that does little work between its Q and DQ nodes is
        the first to cost more than it saves."""
        from onnxopt.analysis.cost import model_cost

        q = ctx.target.quantization
        transparent = set(q.get("passthrough_ops", [])) | set(q.get("unified_scale_ops", []))
        nodes = {node_key(n): n for n in model.graph.nodes}
        members = {k: nodes[k] for k in layers if k in nodes}
        key_of = {id(n): k for k, n in members.items()}
        parent = {k: k for k in members}

        def find(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        for key, node in members.items():  # join each layer to the layers it feeds
            stack = [t for t in node.outputs]
            seen = set()
            while stack:
                t = stack.pop()
                for user in t.outputs:
                    if id(user) in seen:
                        continue
                    seen.add(id(user))
                    if id(user) in key_of:
                        parent[find(key_of[id(user)])] = find(key)
                    elif user.op in transparent:
                        stack.extend(user.outputs)
        groups: dict[str, list[str]] = {}
        for key in members:
            groups.setdefault(find(key), []).append(key)
        proto = model.export()
        try:
            cost = {c.name: c for c in model_cost(proto, feeds=self.probe.batches[0], memory=False).nodes}
        except Exception as exc:  # noqa: BLE001  (no costs: regions in graph order)
            logger.debug("no cost model for the regions: %s", exc)
            cost = {}
        sizes = _tensor_sizes(proto, self.probe.batches[0], {t.name for n in members.values()
                                                            for t in list(n.inputs) + list(n.outputs)})

        def score(keys: list[str]) -> float:
            inside = {id(members[k]) for k in keys}
            work = sum(_count(cost.get(members[k].name)) for k in keys)
            border = 0
            for k in keys:
                node = members[k]
                for t in node.inputs:
                    if t.name in sizes and not (t.inputs and id(t.inputs[0]) in inside):
                        border += sizes[t.name]
                for t in node.outputs:
                    if t.name in sizes and any(id(u) not in inside for u in t.outputs):
                        border += sizes[t.name]
            return work / (border + 1)

        return sorted(groups.values(), key=score)


def _count(cost) -> float:
    """MACs plus FLOPs of a node's cost (0 when unknown or symbolic)."""
    if cost is None:
        return 0.0
    from onnxopt.analysis.cost import to_json

    total = 0.0
    for value in (cost.macs, cost.flops):
        v = to_json(value) if value is not None else None
        total += float(v) if isinstance(v, (int, float)) else 0.0
    return total


def _tensor_sizes(proto, feeds: dict, names: set[str]) -> dict[str, int]:
    """Elements of each named tensor of ``proto`` on one batch (what crosses a region's border)."""
    wanted = sorted(names & capturable(proto))
    try:
        values = Capture(proto, wanted).run(feeds)
    except OnnxoptError:
        return {}
    return {n: int(np.size(v)) for n, v in values.items() if isinstance(v, np.ndarray)}
