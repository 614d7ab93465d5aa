"""Run each peer API of README.md's "Peers' APIs" once on zoo models, to show the examples work.

    .models/peers-venv/bin/python tools/zoo/try_peers.py [--model resnet18] [--out /tmp/peers]

Prints, per step, the node count, parameter count and output agreement with the original
(cosine of the flattened first output on one evaluation batch). Measures nothing else.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ZOO = Path(__file__).resolve().parents[2] / ".models" / "zoo"


def batches(name: str, split: str) -> list[dict]:
    with np.load(ZOO / f"{name}.{split}.npz") as d:
        return [{k: d[k][i] for k in d.files} for i in range(len(d[d.files[0]]))]


def params(m: onnx.ModelProto) -> int:
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    return n + sum(int(np.prod(a.t.dims)) for nd in m.graph.node if nd.op_type == "Constant"
                   for a in nd.attribute if a.name == "value")


def run(model, feeds) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def report(step, model, ref, feeds, t0):
    m = onnx.load(model) if isinstance(model, str) else model
    out = run(model, feeds).ravel()
    cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-12))
    print(f"{step:42s} {len(m.graph.node):5d} nodes {params(m):11,d} params  cosine {cos:.4f}  "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--mlp-model", default="tiny_transformer", help="a MatMul model for pruning + finetune")
    p.add_argument("--out", type=Path, default=Path("/tmp/peers"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import onnxsim
    import onnxslim
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    for name in (a.model, a.mlp_model):
        src = str(ZOO / f"{name}.onnx")
        calib, feeds = batches(name, "calib"), batches(name, "eval")[0]
        ref = run(src, feeds).ravel()
        print(f"\n== {name}")
        t0 = time.perf_counter()
        report("original", src, ref, feeds, t0)

        t0 = time.perf_counter()
        simp, ok = onnxsim.simplify(onnx.load(src), check_n=0)
        report(f"onnxsim.simplify (ok={ok})", simp, ref, feeds, t0)

        t0 = time.perf_counter()
        report("onnxslim.slim", onnxslim.slim(onnx.load(src)), ref, feeds, t0)

        # Structured pruning expects BatchNormalization already fused: prune the simplified model.
        t0 = time.perf_counter()
        pruned = onnxsim.apply_structured_pruning(simp, sparsity=0.3)
        report("onnxsim.apply_structured_pruning 0.3", pruned, ref, feeds, t0)
        t0 = time.perf_counter()
        tuned = onnxsim.apply_pruning_finetune(simp, pruned, calibration_data=calib)
        report("  + apply_pruning_finetune (calib)", tuned, ref, feeds, t0)

        t0 = time.perf_counter()
        report("onnxsim.quantize_static (int8 QDQ)", onnxsim.quantize_static(simp, calibration_data=calib),
               ref, feeds, t0)

        class Reader(CalibrationDataReader):
            def __init__(self, data):
                self.it = iter(data)

            def get_next(self):
                return next(self.it, None)

        t0 = time.perf_counter()
        dst = str(a.out / f"{name}.ort_static.onnx")
        quantize_static(src, dst, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        report("ort quantize_static QDQ per-channel", dst, ref, feeds, t0)
        t0 = time.perf_counter()
        dst = str(a.out / f"{name}.ort_dynamic.onnx")
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        report("ort quantize_dynamic per-channel", dst, ref, feeds, t0)


if __name__ == "__main__":
    main()
