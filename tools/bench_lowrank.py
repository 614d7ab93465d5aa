"""Benchmark low-rank factorization (lowrank-matmul, lowrank-conv, separable-conv) on real models.

    OPENBLAS_NUM_THREADS=1 python tools/bench_lowrank.py [--models minilm,ppocr_v4_rec,vgg11_bn,crnn_lstm]
        [--budgets 0.7 0.5] [--variants plain,whitened,refit] [--runs 20] [--json OUT] [--keep DIR]

Every variant is made from the original model in this run and measured against it in the
same run: parameters and MACs (onnxopt's cost model at the evaluation inputs), 1-thread
latency (onnxruntime, all graph optimizations, the variant interleaved with the original,
median of the run-by-run ratios), and fidelity on held-out inputs: MiniLM by the cosine of
mean-pooled sentence embeddings (as tools/bench_minilm.py judges them), the others by the
worst output's cosine and SNR (and top-1 agreement of the classifiers). No peer splits
layers into low-rank factors (see ../shared/reading/peers.md), so the comparison is the
original model itself.

Variants, for each budget (keep that fraction of the candidate layers' parameters):
  lossless  the lossless pipeline alone (every variant runs it first)
  plain     no calibration data: plain SVD, ranks by output error measured on generated
            inputs, no refit
  spectrum  calibration data: whitened SVD, ranks from the whitened spectra alone, no refit
  whitened  calibration data: whitened SVD, ranks by output error measured on calibration
            batches (the default), no refit
  refit     whitened, then the last factor and bias refitted to the original's outputs
Calibration and evaluation data are disjoint: MiniLM calibrates on 254 sentences written
for this benchmark (tools/bench_lowrank_data.py and bench_minilm's SAMPLE) and is judged on
bench_minilm's 32 EVAL sentences; zoo models use NAME.calib.npz / NAME.eval.npz;
ppocr_v4_rec, which has no data here, calibrates on the zoo's synthetic text lines
(crnn_lstm.calib.npz, resized to 48 pixels high) and is judged on crnn_lstm.eval.npz's.

OPENBLAS_NUM_THREADS=1: on a loaded 2-core machine numpy's threaded SVD and Cholesky ran
10-50x slower than on one thread (seconds instead of 0.1 s for a 1536x384 SVD).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
MODELS = ROOT / ".models"
ZOO = MODELS / "zoo"


# -- models ------------------------------------------------------------------------------------
def _npz_batches(path: Path) -> list[dict]:
    with np.load(path) as d:
        keys = list(d.files)
        stacks = {k: d[k] for k in keys}
    n = len(next(iter(stacks.values())))
    return [{k: v[i] for k, v in stacks.items()} for i in range(n)]


def _write_folder(batches: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(batches):
        np.savez(folder / f"batch{i:03d}.npz", **b)
    return folder


def _minilm(tmp: Path) -> dict:
    from bench_lowrank_data import CALIBRATION
    from bench_minilm import EVAL, SAMPLE, tokenize
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODELS / "minilm_l6_tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(64)
    # calibration batches of 16 sentences of similar length, each padded to its longest:
    # padding rows are no part of what the embedding reads
    enc = sorted(tok.encode_batch(CALIBRATION + SAMPLE), key=lambda e: len(e.ids))
    batches = []
    for i in range(0, len(enc), 16):
        group = enc[i:i + 16]
        width = max(len(e.ids) for e in group)
        ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in group], np.int64)
        mask = np.array([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in group], np.int64)
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    evaluation = tokenize(EVAL)  # 32 sentences padded to 64 tokens, as bench_minilm
    return {"path": MODELS / "minilm_l6.onnx", "calibration": _write_folder(batches[::-1], tmp / "minilm_calib"),
            "eval": [{k: v[i:i + 16] for k, v in evaluation.items()} for i in (0, 16)],
            "fidelity": _embedding_cosine, "passes": ["lowrank-matmul"]}


def _embedding_cosine(ref: list[dict], cand: list[dict], eval_batches: list[dict]) -> dict:
    def pooled(outs, batch):
        h = next(iter(outs.values())).astype(np.float64)
        m = batch["attention_mask"][..., None].astype(np.float64)
        p = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    cos = np.concatenate([(pooled(r, b) * pooled(c, b)).sum(1) for r, c, b in zip(ref, cand, eval_batches)])
    return {"fidelity": f"embedding cosine {cos.mean():.4f} (min {cos.min():.4f})", "score": float(cos.mean())}


def _output_fidelity(ref: list[dict], cand: list[dict], eval_batches: list[dict]) -> dict:
    from onnxopt.measure.metrics import is_classifier_like, output_stats

    worst_snr, worst_cos, top1 = float("inf"), 1.0, None
    for name in ref[0]:
        a = np.concatenate([r[name] for r in ref])
        b = np.concatenate([c[name] for c in cand])
        s = output_stats(a, b)
        worst_snr, worst_cos = min(worst_snr, s.get("snr_db", worst_snr)), min(worst_cos, s.get("cosine", 1.0))
        if is_classifier_like(a):
            agree = float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))
            top1 = agree if top1 is None else min(top1, agree)
    text = f"SNR {worst_snr:.1f} dB, cosine {worst_cos:.4f}" + (f", top-1 {top1:.3f}" if top1 is not None else "")
    return {"fidelity": text, "score": worst_cos}


def _zoo(name: str, passes: list[str]):
    def make(tmp: Path) -> dict:
        calib = _npz_batches(ZOO / f"{name}.calib.npz")
        return {"path": ZOO / f"{name}.onnx", "calibration": _write_folder(calib, tmp / f"{name}_calib"),
                "eval": _npz_batches(ZOO / f"{name}.eval.npz"), "fidelity": _output_fidelity, "passes": passes}
    return make


def _text_lines(path: Path, height: int) -> list[dict]:
    """crnn_lstm's synthetic text lines [1, 3, 32, 320] resized to ``height`` rows (linear)."""
    out = []
    for b in _npz_batches(path):
        x = b["image"]
        pos = np.linspace(0, x.shape[2] - 1, height)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, x.shape[2] - 1)
        t = (pos - lo)[None, None, :, None]
        out.append({"x": (x[:, :, lo] * (1 - t) + x[:, :, hi] * t).astype(np.float32)})
    return out


