"""lowrank-matmul, lowrank-conv, separable-conv: split layers into thinner ones by truncated SVD.

A MatMul/Gemm with a constant weight W[K, N] becomes x·A[K, r]·B[r, N]; a Conv becomes a
chain of smaller Convs (channel SVD, spatial SVD, Tucker-2) or a depthwise plus a pointwise
Conv (``separable-conv``). The factors come from ``onnxopt.factorization`` and the layer
views from ``onnxopt.factorization.layers``; this module decides where and at which rank:

1. Candidates: constant float32 weights of at least ``min_params`` values, not shared with
   another node (the main graph only). Anything else is listed with the reason.
2. With calibration data (``data_aware``) each weight is whitened by its input's second
   moments (``Gram`` of the input, im2col patches for a Conv), centered on the input mean
   when the layer has a bias to absorb the mean's share; the truncation then minimizes the
   layer's output error. Without data: plain SVD.
3. Ranks: ``rank`` or ``rank_ratio`` for every layer, ``energy`` per layer, or ``budget``:
   keep that fraction of the parameters (or MACs) of the layers that can be split by a
   greedy allocation across them (``onnxopt.factorization.ranks.allocate``), the error of
   each option measured at the model's outputs on sample data for a few ranks per layer
   and scaled from the spectrum in between (``select=sensitivity``), or read from the
   spectrum alone (``select=spectrum``). Ranks are multiples of the target's
   ``channel_multiple``; a split must save at least ``min_saving`` of the layer's
   parameters and MACs. Under ``energy`` and ``budget`` a layer whose spectrum needs more
   than ``full_rank_fraction`` of its rank for ``full_rank_energy`` of its energy is full
   rank in practice and left alone (and out of the budget's base).
4. Speed (``speed_check``): every split the choice keeps is timed against the original
   layer in onnxruntime on the target's providers, one thread, at its real input shape
   (``onnxopt.measure.microbench``, cached per shape and rank); a split that is not
   ``min_gain`` faster is left alone (and the budget re-allocated without it). Then
   (``check_model``) the whole model is timed against the model before the pass and every
   split is undone when it is not faster.
5. Refit (``refit``, with calibration data): layer by layer, in the order of the graph, the
   last factor and the bias are solved by least squares from the current model's input to
   that factor to the original model's output of the layer (``Gram.solve``), so each refit
   also absorbs the error of the splits before it.

The stats list every layer: split at which rank, parameters and MACs before and after, the
estimated error, the measured speed ratio, or why it was left alone.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PipelineError
from onnxopt.factorization.layers import METHODS, Split, conv_split, dense_split
from onnxopt.factorization.ranks import Option, allocate, ranks_below, round_rank
from onnxopt.ir.constants import is_constant
from onnxopt.ir.names import NameTable
from onnxopt.ir.surgery import dependency_levels
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


@dataclass
class _Options:
    budget: float = option(0.0, "keep this fraction (0-1) of the parameters (or MACs, budget_on) of the layers "
                                "that can be split (not full rank, not too small, not slower split) by "
                                "choosing their ranks all at once; 0 = per layer")
    budget_on: str = option("params", "what budget counts", choices=["params", "macs"])
    energy: float = option(0.99, "per layer: the smallest rank keeping this share of the (whitened) "
                                 "spectrum's energy (used when budget, rank_ratio and rank are 0)")
    rank_ratio: float = option(0.0, "every layer at this fraction of its full rank")
    rank: int = option(0, "every layer at this rank")
    min_saving: float = option(0.1, "split only where the split form has at most (1 - this) of the "
                                    "layer's parameters and MACs")
    full_rank_energy: float = option(0.9, "with energy or budget: a layer whose spectrum needs more than "
                                          "full_rank_fraction of its rank for this share of the energy is "
                                          "full rank in practice and left alone (0 = never)")
    full_rank_fraction: float = option(0.5, "see full_rank_energy")
    min_params: int = option(4096, "leave layers with fewer weights alone")
    data_aware: bool = option(True, "with calibration data, whiten each weight by its input statistics")
    center: bool = option(True, "whiten by the input covariance around its mean and move the mean's "
                                "share of the error into the bias (where the layer has or can take one)")
    damp: float = option(0.01, "whitening: add this times the mean diagonal to the input's second moments")
    refit: bool = option(True, "with calibration data, refit the last factor and the bias to the original "
                               "model's outputs, layer by layer")
    refit_ridge: float = option(0.01, "ridge of the refit, relative to the mean diagonal of its Gram")
    select: str = option("sensitivity", "budget: each rank's error measured at the model's outputs on sample "
                                        "data (a few ranks per layer, the spectrum in between), or read from "
                                        "the spectrum alone (fast, blind to how the model amplifies each error)",
                         choices=["sensitivity", "spectrum"])
    sensitivity_batches: int = option(4, "select=sensitivity: sample batches per measurement")
    sensitivity_ranks: int = option(4, "select=sensitivity: ranks measured per layer (the others interpolated)")
    speed_check: bool = option(True, "time each split against the original layer (onnxruntime, target "
                                     "providers, 1 thread) and keep only the faster ones")
    min_gain: float = option(0.03, "a split must run at most (1 - this) of the original layer's time")
    check_model: bool = option(True, "time the whole model against the model before the pass and undo "
                                     "every split when it is not faster")
    benchmark_cache: bool = option(True, "keep micro-benchmark timings in the user's cache folder "
                                         "($ONNXOPT_CACHE_DIR or ~/.cache/onnxopt)")
    max_gram: int = option(4608, "largest input width (C·kh·kw for a Conv) to whiten; wider ones use plain SVD")
    whiten_min_rows: float = option(2.0, "whiten a layer only when the calibration data gives at least this "
                                         "many rows (samples, tokens, positions) per input dimension")


@dataclass
class _Layer:
    """A candidate and what became of it."""

    split: Split
    max_rank: int = 0  # the highest rank that still saves min_saving
    ranks: tuple = ()
    rank: int | None = None  # chosen
    reason: str | None = None  # why it is left alone
    error: float | None = None
    measured: dict | None = None  # rank -> measured output error (select=sensitivity)
    speed: float | None = None  # micro-benchmark ratio split/original at ``speed_rank``
    speed_rank: int | None = None
    speed_cached: bool = False
    refit: str | None = None
    note: str | None = None  # why the weight was not whitened


class _LowRankPass(Pass):
    """Shared flow of the low-rank passes (module docstring); subclasses find the layers."""

    lossless = False
    Options = _Options

    def _split(self, node: gs.Node, graph: gs.Graph) -> Split | str | None:
        """The layer view of ``node``, why it cannot be split, or None (not this pass's op)."""
        raise NotImplementedError

    def _rank_limit(self, split: Split) -> int:
        return split.decomposition.max_rank

    def _multiple(self, ctx) -> int:
        return max(1, int(ctx.target.capabilities.get("channel_multiple", 1)))

    def _mode(self) -> str:
        o = self.options
        chosen = [m for m, v in (("rank", o.rank), ("rank_ratio", o.rank_ratio), ("budget", o.budget)) if v]
        if len(chosen) > 1:
            raise PipelineError(f"{self.name}: give one of rank, rank_ratio and budget, not {' and '.join(chosen)}")
        if o.budget and not 0 < o.budget <= 1:
            raise PipelineError(f"{self.name}: budget is a fraction in (0, 1], not {o.budget}")
        if o.rank_ratio and not 0 < o.rank_ratio <= 1:
            raise PipelineError(f"{self.name}: rank_ratio is a fraction in (0, 1], not {o.rank_ratio}")
        if o.rank < 0:
            raise PipelineError(f"{self.name}: rank must be positive, not {o.rank}")
        mode = chosen[0] if chosen else "energy"
        if mode == "energy" and not 0 < o.energy <= 1:
            raise PipelineError(f"{self.name}: energy is a fraction in (0, 1], not {o.energy}")
        return mode

    # -- the flow ---------------------------------------------------------------------------------
    def run(self, model, ctx) -> PassResult:
        o = self.options
        mode = self._mode()
        graph = model.graph
        layers: list[_Layer] = []
        rows: list[dict] = []
        for node in list(graph.nodes):
            found = self._split(node, graph)
            if found is None:
                continue
            if isinstance(found, str):
                rows.append({"node": node.name, "op": node.op, "action": "kept", "reason": found})
                continue
            if found.full_params < o.min_params:
                rows.append(_row(found, reason=f"too small: {found.full_params} weights < min_params {o.min_params}"))
                continue
            layers.append(_Layer(found))
        stats: dict = {"mode": mode, "layers": rows}
        self._opset = model.opset
        if not layers:
            return PassResult(False, self._summary(stats, [], None))

        batches, source = _sample_batches(model, ctx, max(4, o.sensitivity_batches))
        stats["sample_data"] = source
        feeds = max(batches, key=lambda b: sum(np.size(v) for v in b.values())) if batches else None
        if feeds is not None:
            names = [t for lay in layers for t in (lay.split.x.name, lay.split.node.outputs[0].name)]
            shapes = _concrete_shapes(model, feeds, names)
            for lay in layers:
                lay.split.set_shapes(shapes.get(lay.split.x.name), shapes.get(lay.split.node.outputs[0].name))

        grams = self._statistics(model, ctx, layers, stats)
        for lay, gram in zip(layers, grams):
            lay.split.decompose(gram, o.damp, o.center)
        self._limits(layers, ctx)
        proto_before = model.export()
        if mode == "budget":
            self._choose_budget(layers, ctx, proto_before, batches, stats)
        else:
            self._choose_each(layers, mode, ctx)
            if o.speed_check:
                self._check_speed(layers, ctx, stats)

        chosen = [lay for lay in layers if lay.rank is not None]
        if not chosen:
            return PassResult(False, self._summary(stats, layers, None))
        state = model.snapshot() if o.check_model and feeds is not None else None
        names = NameTable.of(graph)
        for lay in chosen:
            lay.split.rewrite(graph, names, lay.rank)
        if state is not None:
            verdict = self._check_model(proto_before, model.export(), feeds, ctx, stats)
            if verdict is not None:
                model.restore(state)
                for lay in chosen:
                    lay.rank, lay.reason = None, verdict
                return PassResult(False, self._summary(stats, layers, None))
        if o.refit and ctx.calibration is not None:
            self._refit(model, ctx, chosen, names)
        stats.update(_fidelity(proto_before, model.export(), batches[:2], ctx))
        return PassResult(True, self._summary(stats, layers, chosen))

    # -- steps ------------------------------------------------------------------------------------
    def _statistics(self, model, ctx, layers: list[_Layer], stats: dict) -> list:
        o = self.options
        if ctx.calibration is None or not o.data_aware:
            stats["whitening"] = "none (no calibration data)" if ctx.calibration is None else "off"
            return [None] * len(layers)
        requests = []
        for lay in layers:
            gram = lay.split.gram()
            width = lay.split.gram_width()
            requests.append(gram if gram is not None and width <= o.max_gram else None)
        asked = [r for r in requests if r is not None]
        filled = iter(ctx.calibration.reduce(model, asked)) if asked else iter(())
        out = [next(filled) if r is not None else None for r in requests]
        for i, (lay, gram) in enumerate(zip(layers, out)):
            width = lay.split.gram_width()
            if requests[i] is None:
                lay.note = f"plain SVD: input width {width} > max_gram {o.max_gram}"
            elif gram.count < o.whiten_min_rows * width:
                # fewer rows than dimensions: the whitened error of any split that fits those
                # rows is ~0 however wrong it is elsewhere (8 images for a 4096-wide layer)
                lay.note = f"plain SVD: {gram.count} calibration rows for {width} input dimensions"
                out[i] = None
        stats["whitening"] = f"{sum(1 for g in out if g is not None and g.count)} of {len(layers)} layers"
        return out

    def _limits(self, layers: list[_Layer], ctx) -> None:
        """Each layer's highest rank that saves ``min_saving``, its candidate ranks, and the
        full-rank verdict."""
        o = self.options
        multiple = self._multiple(ctx)
        check_full = self._mode() in ("energy", "budget") and o.full_rank_energy > 0
        for lay in layers:
            s, d = lay.split, lay.split.decomposition
            limit = self._rank_limit(s)
            keep = 1.0 - o.min_saving
            best = 0
            for r in range(1, limit + 1):
                if s.params(r) > keep * s.full_params or (s.full_macs and s.macs(r) > keep * s.full_macs):
                    break
                best = r
            lay.max_rank = best
            step = self._step(multiple)
            lay.ranks = tuple(ranks_below(best, step, 64)) if best >= step else ()
            if not lay.ranks:
                lay.reason = (f"too small to gain: rank {step} keeps {s.params(step) / s.full_params:.0%} of the "
                              "parameters" if step <= d.max_rank else "too small to gain")
                continue
            if check_full:
                needed = d.rank_for_energy(o.full_rank_energy)
                if needed > o.full_rank_fraction * d.max_rank:
                    what = "whitened energy" if s.whitened else "energy"
                    lay.reason = (f"full rank in practice: {o.full_rank_energy:.0%} of the {what} needs rank "
                                  f"{needed} of {d.max_rank}")

    def _step(self, multiple: int) -> int:
        return multiple

    def _choose_each(self, layers: list[_Layer], mode: str, ctx) -> None:
        o = self.options
        step = self._step(self._multiple(ctx))
        for lay in layers:
            if lay.reason is not None:
                continue
            d = lay.split.decomposition
            if mode == "rank":
                r, why = round_rank(o.rank, step, d.max_rank), f"rank {o.rank}"
            elif mode == "rank_ratio":
                r, why = round_rank(o.rank_ratio * d.max_rank, step, d.max_rank), f"rank_ratio {o.rank_ratio}"
            else:
                r, why = round_rank(d.rank_for_energy(o.energy), step, d.max_rank), f"{o.energy:.0%} energy"
            if r > lay.max_rank:
                lay.reason = f"{why} needs rank {r}, above {lay.max_rank}, the highest that saves {o.min_saving:.0%}"
                continue
            lay.rank, lay.error = r, d.error(r)

    def _choose_budget(self, layers: list[_Layer], ctx, proto, batches, stats: dict) -> None:
        o = self.options
        on_macs = o.budget_on == "macs"
        if on_macs and not all(lay.split.full_macs for lay in layers):
            raise PipelineError(f"{self.name}: budget_on=macs needs the layers' shapes (sample data found none)")

        def cost(s, r):
            return (s.macs(r) if on_macs else s.params(r)) if r is not None else \
                (s.full_macs if on_macs else s.full_params)

        if o.select == "sensitivity" and batches:
            self._measure(layers, ctx, proto, batches, stats)
        options = []
        for lay in layers:
            opts = [Option(None, cost(lay.split, None), 0.0)]
            if lay.reason is None:
                for r in lay.ranks:
                    err = lay.split.decomposition.error(r)
                    if lay.measured:  # the spectrum's error scaled to what the outputs showed
                        err = lay.measured.get(r, err * _amplification(lay, r))
                    opts.append(Option(r, cost(lay.split, r), err))
            options.append(opts)
        for attempt in range(5):
            # the budget is a share of the layers that can be split: one left alone (full rank,
            # too small, slower when split) neither counts nor makes the others pay for it
            live = [i for i, lay in enumerate(layers) if lay.reason is None]
            total = sum(options[i][0].cost for i in live)
            result = allocate([options[i] for i in live], o.budget * total)
            for lay in layers:
                lay.rank = lay.error = None
            for i, option_ in zip(live, result.chosen([options[i] for i in live])):
                layers[i].rank = option_.rank
                layers[i].error = option_.error if option_.rank is not None else None
            stats.update(budget_base=total, budget_cost=result.cost, budget_met=result.met)
            if not o.speed_check:
                return
            slow = self._check_speed(layers, ctx, stats)
            if not slow:
                break
            logger.info("%s: %d split(s) slower than their layer; allocating again without them", self.name, slow)
        for lay in layers:
            if lay.rank is None and lay.reason is None:
                lay.reason = "kept whole by the budget: its error costs more than its parameters save"

    def _measure(self, layers: list[_Layer], ctx, proto, batches, stats: dict) -> None:
        """The relative output error of a few ranks per layer, measured on sample data with
        only that layer split; the ranks between take the spectrum's error scaled by the
        ratio measured/spectral interpolated between them (how much the rest of the model
        amplifies or damps this layer's error)."""
        from onnxopt.measure.weight_sensitivity import WeightSensitivity

        o = self.options
        live = [lay for lay in layers if lay.reason is None]
        weights = sorted({name for lay in live for name in lay.split.replacements(lay.ranks[-1])})
        probe = WeightSensitivity(proto, weights, batches[:o.sensitivity_batches], ctx.providers, ctx.threads)
        for lay in live:
            ranks = ranks_below(lay.ranks[-1], lay.ranks[0], o.sensitivity_ranks)
            lay.measured = {r: probe.error(lay.split.replacements(r)) for r in ranks}
        stats["sensitivity_runs"] = probe.runs

    def _check_speed(self, layers: list[_Layer], ctx, stats: dict) -> int:
        """Time each chosen split; leave alone those not ``min_gain`` faster. Returns how many."""
        from onnxopt.measure.microbench import MicroBenchmark
        from onnxopt.user_cache import user_cache_dir
        from onnxopt.runtime import CannotRun

        o = self.options
        bench = MicroBenchmark(ctx.providers, threads=1,
                               cache_dir=user_cache_dir() if o.benchmark_cache else None)
        slow = 0
        for lay in layers:
            if lay.rank is None or lay.speed is not None and lay.speed_rank == lay.rank:
                continue
            if lay.split.x_shape is None:
                lay.rank, lay.reason = None, "cannot time the split: the input shape is unknown"
                slow += 1
                continue
            a, b, feeds = lay.split.bench_models(lay.rank, self._opset)
            try:
                timing = bench.compare(a, b, feeds, key=lay.split.bench_key(lay.rank))
            except CannotRun as exc:
                lay.rank, lay.reason = None, f"cannot time the split in onnxruntime: {exc}"
                slow += 1
                continue
            lay.speed, lay.speed_rank, lay.speed_cached = timing.ratio, lay.rank, timing.cached
            if timing.ratio > 1.0 - o.min_gain:
                lay.reason = (f"slower when split: rank {lay.rank} ran at {timing.ratio:.2f}x the layer's time "
                              "in a micro-benchmark")
                lay.rank = None
                slow += 1
        stats["microbenchmarks_timed"] = stats.get("microbenchmarks_timed", 0) + bench.timed
        return slow

    def _check_model(self, before, after, feeds, ctx, stats: dict) -> str | None:
        """None when the model with the splits is faster than before, else why it is not."""
        from onnxopt.measure.microbench import MicroBenchmark
        from onnxopt.runtime import CannotRun

        bench = MicroBenchmark(ctx.providers, threads=1, runs=20, budget_s=30.0)
        ratios = []
        try:
            # a ratio within the noise of 1 is measured again (up to three rounds, the median kept)
            while len(ratios) < 3 and (not ratios or abs(statistics.median(ratios) - 1.0) < 0.05):
                ratios.append(bench.compare(before, after, feeds).ratio)
        except CannotRun as exc:
            return f"undone: the model with the splits cannot be timed ({exc})"
        ratio = statistics.median(ratios)
        stats["model_latency_ratio"] = round(ratio, 4)
        if ratio >= 1.0:
            return f"undone: the whole model with the splits ran at {ratio:.2f}x its time before"
        return None

    def _refit(self, model, ctx, chosen: list[_Layer], names: NameTable) -> None:
        """Refit the splits level by level (a level's splits have the same number of splits
        upstream), with statistics of the model as refitted so far."""
        o = self.options
        for group in dependency_levels(model.graph, chosen, lambda lay: lay.split.last):
            requests = []
            for lay in group:
                gram, why = lay.split.refit_request()
                if gram is None:
                    lay.refit = why
                requests.append(gram)
            asked = [g for g in requests if g is not None]
            if not asked:
                continue
            ctx.calibration.invalidate()  # the model changed since the statistics were read
            filled = iter(ctx.calibration.reduce(model, asked))
            for lay, gram in zip(group, requests):
                if gram is None:
                    continue
                got = next(filled)
                if not got.count:
                    lay.refit = "its output is not a tensor of the original model"
                    continue
                lay.split.apply_refit(got, names, o.refit_ridge)
                lay.refit = "refit"

    def _summary(self, stats: dict, layers: list[_Layer], chosen) -> dict:
        rows = stats.pop("layers")
        for lay in layers:
            rows.append(_row(lay.split, lay))
        split = [r for r in rows if r.get("action") == "split"]
        candidates = [r for r in rows if "params" in r]
        before = sum(r["params"][0] for r in candidates)
        after = sum(r["params"][1] for r in candidates)
        macs_before = sum(r["macs"][0] for r in candidates if r.get("macs"))
        macs_after = sum(r["macs"][1] for r in candidates if r.get("macs"))
        stats.update(
            split=len(split), left_alone=len(rows) - len(split),
            params_before=before, params_after=after,
            params_ratio=round(after / before, 4) if before else 1.0,
            macs_ratio=round(macs_after / macs_before, 4) if macs_before else None,
            reasons=dict(Counter(_reason_kind(r["reason"]) for r in rows if r.get("reason"))),
            layers=rows)
        if chosen is not None:
            stats["refit"] = sum(1 for lay in chosen if lay.refit == "refit")
        return stats


def _amplification(lay: _Layer, rank: int) -> float:
    """measured / spectral error at ``rank``, interpolated between the measured ranks."""
    points = [(r, m / e) for r, m in sorted(lay.measured.items())
              if (e := lay.split.decomposition.error(r)) > 1e-12]
    if not points:
        return 1.0
    return float(np.interp(rank, [r for r, _ in points], [f for _, f in points]))


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def _row(split: Split, lay: _Layer | None = None, reason: str | None = None) -> dict:
    row = {"node": split.name, "op": split.node.op, "weight": list(split.weight_shape)}
    if getattr(split, "method", None):
        row["method"] = split.method
    rank = lay.rank if lay is not None else None
    full_macs = split.full_macs if split.y_shape is not None else 0
    if rank is None:
        row.update(action="kept", reason=reason or (lay.reason if lay else None) or "no rank chosen",
                   params=[split.full_params, split.full_params])
        if full_macs:
            row["macs"] = [full_macs, full_macs]
    else:
        row.update(action="split", rank=rank, params=[split.full_params, split.params(rank)],
                   error=round(float(lay.error), 6) if lay.error is not None else None)
        if full_macs:
            row["macs"] = [full_macs, split.macs(rank)]
    if lay is not None:
        if split.decomposition is not None:
            row["whitened"] = bool(split.whitened)
        if lay.note:
            row["whitening"] = lay.note
        if lay.speed is not None:
            row["speed_ratio"] = round(lay.speed, 3)
        if lay.measured and rank in lay.measured:
            row["measured_error"] = round(float(lay.measured[rank]), 6)
        if lay.refit:
            row["refit"] = lay.refit
    return row


def _sample_batches(model, ctx, count: int) -> tuple[list[dict], str]:
    from onnxopt.data.samples import sample_batches

    try:
        return sample_batches(model, ctx, count)
    except Exception as exc:  # noqa: BLE001  (unreadable data: no shapes, no timings)
        logger.warning("low rank: no sample data (%s)", exc)
        return [], "none"


def _concrete_shapes(model, feeds: dict, names: list[str]) -> dict[str, tuple]:
    """Static shapes of ``names`` on the batch ``feeds``: from shape inference with the
    batch's input shapes, the rest observed in one onnxruntime run."""
    from onnxopt.analysis.cost import inferences, value_shapes, with_input_shapes
    from onnxopt.data.capture import Capture
    from onnxopt.errors import OnnxoptError

    proto = model.export()
    inputs = {i.name for i in proto.graph.input}
    out: dict[str, tuple] = {}
    try:
        fixed = with_input_shapes(proto, {k: list(np.shape(v)) for k, v in feeds.items() if k in inputs})
        inferred = next(inferences(fixed))
        known = value_shapes(inferred.graph)
        for name in names:
            s = known.get(name)
            if s is not None and s.shape is not None and all(isinstance(d, int) and d >= 0 for d in s.shape):
                out[name] = tuple(s.shape)
    except Exception as exc:  # noqa: BLE001  (inference is best effort; the run below is exact)
        logger.debug("shape inference failed: %s", exc)
    missing = [n for n in dict.fromkeys(names) if n not in out]
    if missing:
        try:
            seen = Capture(proto, missing).run({k: v for k, v in feeds.items() if k in inputs})
            out.update({k: tuple(np.shape(v)) for k, v in seen.items()})
        except OnnxoptError as exc:
            logger.debug("cannot observe shapes: %s", exc)
    return out


def _fidelity(before, after, batches: list[dict], ctx) -> dict:
    """The outputs' worst row cosine and SNR against the model before the pass, on sample data."""
    from onnxopt import runtime
    from onnxopt.measure.metrics import min_row_cosine, output_stats

    if not batches:
        return {}
    cos, snr = 1.0, float("inf")
    try:
        sessions = [runtime.session(p, ctx.providers, ctx.threads) for p in (before, after)]
        for batch in batches:
            ref, out = ({o.name: v for o, v in zip(s.get_outputs(), s.run(None, _inputs_of(s, batch)))}
                        for s in sessions)
            names = [n for n in ref if n in out]
            cos = min(cos, min_row_cosine([ref[n] for n in names], [out[n] for n in names]))
            for n in names:
                s = output_stats(ref[n], out[n])
                if "snr_db" in s:
                    snr = min(snr, s["snr_db"])
    except (runtime.CannotRun, Exception) as exc:  # noqa: BLE001  (a report line, not a failure)
        return {"sample_fidelity": f"not measured: {runtime.first_line(exc)}"}
    return {"sample_cosine": round(cos, 6), "sample_snr_db": round(snr, 2) if np.isfinite(snr) else None}


def _inputs_of(session, batch: dict) -> dict:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in batch.items() if k in names}


