"""smooth-quant: move activation outliers into the weights that read them (SmoothQuant), exact in float.

For every activation read by MatMul/Gemm (and one-group Conv) layers with constant
weights, channel j is divided by s_j = max|X_j|^α / max|W_j|^(1−α) and the readers' weights
multiplied back (``onnxopt.quantization.smoothing``): the activation's outlier channels
shrink toward the others, so one int8 scale per tensor loses less, while the weights,
quantized per output channel, take the growth. 1/s is folded into the producer's constants
(LayerNormalization, a linear layer and its bias, BatchNormalization, through Relu,
LeakyRelu, PRelu) when every reader of the activation is smoothed; ``insert_mul`` allows a
Mul by 1/s elsewhere (worth it before dynamic quantization, not before static int8, whose
Q/DQ would read the Mul's unsmoothed input). Channel ranges come from the calibration data,
else from sample inputs made from the input specs. Run it before quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxopt.ir.names import NameTable
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass
from onnxopt.quantization.smoothing import activation_absmax, foldable, sites, smooth, smoothquant_scales

logger = logging.getLogger(__name__)


@register_pass("smooth-quant")
class SmoothQuantPass(Pass):
    """Move activation outliers into the weights of the MatMul/Gemm/Conv reading them (SmoothQuant; exact in float)."""

    lossless = True

    @dataclass
    class Options:
        alpha: float = option(0.5, "migration strength: s = max|X|^alpha / max|W|^(1-alpha)")
        op_types: list[str] = option(["MatMul", "Gemm", "Conv"], "readers to smooth into (Conv: one group only)")
        insert_mul: bool = option(False, "where no producer can take 1/s, insert a Mul (costs a pass over the "
                                         "activation; pays before dynamic quantization, not before static)")
        min_outlier: float = option(4.0, "smooth an activation only when its largest channel range is at least "
                                         "this many times the median one (0: every activation)")

    def run(self, model, ctx) -> PassResult:
        o = self.options
        unknown = set(o.op_types) - {"MatMul", "Gemm", "Conv"}
        if unknown:
            from onnxopt.errors import PipelineError

            raise PipelineError(f"smooth-quant: cannot smooth into {', '.join(sorted(unknown))} "
                                "(op_types takes MatMul, Gemm, Conv)")
        graph = model.graph
        found = sites(graph, ctx.analysis("shapes", model), tuple(o.op_types))
        if not o.insert_mul:
            found = [site for site in found if foldable(site, graph) is not None]
        amax, source = activation_absmax(model, ctx, found)
        names = NameTable.of(graph)
        done = {"folded": 0, "mul": 0}
        for site in found:
            a = amax.get(site.tensor.name)
            if a is None or a.size != site.channels or not np.any(a > 0):
                continue
            if o.min_outlier and a.max() < o.min_outlier * max(float(np.median(a)), 1e-12):
                continue
            s = smoothquant_scales(a, site, o.alpha)
            if np.all(np.abs(np.log(s)) < 1e-3):  # balanced already (a second run computes s = 1)
                continue
            how = smooth(site, s, graph, names, o.insert_mul, ctx.lineage)
            if how:
                done[how] += 1
        changed = done["folded"] + done["mul"] > 0
        stats = {"sites": len(found), "smoothed_folded": done["folded"], "smoothed_mul": done["mul"],
                 "data": source}
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=changed, stats=stats)
