"""Benchmark: onnxopt quantize-static (--target cpu) against onnxruntime's quantize_static.

For each model and calibration method, both tools quantize the same float model with the
same calibration samples (QDQ, per-channel int8 weights, uint8 activations, same method),
each in a fresh subprocess so that peak RSS is its own. Reported for both: file size,
latency with 1 and 2 threads (median, ORT_ENABLE_ALL), fidelity (digits: test accuracy;
PP-OCR: SNR in dB of the raw outputs against the float model on evaluation images that are
not the calibration images), quantization wall time and peak RSS.

    python tools/bench_quantize.py --models digits,ppocr_mobile_v2_cls,ppocr_v4_det \
        --methods minmax,percentile,entropy --samples 16

Calibration data for PP-OCR: text lines rendered with Pillow (DejaVu fonts) from a fixed
seed, preprocessed as rapidocr does (det: page images normalized with ImageNet mean/std;
cls: 48x192 lines scaled to [-1, 1]); evaluation images use another seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNXOPT_MODELS", REPO / ".models"))
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("invoice total amount date 2024 Paris ORDER no. 58213 quick brown fox jumps over lazy dog "
         "Hello World ONNX runtime 3.14159 Street 221B Baker ACME Corp. price $19.99 qty 7 page "
         "Section Chapter Table Figure TEXT lower UPPER MiXeD 0123456789 email@example.com").split()


# -- data --------------------------------------------------------------------------------------
def _font(rng, size):
    from PIL import ImageFont

    fonts = sorted(FONT_DIR.glob("*.ttf"))
    return ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)


def _line(rng, n_words=None):
    n = n_words or int(rng.integers(2, 6))
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def det_images(n: int, seed: int, size: int = 320) -> np.ndarray:
    """(n, 1, 3, size, size) pages with a few text lines, rapidocr det preprocessing."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, 3, size, size), np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    for k in range(n):
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(5, 30))
        while y < size - 30:
            font = _font(rng, int(rng.integers(14, 30)))
            color = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((int(rng.integers(2, 60)), y), _line(rng), fill=color, font=font)
            y += int(rng.integers(30, 60))
        x = (np.asarray(img, np.float32) / 255.0 - mean) / std
        out[k, 0] = x.transpose(2, 0, 1)
    return out


