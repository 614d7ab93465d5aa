"""fuse-conv-bn: fold an inference BatchNormalization into the Conv or ConvTranspose before it.

BatchNormalization in inference form computes, per channel c,

    y[c] = scale[c] * (x[c] - mean[c]) / sqrt(var[c] + epsilon) + B[c]

and is affine in x: with ``s[c] = scale[c] / sqrt(var[c] + epsilon)``,
``y[c] = s[c] * x[c] + (B[c] - s[c] * mean[c])``. When x is a convolution
``x[c] = (W * in)[c] + b[c]``, the BN folds into the convolution:

    W'[c] = W[c] * s[c]                  (every weight that writes output channel c)
    b'[c] = (b[c] - mean[c]) * s[c] + B[c]   (b = 0 when the conv has no bias)

Which weights write output channel c depends on the op:

- Conv: W is [C_out, C_in/group, k...]; output channel c is W[c], for any group.
- ConvTranspose: W is [C_in, C_out/group, k...]; output channel c = g * (C_out/group) + j
  is written by W[g*C_in/group:(g+1)*C_in/group, j]. Seen as [group, C_in/group,
  C_out/group, k...], the scale is s reshaped to [group, 1, C_out/group, 1...].

The arithmetic runs in float64 and the results are cast back to the weight's dtype, so
float16 and double models keep their types. Applies to 1-D, 2-D and 3-D convolutions.
Required: constant weight, bias and BN parameters of length C_out; the conv output read
only by the BN; the BN in inference form (no training_mode, spatial=1, extra outputs
unused). Shared weights are never modified: the fused conv gets new initializers.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxopt.analysis.use_def import is_op
from onnxopt.registry import register_pass
from onnxopt.rewrite import (RewritePass, RewriteRule, constant_value, is_present, new_constant,
                             producer_op, single_use, take_outputs, unused)

logger = logging.getLogger(__name__)

_FLOATS = (np.float16, np.float32, np.float64)


class FoldBatchNormIntoConv(RewriteRule):
    """Conv/ConvTranspose -> BatchNormalization becomes one conv with scaled weights."""

    name = "conv-bn"
    root_ops = ("BatchNormalization",)

    def match(self, node, graph):
        if not is_op(node, "BatchNormalization") or len(node.inputs) != 5:
            return None
        conv = producer_op(node, 0, "Conv", "ConvTranspose")
        if conv is None:
            return None
        return {"conv": conv, "bn": node}

    def check(self, match, model, ctx):
        conv, bn, graph = match["conv"], match["bn"], match["graph"]
        if bn.attrs.get("training_mode", 0) or not bn.attrs.get("spatial", 1) or not bn.attrs.get("is_test", 1):
            return "BatchNormalization is not in inference form"
        if any(not unused(t, graph) for t in bn.outputs[1:]):
            return "BatchNormalization training outputs are used"
        if len(conv.outputs) != 1 or not single_use(conv.outputs[0], graph):
            return "conv output has other consumers"
        weight = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None:
            return "conv weight is not constant"
        if weight.dtype not in _FLOATS:
            return f"conv weight dtype {weight.dtype} is not a float type"
        if weight.ndim < 3:
            return "conv weight rank below 3"
        group = int(conv.attrs.get("group", 1))
        transposed = conv.op == "ConvTranspose"
        channels = weight.shape[1] * group if transposed else weight.shape[0]
        if transposed and weight.shape[0] % group:
            return "ConvTranspose weight does not split into groups"
        bias = None
        if is_present(conv, 2):
            bias = constant_value(conv.inputs[2])
            if bias is None:
                return "conv bias is not constant"
            if bias.shape != (channels,):
                return "conv bias shape does not match output channels"
        params = [constant_value(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "BatchNormalization parameters are not constant"
        if any(p.dtype.kind != "f" or p.size != channels or p.ndim != 1 for p in params):
            return "BatchNormalization parameters do not match conv output channels"
        match.update(weight=weight, bias=bias, params=params, group=group, transposed=transposed,
                     channels=channels)
        return None

    def rewrite(self, match, graph):
        conv, bn = match["conv"], match["bn"]
        weight, group, channels = match["weight"], match["group"], match["channels"]
        scale, beta, mean, var = (p.astype(np.float64) for p in match["params"])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = scale / np.sqrt(var + eps)
        bias = np.zeros(channels) if match["bias"] is None else match["bias"].astype(np.float64)
        new_bias = (bias - mean) * s + beta

        k = weight.shape[2:]
        if match["transposed"]:
            grouped = weight.astype(np.float64).reshape(group, weight.shape[0] // group, weight.shape[1], *k)
            factor = s.reshape(group, 1, weight.shape[1], *([1] * len(k)))
            new_weight = (grouped * factor).reshape(weight.shape)
        else:
            new_weight = weight.astype(np.float64) * s.reshape(-1, *([1] * (weight.ndim - 1)))

        base = conv.name or bn.outputs[0].name
        conv.inputs[1] = new_constant(graph, f"{base}_bn_weight", new_weight.astype(weight.dtype))
        fused_bias = new_constant(graph, f"{base}_bn_bias", new_bias.astype(weight.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = fused_bias
        else:
            conv.inputs.append(fused_bias)
        take_outputs(bn, conv, count=1)
        return None


@register_pass("fuse-conv-bn")
class FuseConvBnPass(RewritePass):
    """Fold inference BatchNormalization into the preceding Conv/ConvTranspose weights."""

    lossless = True
    rules = (FoldBatchNormIntoConv(),)
