"""refit: layer-wise distillation from the original model, with no training framework.

Every layer that an earlier lossy pass changed (``ctx.lineage``: today the layers that a
quantization pass stored as integer codes, in any of the forms of
``onnxopt.quantization.stored``) gets weights and a bias that make its output match the
teacher's output of the same layer (the reference model's tensor of the same name,
``onnxopt.pipeline.lineage.Teacher``) on the calibration data.

Sequential: layers are visited in waves, a wave being the layers whose inputs depend on no
layer still waiting. For each wave one streamed run over the data (the student truncated
just after the wave's inputs, the teacher just after its targets) accumulates, per layer,
XᵀX of the student's input and XᵀY against the teacher's output in float64
(``onnxopt.data.statistics.Gram``; a Conv's input as im2col patches, block-diagonal per
group), so a layer's inputs come from the already refitted layers before it and memory does
not grow with the number of samples.

A quantized layer keeps its grid (the scales its pass chose, so an int32 bias stays valid);
for each output group of it, candidates are made and the one with the least error on the
held-back batches is kept:

- ``gptq``: the layer's float weight from just before quantization, rounded by GPTQ
  (``onnxopt.quantization.gptq``: column by column, each rounding error pushed into the
  columns not yet rounded with the inverse Hessian of the student's inputs; damping; lazy
  blocks), then bias correction: the bias absorbs the expected output shift against the
  teacher (E[y_teacher] − E[x]·W̃), or against the float layer when the teacher has no such
  tensor;
- ``teacher``: first the float weight that best maps the student's inputs to the teacher's
  outputs (ridge least squares pulled toward the float weight, so a fit on few samples stays
  near it), then GPTQ and bias correction as above: this also absorbs the error the layers
  upstream left;
- ``current``: the layer as it was. A refit whose held-back error is worse than this is
  undone for that group: the held-back check.

The held-back error of any candidate is computed exactly from the held-back Gram's sums,
without running the model again. A part of the calibration batches (``holdout``) is held back
from fitting for that check; with a single batch the check uses it too, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxopt.data.calibration import Subset, batch_count
from onnxopt.data.obs import hessian
from onnxopt.data.statistics import REFERENCE, Calibration, Gram, Tap
from onnxopt.errors import CalibrationError
from onnxopt.ir.graphs import named
from onnxopt.ir.names import NameTable
from onnxopt.ir.submodel import upstream
from onnxopt.ir.surgery import dependency_levels
from onnxopt.pipeline.lineage import Teacher
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass
from onnxopt.quantization.gptq import Grid, gptq
from onnxopt.quantization.stored import StoredLayer, read_layer

logger = logging.getLogger(__name__)

CANDIDATES = ("current", "gptq", "teacher")


@dataclass
class _Job:
    """One layer to refit: how it is stored, what it was, and the teacher tensor."""

    layer: StoredLayer
    prior_weight: np.ndarray  # [groups, rows, cols] float64
    prior_bias: np.ndarray | None  # [out] float64
    teacher: tuple | None  # (reference tensor, per-channel factor or None)


class _Source:
    """A reference for a Calibration: the teacher truncated to what a wave reads."""

    def __init__(self, proto):
        self.proto = proto


@register_pass("refit")
class RefitPass(Pass):
    """Refit layers changed by earlier lossy passes to the original's outputs (GPTQ rounding, bias correction)."""

    lossless = False
    needs_calibration = True
    # no keep_option: under a fidelity floor, a refit that leaves the model below it is rolled
    # back whole (the floor's search would run the whole sequential refit again per trial)

    @dataclass
    class Options:
        damp: float = option(0.01, "GPTQ damping: fraction of the mean diagonal of XᵀX added to it")
        block: int = option(128, "GPTQ lazy-update block (columns)")
        act_order: bool = option(True, "round columns by decreasing input energy (diag XᵀX) first")
        ridge: float = option(0.05, "teacher fit: pull toward the float weight, as a fraction of the mean "
                                    "diagonal of XᵀX")
        teacher: bool = option(True, "also try fitting the teacher's outputs (absorbs upstream error)")
        bias: bool = option(True, "correct the bias for the expected output shift")
        holdout: float = option(0.25, "share of the calibration batches held back to check each refit")
        max_columns: int = option(8192, "leave layers whose input has more columns (C·k·k or K) alone: "
                                        "XᵀX would need columns² × 8 bytes")
        exclude_nodes: list[str] = option([], "layers (node names, or output names) left as they are")

    # -- which layers ------------------------------------------------------------------------
    def _jobs(self, model, ctx) -> tuple[list[_Job], dict]:
        skipped: dict[str, int] = {}
        teacher = Teacher(ctx.reference.proto) if ctx.reference is not None else None
        jobs = []
        for node in model.graph.nodes:  # main graph only: a body's tensors cannot be captured
            layer = read_layer(node, model.graph)
            if layer is None or named(node, self.options.exclude_nodes):
                continue
            origin = ctx.lineage.origin(layer.key)
            if origin is None:
                skipped["no_record"] = skipped.get("no_record", 0) + 1
                continue
            current = layer.weight()
            if current.shape[2] > self.options.max_columns:
                skipped["too_wide"] = skipped.get("too_wide", 0) + 1
                continue
            prior = current
            if origin.weight is not None:
                candidate = layer.matrices(np.asarray(origin.weight, np.float64))
                if candidate.shape == current.shape:
                    prior = candidate.astype(np.float64)
            bias = layer.bias()
            if origin.bias is not None and bias is not None and np.asarray(origin.bias).size == bias.size:
                bias = np.asarray(origin.bias, np.float64).reshape(-1)
            jobs.append(_Job(layer, prior, bias, teacher.tensor(layer.y.name, ctx.lineage) if teacher else None))
        return jobs, skipped

    # -- run -----------------------------------------------------------------------------------
    def run(self, model, ctx) -> PassResult:
        if ctx.calibration is None:
            raise CalibrationError("refit needs calibration data (--calibration DATA)")
        jobs, skipped = self._jobs(model, ctx)
        stats: dict = {"layers": 0, **{f"skipped_{k}": v for k, v in skipped.items()}}
        if not jobs:
            return PassResult(changed=False, stats=stats)
        fit, check, split = self._split(ctx.calibration.source)
        stats["check"] = split
        waves = dependency_levels(model.graph, jobs, lambda job: job.layer.node)
        names = NameTable.of(model.graph)
        chosen = dict.fromkeys(CANDIDATES, 0)
        before = after = 0.0
        changed = 0
        from tqdm import tqdm

        bar = tqdm(waves, desc="refit", unit="wave", disable=not ctx.calibration.progress, leave=False)
        for wave in bar:
            grams = self._statistics(model, ctx, wave, fit, check)
            for job, (g_fit, g_check) in zip(wave, grams):
                result = self._refit(job, g_fit, g_check)
                before += result["before"]
                after += result["after"]
                for name, n in result["chosen"].items():
                    chosen[name] += n
                if result["codes"] is not None:
                    old = job.layer.key
                    new = job.layer.write(result["codes"], result["bias"], names)
                    ctx.lineage.move(old, new)
                    changed += 1
        bar.close()
        stats.update({"layers": len(jobs), "refit": changed, "waves": len(waves),
                      "with_teacher": sum(job.teacher is not None for job in jobs),
                      "groups_" + "_".join(CANDIDATES): [chosen[c] for c in CANDIDATES],
                      "check_error_before": before, "check_error_after": after})
        if before > 0:
            stats["check_error_ratio"] = round(after / before, 4)
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=changed > 0, stats=stats)

    def _split(self, source):
        """(fit batches, check batches, what the check is)."""
        count = batch_count(source)
        if count is None:
            source = list(source)
            count = len(source)
        if count < 2:
            return source, source, "the fitting data (only one batch)"
        k = min(count - 1, max(1, int(round(count * self.options.holdout))))
        return Subset(source, stop=count - k), Subset(source, start=count - k), f"{k} of {count} batch(es) held back"

    def _statistics(self, model, ctx, wave: list[_Job], fit, check) -> list[tuple[Gram, Gram]]:
        """One streamed run per data split: the Grams of the wave's layers, on the student as
        it is now (earlier waves refitted) against the teacher."""
        student = model.export()
        reference = ctx.reference.proto
        calib = ctx.calibration

        def reducers(with_teacher: bool) -> list[Gram]:
            out = []
            for job in wave:
                layer = job.layer
                name, factor = job.teacher if with_teacher and job.teacher else (None, None)
                out.append(Gram(layer.x.name, axis=layer.x_axis, y=Tap(name, REFERENCE) if name else None,
                                y_axis=layer.y_axis, patches=layer.patches, groups=layer.groups, y_scale=factor))
            return out

        def collect(source, with_teacher: bool) -> list[Gram]:
            wanted = reducers(with_teacher)
            teachers = [t.taps[1].name for t in wanted if len(t.taps) > 1]
            run = Calibration(source=source, reference=_Source(upstream(reference, teachers)),
                              providers=ctx.providers, threads=ctx.threads, workers=calib.workers)
            return run.reduce(upstream(student, [job.layer.x.name for job in wave]), wanted)

        try:
            fitted = collect(fit, self.options.teacher or self.options.bias)
            checked = collect(check, True)
        except CalibrationError as exc:  # a teacher tensor that does not line up: the float layer is the target
            logger.info("refit: teacher tensors unusable for a wave (%s); fitting to the float layers", exc)
            for job in wave:
                job.teacher = None
            fitted, checked = collect(fit, False), collect(check, False)
        return list(zip(fitted, checked))

    # -- one layer -----------------------------------------------------------------------------
    def _refit(self, job: _Job, g_fit: Gram, g_check: Gram) -> dict:
        """The best candidate of each output group on the held-back data (see the module
        docstring): new codes (None when nothing changed), a new bias, errors and choices."""
        layer, o = job.layer, self.options
        chosen = dict.fromkeys(CANDIDATES, 0)
        codes, weight = layer.codes(), layer.weight()
        bias_now = layer.bias()
        writable = layer.bias_slot is not None and o.bias
        groups, rows = weight.shape[0], weight.shape[1]
        out_codes, out_bias = codes.copy(), None if bias_now is None else bias_now.copy()
        total_before = total_after = 0.0
        if g_fit.count == 0 or g_check.count == 0:
            return {"codes": None, "bias": None, "before": 0.0, "after": 0.0, "chosen": chosen}
        teacher = job.teacher is not None and g_fit.xty is not None and g_check.xty is not None
        for i in range(groups):
            fit, chk = g_fit.block(i), g_check.block(i)
            span = slice(i * rows, (i + 1) * rows)
            prior_w = job.prior_weight[i]
            prior_b = None if job.prior_bias is None else job.prior_bias[span]
            now_b = None if bias_now is None else bias_now[span]
            grid: Grid = layer.grids[i]

            def error(w, b) -> float:
                if teacher:
                    return chk.residual(w.T, b)
                delta = prior_w - w  # against the float layer on the held-back inputs
                shift = (0 if prior_b is None else prior_b) - (0 if b is None else b)
                total = float(np.sum((delta @ chk.xtx) * delta))
                if np.any(shift):
                    total += 2.0 * float(shift @ (delta @ chk.sum_x)) + chk.count * float(np.sum(shift * shift))
                return max(total, 0.0)

            options = {"current": (codes[i], weight[i], now_b)}
            h = fit.covariance()
            if writable:  # the bias absorbs the mean: only the spread of the inputs matters
                mean = fit.mean_x
                h = h - np.outer(mean, mean)
            factor = hessian(h, o.damp, o.act_order)
            rounded = gptq(prior_w, factor, grid, o.block)
            options["gptq"] = (rounded.codes, rounded.weight, self._bias(rounded.weight, prior_w, prior_b, now_b,
                                                                        fit, teacher and o.bias, writable))
            if teacher and o.teacher:
                a, _ = fit.solve(o.ridge, bias=True, prior=prior_w.T)
                again = gptq(a.T, factor, grid, o.block)
                options["teacher"] = (again.codes, again.weight, self._bias(again.weight, prior_w, prior_b, now_b,
                                                                            fit, True, writable))
            errors = {name: error(w, b) for name, (_, w, b) in options.items()}
            best = min(errors, key=lambda k: (errors[k], k != "current"))
            chosen[best] += 1
            total_before += errors["current"]
            total_after += errors[best]
            q, _, b = options[best]
            out_codes[i] = q
            if b is not None and out_bias is not None:
                out_bias[span] = b
        changed = not np.array_equal(out_codes, codes) or (
            out_bias is not None and bias_now is not None and not np.array_equal(out_bias, bias_now))
        return {"codes": out_codes if changed else None, "bias": out_bias if writable else None,
                "before": total_before, "after": total_after, "chosen": chosen}

    @staticmethod
    def _bias(w: np.ndarray, prior_w, prior_b, now_b, fit: Gram, to_teacher: bool, writable: bool):
        """Bias correction for weights ``w``: the expected output shift against the teacher
        (E[y] − E[x]·wᵀ) or against the float layer (b + E[x]·(prior − w)ᵀ)."""
        if not writable:
            return now_b
        if to_teacher:
            return fit.sum_y / fit.count - fit.mean_x @ w.T
        base = prior_b if prior_b is not None else (now_b if now_b is not None else 0.0)
        return base + fit.mean_x @ (prior_w - w).T