def cls_images(n: int, seed: int) -> np.ndarray:
    """(n, 1, 3, 48, 192) text lines (a third upside down), rapidocr cls preprocessing."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, 3, 48, 192), np.float32)
    for k in range(n):
        font = _font(rng, int(rng.integers(20, 32)))
        text = _line(rng, int(rng.integers(1, 4)))
        w = int(draw_width(text, font)) + 10
        img = Image.new("RGB", (max(w, 20), 48), tuple(int(v) for v in rng.integers(200, 256, 3)))
        ImageDraw.Draw(img).text((5, 6), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        if rng.random() < 0.33:
            img = img.rotate(180)
        ratio = img.width / 48.0
        rw = min(192, int(np.ceil(48 * ratio)))
        img = img.resize((rw, 48))
        x = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
        out[k, 0, :, :, :rw] = x.transpose(2, 0, 1)
    return out


def draw_width(text, font):
    left, _, right, _ = font.getbbox(text)
    return right - left


def model_cases(names: list[str], samples: int, evals: int, folder: Path) -> list[dict]:
    cases = []
    for name in names:
        if name == "digits":
            cases.append({"name": "digits", "model": str(REPO / "examples/digits_cnn.onnx"),
                          "calib": str(REPO / "examples/digits_calib.npz"),
                          "eval": str(REPO / "examples/digits_test.npz"), "metric": "accuracy"})
            continue
        path = MODELS / f"{name}.onnx"
        if not path.exists():
            print(f"skip {name}: {path} absent (run ../shared/models/get_models.sh .models)")
            continue
        make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images}.get(name)
        if make is None:
            print(f"skip {name}: no data maker")
            continue
        calib, ev = folder / f"{name}_calib.npz", folder / f"{name}_eval.npz"
        np.savez(calib, x=make(samples, seed=1))
        np.savez(ev, x=make(evals, seed=2))
        cases.append({"name": name, "model": str(path), "calib": str(calib), "eval": str(ev), "metric": "snr"})
    return cases


# -- workers (one fresh process per quantization, for its own peak RSS) ---------------------------
class NpzReader:
    """onnxruntime CalibrationDataReader over a stack of batches in an .npz."""

    def __init__(self, path):
        data = np.load(path)
        self.name = "image" if "image" in data.files else "x"
        self.batches = list(data[self.name])
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def worker(args) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    info = {"baseline_rss_mb": base}
    try:
        if args.tool == "onnxopt":
            import onnxopt

            pipeline = (f"lossless,fold-constants,fuse-conv-bn,quantize-static{{calibration={args.method},"
                        f"percentile={args.percentile}}}")
            result = onnxopt.optimize(args.model, target="cpu", pipeline=pipeline, calibration=args.calib)
            result.save(args.output)
            info["notes"] = result.report["notes"]
            info["stats"] = result.report["passes"][-1]["stats"]
        else:
            from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                                  quantize_static)

            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                "entropy": CalibrationMethod.Entropy}[args.method]
            extra = {"CalibPercentile": args.percentile} if args.method == "percentile" else {}
            quantize_static(args.model, args.output, NpzReader(args.calib), quant_format=QuantFormat.QDQ,
                            per_channel=not args.per_tensor, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra)
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    info["seconds"] = time.perf_counter() - start
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(info))


def run_worker(tool, model, calib, method, output, percentile, per_tensor=False) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--model", model, "--calib", calib,
           "--method", method, "--output", output, "--percentile", str(percentile)]
    if per_tensor:
        cmd.append("--per-tensor")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


# -- measurements -----------------------------------------------------------------------------
def session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def latency_ms(path, feed, threads, repeats) -> float:
    sess = session(path, threads)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def outputs(path, batches, name):
    sess = session(path, 1)
    return [sess.run(None, {name: b})[0] for b in batches]


def fidelity(case, path, reference=None) -> float:
    data = np.load(case["eval"])
    if case["metric"] == "accuracy":
        logits = outputs(path, [data["image"]], "image")[0]
        return float((logits.argmax(1) == data["label"]).mean())
    got = outputs(path, list(data["x"]), "x")
    ref = reference
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    noise = sum(float(np.sum((r.astype(np.float64) - g) ** 2)) for r, g in zip(ref, got))
    return 10 * np.log10(signal / max(noise, 1e-30))


def measure(case, path, reference, repeats) -> dict:
    data = np.load(case["eval"])
    key = "image" if "image" in data.files else "x"
    feed = {key: data[key][:1] if key == "image" else data[key][0]}
    return {"size_kb": os.path.getsize(path) / 1024,
            "lat1_ms": latency_ms(path, feed, 1, repeats), "lat2_ms": latency_ms(path, feed, 2, repeats),
            "fidelity": fidelity(case, path, reference)}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = [l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")]
        flags = [l for l in out.splitlines() if l.startswith("Flags")]
        vnni = "avx512_vnni" in flags[0] if flags else False
        amx = "amx_int8" in flags[0] if flags else False
        return f"{model[0] if model else platform.processor()} (AVX-512 VNNI: {vnni}, AMX-INT8: {amx}, {os.cpu_count()} cores)"
    except OSError:
        return platform.processor()


def flat_memory(args) -> None:
    """Peak RSS and wall time of each tool as the number of calibration samples grows."""
    name, method, counts = args.flat_memory.split(":")
    make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images}[name]
    model = str(MODELS / f"{name}.onnx")
    print(f"\n## {name}, {method}: peak RSS (MB) and quantize time (s) against calibration samples")
    print("| samples | onnxopt RSS | onnxopt s | onnxruntime RSS | onnxruntime s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, counts.split(",")):
            calib = str(Path(tmp) / f"c{n}.npz")
            np.savez(calib, x=make(n, seed=1))
            ours = run_worker("onnxopt", model, calib, method, str(Path(tmp) / "o.onnx"), args.percentile)
            theirs = run_worker("ort", model, calib, method, str(Path(tmp) / "r.onnx"), args.percentile) \
                if n <= args.ort_max_samples else {}
            cells = [f"{ours.get('peak_rss_mb', float('nan')):.0f}", f"{ours.get('seconds', float('nan')):.1f}",
                     f"{theirs['peak_rss_mb']:.0f}" if "peak_rss_mb" in theirs else "not run",
                     f"{theirs['seconds']:.1f}" if "seconds" in theirs else ""]
            print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,ppocr_mobile_v2_cls,ppocr_v4_det")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (batches of 1)")
    ap.add_argument("--eval", type=int, default=16, help="evaluation samples")
    ap.add_argument("--percentile", type=float, default=99.999)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--flat-memory", default="",
                    help="model:method:n1,n2,... — peak RSS of both tools as calibration samples grow "
                         "(e.g. ppocr_v4_det:percentile:4,16,64; onnxruntime only up to --ort-max-samples)")
    ap.add_argument("--ort-max-samples", type=int, default=16)
    ap.add_argument("--worker", choices=("onnxopt", "ort"))
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--method")
    ap.add_argument("--output")
    ap.add_argument("--per-tensor", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(argparse.Namespace(tool=args.worker, model=args.model, calib=args.calib, method=args.method,
                                  output=args.output, percentile=args.percentile, per_tensor=args.per_tensor))
        return
    print(f"CPU: {cpu_name()}; onnxruntime {__import__('onnxruntime').__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    results = []
    if args.flat_memory:
        flat_memory(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in model_cases(args.models.split(","), args.samples, args.eval, tmp):
            ref = None
            if case["metric"] == "snr":
                ref = outputs(case["model"], list(np.load(case["eval"])["x"]), "x")
            base = measure(case, case["model"], ref, args.repeats)
            print(f"\n## {case['name']}  float32: {base['size_kb']:.0f} KB, {base['lat1_ms']:.2f} / "
                  f"{base['lat2_ms']:.2f} ms (1/2 threads), {case['metric']} "
                  f"{base['fidelity'] if case['metric'] == 'accuracy' else float('inf'):.4f}")
            print("| method | tool | size (x float) | latency 1t ms | latency 2t ms | "
                  f"{case['metric']} | quantize s | peak RSS MB |")
            print("|---|---|---|---|---|---|---|---|")
            for method in args.methods.split(","):
                for tool in ("onnxopt", "ort") if method != "mse" else ("onnxopt",):
                    out = str(tmp / f"{case['name']}_{tool}_{method}.onnx")
                    info = run_worker(tool, case["model"], case["calib"], method, out, args.percentile)
                    label = tool
                    row = {"model": case["name"], "method": method, "tool": tool, **info}
                    if "error" not in info:
                        try:
                            row.update(measure(case, out, ref, args.repeats))
                        except Exception as exc:
                            row["error"] = f"cannot run: {str(exc).splitlines()[0][:150]}"
                    if tool == "ort" and "error" in row and "per_tensor" not in row:
                        first = row["error"]
                        info = run_worker(tool, case["model"], case["calib"], method, out, args.percentile, True)
                        row = {"model": case["name"], "method": method, "tool": tool, **info,
                               "per_channel_error": first}
                        label = "ort (per-tensor: per-channel output failed)"
                        if "error" not in info:
                            row.update(measure(case, out, ref, args.repeats))
                    results.append(row)
                    if "error" in row:
                        print(f"| {method} | {label} | failed: {row['error']} | | | | | |")
                        continue
                    print(f"| {method} | {label} | {row['size_kb'] / base['size_kb']:.3f} | {row['lat1_ms']:.2f} | "
                          f"{row['lat2_ms']:.2f} | {row['fidelity']:.4f} | {row['seconds']:.1f} | "
                          f"{row['peak_rss_mb']:.0f} |", flush=True)
            results.append({"model": case["name"], "tool": "float32", **base})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
