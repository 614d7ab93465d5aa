"""Activation capture: run a model over batches with chosen inner tensors as extra outputs.

The one way onnxopt reads activations (statistics for calibration, pruning, low rank,
refit, smoothing): the tensors are added as outputs of a copy of the model (declared by
name only, so any dtype is returned as it is computed), and the copy runs in one
onnxruntime session with the memory arena off, so each batch's activations are freed as
soon as they are reduced and memory stays at one batch however many batches there are.
Only tensors of the main graph can be captured (If/Loop/Scan bodies have no outputs of
their own that a session could return).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.errors import CalibrationError

logger = logging.getLogger(__name__)


def capturable(proto: onnx.ModelProto) -> set[str]:
    """Names a session of ``proto`` can return: graph inputs and outputs of main-graph nodes."""
    names = {i.name for i in proto.graph.input}
    for node in proto.graph.node:
        names.update(o for o in node.output if o)
    return names


class Capture:
    """A session of ``proto`` that returns ``names`` (inner tensors or graph inputs) per batch."""

    def __init__(self, proto: onnx.ModelProto, names: Iterable[str], providers: list[str] | None = None,
                 threads: int = 0, what: str = "the model"):
        names = list(dict.fromkeys(names))
        inputs = {i.name for i in proto.graph.input}
        self.inputs = [n for n in names if n in inputs]  # read from the feeds, not the session
        wanted = [n for n in names if n not in inputs]
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        existing = {o.name for o in copy.graph.output}
        for name in wanted:
            if name not in existing:
                copy.graph.output.add().name = name  # no type: the session returns it as computed
        self.outputs = wanted
        self.what = what
        self.session = None
        if not wanted:  # graph inputs only: they come from the feeds, no session needed
            return
        try:
            # Basic level folds constants but keeps every requested tensor (they are outputs).
            self.session = runtime.session(copy, providers, threads, level="basic", arena=False)
        except runtime.CannotRun as exc:
            raise CalibrationError(f"onnxruntime cannot run {what} to read its activations: {exc}") from None

    def run(self, batch: dict[str, np.ndarray], index: int = 0) -> dict[str, np.ndarray]:
        """The captured tensors for one batch, by name."""
        try:
            values = self.session.run(self.outputs, batch) if self.outputs else []
        except Exception as exc:
            raise CalibrationError(f"onnxruntime could not run {self.what} on batch {index}: "
                                   f"{runtime.first_line(exc)}") from None
        out = dict(zip(self.outputs, values))
        for name in self.inputs:
            out[name] = batch[name]
        return out


def capture(proto: onnx.ModelProto, names: Iterable[str], batches: Iterable[dict],
            providers: list[str] | None = None, threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Per batch, the tensors ``names`` of ``proto`` (one session for all batches)."""
    cap = Capture(proto, names, providers, threads)
    for i, batch in enumerate(batches):
        yield cap.run(batch, i)
