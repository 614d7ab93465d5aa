"""fuse-conv-bn: fold per-channel affine ops into the Conv or ConvTranspose before them.

Rules: ``conv-bn`` (an inference BatchNormalization), ``conv-add`` (an Add of a
per-channel constant, the way Paddle and some exporters write a conv bias), ``conv-mul``
(a Mul by a per-channel or scalar constant, as in PP-OCR's recognizer), ``conv-sub`` and
``conv-div`` (a BatchNormalization that a converter wrote as (x - mean) * s + b, or
/ std), and, on the conv's input side, ``scale-into-conv`` and ``shift-into-conv`` (an
input normalization (x - mean) / std before the first conv; NHWC models once
push-transposes has put their per-channel constants into [1, C, 1, 1] form).

conv-bn
-------
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

conv-add
--------
``Add(conv(x), A)`` where A is constant and broadcasts along the channel axis only (A of
shape [1, C, 1, 1], [C, 1, 1], [1] or a scalar for a 2-D conv) is the conv with bias
``b'[c] = b[c] + A[c]``. The conv output must be read only by the Add, and A must have
the weight's dtype.

conv-mul
--------
``Mul(conv(x), A)`` with A constant per channel (same shapes as for conv-add) is the conv
with ``W'[c] = W[c] * A[c]`` (the output channels' weights, as for conv-bn) and
``b'[c] = b[c] * A[c]``.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxopt.analysis.use_def import is_op, is_present, producer_op, single_use, unused
from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import new_constant
from onnxopt.ir.rewrite import RewritePass, RewriteRule
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

_FLOATS = (np.float16, np.float32, np.float64)


def _check_conv(conv, graph, match) -> str | None:
    """Why ``conv``'s weights cannot absorb a per-channel affine op; on success, stores
    weight, bias (None when absent), group, transposed and channels in ``match``."""
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
    match.update(weight=weight, bias=bias, group=group, transposed=transposed, channels=channels)
    return None


def _set_bias(conv, graph, values: np.ndarray) -> None:
    fused_bias = new_constant(graph, f"{conv.name or conv.outputs[0].name}_bias", values)
    if len(conv.inputs) > 2:
        conv.inputs[2] = fused_bias
    else:
        conv.inputs.append(fused_bias)


def _scale_output_channels(match, s: np.ndarray) -> np.ndarray:
    """The conv weight with every weight of output channel c multiplied by s[c] (float64)."""
    weight, group = match["weight"], match["group"]
    k = weight.shape[2:]
    if match["transposed"]:
        grouped = weight.astype(np.float64).reshape(group, weight.shape[0] // group, weight.shape[1], *k)
        factor = s.reshape(group, 1, weight.shape[1], *([1] * len(k)))
        return (grouped * factor).reshape(weight.shape)
    return weight.astype(np.float64) * s.reshape(-1, *([1] * (weight.ndim - 1)))


def _per_channel_constant(match, tensor) -> str | None:
    """Why ``tensor`` is not a per-channel constant of the conv; else store it as float64."""
    value = constant_value(tensor)
    if value is None:
        return "other operand is not constant"
    weight, channels = match["weight"], match["channels"]
    if value.dtype != weight.dtype:
        return "constant and weight dtypes differ"
    out_rank = weight.ndim  # per channel: at most the conv output's rank, 1 but on axis 1
    if value.ndim > out_rank:
        return "constant has a higher rank than the conv output"
    shape = (1,) * (out_rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return "constant is not per channel"
    match["per_channel"] = np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)
    return None


def _match_conv_operand(node, op: str):
    if not is_op(node, op) or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        conv = producer_op(node, i, "Conv", "ConvTranspose")
        if conv is not None:
            return {"conv": conv, "node": node, "operand": node.inputs[1 - i]}
    return None


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
        problem = _check_conv(conv, graph, match)
        if problem:
            return problem
        channels = match["channels"]
        params = [constant_value(t) for t in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "BatchNormalization parameters are not constant"
        if any(p.dtype.kind != "f" or p.size != channels or p.ndim != 1 for p in params):
            return "BatchNormalization parameters do not match conv output channels"
        match["params"] = params
        return None

    def rewrite(self, match, graph):
        conv, bn = match["conv"], match["bn"]
        weight, channels = match["weight"], match["channels"]
        scale, beta, mean, var = (p.astype(np.float64) for p in match["params"])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = scale / np.sqrt(var + eps)
        bias = np.zeros(channels) if match["bias"] is None else match["bias"].astype(np.float64)
        new_bias = (bias - mean) * s + beta

        new_weight = _scale_output_channels(match, s)
        conv.inputs[1] = new_constant(graph, f"{conv.name or conv.outputs[0].name}_weight", new_weight.astype(weight.dtype))
        _set_bias(conv, graph, new_bias.astype(weight.dtype))
        take_outputs(bn, conv, count=1)
        return None


class _OutputAffine(RewriteRule):
    """Base of the rules folding ``conv <op> constant`` (per output channel) into the conv:
    Add/Sub shift its bias, Mul/Div scale its weights and bias."""

    op: str = ""
    commutes = False  # the conv may be either operand (Add, Mul) or only the first (Sub, Div)
    missing = ""  # the reason when the other operand is not constant

    @property
    def root_ops(self):
        return (self.op,)

    def match(self, node, graph):
        if self.commutes:
            return _match_conv_operand(node, self.op)
        conv = producer_op(node, 0, "Conv", "ConvTranspose") if is_op(node, self.op) and len(node.inputs) == 2 else None
        return None if conv is None else {"conv": conv, "node": node, "operand": node.inputs[1]}

    def check(self, match, model, ctx):
        if constant_value(match["operand"]) is None:
            return self.missing
        problem = _check_conv(match["conv"], match["graph"], match) or _per_channel_constant(match, match["operand"])
        if problem:
            return problem
        scale, shift = self.affine(match["per_channel"])
        if scale is None:
            match.update(scale=None, shift=shift)
            return None
        if not np.all(np.isfinite(scale)):
            return "divisor has a zero"
        weight = _scale_output_channels(match, scale).astype(match["weight"].dtype)
        if not np.all(np.isfinite(weight)):
            return "scaled weights are not finite in the weight's dtype"
        match.update(scale=scale, shift=shift, new_weight=weight)
        return None

    @staticmethod
    def affine(c: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scale, shift) of y = x * scale + shift for ``conv <op> c``."""
        raise NotImplementedError

    def rewrite(self, match, graph):
        conv, weight = match["conv"], match["weight"]
        bias = match["bias"]
        bias = None if bias is None else bias.astype(np.float64)
        if match["scale"] is not None:
            name = conv.name or conv.outputs[0].name
            conv.inputs[1] = new_constant(graph, f"{name}_weight", match["new_weight"])
            bias = None if bias is None else bias * match["scale"]
        if match["shift"] is not None:
            bias = (np.zeros(match["channels"]) if bias is None else bias) + match["shift"]
        if bias is not None:
            _set_bias(conv, graph, bias.astype(weight.dtype))
        take_outputs(match["node"], conv)
        return None


