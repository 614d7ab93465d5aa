"""The tools a user would run instead of onnxopt, each writing its result for one model.

One place for how each peer is invoked, so every benchmark runs it the same way.
"""

from __future__ import annotations

PEERS = ("graphsurgeon", "onnxsim", "onnxoptimizer", "onnxslim", "ort-basic", "ort-dynamic")


def write_peer(tool: str, src: str, dst: str) -> None:
    """Run peer ``tool`` on the model at ``src`` and write its output to ``dst``."""
    import onnx

    if tool == "graphsurgeon":  # import, cleanup, toposort, export
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(onnx.load(src))
        graph.cleanup().toposort()
        onnx.save(gs.export_onnx(graph), dst)
    elif tool == "onnxsim":
        import onnxsim

        model, _ = onnxsim.simplify(onnx.load(src), check_n=0)
        onnx.save(model, dst)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src)), dst)
    elif tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(src)), dst)
    elif tool == "ort-basic":  # onnxruntime's BASIC graph optimizer, written out
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    elif tool == "ort-dynamic":  # onnxruntime quantize_dynamic, int8 per-channel
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
    else:
        raise SystemExit(f"unknown tool {tool}")
