"""What `onnxopt inspect` shows: counts, opsets, interface, sizes of a model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import onnx

from onnxopt.ir.model import Model
from onnxopt.ir.storage import model_tensors

_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}


def _value_type(value: onnx.ValueInfoProto) -> dict:
    t = value.type
    if t.HasField("tensor_type"):
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.tensor_type.shape.dim] if t.tensor_type.HasField("shape") else None
        return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower(),
                "shape": dims}
    return {"name": value.name, "dtype": t.WhichOneof("value") or "unknown", "shape": None}


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    bits = _BITS.get(tensor.data_type)
    if bits:
        return (n * bits + 7) // 8
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return len(tensor.raw_data)


def proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs inside it, depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from proto_nodes(attr.g)
            for sub in attr.graphs:
                yield from proto_nodes(sub)


def summarize(model: Model, input_shapes: dict[str, list[int]] | None = None,
              cost: bool = True, count_zeros: bool = True) -> dict:
    """A JSON-ready summary of ``model`` (the proto as it would be written).

    With ``cost``, adds MACs, FLOPs and peak activation memory (onnxopt.analysis.cost) under
    "cost"; ``input_shapes`` fixes input dims so that symbolic counts become numbers;
    ``count_zeros`` reads every weight to count its zeros (the per-weight sparsity).
    """
    proto = model.template if not model.modified else model.to_proto()  # no copy of the weights
    ops: Counter = Counter()

    for node in proto_nodes(proto.graph):
        ops[(node.domain + "." if node.domain not in ("", "ai.onnx") else "") + node.op_type] += 1
    nodes = sum(ops.values())
    params = weight_bytes = 0
    for tensor in model_tensors(proto):
        n = 1
        for d in tensor.dims:
            n *= d
        params += n
        weight_bytes += tensor_bytes(tensor)
    out = {
        "file": str(model.path) if model.path else None,
        "file_bytes": Path(model.path).stat().st_size if model.path else proto.ByteSize(),
        "ir_version": proto.ir_version,
        "opsets": {(imp.domain or "ai.onnx"): imp.version for imp in proto.opset_import},
        "producer": (proto.producer_name + " " + proto.producer_version).strip(),
        "nodes": nodes,
        "functions": len(proto.functions),
        "params": params,
        "weight_bytes": weight_bytes,
        "inputs": [_value_type(v) for v in proto.graph.input
                   if v.name not in {i.name for i in proto.graph.initializer}],
        "outputs": [_value_type(v) for v in proto.graph.output],
        "op_histogram": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    if cost:
        from onnxopt.analysis.cost import model_cost

        # Counting zeros is the only thing that reads the weights' bytes.
        out["cost"] = model_cost(proto, input_shapes, count_zeros=count_zeros).to_json(per_node=True)
    return out
