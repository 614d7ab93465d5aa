"""Benchmark calibration-free quantization on MiniLM-L6 against onnxruntime's quantizers.

    /work/venv/bin/python tools/bench_minilm.py [--model .models/minilm_l6.onnx]
        [--threads 1 2] [--repeat 30] [--only NAME ...] [--pipeline NAME=TEXT ...]

Every variant is made in the same run and judged the same way:
- latency: median wall time of one batch of 16 sentences padded to 64 tokens, onnxruntime
  CPU provider with ORT_ENABLE_ALL, for each thread count;
- fidelity: cosine similarity of mean-pooled, L2-normalized embeddings of the 32 EVAL
  sentences against the float model (mean and minimum);
- size of the written file.
Variants: the float model, onnxruntime quantize_dynamic per-tensor and per-channel,
onnxruntime's MatMulNBits int4 quantizer, and onnxopt pipelines (cpu target). The
sentences are written for this benchmark; tokenization needs the `tokenizers` package
(a tool dependency only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".models" / "minilm_l6_tokenizer" / "tokenizer.json"
SEQ = 64
BATCH = 16

EVAL = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Quarterly revenue rose 12 percent, driven by strong demand for cloud services in Europe.",
    "Please remember to water the tomatoes before you leave for the airport tomorrow morning.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "I can't believe the train was late again; that's the third time this week!",
    "The committee postponed its vote on the new zoning rules until after the summer recess.",
    "A neural network learns a function by adjusting its weights to reduce a loss on examples.",
    "She played a haunting melody on the old piano while the rain tapped against the windows.",
    "How many kilometres is it from Lisbon to Madrid if you drive through Badajoz?",
    "The patient reported mild chest pain, shortness of breath and a persistent dry cough.",
    "Preheat the oven to 180 degrees, then whisk the eggs with sugar until pale and fluffy.",
    "In 1969, two astronauts walked on the Moon while a third orbited above in the command module.",
    "Our API returns a 429 status code when a client exceeds one hundred requests per minute.",
    "The old lighthouse keeper kept a diary of every storm that passed the rocky coast.",
    "Interest rates are expected to fall slightly as inflation cools across most economies.",
    "My cat refuses to eat anything except the most expensive salmon-flavoured treats.",
    "Glaciers in the Alps have lost more than half of their volume over the past century.",
    "To reset your password, click the link in the email and follow the instructions.",
    "The striker scored twice in the final ten minutes to win the championship for her club.",
    "Shakespeare wrote tragedies, comedies and histories that are still performed around the world.",
    "Low-latency inference on embedded devices often relies on integer arithmetic and pruning.",
    "Is there a pharmacy open late tonight somewhere near the central station?",
    "The museum's new exhibition features ceramics from the Ming dynasty and modern sculpture.",
    "Volcanic ash disrupted flights across northern Europe for nearly a week in April 2010.",
    "He apologized for the misunderstanding and offered to pay for the damaged bicycle.",
    "Compile the project with optimizations enabled, then run the unit tests before merging.",
    "The desert bloomed with wildflowers after an unusually wet winter.",
    "Vaccines train the immune system to recognize a pathogen without causing the disease.",
    "We hiked for six hours through dense forest before reaching the mountain hut at dusk.",
    "Stock markets tumbled after the central bank signalled further rate increases.",
    "The recipe calls for two cups of flour, a pinch of salt and a tablespoon of honey.",
    "Children learn languages fastest when they hear them spoken every day at home.",
]

# Kept apart from EVAL: may serve as calibration / sensitivity data (--sample-npz).
SAMPLE = [
    "A gentle breeze carried the smell of fresh bread through the narrow village streets.",
    "The software update fixes a memory leak and improves battery life on older phones.",
    "Migrating birds navigate thousands of kilometres using the Earth's magnetic field.",
    "The contract must be signed by both parties and returned within thirty days.",
    "Our team shipped the new search feature two weeks ahead of schedule.",
    "Heavy snowfall closed the mountain pass and stranded dozens of trucks overnight.",
    "The professor explained entropy with a deck of cards and a cup of coffee.",
    "Do you know whether the library is open on public holidays?",
    "Solar panels on the school roof now supply most of its electricity in summer.",
    "The detective noticed a faint scratch on the window frame that everyone else missed.",
    "Customers complained that the checkout page froze when they applied a discount code.",
    "Coral reefs support a quarter of all marine species despite covering a tiny area.",
    "He trained for a marathon by running before sunrise five days a week.",
    "The orchestra tuned their instruments while the audience slowly took their seats.",
    "Please send the revised budget to finance by Friday afternoon at the latest.",
    "Ancient Romans built aqueducts that carried water across valleys for many kilometres.",
]

DEFAULT_PIPELINES = {
    "onnxopt default (cpu)": None,  # the cpu target's default pipeline
    "onnxopt int4 weights (MatMulNBits)": "quantize-weights{bits=4,block_size=32}",
    "onnxopt int8 weights (MatMulNBits)": "quantize-weights{bits=8,block_size=32}",
    "onnxopt float16": "convert-float16",
}


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def embeddings(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    out = []
    for start in range(0, len(feeds["input_ids"]), BATCH):
        batch = {k: v[start:start + BATCH] for k, v in feeds.items()}
        hidden = sess.run(None, batch)[0].astype(np.float64)
        mask = batch["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def interleaved_latency(sessions: dict, batch: dict[str, np.ndarray], repeat: int) -> dict[str, float]:
    """Median seconds per batch of each session, timed in turns (one run each per round)."""
    for sess in sessions.values():
        for _ in range(2):
            sess.run(None, batch)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeat):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, batch)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_variants(model: str, out_dir: Path, only: list[str] | None, pipelines: dict[str, str | None]) -> dict:
    """name -> path of each variant (made now, in this run)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    variants = {"float": model}

    def want(name: str) -> bool:
        return only is None or name == "float" or any(o in name for o in only)

    for name, per_channel in (("ort quantize_dynamic per-tensor", False),
                              ("ort quantize_dynamic per-channel", True)):
        if want(name):
            path = out_dir / (name.replace(" ", "_") + ".onnx")
            quantize_dynamic(model, str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
            variants[name] = str(path)
    if want("ort MatMulNBits int4"):
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:  # needs the onnx-ir package
            print(f"# skipped ort MatMulNBits int4: {exc}", file=sys.stderr)
            MatMulNBitsQuantizer = None
    if want("ort MatMulNBits int4") and MatMulNBitsQuantizer is not None:
        q = MatMulNBitsQuantizer(onnx.load(model), block_size=32, is_symmetric=True)
        q.process()
        path = out_dir / "ort_matmulnbits_int4.onnx"
        onnx.save(q.model.model, str(path))
        variants["ort MatMulNBits int4"] = str(path)

    import onnxopt

    for name, text in pipelines.items():
        if not want(name):
            continue
        t0 = time.perf_counter()
        result = onnxopt.optimize(model, target="cpu", pipeline=text)
        path = out_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        result.save(path)
        print(f"# {name}: pipeline {result.report.get('pipeline', text)!r} "
              f"made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        variants[name] = str(path)
    return variants


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".models" / "minilm_l6.onnx"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--only", nargs="+", help="substrings of the variant names to run (float always runs)")
    ap.add_argument("--pipeline", action="append", default=[], metavar="NAME=TEXT",
                    help="extra onnxopt variant (cpu target); may repeat")
    ap.add_argument("--keep", help="folder to keep the variants in (default: a temporary one)")
    ap.add_argument("--sample-npz", help="write the SAMPLE sentences' token ids here and exit")
    args = ap.parse_args(argv)
    if args.sample_npz:
        np.savez(args.sample_npz, **tokenize(SAMPLE))
        return 0
    if not Path(args.model).exists():
        print(f"{args.model}: missing (see ../shared/models/export_minilm.sh)", file=sys.stderr)
        return 2
    pipelines = dict(DEFAULT_PIPELINES)
    for item in args.pipeline:
        name, _, text = item.partition("=")
        pipelines[name] = text
    feeds = tokenize(EVAL)
    batch = {k: v[:BATCH] for k, v in feeds.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        variants = make_variants(args.model, out_dir, args.only, pipelines)
        embs = {name: embeddings(session(path, args.threads[0]), feeds) for name, path in variants.items()}
        ref = embs["float"]
        lat = {name: {} for name in variants}
        for threads in args.threads:
            # Round robin over the variants, so load from other processes hits all alike.
            sessions = {name: session(path, threads) for name, path in variants.items()}
            times = interleaved_latency(sessions, batch, args.repeat)
            for name in variants:
                lat[name][threads] = times[name]
        rows = []
        for name, path in variants.items():
            cos = (embs[name] * ref).sum(1)
            rows.append((name, os.path.getsize(path), lat[name], float(cos.mean()), float(cos.min())))
    cpu = _cpu_name()
    print(f"MiniLM-L6, batch {BATCH}x{SEQ} tokens, {len(EVAL)} eval sentences, median of {args.repeat}, "
          f"onnxruntime {ort.__version__} ORT_ENABLE_ALL, {cpu}, load average {os.getloadavg()[0]:.1f} at the end")
    head = "| variant | size MB | " + " | ".join(f"{t} thr ms (x float)" for t in args.threads) + \
        " | cosine mean | cosine min |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base = rows[0][2]
    for name, size, lat, cmean, cmin in rows:
        cells = " | ".join(f"{lat[t] * 1e3:.1f} ({lat[t] / base[t]:.2f}x)" for t in args.threads)
        print(f"| {name} | {size / 1e6:.1f} | {cells} | {cmean:.4f} | {cmin:.4f} |")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                vnni = "avx512_vnni" in flags or "avx_vnni" in flags
                return f"{name} ({os.cpu_count()} cores, {'with' if vnni else 'without'} VNNI)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
