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


def rec_images(n: int, seed: int) -> np.ndarray:
    """(n, 1, 3, 48, 320) upright text lines, rapidocr rec preprocessing."""
    return cls_images(n, seed, width=320, flip=0.0)


def cls_images(n: int, seed: int, width: int = 192, flip: float = 0.33) -> np.ndarray:
    """(n, 1, 3, 48, width) text lines (a third upside down), rapidocr cls preprocessing."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, 3, 48, width), np.float32)
    for k in range(n):
        font = _font(rng, int(rng.integers(20, 32)))
        text = _line(rng, int(rng.integers(1, 4)))
        w = int(draw_width(text, font)) + 10
        img = Image.new("RGB", (max(w, 20), 48), tuple(int(v) for v in rng.integers(200, 256, 3)))
        ImageDraw.Draw(img).text((5, 6), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
        if rng.random() < flip:
            img = img.rotate(180)
        ratio = img.width / 48.0
        rw = min(width, int(np.ceil(48 * ratio)))
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
        make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images, "ppocr_v4_rec": rec_images}.get(name)
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
        if args.tool == "lift":  # not timed as quantization: the input of "ort-lifted"
            import onnxopt

            onnxopt.optimize(args.model, target="cpu", pipeline="lossless").save(args.output)
        elif args.tool == "onnxopt":
            import onnxopt

            extra = f",{args.options}" if args.options else ""
            pipeline = (f"lossless,fold-constants,fuse-conv-bn,quantize-static{{calibration={args.method},"
                        f"percentile={args.percentile}{extra}}}")
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


def run_worker(tool, model, calib, method, output, percentile, per_tensor=False, options="") -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--model", model, "--calib", calib,
           "--method", method, "--output", output, "--percentile", str(percentile), "--options", options]
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
    case.setdefault("task", {})[path] = task_agreement(case["name"], ref, got)
    return 10 * np.log10(signal / max(noise, 1e-30))


def task_agreement(name: str, ref: list, got: list) -> float:
    """How much of the task's decision the quantized model keeps, against the float model:
    det: IoU of the text masks (probability > 0.3, DBNet's threshold); cls: share of lines
    with the same direction; rec: share of lines whose greedy CTC decoding is the same."""
    if "det" in name:
        inter = sum(int(np.sum((r > 0.3) & (g > 0.3))) for r, g in zip(ref, got))
        union = sum(int(np.sum((r > 0.3) | (g > 0.3))) for r, g in zip(ref, got))
        return inter / max(union, 1)
    if "cls" in name:
        return float(np.mean([r.argmax(-1)[0] == g.argmax(-1)[0] for r, g in zip(ref, got)]))

    def decode(probs):
        ids = probs[0].argmax(-1)
        return [int(i) for k, i in enumerate(ids) if i != 0 and (k == 0 or i != ids[k - 1])]

    return float(np.mean([decode(r) == decode(g) for r, g in zip(ref, got)]))


def interleaved_latency(paths: list[str], feed: dict, threads: int, repeats: int) -> list[float]:
    """Median ms of each model, timed in rounds (one run of each model per round) so that
    a change in the machine's load hits every model alike."""
    sessions = [session(p, threads) for p in paths]
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feed)
    times = [[] for _ in paths]
    for _ in range(repeats):
        for i, sess in enumerate(sessions):
            t = time.perf_counter()
            sess.run(None, feed)
            times[i].append((time.perf_counter() - t) * 1000)
    return [statistics.median(t) for t in times]


