"""Reading and making constants: the one way a pass gets a weight's value.

A constant is an initializer (``gs.Constant``) or the output of a ``Constant`` node
(``value``, ``value_float(s)``, ``value_int(s)``). An initializer whose data stayed in an
external file is read through a read-only map of that file. Values are read without caching them on
the tensor: graphsurgeon's ``.values`` replaces the lazily loaded TensorProto by the array,
which changes how the model is written (raw_data instead of float_data) although nothing
was rewritten. Only values numpy holds exactly are returned (bool, integers, float16/32/64);
bfloat16, float8, int4, complex and strings give None, so no pass rewrites what it cannot
represent.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.ir.storage import external_array, external_span

# TensorProto element types whose values numpy holds exactly.
EXACT_TYPES = {
    onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
}
EXACT_DTYPES = frozenset(np.dtype(t) for t in EXACT_TYPES.values())


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


# (id(values), kind) -> (weak reference to the values, result). See ``per_values``.
_PER_VALUES: dict[tuple, tuple] = {}


def per_values(constant: gs.Constant, kind: str, compute: Callable[[gs.Constant], Any]) -> Any:
    """``compute(constant)``, remembered for as long as the constant's values object lives.

    Values are never changed in place (passes build new arrays and new constants), so what
    was read from them once stays true: analyses and passes that run after every change
    (symbolic shapes, duplicate detection) read each weight once per process, not per run.
    """
    values = constant._values
    key = (id(values), kind)
    hit = _PER_VALUES.get(key)
    if hit is not None and hit[0]() is values:
        return hit[1]
    result = compute(constant)
    try:
        ref = weakref.ref(values, lambda _, key=key, cache=_PER_VALUES: cache.pop(key, None))
    except TypeError:  # values that cannot be referenced weakly are not remembered
        return result
    _PER_VALUES[key] = (ref, result)
    return result


def constant_tensor(tensor: gs.Tensor) -> gs.Constant | None:
    """The gs.Constant behind an initializer or a Constant node's ``value`` (nothing loaded)."""
    if isinstance(tensor, gs.Constant):
        return tensor
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Constant" and is_default_domain(node) and len(node.attrs) == 1:
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return value
    return None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None when the tensor is
    not constant or numpy cannot hold its value exactly."""
    if isinstance(tensor, gs.Constant):
        return exact_array(tensor)
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "Constant" or not is_default_domain(node):
        return None
    return constant_node_value(node)


def is_constant(tensor: gs.Tensor) -> bool:
    """An initializer or a Constant node's output (whatever its type)."""
    if isinstance(tensor, gs.Constant):
        return True
    node = tensor.inputs[0] if tensor.inputs else None
    return node is not None and node.op == "Constant" and is_default_domain(node)


def has_exact_value(tensor: gs.Tensor) -> bool:
    """Whether ``constant_value(tensor)`` would give a value, decided without reading it
    (a pass scanning every node asks this of every weight)."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        if isinstance(values, gs.ir.tensor.LazyValues):
            proto = values.tensor
            if proto.data_type not in EXACT_TYPES:
                return False
            return proto.data_location != onnx.TensorProto.EXTERNAL or external_span(proto) is not None
        return exact_array(tensor) is not None  # already an array: no reading involved
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op != "Constant" or not is_default_domain(node) or len(node.attrs) != 1:
        return False
    (key, value), = node.attrs.items()
    if key == "value" and isinstance(value, gs.Constant):
        return has_exact_value(value)
    return key in ("value_float", "value_floats", "value_int", "value_ints")


def exact_array(tensor: gs.Constant) -> np.ndarray | None:
    """The value of an initializer, or None when numpy cannot hold it exactly (or it is sparse)."""
    values = tensor._values
    if isinstance(values, gs.ir.tensor.SparseValues):  # a LazyValues over a SparseTensorProto
        return None
    if isinstance(values, gs.ir.tensor.LazyValues):
        proto = values.tensor
        if proto.data_type not in EXACT_TYPES:
            return None
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            # a read-only map of the file: the weight is read only where a pass reads it
            return external_array(proto, EXACT_TYPES[proto.data_type])
        return numpy_helper.to_array(proto)
    if isinstance(values, np.ndarray):
        if values.dtype not in EXACT_DTYPES:
            return None
        export = tensor.export_dtype
        if export is not None and not _same_dtype(export, values.dtype):
            return None
        return values
    return None  # sparse


def _same_dtype(export_dtype, dtype: np.dtype) -> bool:
    if isinstance(export_dtype, int):
        return export_dtype in EXACT_TYPES and np.dtype(EXACT_TYPES[export_dtype]) == dtype
    try:
        return np.dtype(export_dtype) == dtype
    except TypeError:
        return False


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Constant node, when numpy holds it exactly."""
    if len(node.attrs) != 1:
        return None
    (key, value), = node.attrs.items()
    if key == "value" and isinstance(value, gs.Constant):
        return exact_array(value)
    return _listed_value(key, value)


def _listed_value(key: str, value) -> np.ndarray | None:
    if key == "value_float":
        return np.array(value, dtype=np.float32)
    if key == "value_floats":
        return np.array(value, dtype=np.float32).reshape(-1)
    if key == "value_int":
        return np.array(value, dtype=np.int64)
    if key == "value_ints":
        return np.array(value, dtype=np.int64).reshape(-1)
    return None


def constant_node_payload(node: gs.Node) -> tuple[object, object]:
    """(values, export_dtype) of a Constant node as ``gs.Constant`` takes them, keeping types
    numpy cannot hold (bfloat16, int4, … stay lazily encoded); (None, None) for sparse,
    string or unknown values. What lifting a Constant node into an initializer needs."""
    if len(node.attrs) != 1:
        return None, None
    (key, value), = node.attrs.items()
    if key == "value" and isinstance(value, gs.Constant):
        if value.export_dtype is not None and str(value.export_dtype) in ("string",):
            return None, None
        values = value._values
        if isinstance(values, np.ndarray) and values.dtype.kind in "OUS":
            return None, None
        return values, value.export_dtype
    listed = _listed_value(key, value)
    return (listed, None) if listed is not None else (None, None)
