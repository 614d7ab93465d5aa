"""align-channels: pad a layer's output channels with zero channels up to the target's multiple.

Hardware that computes channels in blocks (an NPU's 32-wide vector depth, a GPU's tensor cores
in groups of 8) pads a layer with an unaligned number of output channels anyway; the target
says so with ``capabilities.aligned_channels`` and ``channel_multiple``, and `onnxopt check`
reports such layers. This
pass makes the padding part of the model, exactly: the producer (Conv, ConvTranspose, Gemm, or
MatMul with a constant 2-D weight) gets zero filters and zero biases, the ops between it and
the next weight layers get their per-channel parameters padded (BatchNormalization with scale
1, mean 0, variance 1; Add/Sub with 0; Mul/Div with 1; PRelu with 0; a depthwise Conv with
zero filters and more groups), and the next weight layers (Conv, ConvTranspose, Gemm, MatMul)
read the new channels with zero weights. Whatever the ops in between make of a zero channel
(Sigmoid gives 0.5), a zero weight ignores it, so the outputs are those of the original.

Add, Sub and Mul of two tensors that both carry the padded channels (hard-swish's
x * hardsigmoid(x)) are followed too. A layer is left alone (and counted in ``skipped``, by
reason) when its channels reach a graph output (the interface fixes them), meet another
branch (a residual Add of another layer's output), or pass an op outside the list above
(Concat, Reshape, …), where padding would need more than this layer padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.surgery import topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

# Ops that work on each channel alone and take no per-channel parameter.
CHANNELWISE = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
                         "Selu", "Celu", "Softplus", "Mish", "Gelu", "Identity", "MaxPool", "AveragePool",
                         "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Neg", "Abs"})
# Binary ops with a constant operand, and the value that pads that operand's channel axis.
PAD_VALUE = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0, "PRelu": 0.0}
BATCHNORM_PAD = (1.0, 0.0, 0.0, 1.0)  # scale, bias, mean, variance: a zero channel stays zero


@dataclass
class Region:
    """What padding one layer's output channels touches."""

    producer: gs.Node
    channels: int
    axis: int  # the channel axis of the tensors below the producer
    tensors: list[gs.Tensor] = field(default_factory=list)
    params: list[tuple[gs.Node, int, float, int]] = field(default_factory=list)  # (node, input, pad, axis)
    depthwise: list[gs.Node] = field(default_factory=list)
    readers: list[tuple[gs.Node, int]] = field(default_factory=list)  # (weight layer, axis of its weight)
    # other operands of Add/Sub/Mul nodes in the region: they must be in the region too (the
    # x * hardsigmoid(x) of hard-swish), else the other branch would need padding as well
    partners: list[tuple[gs.Node, gs.Tensor]] = field(default_factory=list)


def _const(t: gs.Tensor) -> np.ndarray | None:
    return constant_value(t) if isinstance(t, gs.Constant) else None


def _rank(t: gs.Tensor, shapes: dict) -> int | None:
    info = shapes.get(t.name)
    if info is not None and info.shape is not None:
        return len(info.shape)
    return len(t.shape) if t.shape is not None else None


def _producer_axes(node: gs.Node) -> tuple[int, int] | None:
    """(axis of the weight holding output channels, channel axis of the output) for a layer
    whose outputs can be padded, else None."""
    if node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    w = _const(node.inputs[1])
    if w is None:
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and w.ndim >= 3:
        return 0, 1
    if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) == 1 and w.ndim >= 3:
        return 1, 1
    if node.op == "Gemm" and w.ndim == 2:
        return (0 if int(node.attrs.get("transB", 0)) else 1), 1
    if node.op == "MatMul" and w.ndim == 2:
        return 1, -1
    return None


