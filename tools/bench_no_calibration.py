"""Calibration-free passes on the real models: output SNR, size and latency against float.

    /work/venv/bin/python tools/bench_no_calibration.py [--repeat 15] [--models NAME ...]

For each model of .models/ (MiniLM has its own benchmark, tools/bench_minilm.py) and each
pipeline below, run on the cpu target: the model after `lossless` is the reference. Inputs
are seeded uniform values in [-1, 1] at a fixed shape (the PP-OCR shapes of
BENCHMARKS.md's lossless table; Silero's sequence model a 16x576 chunk). Latency: median
of one-thread runs, ORT_ENABLE_ALL, reference and variant timed in turns.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "ppocr_mobile_v2_cls": (1, 3, 48, 192),
    "ppocr_v4_det": (1, 3, 320, 320),
    "ppocr_v4_rec": (1, 3, 48, 320),
    "silero_vad_16k_sequence": (16, 576),
}
PIPELINES = {
    "quantize-dynamic": "lossless,quantize-dynamic",
    "quantize-dynamic +Conv": "lossless,quantize-dynamic{op_types=[MatMul,Gemm,Gather,Conv]}",
    "int4 weights (MatMulNBits)": "lossless,quantize-weights",
    "int8 weights (opset-21 DQ)": "lossless,quantize-weights{bits=8,format=standard}",
    "float16": "lossless,convert-float16",
}


def session(proto, threads=1):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = ((ref - got.astype(np.float64)) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((ref ** 2).sum() / err))


def main(argv=None) -> int:
    import onnxopt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    print(f"onnxruntime {ort.__version__}, 1 thread, median of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print("| model | variant | changed | size MB | 1 thr ms (x ref) | output SNR dB |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        path = ROOT / ".models" / f"{name}.onnx"
        if not path.exists():
            print(f"| {name} | missing | | | | |")
            continue
        ref_model = onnxopt.optimize(str(path), target="cpu", pipeline="lossless").model
        ref_sess = session(ref_model)
        x = np.random.default_rng(0).uniform(-1, 1, MODELS[name]).astype(np.float32)
        feeds = {ref_sess.get_inputs()[0].name: x}
        for extra in ref_sess.get_inputs()[1:]:  # recurrent state and the like: zeros
            shape = [d if isinstance(d, int) else 1 for d in extra.shape]
            feeds[extra.name] = np.zeros(shape, np.float32 if "float" in extra.type else np.int64)
        ref_out = ref_sess.run(None, feeds)[0]
        print(f"| {name} | reference (lossless) | | {ref_model.ByteSize() / 1e6:.2f} | | |")
        for label, text in PIPELINES.items():
            result = onnxopt.optimize(str(path), target="cpu", pipeline=text)
            changed = result.records[-1].status
            sess = session(result.model)
            out = sess.run(None, feeds)[0]
            times = {0: [], 1: []}
            for s in (ref_sess, sess):
                s.run(None, feeds)
            for _ in range(args.repeat):
                for i, s in enumerate((ref_sess, sess)):
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    times[i].append(time.perf_counter() - t0)
            a, b = statistics.median(times[0]), statistics.median(times[1])
            print(f"| {name} | {label} | {changed} | {result.model.ByteSize() / 1e6:.2f} | "
                  f"{b * 1e3:.1f} ({b / a:.2f}x) | {snr_db(ref_out, out):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
