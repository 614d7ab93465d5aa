"""Pruning benchmark: prune-channels and prune-magnitude against onnxsim 0.8.1's structured
pruning, every row measured against the original model in the same run.

    python tools/bench_pruning.py [--models resnet18,ppocr_v4_det,…] [--ratio 0.3] [--sparsity 0.5]
        [--runs 20] [--write BENCHMARKS.md] [--json results.json]

Per model (ppocr det/rec/cls, the digits CNN, MiniLM, torchvision zoo exports):

- ``onnxopt`` = ``lossless,prune-channels{ratio=R}`` with calibration data (criterion auto =
  activation, least-squares refit of every consumer against the original model);
  ``onnxopt, no refit`` = the same with ``refit=off`` (what point 4 buys);
- ``onnxsim`` = onnxsim.simplify, then ``apply_structured_pruning(sparsity=R)``, then its refit
  ``apply_pruning_finetune`` on the same calibration batches (onnxsim 0.8.1 run from
  ``.models/peers-venv``, or ``--peer-python``);
- ``magnitude`` = ``lossless,prune-magnitude{sparsity=S}``: file and gzip size.

Measured against the original: params, MACs (onnxopt's cost model at the evaluation
inputs), 1-thread latency (the two models interleaved in one process, median of the pair
ratios: onnxopt.measure.compare), the worst output's SNR and the task metric: digits
accuracy on the test split; MiniLM mean cosine of mean-pooled sentence embeddings; PP-OCR
on rendered text (Pillow, DejaVu fonts; calibration and evaluation texts differ): cls
accuracy of the 0/180 label, rec character agreement of the greedy CTC decode with the
original's (no dictionary ships with the model), det IoU of the text mask (p > 0.3) with
the original's. The zoo exports have random weights: their fidelity figures only show the
surgery is sound, not accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools" / "bench"))

MODELS = REPO / ".models"
ZOO = MODELS / "zoo"
EXAMPLES = REPO / "examples"
CNN_ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
           "regnet_y_400mf", "convnext_tiny"]
DEFAULT = ["ppocr_v4_det", "ppocr_v4_rec", "ppocr_mobile_v2_cls", "digits_cnn", "minilm_l6"] + CNN_ZOO
CNNS = set(CNN_ZOO) | {"ppocr_v4_det", "ppocr_v4_rec", "ppocr_mobile_v2_cls", "digits_cnn"}

PEER = r'''
import sys, numpy as np, onnx, onnxsim
src, out, calib, ratio = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
simp, _ = onnxsim.simplify(onnx.load(src), check_n=0)
pruned = onnxsim.apply_structured_pruning(simp, sparsity=ratio)
onnx.save(pruned, out + ".nofinetune.onnx")
with np.load(calib) as d:
    batches = [{k: d[k][i] for k in d.files} for i in range(len(d[d.files[0]]))]
onnx.save(onnxsim.apply_pruning_finetune(simp, pruned, calibration_data=batches), out)
'''


# -- data ------------------------------------------------------------------------------------
WORDS = ("invoice total amount paid date order number customer street city phone email price "
         "quantity item description tax discount balance account bank transfer reference code "
         "delivery address shipping receipt thank you for your purchase welcome station platform "
         "train departs arrival gate flight boarding seat class window aisle menu coffee tea sugar "
         "milk bread butter cheese apple orange banana lemon water juice hotel room key floor").split()


def _text_lines(rng, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(2, 4)))
        if rng.random() < 0.5:
            words.append(str(rng.integers(10, 99999)))
        text = " ".join(w.capitalize() if rng.random() < 0.3 else w for w in words)
        out.append(text)
    return out


def _font(rng, size: int):
    from PIL import ImageFont

    names = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]
    return ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{names[rng.integers(len(names))]}", size)


def _line_image(text: str, rng, height: int, width: int):
    from PIL import Image, ImageDraw

    font = _font(rng, int(height * rng.uniform(0.55, 0.75)))
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (width, height), (bg, bg, bg))
    ImageDraw.Draw(img).text((int(rng.integers(2, 10)), int(height * 0.12)), text, font=font,
                             fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
    return np.asarray(img, np.float32)


def _normalize_line(a: np.ndarray) -> np.ndarray:
    return ((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def _page(rng, size: int = 320) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(5, 25))
    for text in _text_lines(rng, 6):
        font = _font(rng, int(rng.integers(14, 26)))
        draw.text((int(rng.integers(5, 60)), y), text, font=font, fill=(20, 20, 20))
        y += int(rng.integers(32, 50))
        if y > size - 30:
            break
    a = np.asarray(img, np.float32) / 255.0
    a = (a - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def ppocr_data(name: str, seed: int, count: int) -> tuple[list[dict], np.ndarray | None]:
    rng = np.random.default_rng(seed)
    feeds, labels = [], []
    for text in _text_lines(rng, count):
        if name == "ppocr_v4_det":
            feeds.append({"x": _page(rng)})
        elif name == "ppocr_v4_rec":
            feeds.append({"x": _normalize_line(_line_image(text, rng, 48, 320))})
        else:
            a = _line_image(text, rng, 48, 192)
            flip = int(rng.random() < 0.5)
            labels.append(flip)
            feeds.append({"x": _normalize_line(a[::-1, ::-1].copy() if flip else a)})
    return feeds, np.array(labels) if labels else None


CALIB_SENTENCES = [
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "The committee will review the budget proposal on Tuesday morning.",
    "Rain is expected across the northern regions later this week.",
    "He forgot his umbrella at the office again.",
    "Machine translation has improved a lot in recent years.",
    "Our flight was delayed by two hours because of fog.",
    "The recipe calls for fresh basil, garlic and olive oil.",
    "Students gathered in the library to prepare for exams.",
    "The new bridge connects the old town with the harbour.",
    "Please turn off your phones during the performance.",
    "Electric cars need fewer repairs than petrol ones.",
    "The orchestra rehearsed the symphony for three weeks.",
    "She adopted a grey cat from the animal shelter.",
    "Solar panels cover the roof of the new school.",
    "The bakery opens at six and sells out by noon.",
    "Water boils at a lower temperature in the mountains.",
]


def calibration_sentences(count: int = 128, seed: int = 7) -> list[str]:
    """The sixteen sentences above and more made from them: each sentence's first half
    joined to another's second half (different words from the evaluation sentences)."""
    rng = np.random.default_rng(seed)
    halves = [(s.split()[:len(s.split()) // 2], s.split()[len(s.split()) // 2:]) for s in CALIB_SENTENCES]
    out = list(CALIB_SENTENCES)
    while len(out) < count:
        a, b = rng.integers(len(halves), size=2)
        out.append(" ".join(halves[a][0] + halves[b][1]))
    return out


def minilm_feeds(sentences: list[str]) -> dict:
    from models import _minilm_inputs  # tools/bench/models.py

    return _minilm_inputs(sentences)


def model_data(name: str, work: Path):
    """(model path, calibration npz path, evaluation feeds list, labels or None)."""
    if name in CNN_ZOO:
        with np.load(ZOO / f"{name}.eval.npz") as d:
            feeds = [{k: d[k][i] for k in d.files} for i in range(len(d[d.files[0]]))]
        return ZOO / f"{name}.onnx", ZOO / f"{name}.calib.npz", feeds, None
    if name == "digits_cnn":
        with np.load(EXAMPLES / "digits_test.npz") as d:
            return EXAMPLES / "digits_cnn.onnx", EXAMPLES / "digits_calib.npz", [{"image": d["image"]}], d["label"]
    if name == "minilm_l6":
        from models import SENTENCES

        calib = work / "minilm.calib.npz"
        c = minilm_feeds(calibration_sentences())
        np.savez(calib, **{k: v.reshape(16, 8, -1) for k, v in c.items()})
        return MODELS / "minilm_l6.onnx", calib, [minilm_feeds(SENTENCES)], None
    calib_feeds, _ = ppocr_data(name, 1, 16)
    feeds, labels = ppocr_data(name, 2, 32)
    calib = work / f"{name}.calib.npz"
    np.savez(calib, **{"x": np.stack([f["x"] for f in calib_feeds])})
    return MODELS / f"{name}.onnx", calib, feeds, labels


# -- task metrics -------------------------------------------------------------------------------
def _ctc(probs: np.ndarray) -> list[int]:
    idx = probs.argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(int(i))
        prev = i
    return out


def _edit(a: list, b: list) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def task_metric(name: str, ref: list[list[np.ndarray]], cand: list[list[np.ndarray]], feeds, labels):
    """(metric name, original's value, candidate's value) or None."""
    if name == "digits_cnn":
        return "accuracy", float(np.mean(ref[0][0].argmax(-1) == labels)), float(np.mean(cand[0][0].argmax(-1) == labels))
    if name == "minilm_l6":
        mask = feeds[0]["attention_mask"][..., None].astype(np.float64)

        def emb(h):
            p = (h.astype(np.float64) * mask).sum(1) / mask.sum(1)
            return p / np.linalg.norm(p, axis=1, keepdims=True)

        return "embedding cosine", 1.0, float(np.mean(np.sum(emb(ref[0][0]) * emb(cand[0][0]), axis=1)))
    if name == "ppocr_mobile_v2_cls":
        r = np.array([o[0].argmax(-1)[0] for o in ref])
        c = np.array([o[0].argmax(-1)[0] for o in cand])
        return "0/180 accuracy", float(np.mean(r == labels)), float(np.mean(c == labels))
    if name == "ppocr_v4_rec":
        total = errors = 0
        for a, b in zip(ref, cand):
            s, t = _ctc(a[0][0]), _ctc(b[0][0])
            total += max(len(s), 1)
            errors += _edit(s, t)
        return "char agreement", 1.0, 1.0 - errors / total
    if name == "ppocr_v4_det":
        inter = union = 0
        for a, b in zip(ref, cand):
            ma, mb = a[0] > 0.3, b[0] > 0.3
            inter += int((ma & mb).sum())
            union += int((ma | mb).sum())
        return "text-mask IoU", 1.0, inter / max(union, 1)
    return None


# -- measuring ----------------------------------------------------------------------------------
def outputs(path, feeds) -> list[list[np.ndarray]]:
    from onnxopt.runtime import session

    s = session(str(path), threads=2)
    return [s.run(None, f) for f in feeds]


def snr_db(ref, cand) -> float:
    worst = np.inf
    for k in range(len(ref[0])):
        a = np.concatenate([r[k].ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([c[k].ravel() for c in cand]).astype(np.float64)
        noise = np.sum((a - b) ** 2)
        worst = min(worst, np.inf if noise == 0 else 10 * np.log10(np.sum(a * a) / noise))
    return float(worst)


def gz_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), 6))


def measure(name, src: Path, cand: Path, feeds, labels, ref_outs, runs: int, cost0) -> dict:
    import onnx

    from onnxopt.analysis.cost import model_cost
    from onnxopt.measure.compare import compare

    row = {"file_ratio": cand.stat().st_size / src.stat().st_size, "gzip_ratio": gz_size(cand) / gz_size(src)}
    try:
        c = model_cost(onnx.load(str(cand)), feeds=feeds[0], memory=False)
        row["params_ratio"] = int(c.params) / int(cost0.params)
        row["macs_ratio"] = int(c.macs) / int(cost0.macs)
        cand_outs = outputs(cand, feeds)
        row["snr_db"] = snr_db(ref_outs, cand_outs)
        tm = task_metric(name, ref_outs, cand_outs, feeds, labels)
        if tm:
            row["task"], row["task_ref"], row["task_value"] = tm
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "x.npz", **{k: v[None] for k, v in feeds[0].items()})
            cmp = compare(str(src), str(cand), data=str(Path(tmp) / "x.npz"), threads=1, runs=runs, memory=False)
        row["latency_ratio"] = cmp["latency_ratio"]
        row["latency_ms"] = cmp["reference"]["latency_ms"]
    except Exception as exc:  # noqa: BLE001 - a broken variant is a row, not a stop
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return row


def ours(src: Path, dst: Path, pipeline: str, calib: Path | None) -> dict:
    from onnxopt.optimize import optimize

    start = time.perf_counter()
    result = optimize(str(src), pipeline=pipeline, calibration=str(calib) if calib else None)
    result.save(dst)
    stats = next((p["stats"] for p in result.report["passes"] if p["name"].startswith("prune")), {})
    status = next((p["status"] for p in result.report["passes"] if p["name"].startswith("prune")), "?")
    return {"seconds": time.perf_counter() - start, "status": status,
            "refit": stats.get("refit"), "left_alone": stats.get("left_alone"),
            "pruned_groups": stats.get("pruned_groups"), "groups": stats.get("groups"),
            "stored_sparse": stats.get("stored_sparse")}


def peer(src: Path, dst: Path, calib: Path, ratio: float, python: str, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([python, "-c", PEER, str(src), str(dst), str(calib), str(ratio)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0 or not dst.exists():
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"seconds": time.perf_counter() - start}


def bench(name: str, args, work: Path, log) -> list[dict]:
    import onnx

    from onnxopt.analysis.cost import model_cost

    src, calib, feeds, labels = model_data(name, work)
    if not src.exists():
        return [{"model": name, "variant": "-", "error": f"{src} missing"}]
    ref_outs = outputs(src, feeds)
    cost0 = model_cost(onnx.load(str(src)), feeds=feeds[0], memory=False)
    rows = []
    variants = [
        ("onnxopt", lambda d: ours(src, d, f"lossless,prune-channels{{ratio={args.ratio}}}", calib)),
        ("onnxopt, no refit", lambda d: ours(src, d, f"lossless,prune-channels{{ratio={args.ratio},refit=off}}", calib)),
        ("onnxsim + finetune", lambda d: peer(src, d, calib, args.ratio, args.peer_python, args.timeout)),
        ("onnxsim", None),  # written by the row above
        ("lossless only", lambda d: ours(src, d, "lossless", None)),
        (f"magnitude {args.sparsity}", lambda d: ours(src, d, f"lossless,prune-magnitude{{sparsity={args.sparsity}}}", None)),
    ]
    for variant, make in variants:
        dst = work / f"{name}.{variant.replace(' ', '_').replace(',', '').replace('+', 'p')}.onnx"
        if make is None:
            dst = work / f"{name}.onnxsim_p_finetune.onnx.nofinetune.onnx"
            info = {} if dst.exists() else {"error": "not written"}
        else:
            try:
                info = make(dst)
            except Exception as exc:  # noqa: BLE001
                info = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        row = {"model": name, "variant": variant, **info}
        if "error" not in info:
            row.update(measure(name, src, dst, feeds, labels, ref_outs, args.runs, cost0))
        rows.append(row)
        log(json.dumps(row, default=str))
    return rows


# -- report -------------------------------------------------------------------------------------
def _r(x, fmt="{:.2f}x"):
    return "—" if x is None else fmt.format(x)


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | params | MACs | latency 1T | SNR dB | task metric (original → this) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] in ("lossless only",) or r["variant"].startswith("magnitude"):
            continue
        task = f"{r['task']}: {r['task_ref']:.3f} → {r['task_value']:.3f}" if "task" in r else "—"
        notes = r.get("error") or ""
        if r.get("status") == "unchanged":
            notes = "nothing pruned"
        elif "refit" in r and isinstance(r["refit"], dict):
            notes = f"refit {r['refit'].get('refitted', 0)} layers; {r.get('pruned_groups')}/{r.get('groups')} groups pruned"
        elif r.get("pruned_groups") is not None:
            notes = f"{r.get('pruned_groups')}/{r.get('groups')} groups pruned"
        lines.append(f"| {r['model']} | {r['variant']} | {_r(r.get('params_ratio'))} | {_r(r.get('macs_ratio'))} | "
                     f"{_r(r.get('latency_ratio'))} | {_r(r.get('snr_db'), '{:.1f}')} | {task} | {notes} |")
    return "\n".join(lines)


def size_table(rows: list[dict]) -> str:
    lines = ["| model | variant | file | gzip | SNR dB | task metric | sparse initializers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not (r["variant"] == "lossless only" or r["variant"].startswith("magnitude")):
            continue
        task = f"{r['task']}: {r['task_ref']:.3f} → {r['task_value']:.3f}" if "task" in r else "—"
        lines.append(f"| {r['model']} | {r['variant']} | {_r(r.get('file_ratio'))} | {_r(r.get('gzip_ratio'))} | "
                     f"{_r(r.get('snr_db'), '{:.1f}')} | {task} | {r.get('stored_sparse') or 0} |")
    return "\n".join(lines)


def goals(rows: list[dict], ratio: float) -> str:
    out = []
    for r in rows:
        if r["variant"] != "onnxopt" or r["model"] not in CNNS or "error" in r:
            continue
        peer_row = next((p for p in rows if p["model"] == r["model"] and p["variant"] == "onnxsim + finetune"), {})
        checks = [("params ≤ 0.75x", r.get("params_ratio", 9) <= 0.75), ("MACs ≤ 0.65x", r.get("macs_ratio", 9) <= 0.65),
                  ("latency ≤ 0.8x", r.get("latency_ratio", 9) <= 0.8)]
        if "snr_db" in peer_row:
            checks.append(("SNR above onnxsim's", r.get("snr_db", -1e9) > peer_row["snr_db"]))
        missed = [c for c, ok in checks if not ok]
        out.append(f"- {r['model']}: " + ("all met" if not missed else "missed " + ", ".join(missed)))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT))
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--peer-python", default=str(MODELS / "peers-venv" / "bin" / "python"))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--write", type=Path)
    p.add_argument("--section", default="Pruning (issue 15)")
    p.add_argument("--json", type=Path)
    p.add_argument("--render", type=Path, metavar="RESULTS.json",
                   help="measure nothing: write the tables of an earlier run's --json (of these --models)")
    p.add_argument("--note", default="", help="a line to add under the command (with --render: the run's load)")
    args = p.parse_args(argv)
    from harness import machine, write_section

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    if args.render:
        wanted = args.models.split(",")
        rows = [r for r in json.loads(args.render.read_text()) if r["model"] in wanted]
        rows.sort(key=lambda r: wanted.index(r["model"]))
    else:
        for name in args.models.split(","):
            log(f"== {name}")
            rows.extend(bench(name, args, work, log))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    models = f" --models {args.models}" if args.models != ",".join(DEFAULT) else ""
    command = (f"`python tools/bench_pruning.py --ratio {args.ratio} --sparsity {args.sparsity} --runs {args.runs}"
               f"{models} --write BENCHMARKS.md`")
    if args.render:
        command = (f"`python tools/bench_pruning.py --ratio {args.ratio} --sparsity {args.sparsity} --runs "
                   f"{args.runs}{models} --json results.json`, tables by `--render results.json`")
    body = "\n".join([
        command,
        "", f"{datetime.date.today()}; {machine()}; " + (args.note if args.render else
                                                          f"load average {load_before[0]:.1f} before, "
                                                          f"{os.getloadavg()[0]:.1f} after.") + "", "",
        f"Channel pruning at ratio {args.ratio}: ratios against the original model, latency with 1 thread "
        "(interleaved with the original, median of pair ratios), SNR of the worst output on the evaluation "
        "inputs. `onnxopt` = `lossless,prune-channels{ratio=…}` (activation criterion, least-squares refit of "
        "the consumers); `onnxsim + finetune` = onnxsim.simplify + apply_structured_pruning + "
        "apply_pruning_finetune on the same calibration batches.", "",
        table(rows), "", "Goals at this ratio (CNNs):", "", goals(rows, args.ratio), "",
        f"Magnitude pruning `lossless,prune-magnitude{{sparsity={args.sparsity}}}` (storage auto): file and gzip "
        "size against the original file, next to the lossless pipeline alone.", "", size_table(rows)])
    print(body)
    if args.write:
        write_section(args.write, args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
