"""Benchmark: every model through each built-in target's default pipeline, judged on this CPU.

For each model (the digits CNN of examples/ and the six real models of ../shared/models in
.models/) and each target (cpu, cpu-avx2, gpu with data = int8 Q/DQ, gpu without data =
float16, npu with fixed shapes), the model is optimized by the target's default pipeline,
with calibration data where the target quantizes statically (made as tools/bench_quantize.py
makes it, from other seeds than the evaluation inputs: rendered text lines for PP-OCR,
synthetic voiced audio for Silero, other sentences for MiniLM, the train split for digits).
Reported against the float original, measured in the same run: file size, latency with one
thread on this CPU (onnxruntime CPU provider, ORT_ENABLE_ALL, the two sessions interleaved
A B B A after a warm-up, median of the per-pair ratios), fidelity on the evaluation inputs
(worst output's SNR; digits: test accuracy; MiniLM: mean cosine of mean-pooled sentence
embeddings) and the verdict of `onnxopt check` against the target. Beside the npu row, the
tool a QNN user would otherwise pick: onnxruntime's `get_qnn_qdq_config` + `quantize` on the
same fixed-shape model and calibration data, judged by the same check.

The cpu target's activation type was chosen by measurement (``--schemes``): U8S8 (uint8
activations) against S8S8 (int8 activations) on the CNNs, same pipeline otherwise.

    python tools/bench_targets.py --write BENCHMARKS.md --json /tmp/targets.json
    python tools/bench_targets.py --schemes --models digits_cnn,ppocr_v4_det,ppocr_v4_rec

No GPU or NPU is attached here: latency of the gpu and npu rows is their model's latency on
this CPU (what the file costs where it does run), not the hardware's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

MODELS = REPO / ".models"
SECTION = "Hardware targets: default pipelines, check verdicts"
TARGETS = ["cpu", "cpu (no data)", "cpu-avx2", "gpu", "gpu (no data)", "npu"]
ALIGNMENT = {"gpu": 8, "npu": 32}  # the values; the pruning issue adds them to the files


# -- data: (calibration batches, evaluation batches), equal shapes per batch ------------------------
def _stack(arrays: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Rows of each array split into batches of ``batch`` (the remainder dropped)."""
    out = {}
    for k, v in arrays.items():
        n = len(v) // batch
        out[k] = v[: n * batch].reshape((n, batch) + v.shape[1:])
    return out


