"""prune-magnitude and prune-nm: zero individual weights (masks), the model keeps its shape.

Masks are first-class: every weight a pass prunes leaves its mask (True = kept) in
``ctx.pruned_masks`` keyed by initializer name, which the caller writes for a training
framework to fine-tune with (``--export-masks``); masks given to the run (``ctx.masks``,
``--masks`` of an earlier run) are respected: what they removed stays removed and counts
toward the sparsity, so pruning can be iterated. Weights in Constant nodes are left alone
(masks are keyed by initializer name: run ``lift-constants`` first).

Zeros only make a model faster on hardware with sparse kernels: unstructured sparsity
buys file size (``prune-magnitude`` stores a mostly-zero weight as an ONNX sparse
initializer where that makes it smaller; onnxruntime densifies it at load), and
N:M sparsity is only offered for targets whose ``capabilities.nm_sparsity`` lists the
pattern.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import Pass, PassResult, option, register_pass
from onnxopt.errors import CalibrationError, PipelineError, TargetError, UsageError
from onnxopt.ir.constants import constant_value
from onnxopt.ir.sparse import encoded_sizes, sparse_constant, sparse_pays
from onnxopt.ir.surgery import replace_input
from onnxopt.ir.weights import WEIGHT_OPS, weight_axes
from onnxopt.target import parse_nm

logger = logging.getLogger(__name__)

@dataclass
class _Weight:
    tensor: gs.Constant
    node: gs.Node
    values: np.ndarray
    in_axis: int  # the reduction axis (input channels, K)


def _weights(model, op_types: list[str]) -> tuple[list[_Weight], int]:
    """Float constant weights (rank >= 2) of the given op types, each once; and how many
    weights were left alone because they live in Constant nodes."""
    found, seen, in_nodes = [], set(), 0
    for node in model.graph.nodes:
        if node.op not in op_types or node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        if node.domain not in (None, "", "ai.onnx") or isinstance(node.inputs[0], gs.Constant):
            continue
        t = node.inputs[1]
        if not isinstance(t, gs.Constant):
            in_nodes += bool(t.inputs and t.inputs[0].op == "Constant")
            continue
        if id(t) in seen:
            continue
        values = constant_value(t)
        if values is None or values.dtype.kind != "f" or values.ndim < 2:
            continue
        axes = weight_axes(node, 1, values.ndim)
        if axes is None:
            continue
        seen.add(id(t))
        found.append(_Weight(t, node, values, axes.in_axis))
    return found, in_nodes


def _given_mask(ctx, w: _Weight) -> np.ndarray | None:
    mask = ctx.masks.get(w.tensor.name)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != w.values.shape:
        raise UsageError(f"mask of '{w.tensor.name}' has shape {list(mask.shape)}, the weight "
                         f"{list(w.values.shape)}")
    return mask.astype(bool)


def _check_op_types(op_types: list[str]) -> None:
    bad = [op for op in op_types if op not in WEIGHT_OPS]
    if bad:
        raise PipelineError(f"op_types: {', '.join(bad)} have no weight to prune (take {', '.join(WEIGHT_OPS)})")


@register_pass("prune-magnitude")
class PruneMagnitudePass(Pass):
    """Zero the smallest weights (per layer or one global threshold), keep their masks."""

    lossless = False

    @dataclass
    class Options:
        sparsity: float = option(0.5, "fraction of each weight (layer) or of all weights (global) to zero")
        scope: str = option("layer", "one threshold per weight, or one over all weights normalized by their "
                                     "mean magnitude", choices=("layer", "global"))
        op_types: list[str] = option(["Conv", "MatMul", "Gemm"], "ops whose constant weight is pruned")
        schedule: list[float] = option([], "prune in rounds to these sparsities (each round keeps the zeros "
                                           "of the one before); empty = one round to 'sparsity'")
        storage: str = option("auto", "store pruned weights as ONNX sparse initializers: auto (weights at least "
                                      "75% zero, where that is smaller), dense, sparse",
                              choices=("auto", "dense", "sparse"))
        refit: str = option("auto", "after each round, refit the kept weights of every pruned layer to the "
                                    "original model's outputs, making up for the zeros (auto: when calibration "
                                    "data is given)", choices=("auto", "on", "off"))
        ridge: float = option(1e-3, "ridge of the refit, relative to the mean input energy")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        rounds = list(o.schedule) or [o.sparsity]
        if any(not 0.0 <= s < 1.0 for s in rounds) or rounds != sorted(rounds):
            raise PipelineError(f"prune-magnitude: sparsity and schedule take increasing values in [0, 1), "
                                f"not {rounds}")
        if o.refit == "on" and ctx.calibration is None:
            raise CalibrationError("prune-magnitude: refit=on needs calibration data (--calibration DATA)")
        do_refit = o.refit == "on" or (o.refit == "auto" and ctx.calibration is not None)
        _check_op_types(o.op_types)
        weights, in_nodes = _weights(model, o.op_types)
        keep = {}
        for w in weights:
            given = _given_mask(ctx, w)
            keep[id(w.tensor)] = given if given is not None else np.ones(w.values.shape, bool)
        refits: dict[str, int] = {}
        for target in rounds:
            if o.scope == "layer":
                for w in weights:
                    keep[id(w.tensor)] = _layer_mask(np.abs(w.values), keep[id(w.tensor)], target)
            else:
                _global_masks(weights, keep, target)
            if do_refit:  # the next round ranks the refitted weights
                for status, n in _refit(model, ctx, weights, keep, o.ridge).items():
                    refits[status] = refits.get(status, 0) + n
        zeroed = total = stored_sparse = 0
        sizes = {"bytes_before": 0, "bytes_after": 0, "gzip_before": 0, "gzip_after": 0}
        for w in weights:
            mask = keep[id(w.tensor)]
            total += mask.size
            zeroed += int((~mask).sum())
            ctx.pruned_masks[w.tensor.name] = mask
            pruned = np.where(mask, w.values, np.zeros((), w.values.dtype)).astype(w.values.dtype)
            sparse = o.storage == "sparse" or (o.storage == "auto" and sparse_pays(pruned))
            _count_sizes(sizes, w.values, pruned, sparse)
            if sparse:
                _store_sparse(model, w.tensor, pruned)
                stored_sparse += 1
            elif not np.array_equal(pruned, w.values):
                w.tensor.values = pruned
        stats = {"weights": len(weights), "zeroed": zeroed, "sparsity": round(zeroed / total, 4) if total else 0.0,
                 "stored_sparse": stored_sparse, "weight_storage": sizes}
        if in_nodes:
            stats["left_in_constant_nodes"] = in_nodes
        stats["refit"] = refits if do_refit else ("off (no calibration data)" if o.refit == "auto" else "off")
        changed = zeroed > 0 or stored_sparse > 0
        return PassResult(changed=changed, stats=stats)


def _refit(model, ctx, weights: list[_Weight], keep: dict, ridge: float) -> dict[str, int]:
    """Zero the dropped weights, then refit the layers layer by layer (each on the inputs the
    refitted layers before it give) to the original model's outputs, zeros kept
    (``onnxopt.data.reconstruct``); ``weights`` then hold the refitted values. A weight read
    by more than one layer is zeroed but not refitted. Returns counts by refit status."""
    from onnxopt.data.reconstruct import LayerFit, refit_layers

    fits = []
    for w in weights:
        w.tensor.values = np.where(keep[id(w.tensor)], w.values, np.zeros((), w.values.dtype)).astype(w.values.dtype)
        w.values = w.tensor.values
        if len(w.tensor.outputs) == 1:
            fits.append(LayerFit(w.node, keep_zeros=True))
    records = refit_layers(model, ctx, fits, ridge=ridge)
    for w in weights:
        w.values = constant_value(w.tensor)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _layer_mask(magnitude: np.ndarray, keep: np.ndarray, sparsity: float) -> np.ndarray:
    """``keep`` with more entries dropped (smallest magnitude first) until ``sparsity`` of
    them are dropped."""
    want = int(round(sparsity * magnitude.size))
    more = want - int((~keep).sum())
    if more <= 0:
        return keep
    flat = np.where(keep, magnitude, np.inf).reshape(-1)
    drop = np.argpartition(flat, more - 1)[:more]
    out = keep.copy().reshape(-1)
    out[drop] = False
    return out.reshape(keep.shape)


def _global_masks(weights: list[_Weight], keep: dict, sparsity: float) -> None:
    """One threshold over all weights, each divided by its mean magnitude (so a layer's
    scale does not decide its sparsity)."""
    if not weights:
        return
    scores = []
    for w in weights:
        mag = np.abs(w.values).astype(np.float64)
        m = keep[id(w.tensor)]
        mean = float(mag[m].mean()) if m.any() else 1.0
        scores.append(np.where(m, mag / max(mean, 1e-30), np.inf).reshape(-1))
    flat = np.concatenate(scores)
    want = int(round(sparsity * flat.size))
    already = int(np.isinf(flat).sum())
    more = want - already
    if more <= 0:
        return
    threshold = np.partition(flat, more - 1)[more - 1]
    budget = more
    for w, s in zip(weights, scores):
        drop = s < threshold
        ties = np.flatnonzero(s == threshold)
        mask = keep[id(w.tensor)].reshape(-1).copy()
        mask[drop] = False
        budget -= int(drop.sum())
        if budget > 0 and len(ties):
            take = ties[:budget]
            mask[take] = False
            budget -= len(take)
        keep[id(w.tensor)] = mask.reshape(w.values.shape)


def _count_sizes(sizes: dict, before: np.ndarray, after: np.ndarray, sparse: bool) -> None:
    """Bytes of the pruned weights as written, raw and gzip-compressed, before and after (what
    the report shows for the file: onnxruntime loads either form as a dense tensor)."""
    old = encoded_sizes(before)
    new = encoded_sizes(after)
    sizes["bytes_before"] += old["dense"]
    sizes["gzip_before"] += old["dense_compressed"]
    sizes["bytes_after"] += new["sparse" if sparse else "dense"]
    sizes["gzip_after"] += new["sparse_compressed" if sparse else "dense_compressed"]


def _store_sparse(model, tensor: gs.Constant, values: np.ndarray) -> None:
    """Every reader of ``tensor`` reads the same values from a sparse initializer."""
    sparse = sparse_constant(tensor.name, values)
    for node in list(tensor.outputs):
        replace_input(node, tensor, sparse)


@register_pass("prune-nm")
class PruneNMPass(Pass):
    """Keep the n largest of every m consecutive weights along the reduction axis (N:M sparsity)."""

    lossless = False

    @dataclass
    class Options:
        n: int = option(2, "weights kept in every group")
        m: int = option(4, "group length along the reduction axis (input channels, K)")
        op_types: list[str] = option(["Conv", "MatMul", "Gemm"], "ops whose constant weight is pruned")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        pattern = f"{o.n}:{o.m}"
        if parse_nm(pattern) is None:
            raise PipelineError(f"prune-nm: n={o.n}, m={o.m} is not an N:M pattern (0 < n < m)")
        accelerated = list(ctx.target.capabilities.get("nm_sparsity", []))
        if pattern not in accelerated:
            raise TargetError(f"prune-nm: target '{ctx.target.name}' does not accelerate {pattern} sparsity "
                              f"(capabilities.nm_sparsity = {accelerated}); zeros would only cost accuracy there")
        _check_op_types(o.op_types)
        weights, in_nodes = _weights(model, o.op_types)
        pruned, skipped, zeroed, total = 0, [], 0, 0
        for w in weights:
            k = w.values.shape[w.in_axis]
            if k % o.m:
                skipped.append(f"{w.tensor.name}: reduction axis of {k} is not a multiple of {o.m}")
                continue
            given = _given_mask(ctx, w)
            mask = _nm_mask(np.abs(w.values), w.in_axis, o.n, o.m, given)
            ctx.pruned_masks[w.tensor.name] = mask
            new = np.where(mask, w.values, np.zeros((), w.values.dtype)).astype(w.values.dtype)
            zeroed += int((~mask).sum())
            total += mask.size
            if not np.array_equal(new, w.values):
                w.tensor.values = new
                pruned += 1
        stats = {"pattern": pattern, "weights": pruned, "zeroed": zeroed,
                 "sparsity": round(zeroed / total, 4) if total else 0.0, "skipped": skipped[:20]}
        if in_nodes:
            stats["left_in_constant_nodes"] = in_nodes
        return PassResult(changed=pruned > 0, stats=stats)


def _nm_mask(magnitude: np.ndarray, axis: int, n: int, m: int, given: np.ndarray | None) -> np.ndarray:
    """Per group of ``m`` consecutive entries along ``axis``: the ``n`` largest kept (entries a
    given mask removed count as smallest)."""
    mag = np.moveaxis(magnitude, axis, -1)
    if given is not None:
        mag = np.where(np.moveaxis(given, axis, -1), mag, -1.0)
    shape = mag.shape
    groups = mag.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    if given is not None:
        keep &= np.moveaxis(given, axis, -1).reshape(-1, m)
    return np.moveaxis(keep.reshape(shape), -1, axis)
