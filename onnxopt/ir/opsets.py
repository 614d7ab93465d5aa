"""Raising a model's default-domain opset: one policy for every pass that needs newer ops.

A pass that emits an op or attribute of a newer opset (per-channel DequantizeLinear at 13,
16-bit Q/DQ or blocked weights at 21, Gelu at 20) must raise the model's opset without
changing what its other ops mean. ``raise_blockers`` lists, per node, why a raise would
change its meaning: every schema revision of its op between the two opsets is looked up in
a table of reviewed revisions (``_REVIEWED``: a revision that only added types, or inputs
and attributes whose defaults keep the old meaning, is harmless; some are harmless only for
some nodes); an unreviewed revision is a blocker. Local functions block a raise too
(their own opset imports would disagree with the model's).

``raise_opset(model, version, convert=…)``:

1. no blocker: the import is raised as it is (the graph is unchanged);
2. blockers and ``convert``: onnx's version converter rewrites the changed ops (Squeeze/
   Unsqueeze/Split/Reduce* axes from attributes to inputs, …), the result must pass the
   checker, and becomes the model's graph;
3. otherwise the opset stays and the reasons are returned.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSumSquare")


def _reduce_axes_attr(node: gs.Node) -> str | None:
    return "axes attribute became an input in opset 18" if "axes" in node.attrs else None


def _split_without_sizes(node: gs.Node) -> str | None:
    given = len(node.inputs) > 1 and node.inputs[1].name
    return None if given else "needs 'split' or 'num_outputs' from opset 18"


def _always(reason: str) -> Callable[[gs.Node], str]:
    return lambda node: reason


def _batchnorm_training_outputs(node: gs.Node) -> str | None:
    extra = [t for t in node.outputs[1:] if t.name]
    return "BatchNormalization with training outputs (their meaning changed in opset 14)" if extra else None


def _roi_align_mode(node: gs.Node) -> str | None:
    given = "coordinate_transformation_mode" in node.attrs
    return None if given else "RoiAlign's default coordinate_transformation_mode changed in opset 16"


def _grid_sample_mode(node: gs.Node) -> str | None:
    mode = node.attrs.get("mode")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return f"mode '{mode}' was renamed in opset 20" if mode in ("bilinear", "bicubic") else None


# (op, version) of the default domain -> None when a node written for the previous version
# keeps its meaning at this one; else a function(node) -> the reason it would change (None
# when that node is not affected). Reviewed: the revisions of opsets 14 to 20 (13 changed
# too much: a raise from 12 or below goes through onnx's version converter).
_REVIEWED: dict[tuple[str, int], Any] = {
    # 14: types added; Reshape's allowzero and the RNNs' layout default to the old meaning
    **{(op, 14): None for op in ("Add", "Sub", "Mul", "Div", "CumSum", "Relu", "Identity", "Reshape",
                                 "GRU", "LSTM", "RNN")},
    ("BatchNormalization", 14): _batchnorm_training_outputs,
    # 15: types added (bfloat16, differing scale/bias types); Shape's start/end default to all
    ("BatchNormalization", 15): None, ("Pow", 15): None, ("Shape", 15): None,
    # 16: types added (bfloat16, optional); Scatter's reduction defaults to none
    **{(op, 16): None for op in ("GreaterOrEqual", "LessOrEqual", "Identity", "If", "Loop", "Scan",
                                 "LeakyRelu", "PRelu", "ScatterElements", "ScatterND", "Where")},
    ("RoiAlign", 16): _roi_align_mode,
    **{(op, 18): _reduce_axes_attr for op in _REDUCE_OPS},
    ("ReduceMax", 20): None, ("ReduceMin", 20): None,  # bool added
    ("Split", 18): _split_without_sizes,
    ("DFT", 20): _always("axis moved from attribute to input (default changed) in opset 20"),
    # 17 only added ops (LayerNormalization, DFT, STFT, the windows, SequenceMap)
    ("GridSample", 20): _grid_sample_mode,
    ("LpPool", 18): None, ("OptionalGetElement", 18): None, ("OptionalHasElement", 18): None,
    ("Pad", 18): None, ("Pad", 19): None, ("Resize", 18): None, ("Resize", 19): None,
    ("ScatterElements", 18): None, ("ScatterND", 18): None, ("AveragePool", 19): None,
    ("Cast", 19): None, ("CastLike", 19): None, ("Constant", 19): None,
    ("DequantizeLinear", 19): None, ("QuantizeLinear", 19): None, ("Equal", 19): None,
    ("Identity", 19): None, ("If", 19): None, ("Loop", 19): None, ("Scan", 19): None,
    ("Reshape", 19): None, ("Shape", 19): None, ("Size", 19): None,
    ("ConstantOfShape", 20): None, ("IsInf", 20): None, ("IsNaN", 20): None,
}


def _introduced_at(op: str, version: int) -> bool:
    """Whether ``op`` has a schema revision at exactly ``version``."""
    try:
        return onnx.defs.get_schema(op, version).since_version == version
    except onnx.defs.SchemaError:
        return False


def raise_blockers(model, version: int) -> Counter:
    """Why raising the default opset to ``version`` would change the model ({} = it would not)."""
    current = model.opset
    blockers: Counter = Counter()
    if current >= version:
        return blockers
    if model.template.functions:
        blockers["model has local functions (their opset imports would disagree)"] += 1
    for graph in model.graphs():
        for node in graph.nodes:
            if node.domain not in (None, "", "ai.onnx"):
                continue
            try:
                old = onnx.defs.get_schema(node.op, current).since_version
                new = onnx.defs.get_schema(node.op, version).since_version
            except onnx.defs.SchemaError:
                blockers[f"{node.op}: unknown op"] += 1
                continue
            for since in range(old + 1, new + 1):
                if not _introduced_at(node.op, since):
                    continue
                key = (node.op, since)
                if key not in _REVIEWED:
                    blockers[f"{node.op}-{since}: revision not reviewed"] += 1
                    break
                rule = _REVIEWED[key]
                reason = rule(node) if rule is not None else None
                if reason:
                    blockers[f"{node.op}: {reason}"] += 1
                    break
    return blockers


def raise_opset(model, version: int, convert: bool = True) -> tuple[bool, str]:
    """Raise the model's default opset to ``version`` keeping every op's meaning (see the
    module docstring). Returns (raised, how or why not)."""
    from onnxopt.ir.graph_io import import_graph

    current = model.opset
    if current >= version:
        return True, "already"
    blockers = raise_blockers(model, version)
    if not blockers:
        model.require_opset("", version)
        return True, f"opset {current} -> {version} (no op changed meaning)"
    reasons = ", ".join(sorted(blockers)[:3])
    if not convert:
        return False, f"raising {current} -> {version} would change: {reasons}"
    proto = model.export()
    declared = {v.name for v in proto.graph.value_info}
    try:
        converted = onnx.version_converter.convert_version(proto, version)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter lacks an adapter for some op
        return False, f"onnx version converter failed ({str(exc).splitlines()[0][:120]})"
    # the converter infers shapes on the way: keep only the value_info the model declared
    # (the rest would be written to the file, 1% of a quantized detector, and may go stale)
    kept = [v for v in converted.graph.value_info if v.name in declared]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    model.require_opset("", version)
    model.graph = import_graph(converted)
    model.graph.opset = version
    return True, f"opset {current} -> {version} (converted: {reasons})"
