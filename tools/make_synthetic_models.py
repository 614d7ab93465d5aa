"""Synthetic models for the scale and lossless-pipeline benchmarks (and, small, for tests).

    python tools/make_synthetic_models.py chain 30000 -o /tmp/chain30k.onnx
    python tools/make_synthetic_models.py big 2.2 -o /tmp/big/big.onnx   # 2.2 GB, external data

chain: a node-heavy, weight-light model. Blocks of MatMul -> Add -> Identity -> Relu on a
[1, width] activation, and off every block's Relu a dead branch (Mul by a constant, then
Sigmoid) that no output reads. Six nodes a block; a lossless optimizer can drop the
Identity and both dead nodes, and may fuse MatMul+Add into Gemm. Weights are shared between
blocks in groups so the file stays small and node count, not bytes, dominates.

big: a weight-heavy model over the 2 GB protobuf limit, so it must use external data. A
short chain of MatMul layers with [side, side] float32 weights plus an Identity and a dead
branch (so the lossless pipeline has something to change). The weights are written one
tensor at a time straight to ``<name>.data``: generating it needs little memory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NODES_PER_BLOCK = 6


def chain_model(n_nodes: int, width: int = 8, weight_groups: int = 64, seed: int = 0) -> onnx.ModelProto:
    """About ``n_nodes`` nodes (a multiple of 6) of MatMul+Add+Identity+Relu blocks with dead branches."""
    rng = np.random.default_rng(seed)
    blocks = max(1, n_nodes // NODES_PER_BLOCK)
    groups = min(weight_groups, blocks)
    # Scaled so activations neither vanish nor explode over thousands of blocks.
    inits = []
    for g in range(groups):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{g}"))
        inits.append(numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), f"b{g}"))
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes = []
    x = "x"
    for i in range(blocks):
        g = i % groups
        nodes += [
            helper.make_node("MatMul", [x, f"w{g}"], [f"mm{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"mm{i}", f"b{g}"], [f"add{i}"], name=f"add{i}"),
            helper.make_node("Identity", [f"add{i}"], [f"id{i}"], name=f"id{i}"),
            helper.make_node("Relu", [f"id{i}"], [f"relu{i}"], name=f"relu{i}"),
            # dead branch: read by nothing downstream
            helper.make_node("Mul", [f"relu{i}", "half"], [f"dead_mul{i}"], name=f"dead_mul{i}"),
            helper.make_node("Sigmoid", [f"dead_mul{i}"], [f"dead_sig{i}"], name=f"dead_sig{i}"),
        ]
        x = f"relu{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxopt-synthetic")
    model.ir_version = 8
    return model


def big_model(path: str | os.PathLike, gigabytes: float = 2.2, side: int = 8192, seed: int = 0) -> Path:
    """Write a model of about ``gigabytes`` GB of float32 weights with external data to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    layer_bytes = side * side * 4
    layers = max(1, int(np.ceil(gigabytes * 1e9 / layer_bytes)))
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    x = "x"
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            # One row block at a time: the generator never holds a whole layer.
            for start in range(0, side, 1024):
                rows = min(1024, side - start)
                block = rng.standard_normal((rows, side), dtype=np.float32)
                block *= np.float32(1 / np.sqrt(side))  # in place: stays float32
                f.write(block.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(layer_bytes))):
                t.external_data.add(key=key, value=value)
            offset += layer_bytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Identity", [f"mm{i}"], [f"id{i}"], name=f"id{i}"))
            nodes.append(helper.make_node("Neg", [f"id{i}"], [f"dead{i}"], name=f"dead{i}"))
            x = f"id{i}"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, side])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxopt-synthetic")
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("chain", help="node-heavy chain with dead branches")
    c.add_argument("nodes", type=int)
    c.add_argument("--width", type=int, default=8)
    c.add_argument("-o", "--output", required=True)
    b = sub.add_parser("big", help="weight-heavy model over 2 GB with external data")
    b.add_argument("gigabytes", type=float)
    b.add_argument("--side", type=int, default=8192)
    b.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    if args.kind == "chain":
        model = chain_model(args.nodes, width=args.width)
        with open(args.output, "wb") as f:
            f.write(model.SerializeToString())
        print(f"{args.output}: {len(model.graph.node)} nodes")
    else:
        path = big_model(args.output, args.gigabytes, side=args.side)
        print(f"{path}: {(path.parent / (path.name + '.data')).stat().st_size / 1e9:.2f} GB of external data")


if __name__ == "__main__":
    main()
