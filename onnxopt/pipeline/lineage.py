"""Lineage: which layers an earlier lossy pass changed, what they were, and who teaches them.

A lossy pass that rewrites a layer's weight (quantization stores integer codes; pruning and
low rank, in their own passes, store a smaller or factorized weight) records what it did
in ``ctx.lineage``, keyed by the name of the weight tensor it wrote:

    ctx.lineage.record(codes_name, Origin("quantized", output=node.outputs[0].name,
                                          weight=float_weight, bias=float_bias))

A later pass (``refit``) finds the layers whose current weight tensor has a record: a
record whose tensor is no longer in the graph (the pass was rolled back, the floor gave the
layer back) is never looked up, and a pass run again writes its records again, so stale
records do no harm. The record keeps the layer's float weight and bias from just before
the change, as the op stored them (what error-compensating rounding starts from).

The teacher of a layer is the reference model's tensor (the model as loaded) with the
layer's output name: lossless passes keep the names of the tensors they rewire (a
Conv+BatchNormalization folded into one Conv writes the BatchNormalization's output), so the
name is the layer's identity across the pipeline. One exception is resolved here: static
quantization folds a Relu or Clip(0, c) into the quantized output of the layer before it,
which then writes the activation's output name; its teacher is the activation's input.
And lossless passes that rescale a tensor per channel (equalize, smooth-quant) rename it and
record how it relates to the original (``Lineage.rescaled``): its teacher is the original
tensor times the recorded factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# Activations a quantization pass may fold into the layer before it (the layer then writes
# the activation's output name).
FOLDED_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class Origin:
    """What a lossy pass did to one layer."""

    kind: str  # "quantized" (the pruning and low-rank passes add their own kinds)
    output: str  # the layer's output tensor when the pass changed it
    weight: np.ndarray | None = None  # the float weight just before the change, as stored
    bias: np.ndarray | None = None  # the float bias just before the change (None: none)


class Lineage:
    """Records of layers changed by lossy passes, by the name of the weight tensor written;
    and of tensors that lossless passes rescaled per channel (equalize, smooth-quant), by
    their new name."""

    def __init__(self):
        self._records: dict[str, Origin] = {}
        self._rescaled: dict[str, tuple[str, np.ndarray]] = {}

    def rescaled(self, old: str, new: str, factor: np.ndarray | None) -> None:
        """Tensor ``new`` holds tensor ``old`` with channel c multiplied by ``factor[c]`` (along
        the channel axis of the layer that writes it); ``factor`` None: a plain rename."""
        base, before = self._rescaled.get(old, (old, None))
        if factor is None:
            self._rescaled[new] = (base, before)
            return
        factor = np.asarray(factor, np.float64)
        self._rescaled[new] = (base, factor if before is None else before * factor)

    def original(self, name: str) -> tuple[str, np.ndarray | None]:
        """(the name the tensor had in the original model, the per-channel factor it carries
        since, or None when it carries the original values)."""
        return self._rescaled.get(name, (name, None))

    def record(self, tensor: str, origin: Origin) -> None:
        self._records[tensor] = origin

    def origin(self, tensor: str) -> Origin | None:
        return self._records.get(tensor)

    def move(self, old: str, new: str) -> None:
        """The layer's weight tensor was written again under a new name (a refit)."""
        if old in self._records:
            self._records[new] = self._records.pop(old)

    def __len__(self) -> int:
        return len(self._records)


class Teacher:
    """The reference model's tensors, looked up by a student layer's output name."""

    def __init__(self, proto: onnx.ModelProto):
        self._producer: dict[str, onnx.NodeProto] = {}
        for node in proto.graph.node:
            for out in node.output:
                if out:
                    self._producer[out] = node

    def tensor(self, output: str, lineage: Lineage | None = None) -> tuple[str, np.ndarray | None] | None:
        """(the reference tensor a layer writing ``output`` must reproduce, the per-channel
        factor to apply to it or None), or None when the reference has no such tensor (a
        name the pipeline made up)."""
        name, factor = lineage.original(output) if lineage is not None else (output, None)
        node = self._producer.get(name)
        if node is None:
            return None
        if node.op_type in FOLDED_ACTIVATIONS and node.domain in ("", "ai.onnx") and node.input:
            # a Relu/Clip(0, c) folded by quantization commutes with a positive factor too
            return (node.input[0], factor) if node.input[0] in self._producer else None
        return name, factor
