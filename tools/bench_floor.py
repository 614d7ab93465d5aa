"""Benchmark: quantization that never ships harm (the fidelity and speed floor).

For each model, in one run: the target's default pipeline (onnxopt, with calibration data
where it quantizes statically, and the target's [floor]), and onnxruntime's quantize_static
with uint8 activations x int8 weights (U8S8) and int8 x int8 (S8S8), both per-channel QDQ
with MinMax calibration on the same calibration batches. Each result against the float
model on separate evaluation batches: file size ratio, 1-thread latency ratio (interleaved
with the float model, median of pair ratios), worst output's SNR (dB) over all evaluation
batches; for onnxopt also what the floor did (layers given back, passes rolled back).

    python tools/bench_floor.py --models ppocr_v4_det,picodet_style --markdown

Models: the real ones of ../shared/models (.models/), the digits CNN of examples/, and
.models/zoo/ exports (tools/zoo/): detector_dynhw (multi-scale YOLO-style heads),
picodet_style (8 outputs, weights in Constant nodes, opset 11), audio_frontend (STFT as
strided convs, mel MatMul, log), crnn_lstm (CNN + LSTM text recognizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNXOPT_MODELS", REPO / ".models"))
ZOO = MODELS / "zoo"
sys.path.insert(0, str(REPO / "tools"))

ZOO_MODELS = ("detector_dynhw", "picodet_style", "audio_frontend", "crnn_lstm")
DEFAULT = ("digits", "ppocr_v4_det", "ppocr_v4_rec", "ppocr_mobile_v2_cls", "silero_vad_16k_op15",
           "minilm_l6") + ZOO_MODELS


# -- data ----------------------------------------------------------------------------------------
def case(name: str, folder: Path) -> dict | None:
    """{model, calib (.npz or None), eval (.npz)} for a model, making the data where needed."""
    if name == "digits":
        return {"model": REPO / "examples/digits_cnn.onnx", "calib": REPO / "examples/digits_calib.npz",
                "eval": REPO / "examples/digits_test.npz"}
    if name in ZOO_MODELS:
        path = ZOO / f"{name}.onnx"
        return {"model": path, "calib": ZOO / f"{name}.calib.npz", "eval": ZOO / f"{name}.eval.npz"} \
            if path.exists() else None
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        return None
    calib, ev = folder / f"{name}.calib.npz", folder / f"{name}.eval.npz"
    if name.startswith("ppocr"):
        from bench_quantize import cls_images, det_images, rec_images

        make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images, "ppocr_v4_rec": rec_images}[name]
        np.savez(calib, x=make(16, seed=1))
        np.savez(ev, x=make(8, seed=2))
    elif name.startswith("silero"):
        from zoo.zoo_data import audio

        def chunks(seed, n):
            wave = audio(np.random.default_rng(seed), 1, 512 * n)[0].reshape(n, 1, 512)
            return {"input": wave, "state": np.zeros((n, 2, 1, 128), np.float32),
                    "sr": np.full((n,), 16000, np.int64)}

        np.savez(calib, **chunks(1, 32))
        np.savez(ev, **chunks(2, 16))
    elif name == "minilm_l6":
        from bench.models import _minilm_inputs

        inputs = _minilm_inputs()
        half = len(inputs["input_ids"]) // 2
        np.savez(calib, **{k: v[None, :half] for k, v in inputs.items()})
        np.savez(ev, **{k: v[None, half:] for k, v in inputs.items()})
    else:
        return None
    return {"model": path, "calib": calib, "eval": ev}


def batches(path: Path, model: Path) -> list[dict]:
    """The batches of an .npz as onnxopt reads evaluation data (stacked or single; arrays
    that are not inputs, such as labels, left out)."""
    import onnx

    from onnxopt.measure.compare import read_batches

    return read_batches(str(path), onnx.load(str(model)))


# -- tools ---------------------------------------------------------------------------------------
class Reader:
    """onnxruntime CalibrationDataReader over batches."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def get_next(self):
        self.i += 1
        return self.items[self.i - 1] if self.i <= len(self.items) else None

    def rewind(self):
        self.i = 0


