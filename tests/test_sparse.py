"""Sparse initializers (onnxopt/ir/sparse.py): round trip through the graph, onnxruntime loads them."""

import numpy as np
import onnx
from onnx import helper

from onnxopt.ir.model import load
from onnxopt.ir.sparse import dense_array, encoded_sizes, sparse_constant, sparse_pays, sparse_proto
from onnxopt.runtime import session
from tests.graphs import make_model, tensor, init


def test_proto_round_trip():
    a = np.zeros((4, 5), np.float32)
    a[1, 2], a[3, 4] = 1.5, -2.0
    p = sparse_proto("w", a)
    assert p.values.name == "w" and list(p.indices.int64_data) == [7, 19]
    np.testing.assert_array_equal(dense_array(p), a)


def test_sizes_and_policy():
    r = np.random.default_rng(0)
    w = r.standard_normal((64, 256)).astype(np.float32)
    half, most = w.copy(), w.copy()
    half[np.abs(half) < np.quantile(np.abs(half), 0.5)] = 0
    most[np.abs(most) < np.quantile(np.abs(most), 0.97)] = 0
    s = encoded_sizes(half)
    assert s["sparse"] < s["dense"] and s["sparse_compressed"] > s["dense_compressed"]
    assert not sparse_pays(half) and sparse_pays(most) and not sparse_pays(w)
    assert sparse_pays(half, min_zeros=0.5)  # smaller written out, though not compressed


def test_graph_round_trip_and_onnxruntime_loads_it():
    r = np.random.default_rng(1)
    w = r.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w[np.abs(w) < 1.5] = 0
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 8, 5, 5])], [init("w", w)])
    m = load(model)
    conv = m.graph.nodes[0]
    old = conv.inputs[1]
    conv.inputs[1] = sparse_constant("w", w)
    assert not old.outputs
    m.modified = True
    out = m.to_proto()
    assert not out.graph.initializer and len(out.graph.sparse_initializer) == 1
    onnx.checker.check_model(out)
    again = load(out).to_proto()  # import and export keep it sparse, unchanged
    assert again.graph.sparse_initializer[0] == out.graph.sparse_initializer[0]
    x = r.standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(session(out).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0])


def test_constant_value_of_a_sparse_initializer_is_none():
    """Before: exact_array read ``data_type`` of the SparseTensorProto and raised."""
    from onnxopt.ir.constants import constant_value

    c = sparse_constant("w", np.eye(3, dtype=np.float32))
    assert constant_value(c) is None
