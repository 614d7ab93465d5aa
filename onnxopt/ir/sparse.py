"""Mostly-zero weights stored as ONNX sparse initializers.

A ``SparseTensorProto`` holds the non-zero values and their linear positions (``[NNZ]``
int64 indices, ascending; the ONNX checker accepts no other index type). The indices go
into ``int64_data``, which protobuf writes as varints (2-4 bytes for the positions of
real weights instead of 8), so a weight that is about half zeros is already smaller on
disk. It is not smaller once compressed: zeros in a dense tensor compress to about a
bit each, less than an index (a 50% sparse weight: sparse 0.81x the dense bytes but 1.3x
its zlib size; 90%: 0.16x and 1.08x). ``sparse_pays`` stores sparse only weights that are
mostly zero (75% by default), where the file shrinks several-fold for a few percent of
compressed size.

onnxruntime turns sparse initializers back into dense tensors when the session is created
(its kernels do not consume sparse tensors), so this saves file size and download size,
not memory or time at run time. Sparse initializers are read and written by
``onnxopt.ir.graph_io`` as graphsurgeon ``SparseValues`` constants; ``constant_value``
returns None for them, so passes that run later leave them alone.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import SparseValues


def sparse_proto(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    """``array`` as a SparseTensorProto named ``name`` (linear int64 indices as varints)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    positions = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[positions], name)
    indices = helper.make_tensor("", onnx.TensorProto.INT64, [len(positions)], positions.tolist())
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def sparse_constant(name: str, array: np.ndarray) -> gs.Constant:
    """A graphsurgeon constant that exports as a sparse initializer."""
    return gs.Constant(name, SparseValues(sparse_proto(name, array)))


def dense_array(proto: onnx.SparseTensorProto) -> np.ndarray:
    """The dense value of a SparseTensorProto with [NNZ] or [NNZ, rank] indices."""
    values = numpy_helper.to_array(proto.values).reshape(-1)
    indices = numpy_helper.to_array(proto.indices)
    out = np.zeros(int(np.prod(proto.dims)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), tuple(proto.dims))
    out[indices.reshape(-1)] = values
    return out.reshape(tuple(proto.dims))


def encoded_sizes(array: np.ndarray) -> dict[str, int]:
    """Bytes of ``array`` as a dense and as a sparse tensor, raw and zlib-compressed."""
    dense = numpy_helper.from_array(np.ascontiguousarray(array), "w").SerializeToString()
    sparse = sparse_proto("w", array).SerializeToString()
    return {"dense": len(dense), "sparse": len(sparse),
            "dense_compressed": len(zlib.compress(dense, 6)), "sparse_compressed": len(zlib.compress(sparse, 6))}


def sparse_pays(array: np.ndarray, min_zeros: float = 0.75) -> bool:
    """Whether to store ``array`` sparse: it is mostly zero (``min_zeros`` of it) and the
    sparse form is smaller written out. Below that the dense form, whose zeros compress
    to about a bit each, gives the smaller compressed file and nearly the same raw one."""
    if array.size == 0 or np.count_nonzero(array) > (1.0 - min_zeros) * array.size:
        return False
    s = encoded_sizes(array)
    return s["sparse"] < s["dense"]
