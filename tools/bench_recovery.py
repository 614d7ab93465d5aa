"""Benchmark recovery and search: refit, equalize and smooth-quant after int8; the search's front.

    python tools/bench_recovery.py fidelity [--models a,b,…]   int8 before/after refit, equalize, smooth-quant
    python tools/bench_recovery.py search [--models …] [--budget 0.01] [--trials 12] [--workers 2]
    python tools/bench_recovery.py timing [--models …]         the same search with 1, 2 workers and Ray
    python tools/bench_recovery.py table --out FILE.jsonl       the results as markdown tables

Models: the digits CNN (examples/), the PP-OCR det/rec/cls models with page/line images
rendered as tools/bench_quantize.py does (16 calibration, 8 evaluation images, other
seeds), MiniLM-L6 (quantize-dynamic; 16 calibration and 32 evaluation sentences of
tools/bench_minilm.py), and every .models/zoo model with its NAME.calib.npz / NAME.eval.npz.
Each model runs in its own process (one model's failure is a row, memory is its own).

Fidelity is measured on the evaluation data against the float model: worst output's SNR
(dB) and cosine; digits also test accuracy; MiniLM the cosine of mean-pooled, L2-normalized
embeddings over real tokens (the metric ``minilm_pooled`` below). ``int8`` is the cpu
target's int8 as a user gets it: ``lossless,quantize-static`` (per-channel weights, uint8
activations, minmax) for models with calibration data, ``lossless,quantize-dynamic`` for
MiniLM; no floor (the floor would give layers back). The budget of the search is a drop of
the metric: cosine (1 - cosine of the worst output), top-1 for digits, pooled cosine for MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNXOPT_MODELS", REPO / ".models"))
sys.path.insert(0, str(REPO / "tools"))

PPOCR = ("ppocr_mobile_v2_cls", "ppocr_v4_rec", "ppocr_v4_det")


# -- data ---------------------------------------------------------------------------------------
def cases(names: list[str] | None, folder: Path) -> list[dict]:
    """Every benchmark model with its data files (made here where needed)."""
    out = [{"name": "digits", "model": str(REPO / "examples/digits_cnn.onnx"),
            "calib": str(REPO / "examples/digits_calib.npz"), "eval": str(REPO / "examples/digits_test.npz"),
            "metric": "top1", "quantize": "quantize-static"}]
    for name in PPOCR:
        out.append({"name": name, "model": str(MODELS / f"{name}.onnx"), "calib": str(folder / f"{name}_c.npz"),
                    "eval": str(folder / f"{name}_e.npz"), "metric": "cosine", "quantize": "quantize-static",
                    "make": name})
    out.append({"name": "minilm_l6", "model": str(MODELS / "minilm_l6.onnx"), "calib": str(folder / "minilm_c.npz"),
                "eval": str(folder / "minilm_e.npz"), "metric": "bench_recovery:minilm_pooled",
                "quantize": "quantize-dynamic", "make": "minilm"})
    for path in sorted((MODELS / "zoo").glob("*.onnx")):
        name = path.stem
        out.append({"name": name, "model": str(path), "calib": str(path.with_suffix(".calib.npz")),
                    "eval": str(path.with_suffix(".eval.npz")), "metric": "cosine", "quantize": "quantize-static"})
    if names:
        out = [c for c in out if c["name"] in names]
    return [c for c in out if Path(c["model"]).exists()]


def make_data(case: dict) -> None:
    kind = case.get("make")
    if kind is None or Path(case["calib"]).exists():
        return
    if kind == "minilm":
        from bench_minilm import EVAL, SAMPLE, tokenize

        c, e = tokenize(SAMPLE), tokenize(EVAL)
        np.savez(case["calib"], **{k: v.reshape(4, 4, -1) for k, v in c.items()})
        np.savez(case["eval"], **{k: v.reshape(4, 8, -1) for k, v in e.items()})
        return
    from bench_quantize import cls_images, det_images, rec_images

    make = {"ppocr_v4_det": det_images, "ppocr_mobile_v2_cls": cls_images, "ppocr_v4_rec": rec_images}[kind]
    np.savez(case["calib"], x=make(16, seed=1))
    np.savez(case["eval"], x=make(8, seed=2))


def minilm_pooled(reference: dict, candidate: dict) -> float:
    """1 - the smallest cosine of mean-pooled, L2-normalized sentence embeddings over real
    tokens (the attention mask comes from $BENCH_MINILM_EVAL, the evaluation .npz)."""
    mask = np.load(os.environ["BENCH_MINILM_EVAL"])["attention_mask"].reshape(-1, 64).astype(np.float64)
    name = next(iter(reference))

    def pooled(out):
        h = np.asarray(out[name], np.float64).reshape(mask.shape[0], mask.shape[1], -1)
        v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return float(1.0 - np.min(np.sum(pooled(reference) * pooled(candidate), axis=1)))


# -- one model, in its own process ----------------------------------------------------------------
def fidelity_rows(case: dict) -> list[dict]:
    import onnxopt
    from onnxopt.measure.compare import compare
    from onnxopt.measure.fidelity import Floor
    from onnxopt.measure.metrics import load_metric

    q = case["quantize"]
    variants = [("float lossless", "lossless"), ("int8", f"lossless,{q}"), ("int8 + refit", f"lossless,{q},refit"),
                ("equalize + int8", f"lossless,equalize,{q}")]
    if q == "quantize-static":
        variants += [("smooth-quant + int8", f"lossless,smooth-quant,{q}"),
                     ("equalize + smooth-quant + int8 + refit", f"lossless,equalize,smooth-quant,{q},refit"),
                     ("int8 per-tensor", f"lossless,{q}{{per_channel=false}}"),
                     ("equalize + int8 per-tensor", f"lossless,equalize,{q}{{per_channel=false}}"),
                     ("int8 per-tensor + refit", f"lossless,{q}{{per_channel=false}},refit")]
    else:
        variants += [("smooth-quant (Mul) + int8", f"lossless,smooth-quant{{insert_mul=true}},{q}{{smooth=false}}"),
                     ("int4 weights (MatMulNBits)", "lossless,quantize-weights"),
                     ("int4 weights (MatMulNBits) + refit", "lossless,quantize-weights,refit")]
    metric = load_metric(case["metric"])
    rows = []
    for label, pipeline in variants:
        start = time.perf_counter()
        row = {"model": case["name"], "variant": label, "pipeline": pipeline}
        try:
            result = onnxopt.optimize(case["model"], pipeline=pipeline, calibration=case["calib"], floor=Floor())
            row["seconds"] = round(time.perf_counter() - start, 1)
            c = compare(case["model"], result.model, data=case["eval"], metric=metric, latency=False, memory=False)
            outs = [o for o in c["outputs"].values() if "snr_db" in o]
            row["snr_db"] = min(o["snr_db"] for o in outs)
            row["cosine"] = min(o["cosine"] for o in outs)
            row["metric_drop"] = c["metric"]["drop"]
            row["size_ratio"] = c["size_ratio"]
            for p in result.report["passes"]:
                if p["name"] == "refit":
                    row["refit"] = {k: p["stats"].get(k) for k in ("layers", "refit", "waves", "check_error_ratio",
                                                                   "groups_current_gptq_teacher")}
                if p["status"] in ("failed", "rolled-back"):
                    row.setdefault("problems", []).append(f"{p['name']}: {p['error']}")
        except Exception as exc:  # noqa: BLE001  (a row, not a crash)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def search_row(case: dict, budget: float, trials: int, workers: int, executor: str, cache: bool) -> dict:
    from onnxopt.errors import QualityGateError
    from onnxopt.search import search

    start = time.perf_counter()
    row = {"model": case["name"], "budget": budget, "metric": case["metric"], "workers": workers,
           "executor": executor, "trials": trials}
    try:
        found = search(case["model"], max_drop=budget, metric=case["metric"], data=case["eval"],
                       calibration=case["calib"], trials=trials, workers=workers, executor=executor, cache=cache)
        rep = found.report
        base = rep["candidates"][0]  # the aggressive pipeline as it is (the first one evaluated)
        row.update({"seconds": rep["seconds"], "sensitivity_seconds": rep["sensitivity_seconds"],
                    "evaluations": rep["evaluations"], "give_back": rep["give_back"],
                    "int8": {k: base.get(k) for k in ("drop", "size_ratio", "latency_ratio", "pipeline")},
                    "front": [{k: c.get(k) for k in ("size_ratio", "latency_ratio", "latency_ratio_parallel", "drop",
                                                     "pipeline", "give_back", "config")} for c in rep["front"]],
                    "chosen": {k: rep["chosen"].get(k) for k in ("size_ratio", "latency_ratio", "drop", "pipeline")}})
    except QualityGateError as exc:
        row["unmet"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def worker_main(args) -> None:
    case = json.loads(args.case)
    if case["name"] == "minilm_l6":
        os.environ["BENCH_MINILM_EVAL"] = case["eval"]
    if args.worker == "fidelity":
        fidelity_rows(case)
    else:
        search_row(case, args.budget, args.trials, args.workers, args.executor, not args.no_cache)


def run_case(kind: str, case: dict, args, workers: int, executor: str, out: Path, no_cache: bool = False) -> None:
    cmd = [sys.executable, __file__, "--worker", kind, "--case", json.dumps(case), "--budget", str(args.budget),
           "--trials", str(args.trials), "--workers", str(workers), "--executor", executor]
    if no_cache:
        cmd.append("--no-cache")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tools"), os.environ.get("PYTHONPATH", "")]))
    if case["name"] == "minilm_l6":
        env["BENCH_MINILM_EVAL"] = case["eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        rows = [json.dumps({"model": case["name"], "error": last})]
    with out.open("a") as f:
        for line in rows:
            f.write(line + "\n")
    for line in rows:
        print(line, flush=True)


def tables(path: Path) -> None:
    """Markdown tables of the rows in ``path`` (the last row of each model and variant wins)."""
    fid, search = {}, []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "variant" in row:
            fid[(row["model"], row["variant"])] = row
        elif "budget" in row or "unmet" in row:
            search.append(row)
    if fid:
        models = list(dict.fromkeys(m for m, _ in fid))
        print("| model | int8 | + refit | equalize + int8 | smooth-quant + int8 | all + refit | per-tensor | "
              "equalize + per-tensor | per-tensor + refit | refit s |")
        print("|---|---|---|---|---|---|---|---|---|---|")

        def cell(model, variant):
            r = fid.get((model, variant))
            if r is None:
                return "-"
            if "error" in r:
                return "failed"
            return f"{r['snr_db']:.1f} dB / {r['cosine']:.4f}"

        for m in models:
            variants = [v for mm, v in fid if mm == m]
            static = "int8 per-tensor" in variants or any(v.startswith("smooth-quant + int8") for v in variants)
            refit = fid.get((m, "int8 + refit"), {})
            cols = ["int8", "int8 + refit", "equalize + int8",
                    "smooth-quant + int8" if static else "smooth-quant (Mul) + int8",
                    "equalize + smooth-quant + int8 + refit" if static else "int4 weights (MatMulNBits)",
                    "int8 per-tensor" if static else "int4 weights (MatMulNBits) + refit",
                    "equalize + int8 per-tensor", "int8 per-tensor + refit"]
            print(f"| {m} | " + " | ".join(cell(m, v) for v in cols) + f" | {refit.get('seconds', '-')} |")
    if search:
        print()
        print("| model | workers | executor | int8 drop / size / latency | front (size, latency, drop) | "
              "chosen | evaluations | search s (sensitivity s) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in search:
            if "unmet" in r or "error" in r:
                print(f"| {r['model']} | {r.get('workers')} | {r.get('executor')} | "
                      f"{r.get('unmet') or r.get('error')} | | | | {r.get('wall_seconds')} |")
                continue
            i8 = r["int8"]
            front = "; ".join(f"{c['size_ratio']:.3f}x {c['latency_ratio']:.2f}x {c['drop']:.2g}" for c in r["front"])
            ch = r["chosen"]
            print(f"| {r['model']} | {r['workers']} | {r['executor']} | {i8['drop']:.3g} / {i8['size_ratio']:.3f}x / "
                  f"{i8['latency_ratio']:.2f}x | {front} | {ch['size_ratio']:.3f}x {ch['latency_ratio']:.2f}x "
                  f"{ch['drop']:.2g} | {r['evaluations']} | {r['seconds']:.0f} ({r['sensitivity_seconds']:.0f}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=("fidelity", "search", "timing", "table"))
    ap.add_argument("--models", default="", help="comma-separated names (default: all present)")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--out", default="bench_recovery.jsonl", help="results are appended here (one JSON a line)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per model and run")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--worker", choices=("fidelity", "search"))
    ap.add_argument("--case")
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.command == "table":
        tables(Path(args.out))
        return
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    data = Path(tempfile.gettempdir()) / "onnxopt-bench-recovery"
    data.mkdir(exist_ok=True)
    out = Path(args.out)
    for case in cases([m for m in args.models.split(",") if m] or None, data):
        make_data(case)
        if args.command == "fidelity":
            run_case("fidelity", case, args, args.workers, "local", out)
        elif args.command == "search":
            run_case("search", case, args, args.workers, args.executor, out, args.no_cache)
        else:  # the same search three ways; no cache, so each computes the sensitivities too
            for workers, executor in ((1, "local"), (2, "local"), (2, "ray")):
                run_case("search", case, args, workers, executor, out, True)


if __name__ == "__main__":
    main()
