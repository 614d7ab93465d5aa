"""The lossless pipeline on the exported test models of issue 19 (the small ones: the ViT,
Swin and ConvNeXt files are benchmarked by tools/bench_lossless.py --zoo --check).

Each must keep its outputs at two sizes of every dynamic axis and leave no more nodes than
the best of onnxsim, onnxslim and onnxruntime BASIC did on the same file (BENCHMARKS.md).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxopt.analysis.summary import proto_nodes
from onnxopt.measure import verify
from onnxopt.optimize import optimize

from tests.real_models import real_model

# model -> (nodes the best peer left, what it is)
CASES = {
    "zoo/tiny_transformer.onnx": (112, "dynamic batch and sequence, LayerNorm and GELU at opset 14"),
    "zoo/crnn_lstm.onnx": (30, "CNN + bidirectional LSTM, dynamic width"),
    "zoo/detector_dynhw.onnx": (330, "anchor grids from Shape -> Range -> Expand, dynamic batch/H/W"),
    "zoo/nhwc_resnet.onnx": (111, "NHWC ResNet-18: a Transpose around every Conv, BatchNorm as Sub/Mul/Add"),
}


def _feeds(model: onnx.ModelProto, k: int) -> dict:
    sizes = json.loads({p.key: p.value for p in model.metadata_props}.get("zoo.check_sizes", "{}"))
    rng = np.random.default_rng(k)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, [1, 2])[k]
                for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", list(CASES))
def test_lossless_beats_the_peers_and_keeps_outputs_at_two_sizes(name):
    path = real_model(name)
    best_peer, _ = CASES[name]
    result = optimize(str(path), pipeline="lossless")
    nodes = sum(1 for _ in proto_nodes(result.model.graph))
    assert nodes <= best_peer
    assert all(p["status"] in ("changed", "unchanged", "skipped") for p in result.report["passes"])
    ref = onnx.load(str(path))
    for k in range(2):
        feeds, expected = verify.run(ref, _feeds(ref, k))
        _, got = verify.run(result.model, feeds)
        assert not verify.compare_outputs(expected, got), (name, {n: v.shape for n, v in feeds.items()})