@register_pass("align-channels")
class AlignChannelsPass(Pass):
    """Pad layers' output channels with zero channels to the target's channel_multiple (exact)."""

    lossless = True

    @dataclass
    class Options:
        multiple: int = option(0, "channel multiple (0 = the target's capabilities.channel_multiple when "
                                  "the target needs aligned channels: capabilities.aligned_channels)")
        max_growth: float = option(2.0, "leave a layer alone if padding would grow its channels more than this")

    def run(self, model, ctx) -> PassResult:
        caps = ctx.target.capabilities
        multiple = self.options.multiple or (int(caps.get("channel_multiple", 1) or 1)
                                             if caps.get("aligned_channels") else 1)
        if multiple <= 1:
            return PassResult(changed=False, stats={"skipped": "the target needs no aligned channels "
                                                              "(capabilities.aligned_channels)"})
        graph = model.graph
        shapes = ctx.analysis("shapes", model)
        names = NameTable.of(graph)
        padded, added = 0, 0
        skipped: dict[str, int] = {}
        for node in topological_order(graph):
            axes = _producer_axes(node)
            if axes is None:
                continue
            channels = int(_const(node.inputs[1]).shape[axes[0]])
            if channels % multiple == 0:
                continue
            target = -(-channels // multiple) * multiple
            region = self._region(graph, node, channels, axes[1], shapes)
            if isinstance(region, Region) and target > channels * self.options.max_growth:
                region = f"would grow {channels} channels to {target}"
            if not isinstance(region, Region):
                skipped[region] = skipped.get(region, 0) + 1
                continue
            self._pad(region, axes[0], target, names)
            padded += 1
            added += target - channels
        if padded:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=padded > 0, stats={"multiple": multiple, "layers_padded": padded,
                                                     "channels_added": added, "skipped": skipped})

    # -- which nodes see the channels ------------------------------------------------------------
    def _region(self, graph: gs.Graph, producer: gs.Node, channels: int, axis: int, shapes: dict) -> Region | str:
        """The nodes padding ``producer`` touches, or why it cannot be padded."""
        out = producer.outputs[0]
        rank = _rank(out, shapes)
        if rank is None and producer.op in ("Conv", "ConvTranspose", "Gemm"):
            rank = 2 if producer.op == "Gemm" else len(_const(producer.inputs[1]).shape)
        if rank is None or rank < 2:
            return "output rank unknown"
        axis = axis % rank
        region = Region(producer, channels, axis)
        outputs = {id(t) for t in graph.outputs}
        todo, seen = [out], set()
        while todo:
            t = todo.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in outputs:
                return "reaches a graph output"
            if _rank(t, shapes) not in (None, rank):  # the ops followed keep the rank
                return "changes rank"
            region.tensors.append(t)
            for reader in t.outputs:
                index = [i for i, x in enumerate(reader.inputs) if x is t]
                step = None
                if reader.domain in (None, "", "ai.onnx") and (len(index) == 1 or reader.op in ("Add", "Mul")):
                    step = self._follow(reader, index[0], region, rank)  # x*x: both operands in the region
                if step is None:
                    return f"passes {reader.op}"
                todo.extend(step)
        inside = {id(t) for t in region.tensors}
        for node, other in region.partners:
            if id(other) not in inside:
                return f"passes {node.op} with another branch"
        return region if region.readers else "read by no weight layer"

    def _follow(self, node: gs.Node, index: int, region: Region, rank: int) -> list[gs.Tensor] | None:
        """Record what ``node`` needs padded when its input ``index`` grows channels; the
        tensors the channels flow on to (empty for a weight layer that reads them); None when
        the node cannot take padded channels."""
        c, axis = region.channels, region.axis
        first = [node.outputs[0]] if node.outputs else []
        if index != 0 and node.op not in ("Add", "Mul"):
            return None
        if node.op in CHANNELWISE:
            if node.op in ("MaxPool", "Dropout") and len(node.outputs) > 1 and node.outputs[1].outputs:
                return None  # indices / mask would change meaning
            if node.op == "Clip" and any(len(t.name) and _const(t) is None for t in node.inputs[1:]):
                return None
            return first
        if node.op == "BatchNormalization" and axis == 1 and len(node.outputs) == 1:
            if any(_const(t) is None or _const(t).shape != (c,) for t in node.inputs[1:5]):
                return None
            region.params += [(node, i, v, 0) for i, v in zip(range(1, 5), BATCHNORM_PAD)]
            return first
        if node.op in ("Add", "Sub", "Mul") and len(node.inputs) == 2 and _const(node.inputs[1 - index]) is None:
            region.partners.append((node, node.inputs[1 - index]))  # must carry these channels too
            return first
        if node.op in PAD_VALUE:
            other = 1 - index
            value = _const(node.inputs[other]) if len(node.inputs) == 2 else None
            if value is None or (node.op == "Div" and index != 0) or (node.op == "PRelu" and index != 0):
                return None
            lead = rank - value.ndim  # numpy broadcasting aligns the constant on the right
            if value.ndim > rank:
                return None
            if axis - lead >= 0 and value.shape[axis - lead] == c:
                region.params.append((node, other, PAD_VALUE[node.op], axis - lead))
            elif axis - lead >= 0 and value.shape[axis - lead] != 1:
                return None
            return first
        if node.op == "Conv" and axis == 1:
            w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None:
                return None
            group = int(node.attrs.get("group", 1))
            if group == 1 and w.shape[1] == c:
                region.readers.append((node, 1))
                return []
            if group == c and w.shape[0] == c and w.shape[1] == 1:
                region.depthwise.append(node)
                return first
            return None
        if node.op == "ConvTranspose" and axis == 1 and int(node.attrs.get("group", 1)) == 1:
            w = _const(node.inputs[1])
            if w is None or w.shape[0] != c:
                return None
            region.readers.append((node, 0))
            return []
        if node.op == "Gemm" and axis == 1 and not int(node.attrs.get("transA", 0)):
            w = _const(node.inputs[1])
            transposed = int(node.attrs.get("transB", 0))
            if w is None or w.ndim != 2 or w.shape[1 if transposed else 0] != c:
                return None
            region.readers.append((node, 1 if transposed else 0))
            return []
        if node.op == "MatMul" and axis == rank - 1:
            w = _const(node.inputs[1])
            if w is None or w.ndim != 2 or w.shape[0] != c:
                return None
            region.readers.append((node, 0))
            return []
        return None

    # -- the padding ------------------------------------------------------------------------------
    def _pad(self, region: Region, weight_axis: int, target: int, names: NameTable) -> None:
        extra = target - region.channels
        producer = region.producer

        def padded(t: gs.Tensor, axis: int, value: float = 0.0) -> gs.Constant:
            v = np.asarray(_const(t))
            widths = [(0, 0)] * v.ndim
            widths[axis] = (0, extra)
            return new_constant(names, t.name or "w", np.pad(v, widths, constant_values=v.dtype.type(value)))

        producer.inputs[1] = padded(producer.inputs[1], weight_axis)
        if len(producer.inputs) > 2 and producer.inputs[2].name:
            bias = np.asarray(_const(producer.inputs[2]))
            if bias.ndim >= 1 and bias.shape[-1] == region.channels:
                producer.inputs[2] = padded(producer.inputs[2], bias.ndim - 1)
        for node, index, value, axis in region.params:
            node.inputs[index] = padded(node.inputs[index], axis, value)
        for node in region.depthwise:
            node.inputs[1] = padded(node.inputs[1], 0)
            if len(node.inputs) > 2 and node.inputs[2].name:
                node.inputs[2] = padded(node.inputs[2], 0)
            node.attrs["group"] = target
        for node, axis in region.readers:
            node.inputs[1] = padded(node.inputs[1], axis)
        for t in region.tensors:
            if t.shape is not None and len(t.shape) > region.axis and isinstance(t.shape[region.axis], int):
                shape = list(t.shape)
                shape[region.axis] = target
                t.shape = shape