class FoldAddIntoConvBias(_OutputAffine):
    """Conv/ConvTranspose -> Add of a per-channel constant becomes the conv's bias."""

    name, op, commutes, missing = "conv-add", "Add", True, "added tensor is not constant"
    affine = staticmethod(lambda c: (None, c))


class FoldSubIntoConvBias(_OutputAffine):
    """Conv/ConvTranspose -> Sub of a per-channel constant becomes the conv's bias."""

    name, op, missing = "conv-sub", "Sub", "subtracted tensor is not constant"
    affine = staticmethod(lambda c: (None, -c))


class FoldMulIntoConv(_OutputAffine):
    """Conv/ConvTranspose -> Mul by a per-channel constant scales the conv's weights and bias."""

    name, op, commutes, missing = "conv-mul", "Mul", True, "multiplier is not constant"
    affine = staticmethod(lambda c: (c, None))


class FoldDivIntoConv(_OutputAffine):
    """Conv/ConvTranspose -> Div by a per-channel constant scales the conv's weights and bias by 1/c."""

    name, op, missing = "conv-div", "Div", "divisor is not constant"

    @staticmethod
    def affine(c):
        with np.errstate(divide="ignore"):
            return 1.0 / c, None


def _input_channels(match) -> tuple[int, int]:
    """(input channels, input channels per group) of the Conv in ``match``."""
    weight, group = match["weight"], match["group"]
    return weight.shape[1] * group, weight.shape[1]


def _per_input_channel(conv, operand, graph, match, model, ctx) -> str | None:
    """Why ``operand`` is not a constant per input channel of ``conv``; else stored (float64)."""
    value = constant_value(operand)
    if value is None:
        return "other operand is not constant"
    weight = match["weight"]
    if value.dtype != weight.dtype:
        return "constant and weight dtypes differ"
    cin, _ = _input_channels(match)
    rank = weight.ndim
    if value.ndim > rank:
        return "constant has a higher rank than the conv input"
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, cin):
        return "constant is not per input channel"
    match["per_channel"] = np.broadcast_to(value.reshape(-1), (cin,)).astype(np.float64)
    return None


def _columns(match, per_input: np.ndarray) -> np.ndarray:
    """per_input[c] laid out like the weight: element [o, j] is per_input of the input
    channel that weight column j of output o reads (groups included)."""
    weight, group = match["weight"], match["group"]
    cout, per_group = weight.shape[0], weight.shape[1]
    groups_of_out = np.arange(cout) // (cout // group)
    channel = groups_of_out[:, None] * per_group + np.arange(per_group)[None, :]
    return per_input[channel].reshape(cout, per_group, *([1] * (weight.ndim - 2)))