@register_pass("lowrank-matmul")
class LowRankMatMulPass(_LowRankPass):
    """Split MatMul/Gemm weights into two thinner factors by truncated (whitened) SVD where it is faster."""

    def _split(self, node, graph):
        if node.op not in ("MatMul", "Gemm") or not any(is_constant(t) for t in node.inputs[:2]):
            return None  # activation × activation (attention scores): nothing to factor
        return dense_split(node, graph)


@register_pass("lowrank-conv")
class LowRankConvPass(_LowRankPass):
    """Split Conv kernels into chains of smaller Convs (channel SVD, spatial SVD, Tucker-2) where it is faster."""

    @dataclass
    class Options(_Options):
        method: str = option("channel", "channel: kh×kw C→r then 1×1 r→M; spatial: kh×1 then 1×kw; "
                                        "tucker2: 1×1 C→r, kh×kw r→r·M/C, 1×1 →M",
                             choices=list(METHODS[:3]))

    def _split(self, node, graph):
        if node.op != "Conv":
            return None
        return conv_split(node, self.options.method)


@register_pass("separable-conv")
class SeparableConvPass(_LowRankPass):
    """Approximate k×k Convs by a depthwise k×k Conv and a pointwise 1×1 Conv where the error allows."""

    @dataclass
    class Options(_Options):
        energy: float = option(0.95, "per layer: the smallest depthwise multiplier keeping this share of "
                                     "each input channel's (whitened) kernel energy")
        max_multiplier: int = option(4, "largest depthwise multiplier (output channels per input channel)")

    def _split(self, node, graph):
        if node.op != "Conv":
            return None
        return conv_split(node, "separable")

    def _rank_limit(self, split) -> int:
        return min(split.decomposition.max_rank, self.options.max_multiplier)

    def _step(self, multiple: int) -> int:
        return 1  # the multiplier is per input channel: C·m channels are a multiple when C is
