"""prune-channels: remove whole output channels and everything that depends on them.

The channel-dependency analysis (``onnxopt.analysis.channel_groups``) finds the groups of
channels that must go together (a layer's outputs, coupled through residual adds, split
across Concat/Flatten/heads, through BatchNorm, activations, pooling, depthwise convs);
this pass scores each group's channels, removes the lowest ``ratio`` of every group (kept
counts rounded to the target's ``channel_multiple``), rewrites every member, then refits
each consumer of a pruned tensor to the original model's output on calibration data
(``onnxopt.data.reconstruct``). Graph outputs never change.

Scores (``auto``: ``activation`` when calibration data is given, else ``l2``; summed over the producers of a coupled channel, each producer's scores divided by
their mean first so no layer dominates by scale):

- ``l1``, ``l2``: the norm of each output channel's weights in its producer(s).
- ``bn-scale``: |gamma| of the BatchNormalization on the channel (network slimming);
  groups without one fall back to ``l2``.
- ``activation``: the energy each channel sends into its consumers, E[x_j²]·‖W[:, j]‖²
  (Wanda/FLAP-style), from streamed per-channel moments of the consumers' inputs.
- ``taylor``: the second-order Taylor (OBS) cost of removing input channel j of each
  consumer with the rest refitted, ‖W[:, j]‖² / [H⁻¹]_jj, H the streamed channel Gram of
  the consumer's input (no gradients exist here: the first-order term of a refit layer's
  reconstruction error is zero, so the Hessian term is the Taylor score). H is only
  trusted with at least 4 samples (rows) per channel; a consumer with fewer scores by
  ``activation`` (a singular H makes every channel it never saw look free to remove).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np

from onnxopt import Pass, PassResult, option, register_pass
from onnxopt.analysis.channel_groups import ChannelGraph, Group, channel_graph, kept_count
from onnxopt.errors import CalibrationError, PipelineError
from onnxopt.ir.constants import constant_value
from onnxopt.ir.graphs import count_params

logger = logging.getLogger(__name__)

CRITERIA = ("auto", "l1", "l2", "bn-scale", "activation", "taylor")
MAX_TAYLOR_DIM = 4096  # a consumer with more input columns scores by activation instead


@register_pass("prune-channels")
class PruneChannelsPass(Pass):
    """Remove whole output channels and everything that depends on them, then refit the consumers."""

    lossless = False

    @dataclass
    class Options:
        ratio: float = option(0.3, "fraction of the channels of every prunable group to remove")
        criterion: str = option("auto", "channel importance (auto: activation with calibration data, else l2)",
                                choices=CRITERIA)
        min_keep: int = option(1, "keep at least this many channels in every group")
        per_layer: list[str] = option([], "ratios for some layers: 'NAME=RATIO', quoted in pipeline text (NAME: "
                                          "a producer node name or fnmatch pattern; first match wins; 0 = left alone)")
        refit: str = option("auto", "least-squares refit of each pruned tensor's consumers against the original "
                                    "model (auto: when calibration data is given)", choices=("auto", "on", "off"))
        ridge: float = option(1e-3, "ridge of the refit, relative to the mean input energy")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        if not 0.0 <= o.ratio < 1.0:
            raise PipelineError(f"prune-channels: ratio must be in [0, 1), not {o.ratio}")
        overrides = _parse_per_layer(o.per_layer)
        criterion = o.criterion if o.criterion != "auto" else ("activation" if ctx.calibration else "l2")
        needs_data = o.criterion in ("activation", "taylor") or o.refit == "on"
        if needs_data and ctx.calibration is None:
            raise CalibrationError(f"prune-channels: criterion={o.criterion}, refit={o.refit} needs calibration "
                                   "data (--calibration DATA)")
        multiple = int(ctx.target.capabilities.get("channel_multiple", 1))
        params_before = count_params(model.graph)
        cg = channel_graph(model, ctx)
        scores = _Scorer(cg, model, ctx, criterion).scores()
        removed: set[int] = set()
        left_alone, pruned_groups, channels_before, channels_removed = [], 0, 0, 0
        for group in cg.groups:
            ratio = _ratio_for(group, overrides, o.ratio)
            channels_before += int(group.width.sum())
            if not group.prunable:
                left_alone.append(_why(group, "; ".join(group.reasons[:2])))
                continue
            if ratio <= 0:
                continue
            choice, why = _choose(group, scores[group.id], ratio, multiple, o.min_keep)
            if why:
                left_alone.append(_why(group, why))
                continue
            removed.update(int(c) for c in choice)
            pruned_groups += 1
            channels_removed += int(group.width[np.isin(group.classes, choice)].sum())
        stats = {"groups": len(cg.groups), "pruned_groups": pruned_groups,
                 "channels_removed": channels_removed, "channels_in_groups": channels_before,
                 "criterion": criterion, "channel_multiple": multiple,
                 "left_alone": len(left_alone), "left_alone_reasons": left_alone[:40],
                 "layers_skipped": [f"{n}: {r}" for n, r in cg.skipped][:20]}
        if not removed:
            return PassResult(changed=False, stats=stats)
        consumers = _consumers(cg, removed)
        cg.apply(removed)
        if ctx.calibration is not None:
            ctx.calibration.invalidate()  # the model changed under the statistics
        stats["params_removed"] = params_before - count_params(model.graph)
        do_refit = o.refit == "on" or (o.refit == "auto" and ctx.calibration is not None)
        if do_refit:
            from onnxopt.data.reconstruct import refit_layers

            records = refit_layers(model, ctx, consumers, ridge=o.ridge)
            stats["refit"] = {s: sum(r["status"] == s for r in records) for s in ("refitted", "worse", "skipped")}
            stats["refit_skipped"] = [f"{r['layer']}: {r['reason']}" for r in records if r["status"] == "skipped"][:20]
        else:
            stats["refit"] = "off (no calibration data)" if o.refit == "auto" else "off"
        return PassResult(changed=True, stats=stats)


def _why(group: Group, reason: str) -> str:
    names = ", ".join(group.producers[:3]) + (", …" if len(group.producers) > 3 else "")
    return f"{names}: {reason}"


def _parse_per_layer(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not name or not 0.0 <= ratio < 1.0:
            raise PipelineError(f"prune-channels: per_layer entry '{item}' is not NAME=RATIO with 0 <= RATIO < 1")
        out.append((name, ratio))
    return out


def _ratio_for(group: Group, overrides: list[tuple[str, float]], default: float) -> float:
    for pattern, ratio in overrides:
        if any(fnmatch.fnmatchcase(p, pattern) for p in group.producers):
            return ratio
    return default


def _choose(group: Group, score: np.ndarray, ratio: float, multiple: int, min_keep: int):
    """(classes to remove, None) or (None, why the group is left alone)."""
    n = len(group.classes)
    if group.blocks is not None:
        nb = len(group.blocks)
        per = len(group.blocks[0])
        keep_per = kept_count(per, ratio, max(1, multiple // nb) if multiple > nb else 1, max(1, -(-min_keep // nb)))
        if keep_per >= per:
            return None, f"groups of {per} channels: nothing to remove at this ratio"
        index = {int(c): i for i, c in enumerate(group.classes)}
        removed = []
        for block in group.blocks:
            s = np.array([score[index[int(c)]] for c in block])
            removed.extend(int(block[i]) for i in np.argsort(s, kind="stable")[:per - keep_per])
        return np.array(removed), None
    width = int(group.width[0]) if len(group.width) else 1
    if width > 1:  # classes are heads of ``width`` channels: round the channel count
        multiple //= int(np.gcd(multiple, width))
    if n < multiple:
        return None, f"{n * width} channels, fewer than channel_multiple {multiple * width}"
    keep = kept_count(n, ratio, multiple, min_keep)
    frozen = int(group.frozen.sum())
    remove = min(n - keep, n - frozen)
    if multiple > 1:
        remove -= (n - remove) % multiple
    if remove <= 0:
        return None, "nothing to remove at this ratio" if not frozen else f"{frozen} of {n} channels cannot be pruned"
    s = np.where(group.frozen, np.inf, score)
    order = np.argsort(s, kind="stable")
    return group.classes[order[:remove]], None


def _consumers(cg: ChannelGraph, removed: set[int]):
    """The layers whose input loses channels, in graph order, as LayerFits (with the
    reference output channels each keeps)."""
    from onnxopt.data.reconstruct import LayerFit

    out_cols = {}
    for m in cg.members:
        if m.kind == "out":
            keep = np.array([int(c) not in removed for c in cg.atoms.roots(m.layout)])
            out_cols[id(m.node)] = np.flatnonzero(keep)
    seen, fits = set(), []
    order = {id(n): i for i, n in enumerate(cg.graph.nodes)}
    for m in cg.members:
        if m.kind != "in" or id(m.node) in seen:
            continue
        if not any(int(c) in removed for c in cg.atoms.roots(m.layout)):
            continue
        seen.add(id(m.node))
        fits.append(LayerFit(m.node, out_cols.get(id(m.node))))
    fits.sort(key=lambda f: order.get(id(f.node), 0))
    return fits


class _Scorer:
    """Per group, one importance per class (see the module docstring)."""

    def __init__(self, cg: ChannelGraph, model, ctx, criterion: str):
        self.cg, self.model, self.ctx, self.criterion = cg, model, ctx, criterion
        self.fallbacks = 0

    def scores(self) -> dict[int, np.ndarray]:
        stats = self._statistics() if self.criterion in ("activation", "taylor") else {}
        out = {}
        for group in self.cg.groups:
            index = {int(c): i for i, c in enumerate(group.classes)}
            total = np.zeros(len(group.classes))
            contributions = self._contributions(group, stats)
            for layout, values in contributions:
                roots = self.cg.atoms.roots(layout)
                mean = float(np.mean(values)) if len(values) else 0.0
                if mean <= 0 or not np.isfinite(mean):
                    continue
                for c, v in zip(roots, values / mean):
                    if int(c) in index:
                        total[index[int(c)]] += v
            out[group.id] = total
        return out

    def _contributions(self, group: Group, stats) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.criterion
        if c == "bn-scale":
            found = [(m.layout, np.abs(constant_value(m.node.inputs[1]).reshape(-1)).astype(np.float64))
                     for m in group.members if m.kind == "param" and m.node.op == "BatchNormalization"
                     and m.index == 1 and constant_value(m.node.inputs[1]) is not None]
            if found:
                return found
            c = "l2"
        if c in ("activation", "taylor"):
            found = []
            for m in group.members:
                if m.kind != "in":
                    continue
                value = self._consumer_score(m, stats, c)
                if value is not None:
                    found.append((m.layout, value))
            if found:
                return found
            c = "l2"
        out = []
        for m in group.members:
            if m.kind != "out":
                continue
            w = constant_value(m.node.inputs[1])
            if w is None:
                continue
            w = np.moveaxis(w.astype(np.float64), m.axis, 0).reshape(w.shape[m.axis], -1)
            out.append((m.layout, np.abs(w).sum(1) if c == "l1" else np.sqrt((w * w).sum(1))))
        return out

    def _consumer_input(self, m):
        x = m.node.inputs[0]
        axis = 1 if m.node.op in ("Conv", "ConvTranspose", "Gemm") else -1
        return x, axis

    def _statistics(self) -> dict:
        from onnxopt.data.statistics import ChannelMoments, Gram

        reducers = {}
        for group in self.cg.groups:
            if not group.prunable:
                continue
            for m in group.members:
                if m.kind != "in":
                    continue
                x, axis = self._consumer_input(m)
                patches = _patches(m.node) if m.node.op == "Conv" else None
                width = int(np.prod(m.node.inputs[1].shape[2:])) if patches is not None else 1
                if self.criterion == "taylor" and len(m.layout) * width <= MAX_TAYLOR_DIM:
                    reducers[("gram", x.name, axis)] = Gram(x.name, axis=axis, patches=patches)
                reducers[("moments", x.name, axis)] = ChannelMoments(x.name, axis=axis)
        keys = list(reducers)
        filled = self.ctx.calibration.reduce(self.model, [reducers[k] for k in keys])
        return dict(zip(keys, filled))

    def _consumer_score(self, m, stats, criterion: str) -> np.ndarray | None:
        x, axis = self._consumer_input(m)
        w = constant_value(m.node.inputs[1])
        if w is None:
            return None
        w = np.moveaxis(w.astype(np.float64), m.axis, 0).reshape(w.shape[m.axis], -1)
        col_energy = (w * w).sum(1)  # ‖W[:, j]‖² per input position
        gram = stats.get(("gram", x.name, axis))
        if criterion == "taylor" and gram is not None and gram.count and gram.xtx.shape[0] % len(col_energy) == 0:
            width = gram.xtx.shape[0] // len(col_energy)  # kernel taps per channel (patches)
            if gram.count >= 4 * gram.xtx.shape[0]:
                return _obs_saliency(gram.covariance(), constant_value(m.node.inputs[1]), m.axis, width)
        moments = stats.get(("moments", x.name, axis))
        if moments is None or not moments.count or moments.mean.shape[0] != len(col_energy):
            return None
        return col_energy * (moments.variance + moments.mean ** 2)


def _patches(node):
    """The im2col view of an ungrouped Conv consumer (a grouped one is scored without it)."""
    from onnxopt.data.statistics import conv_patches

    return conv_patches(node) if int(node.attrs.get("group", 1)) == 1 else None


def _obs_saliency(h: np.ndarray, w: np.ndarray, in_axis: int, width: int) -> np.ndarray | None:
    """Per input channel j of a consumer with input Gram ``h`` (columns grouped ``width``
    per channel: the kernel taps of a Conv): the least increase of its squared output error
    when channel j is removed and the others refit, tr(W_jᵀ [H⁻¹]_jj⁻¹ W_j) (group OBS)."""
    d = len(h)
    damp = 0.01 * max(float(np.mean(np.diag(h))), 1e-12)
    try:
        inv = np.linalg.inv(h + damp * np.eye(d))
    except np.linalg.LinAlgError:
        return None
    w = np.moveaxis(w.astype(np.float64), in_axis, 0)  # [C, out, taps…]
    c = w.shape[0]
    if width > 1:  # Conv weight [M, C, k…] -> per channel [taps, M]
        wj = np.moveaxis(w, 1, -1).reshape(c, width, -1)
    else:
        wj = w.reshape(c, 1, -1)
    out = np.empty(c)
    for j in range(c):
        block = inv[j * width:(j + 1) * width, j * width:(j + 1) * width]
        try:
            out[j] = float(np.sum(wj[j] * np.linalg.solve(block, wj[j])))
        except np.linalg.LinAlgError:
            return None
    return np.maximum(out, 0.0)