def _ppocr_rec(tmp: Path) -> dict:
    calib = _text_lines(ZOO / "crnn_lstm.calib.npz", 48)
    return {"path": MODELS / "ppocr_v4_rec.onnx", "calibration": _write_folder(calib, tmp / "rec_calib"),
            "eval": _text_lines(ZOO / "crnn_lstm.eval.npz", 48)[:4], "fidelity": _output_fidelity,
            "passes": ["lowrank-matmul"]}


MODEL_SETUPS = {
    "minilm": _minilm,
    "ppocr_v4_rec": _ppocr_rec,
    "vgg11_bn": _zoo("vgg11_bn", ["lowrank-conv{method=channel}", "lowrank-matmul"]),
    "vgg11_bn_spatial": _zoo("vgg11_bn", ["lowrank-conv{method=spatial}", "lowrank-matmul"]),
    "vgg11_bn_tucker2": _zoo("vgg11_bn", ["lowrank-conv{method=tucker2}", "lowrank-matmul"]),
    "resnet18": _zoo("resnet18", ["lowrank-conv{method=channel}"]),
    "crnn_lstm": _zoo("crnn_lstm", ["lowrank-matmul"]),
    "tiny_transformer": _zoo("tiny_transformer", ["lowrank-matmul"]),
}

VARIANTS = {
    "lossless": ({}, False),  # the lossless pipeline alone: what the splits add is measured beside it
    "plain": ({"refit": "false"}, False),
    "spectrum": ({"refit": "false", "select": "spectrum"}, True),
    "whitened": ({"refit": "false"}, True),
    "refit": ({"refit": "true"}, True),
}


def pipeline_text(passes: list[str], budget: float, extra: dict) -> str:
    parts = ["lossless"]
    for p in passes:
        name, _, opts = p.partition("{")
        opts = opts.rstrip("}")
        items = ([opts] if opts else []) + [f"budget={budget}"] + [f"{k}={v}" for k, v in extra.items()]
        parts.append(f"{name}{{{','.join(items)}}}")
    return ",".join(parts)


# -- measuring ---------------------------------------------------------------------------------
def _session(path, threads: int):
    from onnxopt import runtime

    return runtime.session(str(path), None, threads, level="all", spinning=False)


def _outputs(sess, batch: dict) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {k: v for k, v in batch.items()
                                                                          if k in names}))}


def measure(original: Path, variant: Path, setup: dict, runs: int) -> dict:
    import onnx

    from onnxopt.analysis.cost import model_cost
    from onnxopt.measure.compare import interleaved_latency

    feeds = setup["eval"][0]
    shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
    cost = model_cost(onnx.load(str(variant)), input_shapes=shapes, feeds=feeds, memory=False)
    ref_sess, cand_sess = _session(original, 1), _session(variant, 1)
    ref = [_outputs(ref_sess, b) for b in setup["eval"]]
    cand = [_outputs(cand_sess, b) for b in setup["eval"]]
    a, b = interleaved_latency(ref_sess, cand_sess, feeds, runs=runs, budget_s=60.0)
    row = {"params": cost.params, "macs": int(cost.macs) if cost.macs.is_constant else str(cost.macs),
           "latency_ms": statistics.median(b) * 1e3, "original_ms": statistics.median(a) * 1e3,
           "latency_ratio": statistics.median(y / x for x, y in zip(a, b)), "runs": len(a),
           "bytes": variant.stat().st_size}
    row.update(setup["fidelity"](ref, cand, setup["eval"]))
    return row


