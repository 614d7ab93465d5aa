"""The `shapes` analysis: ONNX shape inference on the current graph, as a name -> info map.

Shapes are inferred with onnx's own inference (with data propagation, so shapes computed
from constant tensors are known) on an export of the graph as it is now. Nothing is
written back into the graph: a pass that wants a shape reads it from here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.pipeline.context import register_analysis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype | None
    shape: tuple | None  # ints for known dims, str for symbolic ones, None for unknown

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def is_static(shape) -> bool:
    """A known shape whose every dim is a number (not a symbol, not -1 or unknown)."""
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


@functools.lru_cache(maxsize=None)
def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, TypeError, ValueError):
        return None


def _info(type_proto: onnx.TypeProto) -> TensorInfo | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    dtype = _np_dtype(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tt.shape.dim)
    return TensorInfo(dtype, shape)


def _longest_vector(graph: onnx.GraphProto) -> int:
    """Length of the longest rank-1 tensor with a static length in ``graph``'s value_info."""
    longest = 0
    for value in graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value"):
            longest = max(longest, dims[0].dim_value)
    return longest


# Tensors larger than this lose their data in the copy that shape inference sees (their
# type and dims stay): inference only needs their shapes, and copying a model's weights into
# onnx's C++ side would cost more than the inference itself. Small ones keep their data,
# which data propagation reads (Reshape targets, Slice bounds, …).
_KEEP_DATA_BYTES = 4096
# Longest static rank-1 tensor for which data propagation is allowed (see ``infer``).
_MAX_PROPAGATED_LENGTH = 1 << 16


def light_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose large tensors (initializers and Constant values, subgraphs
    included) keep their name, type and dims but not their data. The weights' bytes are
    never copied: they are moved aside while the rest is copied, then put back."""
    from onnxopt.ir.storage import model_tensors

    large = [t for t in model_tensors(proto) if t.HasField("raw_data") and len(t.raw_data) > _KEEP_DATA_BYTES]
    saved = [t.raw_data for t in large]
    try:
        for t in large:
            t.ClearField("raw_data")
        light = onnx.ModelProto()
        light.CopyFrom(proto)
    finally:
        for t, data in zip(large, saved):
            t.raw_data = data
    return light


def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``light_copy(proto)`` with inferred shapes in its value_info: onnx's shape inference,
    with data propagation (shapes computed from constant tensors) unless some rank-1 tensor
    is so long that propagating it would exhaust memory (a Range or Tile of 2**40
    elements); best effort: what cannot be inferred stays as declared."""
    light = light_copy(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
        longest = _longest_vector(inferred.graph)
        if longest <= _MAX_PROPAGATED_LENGTH:
            try:
                inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
            except Exception as exc:
                logger.debug("shape inference with data propagation failed: %s", exc)
        else:
            logger.debug("shape inference without data propagation: a vector of %d elements", longest)
    except Exception as exc:  # inference is best effort; passes fall back to declared types
        logger.debug("shape inference failed: %s", exc)
        inferred = light
    return inferred


def _collect(graph: onnx.GraphProto, out: dict) -> None:
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        info = _info(value.type)
        if info is not None:
            out[value.name] = info
    for init in graph.initializer:
        out[init.name] = TensorInfo(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                                    if init.data_type else None, tuple(init.dims))
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _collect(attr.g, out)
            for sub in attr.graphs:
                _collect(sub, out)


def tensor_infos(proto: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of ``proto``, subgraphs included, after inference
    (which keeps the declared types it cannot improve)."""
    shapes: dict[str, TensorInfo] = {}
    _collect(infer(proto).graph, shapes)
    return shapes


@register_analysis("shapes")
def infer_shapes(model, ctx) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the model, subgraphs included."""
    return tensor_infos(model.export())
