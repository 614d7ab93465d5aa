"""equalize: cross-layer equalization of weight ranges (DFQ, Nagel et al. ICCV'19), lossless.

For two layers joined through an activation that commutes with positive per-channel
scaling (Relu, LeakyRelu, PRelu; or none), W1 → f → W2, output channel c of the first can
be divided by s_c and input channel c of the second multiplied by s_c with no change to
the outputs: f(x/s) = f(x)/s. With s_c = sqrt(r1_c / r2_c), r1_c the largest |w| of the
first layer's output channel c and r2_c of what the second layer multiplies input channel
c with, both ranges become sqrt(r1_c · r2_c): per-tensor int8 weights then lose less on the
channels that had a small range (MobileNet-style depthwise layers are the worst case).
Pairs are Conv/Gemm/MatMul (a bias Add after a MatMul included) into Conv (one group,
grouped or depthwise)/Gemm/MatMul; the tensor between them must have one reader. Chains of
three or more layers (conv → depthwise → conv) are balanced by sweeping the pairs until
the scales settle. Run it after fuse-conv-bn (a BatchNormalization between the layers ends
a pair) and before quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxopt.ir.names import NameTable
from onnxopt.ir.rescale import (divide_outputs, input_axis, input_channels, input_range, output_range,
                                 producer_chain, scale_inputs)
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


@register_pass("equalize")
class EqualizePass(Pass):
    """Balance weight ranges of consecutive layers through Relu/LeakyRelu/PRelu (cross-layer equalization; lossless)."""

    lossless = True

    @dataclass
    class Options:
        sweeps: int = option(20, "passes over the pairs of a chain (three or more layers) until the scales settle")
        tolerance: float = option(1e-3, "stop sweeping when every scale is within this of 1")
        max_scale: float = option(1e4, "bound on one channel's scale (and its inverse): a channel with no "
                                       "weight on one side is left alone")

    def _pairs(self, model, ctx) -> list[tuple[list, object, object, int, int | None, int]]:
        """(producer chain, reader node, tensor between, axis, rank, channels) of every pair."""
        graph = model.graph
        shapes = ctx.analysis("shapes", model)
        outputs = {id(t) for t in graph.outputs}
        pairs = []
        for node in graph.nodes:
            if not node.inputs:
                continue
            x = node.inputs[0]
            axis = input_axis(node, x)
            if axis is None or len(x.outputs) != 1 or id(x) in outputs:
                continue
            info = shapes.get(x.name)
            rank = len(info.shape) if info is not None and info.shape is not None else (
                len(x.shape) if x.shape is not None else None)
            channels = input_channels(node)
            if channels is None:
                continue
            chain = producer_chain(x, graph, axis, rank, channels)
            if chain is None or chain[-1].op not in ("Conv", "Gemm", "MatMul"):
                continue
            pairs.append((chain, node, x, axis, rank, channels))
        return pairs

    def run(self, model, ctx) -> PassResult:
        pairs = self._pairs(model, ctx)
        if not pairs:
            return PassResult(changed=False, stats={"pairs": 0})
        names = NameTable.of(model.graph)
        o = self.options
        total = np.zeros(0)
        sweeps = 0
        for sweeps in range(1, max(1, o.sweeps) + 1):
            worst = 0.0
            for chain, reader, _, axis, rank, channels in pairs:
                r1, r2 = output_range(chain[-1]), input_range(reader, channels)
                if r1 is None or r2 is None:
                    continue
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones(channels)
                s[ok] = np.sqrt(r1[ok] / r2[ok])
                s = np.clip(s, 1.0 / o.max_scale, o.max_scale)
                if np.all(np.abs(s - 1.0) <= o.tolerance):
                    continue
                for old, new in divide_outputs(chain, s, axis, rank, names):
                    ctx.lineage.rescaled(old, new, 1.0 / s)
                scale_inputs(reader, s, names)
                worst = max(worst, float(np.max(np.abs(np.log(s)))))
                total = np.append(total, s)
            if worst <= np.log1p(o.tolerance):
                break
        changed = total.size > 0
        stats = {"pairs": len(pairs), "sweeps": sweeps}
        if changed:  # the largest factor one step applied to a channel
            stats["largest_scale"] = round(float(np.exp(np.max(np.abs(np.log(total))))), 3)
        return PassResult(changed=changed, stats=stats)
