"""Moving activation outliers into weights (SmoothQuant), for every pass that smooths.

One scale per tensor for an activation loses most where a few channels reach far beyond
the rest (transformer activations: MiniLM's FFN input has one channel at 28 where the 90th
percentile of channel ranges is 2.4). An activation X read by linear layers (MatMul and Gemm
with a constant weight, Conv with one group: ``onnxopt.ir.rescale``) can carry X/s instead,
each reader multiplying its weight's input channel c by s_c: exact in float, and X/s
quantizes better while the weights, quantized per output channel, barely notice.

Where 1/s goes: folded into the constants of X's producer (a LayerNormalization, a linear
layer and its bias, a BatchNormalization, a Mul by a constant, through Relu/LeakyRelu/PRelu)
when every reader of X takes X/s; else, when ``allow_mul``, a ``Mul`` by 1/s feeding only the
smoothed readers (the others keep X). Folded smoothing costs nothing at run time; the Mul
costs a pass over X, and in front of static int8 the Mul's own input is quantized with X's
outliers, so a folded site is what helps there.

The scale rules:

- ``smoothquant_scales``: s_j = max|X_j|^α / max|W_j|^(1−α) (Xiao et al., ICML'23; W_j over
  every reader), α = 0.5 by default;
- ``outlier_scales``: s_j = max(1, max|X_j| / P)^strength with P a percentile of the channel
  ranges: only outlier channels move, and only part of the way (quantize-dynamic's rule,
  made for estimates from a few sample batches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.names import NameTable
from onnxopt.ir.rescale import (divide_outputs, input_axis, input_channels, input_range, multiply_before,
                                 producer_chain, scale_inputs)

logger = logging.getLogger(__name__)

SHAPE_ONLY = ("Shape", "Size")  # readers that see X/s as X: only its shape matters


@dataclass
class Site:
    """An activation and the linear layers reading it that will take X/s."""

    tensor: gs.Tensor
    readers: list[gs.Node]
    axis: int  # the channel axis of the tensor (1: Conv readers, -1: MatMul/Gemm)
    rank: int | None
    channels: int


def sites(graph: gs.Graph, shapes: dict | None = None, op_types=("MatMul", "Gemm", "Conv"),
          readers=None) -> list[Site]:
    """Activations of ``graph`` read as data input by linear layers of ``op_types`` (or only
    by the nodes in ``readers``, when given): one Site per activation, its smoothable readers
    together (a Conv reader only when it has one group: a depthwise Conv would need s per
    group)."""
    allowed = None if readers is None else {id(n) for n in readers}
    found: dict[int, Site] = {}
    for node in graph.nodes:
        if node.op not in op_types or not node.inputs or (allowed is not None and id(node) not in allowed):
            continue
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            continue
        x = node.inputs[0]
        axis = input_axis(node, x)
        channels = input_channels(node) if axis is not None else None
        if channels is None or isinstance(x, gs.Constant):
            continue
        site = found.get(id(x))
        if site is None:
            info = shapes.get(x.name) if shapes else None
            rank = len(info.shape) if info is not None and info.shape is not None else (
                len(x.shape) if x.shape is not None else None)
            found[id(x)] = Site(x, [node], axis, rank, channels)
        elif site.axis == axis and site.channels == channels:
            site.readers.append(node)
    return list(found.values())


def smoothquant_scales(act_absmax: np.ndarray, site: Site, alpha: float = 0.5) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α), 1 where either side is 0."""
    w = np.zeros(site.channels)
    for node in site.readers:
        r = input_range(node, site.channels)
        if r is not None:
            w = np.maximum(w, r)
    a = np.asarray(act_absmax, np.float64)
    s = np.ones(site.channels)
    ok = (a > 0) & (w > 0)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def outlier_scales(act_absmax: np.ndarray, percentile: float = 90.0, strength: float = 0.6) -> np.ndarray:
    """s_j = max(1, max|X_j| / P)^strength, P the ``percentile`` of the channel ranges."""
    a = np.maximum(np.asarray(act_absmax, np.float64), 1e-6)
    return np.maximum(1.0, a / np.percentile(a, percentile)) ** strength


def foldable(site: Site, graph: gs.Graph) -> list[gs.Node] | None:
    """The producer chain that can take 1/s, when every reader of X is smoothed."""
    smoothed = {id(n) for n in site.readers}
    others = [n for n in site.tensor.outputs if id(n) not in smoothed]
    if any(n.op not in SHAPE_ONLY for n in others) or any(t is site.tensor for t in graph.outputs):
        return None
    return producer_chain(site.tensor, graph, site.axis, site.rank, site.channels)


def smooth(site: Site, s: np.ndarray, graph: gs.Graph, names: NameTable, allow_mul: bool = True,
           lineage=None) -> str | None:
    """Make the site's readers take X/s (see the module docstring): "folded", "mul", or None
    (nothing done: no producer takes 1/s and no Mul is allowed). Tensors a fold rescales are
    recorded in ``lineage`` (``onnxopt.pipeline.lineage``) when given."""
    chain = foldable(site, graph)
    if chain is not None:
        renamed = divide_outputs(chain, s, site.axis, site.rank, names)
        if lineage is not None:
            for old, new in renamed:
                lineage.rescaled(old, new, 1.0 / np.asarray(s, np.float64))
        how = "folded"
    elif allow_mul:
        multiply_before(site.tensor, site.readers, s, site.axis, site.rank, graph, names)
        how = "mul"
    else:
        return None
    for node in site.readers:
        scale_inputs(node, s, names)
    return how


def activation_absmax(model, ctx, found: list[Site]) -> tuple[dict[str, np.ndarray], str]:
    """Per site tensor: the largest |x| of each channel over the calibration data, else over
    sample batches made from the input specs; and which data it was."""
    from onnxopt.data.samples import sample_batches
    from onnxopt.data.statistics import Calibration, ChannelMoments
    from onnxopt.errors import OnnxoptError

    if not found:
        return {}, "none"
    calib, source = ctx.calibration, "calibration data"
    if calib is None:
        feeds, source = sample_batches(model, ctx)
        if not feeds:
            return {}, "none"
        calib = Calibration(source=feeds, providers=ctx.providers, threads=ctx.threads)
    try:
        moments = calib.reduce(model, [ChannelMoments(site.tensor.name, axis=site.axis) for site in found])
    except OnnxoptError as exc:  # the model does not run on the samples: no smoothing
        logger.warning("cannot run the model on %s to measure activations (%s); no smoothing", source, exc)
        return {}, "none"
    return {m.taps[0].name: m.abs_max for m in moments if m.count}, source