def onnxruntime_static(src: Path, dst: Path, calib: list, activation: str) -> str | None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = QuantType.QUInt8 if activation == "u8" else QuantType.QInt8
    try:
        quantize_static(str(src), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return None
    except Exception as exc:  # noqa: BLE001  (a peer's failure is a result)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def worst_snr(ref_path: Path, cand_path: Path, evals: list) -> float:
    from onnxopt import runtime
    from onnxopt.measure.metrics import output_stats

    a = runtime.session(str(ref_path), threads=1, level="all")
    b = runtime.session(str(cand_path), threads=1, level="all")
    names = [o.name for o in a.get_outputs()]
    wanted = {i.name for i in a.get_inputs()}
    ref, got = {n: [] for n in names}, {n: [] for n in names}
    for batch in evals:
        feeds = {k: v for k, v in batch.items() if k in wanted}
        for n, v in zip(names, a.run(names, feeds)):
            ref[n].append(np.asarray(v).ravel())
        for n, v in zip(names, b.run(names, feeds)):
            got[n].append(np.asarray(v).ravel())
    worst = math.inf
    for n in names:
        r, g = np.concatenate(ref[n]), np.concatenate(got[n])
        if r.dtype.kind != "f":
            continue
        s = output_stats(r, g)
        worst = min(worst, -math.inf if s.get("nonfinite_mismatch") else s["snr_db"])
    return worst


def latency_ratio(ref_path: Path, cand_path: Path, feeds: dict) -> float:
    import onnx

    from onnxopt.measure.speed import compare_speed

    return compare_speed(onnx.load(str(ref_path)), onnx.load(str(cand_path)), feeds, threads=1, runs=40,
                         budget_s=30).ratio


# -- one model -------------------------------------------------------------------------------------
def bench(name: str, target: str, folder: Path) -> dict:
    import onnxopt

    c = case(name, folder)
    if c is None:
        return {"model": name, "skipped": "model absent"}
    evals = batches(c["eval"], c["model"])
    calib = batches(c["calib"], c["model"])
    row = {"model": name, "float_bytes": c["model"].stat().st_size}
    # onnxopt: the target's default pipeline (static quantization needs the data, dynamic not)
    start = time.perf_counter()
    result = onnxopt.optimize(str(c["model"]), target=target, calibration=str(c["calib"]))
    out = folder / f"{name}.onnxopt.onnx"
    result.save(out)
    row["onnxopt_seconds"] = round(time.perf_counter() - start, 1)
    lossy = [p for p in result.report["passes"] if p["name"].startswith(("quantize", "convert"))]
    row["floor"] = result.report["floor"]
    row["onnxopt_passes"] = {p["name"]: {"status": p["status"], "error": p["error"],
                                         "kept": len((p["fidelity"] or {}).get("kept", [])),
                                         "kept_for_speed": len((p["fidelity"] or {}).get("kept_for_speed", [])),
                                         "layers": (p["fidelity"] or {}).get("sensitivity_trials")}
                             for p in lossy}
    tools = {"onnxopt": out}
    # onnxruntime on the user's file, and on onnxopt's lossless output (weights lifted out of
    # Constant nodes, BatchNorm fused): its most faithful configuration is the best of these
    lifted = folder / f"{name}.lifted.onnx"
    onnxopt.optimize(str(c["model"]), target=target, pipeline="lossless").save(lifted)
    for act in ("u8", "s8"):
        for variant, src in (("", c["model"]), ("_lifted", lifted)):
            tool = f"ort_{act}{variant}"
            dst = folder / f"{name}.{tool}.onnx"
            problem = onnxruntime_static(src, dst, calib, act)
            if problem:
                row[f"{tool}_error"] = problem
            else:
                tools[tool] = dst
    for tool, path in tools.items():
        try:
            row[f"{tool}_size"] = round(path.stat().st_size / row["float_bytes"], 3)
            row[f"{tool}_snr"] = round(worst_snr(c["model"], path, evals), 2)
            row[f"{tool}_latency"] = round(latency_ratio(c["model"], path, evals[0]), 3)
        except Exception as exc:  # noqa: BLE001  (a model onnxruntime cannot load is a result)
            row[f"{tool}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [f"Command: `python tools/bench_floor.py --models {','.join(args.models)} --target {args.target}"
             " --markdown`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "Cells: file size / 1-thread latency (both against the float model) / worst output's SNR "
             "on the evaluation batches. ORT: onnxruntime quantize_static (QDQ, per-channel, MinMax) on the "
             "user's file, and on onnxopt's lossless output (lifted: weights out of Constant nodes, "
             "BatchNorm fused).", "",
             "| model | onnxopt default | floor: what it did | ORT U8S8 | ORT S8S8 | ORT U8S8 lifted "
             "| ORT S8S8 lifted |", "|---|---|---|---|---|---|---|"]

    def cell(row, tool):
        if f"{tool}_error" in row:
            return f"fails: {row[f'{tool}_error'][:60]}"
        if f"{tool}_size" not in row:
            return "n/a"
        return f"{row[f'{tool}_size']:.3f}x / {row[f'{tool}_latency']:.2f}x / {row[f'{tool}_snr']:.1f} dB"

    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | skipped: {row['skipped']} | | | | | |")
            continue
        did = []
        for pname, p in row["onnxopt_passes"].items():
            if p["status"] == "rolled-back":
                did.append(f"{pname} rolled back ({(p['error'] or '')[:70]})")
            elif p["kept"] or p["kept_for_speed"]:
                did.append(f"{pname}: {p['kept']} layer(s) back for fidelity, {p['kept_for_speed']} for speed")
            elif p["status"] == "changed":
                did.append(f"{pname}: held")
        lines.append(f"| {row['model']} | {cell(row, 'onnxopt')} | {'; '.join(did) or '-'} | {cell(row, 'ort_u8')} "
                     f"| {cell(row, 'ort_s8')} | {cell(row, 'ort_u8_lifted')} | {cell(row, 'ort_s8_lifted')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(DEFAULT))
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        for name in args.models:
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                row = bench(name, args.target, Path(tmp))
            except Exception as exc:  # noqa: BLE001  (one model's failure is a row, not the end)
                row = {"model": name, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(markdown(rows, args) if args.markdown else json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