class _InputAffine(RewriteRule):
    """Base of the rules folding an elementwise op with a per-channel constant before a Conv."""

    root_ops = ("Conv",)
    ops: tuple[str, ...] = ()

    def match(self, node, graph):
        if not is_op(node, "Conv") or not node.inputs:
            return None
        prod = producer_op(node, 0, *self.ops)
        if prod is None or len(prod.inputs) != 2:
            return None
        for i in (0, 1):
            if constant_value(prod.inputs[i]) is not None and constant_value(prod.inputs[1 - i]) is None:
                if prod.op in ("Sub", "Div") and i == 0:
                    return None  # c - x, c / x are not affine in x the same way
                return {"conv": node, "node": prod, "x": prod.inputs[1 - i], "operand": prod.inputs[i]}
        return None

    def check(self, match, model, ctx):
        from onnxopt.analysis.shapes import known_shape

        conv, node, graph = match["conv"], match["node"], match["graph"]
        if not single_use(node.outputs[0], graph):
            return "the elementwise output has other readers"
        weight = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None or weight.dtype not in _FLOATS or weight.ndim < 3:
            return "conv weight is not a constant float tensor"
        group = int(conv.attrs.get("group", 1))
        bias = constant_value(conv.inputs[2]) if is_present(conv, 2) else None
        if is_present(conv, 2) and bias is None:
            return "conv bias is not constant"
        match.update(weight=weight, group=group, bias=bias, channels=weight.shape[0], transposed=False)
        problem = _per_input_channel(conv, match["operand"], graph, match, model, ctx)
        if problem:
            return problem
        shape = known_shape(match["x"], model, ctx)
        cin, _ = _input_channels(match)
        if shape is None or len(shape) != weight.ndim or shape[1] != cin:
            return "the elementwise input is not known to have the conv's input channels"
        return self.check_more(match)

    def check_more(self, match) -> str | None:
        return None


class FoldScaleIntoConvInput(_InputAffine):
    """Conv(x * s) with s per input channel: the weights of channel c scale by s[c]
    (exact with zero padding: 0 * s = 0)."""

    name = "scale-into-conv"
    ops = ("Mul", "Div")

    def check_more(self, match):
        s = match["per_channel"]
        if match["node"].op == "Div":
            if not np.all(s != 0):
                return "divisor has a zero"
            s = 1.0 / s
        match["per_channel"] = s
        weight = (match["weight"].astype(np.float64) * _columns(match, s)).astype(match["weight"].dtype)
        if not np.all(np.isfinite(weight)):
            return "scaled weights are not finite in the weight's dtype"
        match["new_weight"] = weight
        return None

    def rewrite(self, match, graph):
        conv = match["conv"]
        name = conv.name or conv.outputs[0].name
        conv.inputs[0] = match["x"]
        conv.inputs[1] = new_constant(graph, f"{name}_weight", match["new_weight"])
        return None


class FoldShiftIntoConvInput(_InputAffine):
    """Conv(x + t) with t per input channel and no padding: the bias gains sum(W * t)
    (with padding the border would see 0 instead of t: refused)."""

    name = "shift-into-conv"
    ops = ("Add", "Sub")

    def check_more(self, match):
        conv = match["conv"]
        auto_pad = conv.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID") or any(int(p) for p in conv.attrs.get("pads", []) or []):
            return "the conv pads its input (the border would not see the shift)"
        t = match["per_channel"] * (-1.0 if match["node"].op == "Sub" else 1.0)
        weight = match["weight"].astype(np.float64)
        shift = (weight * _columns(match, t)).reshape(weight.shape[0], -1).sum(axis=1)
        bias = np.zeros(weight.shape[0]) if match["bias"] is None else match["bias"].astype(np.float64)
        new_bias = (bias + shift).astype(match["weight"].dtype)
        if not np.all(np.isfinite(new_bias)):
            return "shifted bias is not finite in the weight's dtype"
        match["new_bias"] = new_bias
        return None

    def rewrite(self, match, graph):
        conv = match["conv"]
        conv.inputs[0] = match["x"]
        _set_bias(conv, graph, match["new_bias"])
        return None


@register_pass("fuse-conv-bn")
class FuseConvBnPass(RewritePass):
    """Fold inference BatchNormalization and per-channel constant Add/Sub/Mul/Div into the Conv before or after them."""

    lossless = True
    requires_ops = frozenset({"Conv", "ConvTranspose"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the conv writes the folded op's tensor
    rules = (FoldBatchNormIntoConv(), FoldAddIntoConvBias(), FoldSubIntoConvBias(), FoldMulIntoConv(),
             FoldDivIntoConv(), FoldScaleIntoConvInput(), FoldShiftIntoConvInput())