def bench_case(case: dict, args, tmp: Path) -> list[dict]:
    """Quantize with both tools and every method, then measure all models together."""
    ref = outputs(case["model"], list(np.load(case["eval"])["x"]), "x") if case["metric"] == "snr" else None
    rows = []
    lifted = str(tmp / f"{case['name']}_lifted.onnx")
    run_worker("lift", case["model"], case["calib"], "minmax", lifted, args.percentile)
    for method in args.methods.split(","):
        for tool in ("onnxopt", "ort", "ort-lifted") if method != "mse" else ("onnxopt",):
            out = str(tmp / f"{case['name']}_{tool}_{method}.onnx")
            source = lifted if tool == "ort-lifted" else case["model"]
            row = {"model": case["name"], "method": method, "tool": tool, "path": out,
                   **run_worker(tool.split("-")[0], source, case["calib"], method, out, args.percentile)}
            if "error" not in row:
                try:
                    session(out, 1)
                except Exception as exc:
                    row["error"] = f"onnxruntime refuses the output: {str(exc).splitlines()[0][:150]}"
            if tool.startswith("ort") and "error" in row:  # per-channel failed: what per-tensor gives
                first = row["error"]
                row = {"model": case["name"], "method": method, "tool": f"{tool} per-tensor", "path": out,
                       "per_channel_error": first,
                       **run_worker("ort", source, case["calib"], method, out, args.percentile, True)}
            if "error" not in row:
                row["size_kb"] = os.path.getsize(out) / 1024
                row["fidelity"] = fidelity(case, out, ref)
            rows.append(row)
            print(f"  quantized {case['name']} {method} {tool}: "
                  + (row.get("error") or f"{row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB"), flush=True)
    data = np.load(case["eval"])
    key = "image" if "image" in data.files else "x"
    feed = {key: data[key][:1] if key == "image" else data[key][0]}
    good = [r for r in rows if "error" not in r]
    paths = [case["model"]] + [r["path"] for r in good]
    for threads in (1, 2):
        for r, ms in zip([None] + good, interleaved_latency(paths, feed, threads, args.repeats)):
            (r if r is not None else case).__setitem__(f"lat{threads}_ms", ms)
    base_kb = os.path.getsize(case["model"]) / 1024
    base_fid = fidelity(case, case["model"], ref) if case["metric"] == "accuracy" else float("inf")
    print(f"\n## {case['name']}  float32: {base_kb:.0f} KB, {case['lat1_ms']:.2f} / {case['lat2_ms']:.2f} ms "
          f"(1/2 threads), {case['metric']} {base_fid:.4f}; load average now {os.getloadavg()[0]:.1f}")
    task = {"ppocr_v4_det": "mask IoU", "ppocr_mobile_v2_cls": "same label", "ppocr_v4_rec": "same text"}.get(
        case["name"], "-")
    print(f"| method | tool | size (x float) | latency 1t ms | latency 2t ms | {case['metric']} | {task} | "
          "quantize s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['tool']} | failed: {r['error']} | | | | | | |")
            continue
        agreement = case.get("task", {}).get(r["path"])
        r["task"] = agreement
        print(f"| {r['method']} | {r['tool']} | {r['size_kb'] / base_kb:.3f} | {r['lat1_ms']:.2f} | "
              f"{r['lat2_ms']:.2f} | {r['fidelity']:.4f} | {'-' if agreement is None else f'{agreement:.3f}'} | "
              f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    for method in args.methods.split(","):
        ours = next((r for r in good if r["method"] == method and r["tool"] == "onnxopt"), None)
        for theirs in [] if ours is None else [r for r in good if r["method"] == method and r["tool"].startswith("ort")]:
            print(f"  {method}: onnxopt/{theirs['tool']} latency 1t {ours['lat1_ms'] / theirs['lat1_ms']:.2f}x, "
                  f"2t {ours['lat2_ms'] / theirs['lat2_ms']:.2f}x, time {ours['seconds'] / theirs['seconds']:.2f}x, "
                  f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x, "
                  f"{case['metric']} {ours['fidelity']:.4f} vs {theirs['fidelity']:.4f}")
    sys.stdout.flush()
    case.pop("task", None)
    return rows + [{"model": case["name"], "tool": "float32", "size_kb": base_kb, "fidelity": base_fid,
                    "lat1_ms": case["lat1_ms"], "lat2_ms": case["lat2_ms"]}]


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


def variants(args) -> None:
    """U8S8 vs U8S8 with 7-bit weights vs S8S8 on this CPU: which is fast and faithful."""
    name, method = args.variants.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (case,) = model_cases([name], args.samples, args.eval, tmp)
        ref = outputs(case["model"], list(np.load(case["eval"])["x"]), "x")
        rows = []
        for label, options in (("U8S8", "activation_dtype=uint8,reduce_range=off"),
                               ("U8S8 reduce_range", "activation_dtype=uint8,reduce_range=on"),
                               ("S8S8", "activation_dtype=int8,reduce_range=off")):
            out = str(tmp / f"{label.replace(' ', '_')}.onnx")
            info = run_worker("onnxopt", case["model"], case["calib"], method, out, args.percentile, options=options)
            rows.append({"label": label, "path": out, "snr": fidelity(case, out, ref), **info})
        data = np.load(case["eval"])
        feed = {"x": data["x"][0]}
        paths = [case["model"]] + [r["path"] for r in rows]
        lat = {t: interleaved_latency(paths, feed, t, args.repeats) for t in (1, 2)}
        print(f"\n## {name}, {method}: activation/weight types on this CPU (load average {os.getloadavg()[0]:.1f})")
        print("| variant | latency 1t ms (x float) | latency 2t ms (x float) | snr dB | task agreement |")
        print("|---|---|---|---|---|")
        print(f"| float32 | {lat[1][0]:.2f} | {lat[2][0]:.2f} | inf | 1 |")
        for i, r in enumerate(rows, 1):
            print(f"| {r['label']} | {lat[1][i]:.2f} ({lat[1][i] / lat[1][0]:.2f}x) | "
                  f"{lat[2][i]:.2f} ({lat[2][i] / lat[2][0]:.2f}x) | {r['snr']:.2f} | "
                  f"{case['task'][r['path']]:.3f} |")


def flat_memory(args) -> None:
    """Peak RSS and wall time of each tool as the number of calibration samples grows."""
    name, method, counts = args.flat_memory.split(":")
    make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images, "ppocr_v4_rec": rec_images}[name]
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
    ap.add_argument("--variants", default="",
                    help="model:method — onnxopt's U8S8, U8S8 with reduce_range and S8S8 side by side")
    ap.add_argument("--options", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("onnxopt", "ort", "lift"))
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--method")
    ap.add_argument("--output")
    ap.add_argument("--per-tensor", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(argparse.Namespace(tool=args.worker, model=args.model, calib=args.calib, method=args.method,
                                  output=args.output, percentile=args.percentile, per_tensor=args.per_tensor,
                                  options=args.options))
        return
    print(f"CPU: {cpu_name()}; onnxruntime {__import__('onnxruntime').__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    results = []
    if args.flat_memory:
        flat_memory(args)
        return
    if args.variants:
        variants(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in model_cases(args.models.split(","), args.samples, args.eval, tmp):
            results.extend(bench_case(case, args, tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