def _pass_stats(report: dict) -> dict:
    out = {"split": 0, "left": 0, "refit": 0, "pass_seconds": 0.0, "reasons": {}}
    for p in report["passes"]:
        if p["name"] in ("lowrank-matmul", "lowrank-conv", "separable-conv"):
            s = p.get("stats", {})
            out["split"] += s.get("split", 0)
            out["left"] += s.get("left_alone", 0)
            out["refit"] += s.get("refit", 0) or 0
            out["pass_seconds"] += p["seconds"]
            for k, v in (s.get("reasons") or {}).items():
                out["reasons"][k] = out["reasons"].get(k, 0) + v
            if "model_latency_ratio" in s:
                out.setdefault("pass_model_ratio", []).append(s["model_latency_ratio"])
            out.setdefault("layers", []).extend(s.get("layers", []))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,ppocr_v4_rec,vgg11_bn,crnn_lstm")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--variants", default="plain,whitened,refit")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", help="write every row (with the per-layer stats) here")
    ap.add_argument("--keep", help="folder to keep the variants in")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    import onnxopt
    from onnxopt.analysis.cost import model_cost
    from onnxopt.hardware import cpu_model

    rows = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep or tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        for model_name in args.models.split(","):
            setup = MODEL_SETUPS[model_name](tmp)
            original = Path(setup["path"])
            if not original.exists():
                print(f"# {model_name}: {original} missing, skipped", file=sys.stderr)
                continue
            feeds = setup["eval"][0]
            base = model_cost(onnx.load(str(original)), input_shapes={k: list(np.shape(v)) for k, v in feeds.items()},
                              feeds=feeds, memory=False)
            rows.append({"model": model_name, "variant": "original", "params": base.params,
                         "macs": int(base.macs) if base.macs.is_constant else str(base.macs)})
            runs = [(None, "lossless")] + [(b, v) for b in args.budgets for v in args.variants.split(",")]
            for budget, variant in runs:
                extra, calibrated = VARIANTS[variant]
                text = "lossless" if variant == "lossless" else pipeline_text(setup["passes"], budget, extra)
                out = tmp / f"{model_name}_{variant}_{budget}.onnx"
                started = time.perf_counter()
                try:
                    result = onnxopt.optimize(str(original), pipeline=text,
                                              calibration=str(setup["calibration"]) if calibrated else None)
                except onnxopt.OnnxoptError as exc:
                    rows.append({"model": model_name, "variant": variant, "budget": budget,
                                 "error": str(exc)})
                    continue
                result.save(out)
                row = {"model": model_name, "variant": variant, "budget": budget, "pipeline": text,
                       "seconds": time.perf_counter() - started, **_pass_stats(result.report)}
                row.update(measure(original, out, setup, args.runs))
                row["params_ratio"] = row["params"] / base.params
                if isinstance(row["macs"], int) and base.macs.is_constant:
                    row["macs_ratio"] = row["macs"] / int(base.macs)
                rows.append(row)
                if args.json:  # after every row: a long run that stops keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
                print(f"# {model_name} {variant} {budget}: params {row['params_ratio']:.3f}x, "
                      f"latency {row['latency_ratio']:.3f}x, {row['fidelity']}, split {row['split']}, "
                      f"{row['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"onnxruntime {ort.__version__}, {cpu_model()} ({os.cpu_count()} cores), 1 thread; load average "
          f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {platform.python_version()}")
    print()
    print("| model | budget | variant | layers split | params | MACs | latency 1T | fidelity | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["variant"] == "original":
            print(f"| {r['model']} | - | original | - | {r['params'] / 1e6:.2f} M | {_macs(r['macs'])} | 1.00x | - | - |")
            continue
        if "error" in r:
            print(f"| {r['model']} | {r['budget']} | {r['variant']} | error: {r['error'][:80]} | | | | | |")
            continue
        split = f"{r['split']} of {r['split'] + r['left']}" if r["variant"] != "lossless" else "-"
        print(f"| {r['model']} | {r['budget'] or '-'} | {r['variant']} | {split} | "
              f"{r['params_ratio']:.3f}x | {r.get('macs_ratio', float('nan')):.3f}x | "
              f"{r['latency_ratio']:.3f}x ({r['latency_ms']:.1f} vs {r['original_ms']:.1f} ms) | "
              f"{r['fidelity']} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


def _macs(m) -> str:
    return f"{m / 1e9:.2f} G" if isinstance(m, int) else str(m)


if __name__ == "__main__":
    sys.exit(main())
