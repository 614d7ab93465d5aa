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


# Initializers larger than this are handed to shape inference as typed graph inputs:
# inference only needs their shapes, and copying a model's weights into onnx's C++ side
# would cost more than the inference itself. Small ones keep their data, which data
# propagation reads (Reshape targets, Slice bounds, …).
_KEEP_DATA_BYTES = 4096
# Longest static rank-1 tensor for which data propagation is allowed (see infer_shapes).
_MAX_PROPAGATED_LENGTH = 1 << 16


def _without_large_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    kept = []
    for init in graph.initializer:
        if len(init.raw_data) > _KEEP_DATA_BYTES:
            if init.name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return proto


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


@register_analysis("shapes")
def infer_shapes(model, ctx) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the model, subgraphs included."""
    proto = model.export()
    light = _without_large_weights(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
        # Data propagation materializes rank-1 values it tracks: a Range or Tile of 2**40
        # elements would exhaust memory. Only propagate when no such vector exists.
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
    shapes: dict[str, TensorInfo] = {}
    _collect(inferred.graph, shapes)  # inference keeps the declared types it cannot improve
    return shapes