def _audio(n: int, length: int, seed: int) -> np.ndarray:
    """(n, length) voiced-like 16 kHz frames: a few harmonics of a 90-300 Hz pitch under an
    envelope, plus noise; amplitudes from whisper to loud."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000.0
    out = np.empty((n, length), np.float32)
    for i in range(n):
        f0 = rng.uniform(90, 300)
        wave = sum(rng.uniform(0, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 6))
        env = np.clip(np.sin(np.pi * (t / t[-1]) * rng.uniform(0.5, 2)), 0, None)
        amp = rng.choice([0.005, 0.05, 0.3]) if rng.random() < 0.8 else 0.0
        out[i] = amp * wave * env + rng.normal(0, 0.003, length)
    return out


def _tokens(sentences: list[str], seq: int) -> dict[str, np.ndarray]:
    """MiniLM inputs for ``sentences``, padded to ``seq`` tokens (the evaluation's length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODELS / "minilm_l6_tokenizer" / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int64)
    return {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.zeros_like(ids)}


def make_data(name: str) -> tuple[dict, dict]:
    """(calibration, evaluation) stacks of batches for model ``name``."""
    from bench_quantize import cls_images, det_images, rec_images

    if name == "digits_cnn":
        with np.load(REPO / "examples" / "digits_calib.npz") as c, np.load(REPO / "examples" / "digits_test.npz") as e:
            return {"image": c["image"]}, _stack({"image": e["image"]}, 8)
    if name in ("ppocr_mobile_v2_cls", "ppocr_v4_rec", "ppocr_v4_det"):
        make, calib, evals = {"ppocr_mobile_v2_cls": (cls_images, 16, 8), "ppocr_v4_rec": (rec_images, 8, 4),
                              "ppocr_v4_det": (det_images, 8, 4)}[name]
        return {"x": make(calib, seed=1)}, {"x": make(evals, seed=2)}
    if name == "silero_vad_16k_op15":
        def frames(n, seed):
            return {"input": _audio(n, 512, seed)[:, None, :], "state": np.zeros((n, 2, 1, 128), np.float32),
                    "sr": np.full((n,), 16000, np.int64)}
        return frames(32, 11), frames(16, 12)
    if name == "silero_vad_16k_sequence":
        def seqs(n, seed):
            return {"input": _audio(n * 16, 576, seed).reshape(n, 16, 576), "h": np.zeros((n, 1, 1, 128), np.float32),
                    "c": np.zeros((n, 1, 1, 128), np.float32)}
        return seqs(8, 13), seqs(4, 14)
    if name == "minilm_l6":
        from bench.models import SENTENCES, SEQ
        from bench_minilm import SAMPLE

        return _stack(_tokens(SAMPLE, SEQ), 8), _stack(_tokens(SENTENCES, SEQ), 8)
    raise KeyError(name)


def model_path(name: str) -> Path:
    return REPO / "examples" / "digits_cnn.onnx" if name == "digits_cnn" else MODELS / f"{name}.onnx"


def batches(stack: dict) -> list[dict]:
    n = len(next(iter(stack.values())))
    return [{k: np.asarray(v[i]) for k, v in stack.items()} for i in range(n)]


# -- measuring ---------------------------------------------------------------------------------------
def session(proto_or_path, threads: int = 1):
    from onnxopt import runtime

    source = str(proto_or_path) if isinstance(proto_or_path, Path) else proto_or_path
    return runtime.session(source, ["CPUExecutionProvider"], threads, level="all", spinning=False)


def run_all(sess, data: list[dict]) -> list[dict]:
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    return [dict(zip(names, sess.run(None, {k: v for k, v in b.items() if k in inputs}))) for b in data]


def fidelity(name: str, ref: list[dict], got: list[dict], eval_stack: dict) -> dict:
    from onnxopt.measure import metrics as M

    worst_snr, worst_cos = np.inf, 1.0
    for key in ref[0]:
        a = np.concatenate([np.ravel(r[key]) for r in ref]).astype(np.float64)
        b = np.concatenate([np.ravel(g[key]) for g in got]).astype(np.float64)
        s = M.output_stats(a, b)
        worst_snr, worst_cos = min(worst_snr, s["snr_db"]), min(worst_cos, s["cosine"])
    out = {"snr_db": worst_snr, "cosine": worst_cos}
    if name == "digits_cnn":
        with np.load(REPO / "examples" / "digits_test.npz") as d:
            labels = d["label"][: sum(len(g["logits"]) for g in got)]
        pred = np.concatenate([np.argmax(g["logits"], 1) for g in got])
        out["task"] = ("accuracy", float(np.mean(pred == labels)))
    if name == "minilm_l6":
        def pooled(outs, masks):
            hidden = np.concatenate([o["last_hidden_state"] for o in outs]).astype(np.float64)
            m = np.concatenate(masks)[..., None].astype(np.float64)
            e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            return e / np.linalg.norm(e, axis=1, keepdims=True)

        masks = list(eval_stack["attention_mask"])
        out["task"] = ("embedding cosine", float(np.mean(np.sum(pooled(ref, masks) * pooled(got, masks), 1))))
    return out


def latency_ratio(ref_proto, cand_proto, feeds: dict, runs: int) -> tuple[float, float, float]:
    """(reference ms, candidate ms, median ratio of interleaved pairs), 1 thread."""
    from onnxopt.measure.compare import interleaved_latency

    a_sess, b_sess = session(ref_proto), session(cand_proto)
    a, b = interleaved_latency(a_sess, b_sess, feeds, runs=runs, budget_s=30.0)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3, statistics.median(y / x for x, y in zip(a, b))


def fixed_shapes(eval_stack: dict) -> dict[str, list[int]]:
    return {k: list(v.shape[1:]) for k, v in eval_stack.items()}


def target_for(label: str):
    from onnxopt.target import load_target

    t = load_target(label.split(" ")[0])
    if t.name in ALIGNMENT:
        t.capabilities.setdefault("channel_multiple", ALIGNMENT[t.name])
    return t


def optimize_for(label: str, path: Path, calib_path: Path, eval_stack: dict):
    import onnxopt

    t = target_for(label)
    data = None if "no data" in label else str(calib_path)
    shapes = fixed_shapes(eval_stack) if t.capabilities.get("static_shapes") else None
    started = time.perf_counter()
    result = onnxopt.optimize(str(path), target=t, calibration=data, input_shapes=shapes)
    return result, time.perf_counter() - started, t


def qnn_peer(path: Path, calib: dict, eval_stack: dict, out: Path) -> tuple[onnx.ModelProto | None, str]:
    """onnxruntime's QNN recipe on the fixed-shape model, as its documentation gives it:
    quant_pre_process (shape inference, onnxruntime's basic graph optimizations),
    qnn_preprocess_model (Gelu/LayerNorm/LpNorm fusions), then get_qnn_qdq_config (its defaults:
    uint8 activations and weights, per tensor) + quantize."""
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    import onnxopt

    fixed = onnxopt.optimize(str(path), pipeline="fix-shapes", input_shapes=fixed_shapes(eval_stack)).model
    src = out.with_suffix(".fixed.onnx")
    onnx.save(fixed, src)
    try:
        pre = out.with_suffix(".pre.onnx")
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # noqa: BLE001  (its symbolic shape inference asserts on some models)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # qnn_preprocess_model (onnxruntime 1.32) raises TypeError on any model with
        # metadata_props (dict.update of protobuf entries), which quant_pre_process adds: drop them.
        model = onnx.load(pre)
        del model.metadata_props[:]
        onnx.save(model, pre)
        src = pre
        qnn = out.with_suffix(".qnn.onnx")
        if qnn_preprocess_model(str(src), str(qnn), fuse_layernorm=True):
            src = qnn
    except Exception as exc:  # noqa: BLE001
        return None, f"preprocessing: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches(calib))

        def get_next(self):
            return next(self.items, None)

    try:
        config = get_qnn_qdq_config(str(src), Reader())
        quantize(str(src), str(out), config)
        return onnx.load(out), ""
    except Exception as exc:  # noqa: BLE001  (report the peer's failure, do not stop the benchmark)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def bench_model(name: str, targets: list[str], runs: int, peer: bool, log) -> list[dict]:
    from onnxopt.analysis.target_check import check_model

    path = model_path(name)
    if not path.exists():
        log(f"skip {name}: {path} absent")
        return []
    calib, ev = make_data(name)
    rows = []
    original = onnx.load(path)
    eval_batches = batches(ev)
    ref_outputs = run_all(session(path), eval_batches)
    with tempfile.TemporaryDirectory(prefix="bench-targets-") as tmp:
        calib_path = Path(tmp) / "calib.npz"
        np.savez(calib_path, **calib)
        for label in targets:
            log(f"{name} / {label}")
            try:
                result, seconds, t = optimize_for(label, path, calib_path, ev)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": name, "target": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
                log(f"  failed: {exc}")
                continue
            rows.append(measure(name, label, original, result.model, eval_batches, ev, ref_outputs, runs,
                                check_model(result.model, t), seconds, path))
            if label == "npu" and peer:
                log(f"{name} / npu: onnxruntime get_qnn_qdq_config")
                model, error = qnn_peer(path, calib, ev, Path(tmp) / "qnn.onnx")
                if model is None:
                    rows.append({"model": name, "target": "npu: ORT QNN recipe", "error": error})
                else:
                    rows.append(measure(name, "npu: ORT QNN recipe", original, model, eval_batches, ev, ref_outputs,
                                        runs, check_model(model, t), None, path))
    return rows


def measure(name, label, original, proto, eval_batches, ev, ref_outputs, runs, check, seconds, path) -> dict:
    row = {"model": name, "target": label, "seconds": seconds,
           "bytes_before": path.stat().st_size, "bytes_after": len(proto.SerializeToString()),
           "check": check.summary(), "conforms": check.conforms, "counts": check.counts()}
    try:
        got = run_all(session(proto), eval_batches)
        row.update(fidelity(name, ref_outputs, got, ev))
        row["latency_ms"] = latency_ratio(original, proto, eval_batches[0], runs)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"cannot run on the CPU provider: {str(exc).splitlines()[0][:150]}"
    return row


# -- U8S8 / S8S8 -------------------------------------------------------------------------------------
def bench_schemes(models: list[str], runs: int, log) -> list[dict]:
    import onnxopt

    rows = []
    for name in models:
        path = model_path(name)
        if not path.exists():
            continue
        calib, ev = make_data(name)
        eval_batches = batches(ev)
        original = onnx.load(path)
        ref = run_all(session(path), eval_batches)
        with tempfile.TemporaryDirectory() as tmp:
            calib_path = Path(tmp) / "calib.npz"
            np.savez(calib_path, **calib)
            for scheme, pipeline in (("U8S8", "lossless,quantize-static"),
                                     ("S8S8", "lossless,quantize-static{activation_dtype=int8}")):
                log(f"{name} / {scheme}")
                proto = onnxopt.optimize(str(path), target="cpu", pipeline=pipeline, calibration=str(calib_path)).model
                got = run_all(session(proto), eval_batches)
                row = {"model": name, "scheme": scheme, **fidelity(name, ref, got, ev)}
                row["latency_ms"] = latency_ratio(original, proto, eval_batches[0], runs)
                rows.append(row)
    return rows


# -- writing -----------------------------------------------------------------------------------------
def _fid(r: dict) -> str:
    if "snr_db" not in r:
        return "-"
    snr = "inf" if r["snr_db"] == np.inf else f"{r['snr_db']:.1f}"
    text = f"{snr} dB"
    if "task" in r:
        text += f"; {r['task'][0]} {r['task'][1]:.4f}"
    return text


def _check(r: dict) -> str:
    if r.get("conforms"):
        return "conforms"
    counts = r.get("counts") or {}
    return "exit 3: " + ", ".join(f"{n} {k}" for k, n in counts.items()) if counts else "-"


def markdown(rows: list[dict], scheme_rows: list[dict], command: str, machine: str, load: str,
             references: dict) -> str:
    lines = [f"`{command}`", "", f"Machine: {machine}; load average {load}. " + time.strftime("%Y-%m-%d."), "",
             "Each row: the model through the target's default pipeline (calibration data where the target "
             "quantizes statically; `(no data)`: the same target without it, i.e. its default without "
             "calibration: dynamic int8 on the cpu, float16 on the gpu), against the float "
             "original in the same run. Latency: 1 thread, this CPU, onnxruntime CPU provider, interleaved; "
             "no GPU or NPU here, so gpu/npu rows show what their file costs on this CPU. Fidelity: worst "
             "output's SNR on evaluation inputs never used for calibration (and the task metric where there is "
             "one). Check: `onnxopt check` against the target (npu: channel_multiple 32, gpu: 8, as the issue "
             "sets them). `npu: ORT QNN recipe` is onnxruntime's documented flow for its QNN EP on the same "
             "fixed-shape model and data: `quant_pre_process`, `qnn_preprocess_model`, `get_qnn_qdq_config` "
             "(its defaults: uint8 activations and weights, per tensor) and `quantize`.", "",
             "| model | target | size | latency (1 thread) | fidelity | check |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r and "bytes_after" not in r:
            lines.append(f"| {r['model']} | {r['target']} | - | - | - | failed: {r['error']} |")
            continue
        size = f"{r['bytes_after'] / 1e6:.2f} MB ({r['bytes_after'] / r['bytes_before']:.2f}x)"
        lat = "-" if "latency_ms" not in r else \
            f"{r['latency_ms'][1]:.2f} ms ({r['latency_ms'][2]:.2f}x of {r['latency_ms'][0]:.2f})"
        if "error" in r:
            lat = r["error"]
        lines.append(f"| {r['model']} | {r['target']} | {size} | {lat} | {_fid(r)} | {_check(r)} |")
    if scheme_rows:
        lines += ["", "The cpu target's activation type (`--schemes`): the same pipeline "
                  "(`lossless,quantize-static`) with uint8 activations (U8S8, what `cpu` uses) and int8 "
                  "activations (S8S8), int8 symmetric per-channel weights in both.", "",
                  "| model | scheme | latency vs float (1 thread) | fidelity |", "|---|---|---|---|"]
        for r in scheme_rows:
            lines.append(f"| {r['model']} | {r['scheme']} | {r['latency_ms'][2]:.2f}x ({r['latency_ms'][1]:.2f} ms "
                         f"vs {r['latency_ms'][0]:.2f}) | {_fid(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,ppocr_mobile_v2_cls,ppocr_v4_det,ppocr_v4_rec,"
                                            "silero_vad_16k_op15,silero_vad_16k_sequence,minilm_l6")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--runs", type=int, default=20, help="timed pairs per latency (default 20)")
    parser.add_argument("--schemes", action="store_true", help="also measure U8S8 against S8S8 on the cpu target")
    parser.add_argument("--scheme-models", default="digits_cnn,ppocr_mobile_v2_cls,ppocr_v4_det,ppocr_v4_rec")
    parser.add_argument("--no-peer", action="store_true", help="skip onnxruntime's QNN recipe beside the npu rows")
    parser.add_argument("--only-schemes", action="store_true")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--write", help="write a section into this markdown file (BENCHMARKS.md)")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("onnxopt").setLevel(logging.ERROR)
    from bench.harness import machine, write_section

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    rows: list[dict] = []
    for name in [] if args.only_schemes else args.models.split(","):
        rows += bench_model(name, args.targets.split(","), args.runs, not args.no_peer, log)
        if args.json:  # after each model: a crash later keeps what was measured
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1, default=str))
    schemes = bench_schemes(args.scheme_models.split(","), args.runs, log) if args.schemes or args.only_schemes else []
    load += " → " + "/".join(f"{x:.1f}" for x in os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "schemes": schemes}, indent=1, default=str))
    command = "python tools/bench_targets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, schemes, command.strip(), machine(), load, {})
    print(text)
    if args.write:
        write_section(Path(args.write), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
