"""One benchmark harness: models x (onnxopt pipelines + competitors) -> the BENCHMARKS.md table.

    python tools/bench/harness.py --models digits_cnn,ppocr_v4_det --pipelines lossless \
        --competitors onnxsim,onnxoptimizer --write BENCHMARKS.md --section "Lossless pipeline (harness)"

For every model, every variant is produced in its own child process (wall time and the
child's peak RSS from /usr/bin/time, so the parent's memory does not leak into the figure),
then measured here against the original in the same run:

- nodes (subgraphs included), file size, params, MACs and peak activation memory from the
  cost model (onnxopt.analysis.cost) at the inputs the model is measured on;
- latency with 1 and 2 threads: the variant and the original interleaved in one process
  after a warm-up (onnxopt.measure.compare), median of each and the ratio;
- fidelity against the original's outputs: the worst output's SNR (dB) and cosine;
- the model's task metric where tools/bench/models.py has one (digits: test accuracy;
  MiniLM: mean cosine of sentence embeddings to the original's).

Variants: `loadsave` (onnx.load + onnx.save: the time baseline), `onnxopt:PIPELINE` for each
of --pipelines, and the competitors: onnxsim, onnxoptimizer, onnxslim, ort-basic
(onnxruntime's BASIC graph optimizer writing the model), ort-dynamic (onnxruntime's
quantize_dynamic, int8 per-channel). A crash or timeout is a row, not a stop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

COMPETITORS = ["onnxsim", "onnxoptimizer", "onnxslim", "ort-basic", "ort-dynamic"]


# -- child side: write one variant ------------------------------------------------------------
def child(tool: str, src: str, dst: str, calibration: str | None) -> int:
    import onnx

    if tool == "loadsave":
        onnx.save(onnx.load(src), dst)
    elif tool.startswith("onnxopt:"):
        from onnxopt.cli import main

        args = ["optimize", src, "-o", dst, "--pipeline", tool.split(":", 1)[1], "-q"]
        return main(args + (["--calibration", calibration] if calibration else []))
    else:
        from peers import write_peer

        write_peer(tool, src, dst)
    return 0


# -- parent side -------------------------------------------------------------------------------
def produce(tool: str, model, workdir: Path, timeout: float) -> dict:
    dst = workdir / f"{model.name}.{tool.replace(':', '_').replace(',', '_')[:60]}.onnx"
    dst.unlink(missing_ok=True)
    rss_file = workdir / ".rss"
    rss_file.unlink(missing_ok=True)
    calibration = model.calibration if tool.startswith("onnxopt:") and tool != "onnxopt:lossless" else None
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, str(Path(__file__).resolve()),
           "--child", tool, str(model.path), str(dst)] + (["--calibration", str(calibration)] if calibration else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"variant": tool, "status": f"timeout after {timeout:.0f} s"}
    row = {"variant": tool, "seconds": time.perf_counter() - start}
    last = rss_file.read_text().split()[-1:] if rss_file.exists() else []
    row["peak_rss_bytes"] = int(last[0]) * 1024 if last and last[0].isdigit() else None
    if proc.returncode != 0 or not dst.exists():
        tail = (err.strip().splitlines() or ["?"])[-1]
        row["status"] = f"crash (exit {proc.returncode}): {tail[:120]}"
        return row
    row["status"] = "ok"
    row["path"] = str(dst)
    return row


def count_nodes(graph) -> int:
    from onnxopt.analysis.summary import proto_nodes

    return sum(1 for _ in proto_nodes(graph))


def outputs_of(path: str, feeds: dict, threads: int = 2) -> dict:
    from onnxopt.measure.compare import _run, _session

    return _run(_session(path, threads), feeds)


def measure(model, row: dict, feeds: dict, feeds_path: Path, ref_outputs: dict | None, runs: int) -> None:
    """Add the static and run-time figures of ``row``'s model (in place)."""
    import onnx

    from onnxopt.analysis.cost import model_cost
    from onnxopt.measure.compare import compare

    proto = onnx.load(row["path"])
    shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
    cost = model_cost(proto, input_shapes=shapes, feeds=feeds).to_json()
    row.update(nodes=count_nodes(proto.graph), file_bytes=Path(row["path"]).stat().st_size,
               params=cost["params"], macs=cost["macs"], uncounted=len(cost["uncounted_nodes"]),
               activation_bytes=cost["activation_memory"]["peak_bytes"])
    try:
        for threads in (1, 2):
            r = compare(model.path, row["path"], data=feeds_path, threads=threads, runs=runs, memory=False)
            row[f"latency{threads}_ms"] = r["candidate"]["latency_ms"]
            row[f"latency{threads}_ratio"] = r["latency_ratio"]
            row[f"reference_latency{threads}_ms"] = r["reference"]["latency_ms"]
        stats = [s for s in r["outputs"].values() if "snr_db" in s]
        row["snr_db"] = min(s["snr_db"] for s in stats) if stats else None
        row["cosine"] = min(s["cosine"] for s in stats) if stats else None
        outs = outputs_of(row["path"], feeds)
        if model.task is not None:
            row["task"] = model.task(outs)
        elif model.relative_task is not None and ref_outputs is not None:
            row["task"] = model.relative_task(ref_outputs, outs)
    except Exception as exc:  # noqa: BLE001  (a variant onnxruntime cannot run is a result)
        row["status"] = f"cannot run: {str(exc).splitlines()[0][:120]}"


def bench_model(model, variants: list[str], workdir: Path, runs: int, timeout: float, log) -> list[dict]:
    feeds = model.make_inputs()
    feeds_path = workdir / f"{model.name}.inputs.npz"
    np.savez(feeds_path, **feeds)
    ref_outputs = outputs_of(str(model.path), feeds)
    original = {"variant": "original", "status": "ok", "path": str(model.path)}
    rows = [original]
    for tool in ["loadsave"] + variants:
        log(f"{model.name}: {tool}")
        row = produce(tool, model, workdir, timeout)
        if row["status"] == "ok":
            measure(model, row, feeds, feeds_path, ref_outputs, runs)
        rows.append(row)
    # The original's own figures: static ones from the file, latency from the loadsave pairing
    # (load+save leaves the graph as it is, so the two sides of that pairing are the same model).
    import onnx

    from onnxopt.analysis.cost import model_cost

    proto = onnx.load(model.path)
    cost = model_cost(proto, feeds=feeds).to_json()
    original.update(nodes=count_nodes(proto.graph), file_bytes=model.path.stat().st_size, params=cost["params"],
                    macs=cost["macs"], uncounted=len(cost["uncounted_nodes"]),
                    activation_bytes=cost["activation_memory"]["peak_bytes"])
    ls = rows[1]
    for t in (1, 2):
        if f"reference_latency{t}_ms" in ls:
            original[f"latency{t}_ms"] = ls[f"reference_latency{t}_ms"]
    if model.task is not None:
        original["task"] = model.task(ref_outputs)
    elif model.relative_task is not None:
        original["task"] = model.relative_task(ref_outputs, ref_outputs)
    base = ls.get("seconds") if ls["status"] == "ok" else None
    for row in rows:
        if base and row.get("seconds"):
            row["time_vs_loadsave"] = row["seconds"] / base
        row["model"] = model.name
    return rows


# -- the table ---------------------------------------------------------------------------------
def _mb(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return "symbolic"  # dims inference could not resolve at these inputs (the JSON has the formula)
    return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"


def _count(x, uncounted: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return "symbolic"
    text = f"{x / 1e9:.3g} G" if x >= 1e9 else f"{x / 1e6:.3g} M" if x >= 1e6 else f"{x / 1e3:.3g} k" if x >= 1e3 else str(x)
    return f"≥{text}" if uncounted else text


def _latency(row: dict, t: int) -> str:
    ms = row.get(f"latency{t}_ms")
    if ms is None:
        return "-"
    ratio = row.get(f"latency{t}_ratio")
    return f"{ms:.2f} ({ratio:.2f}x)" if ratio is not None else f"{ms:.2f}"


def _fidelity(row: dict) -> str:
    snr, cos = row.get("snr_db"), row.get("cosine")
    if snr is None:
        return "-"
    return ("equal" if snr == float("inf") else f"{snr:.1f} dB") + f", {cos:.6f}"


def markdown_table(rows: list[dict], task_names: dict[str, str]) -> str:
    head = ("| model | variant | nodes | file | params | MACs | act. mem | lat 1T ms | lat 2T ms "
            "| fidelity (SNR, cos) | task | time s | peak RSS |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        variant = r["variant"] if r["status"] == "ok" else f"{r['variant']}: **{r['status']}**"
        task = "-"
        if r.get("task") is not None:
            task = f"{task_names.get(r['model'], 'task')} {r['task']:.4f}"
        t = "-"
        if r.get("seconds") is not None:
            t = f"{r['seconds']:.2f}" + (f" ({r['time_vs_loadsave']:.1f}x)" if r.get("time_vs_loadsave") else "")
        lines.append(f"| {r['model']} | {variant} | {r.get('nodes', '-')} | {_mb(r.get('file_bytes'))} "
                     f"| {_count(r.get('params'))} | {_count(r.get('macs'), r.get('uncounted', 0))} "
                     f"| {_mb(r.get('activation_bytes'))} | {_latency(r, 1)} | {_latency(r, 2)} "
                     f"| {_fidelity(r)} | {task} | {t} | {_mb(r.get('peak_rss_bytes'))} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags]
    except OSError:
        isa = []
    import onnx
    import onnxruntime

    versions = [f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for pkg in ("onnxsim", "onnxoptimizer", "onnxslim"):
        try:
            versions.append(f"{pkg} {__import__(pkg).__version__}")
        except Exception:  # noqa: BLE001
            pass
    return f"{cpu} ({os.cpu_count()} cores; {', '.join(isa) or 'no AVX2'}); " + ", ".join(versions)


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the section ``## heading`` of ``path`` (up to the next ``## ``), or append it."""
    title = f"## {heading}"
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    try:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = lines[:start] + [title, ""] + body.splitlines() + [""] + lines[end:]
    except ValueError:
        new = lines + ([""] if lines and lines[-1] else []) + [title, ""] + body.splitlines() + [""]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        calibration = argv[argv.index("--calibration") + 1] if "--calibration" in argv else None
        return child(argv[1], argv[2], argv[3], calibration)
    from models import known_models

    known = known_models()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(known), help=f"comma-separated, from: {', '.join(known)}")
    p.add_argument("--pipelines", default="lossless", help="onnxopt pipelines, separated by ';'")
    p.add_argument("--competitors", default="onnxsim,onnxoptimizer", help=f"from: {', '.join(COMPETITORS)}")
    p.add_argument("--runs", type=int, default=15, help="timed runs of each model per latency pairing")
    p.add_argument("--timeout", type=float, default=900, help="seconds a variant may take to produce")
    p.add_argument("--write", metavar="MD", help="write the table into this markdown file")
    p.add_argument("--section", default="Benchmarks (harness)", help="the ## heading to write under")
    p.add_argument("--note", default="", help="a sentence to put under the heading")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in known]
    competitors = [c for c in args.competitors.split(",") if c]
    if unknown or any(c not in COMPETITORS for c in competitors):
        p.error(f"unknown model or competitor: {unknown or competitors}")
    variants = [f"onnxopt:{pl}" for pl in args.pipelines.split(";") if pl] + competitors
    show = not args.quiet and sys.stderr.isatty()
    from tqdm import tqdm

    rows: list[dict] = []
    skipped = []
    todo = [known[n] for n in names]
    bar = tqdm(total=len(todo) * (len(variants) + 1), desc="bench", unit="variant", disable=not show)

    def log(msg: str) -> None:
        bar.set_postfix_str(msg[-40:])
        bar.update(1)
        if not show and not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for model in todo:
            if not model.path.exists():
                skipped.append(f"{model.name} (not in {model.path.parent}; run ../shared/models/get_models.sh)")
                continue
            rows.extend(bench_model(model, variants, Path(tmp), args.runs, args.timeout, log))
    bar.close()
    task_names = {m.name: m.task_name for m in known.values() if m.task_name}
    table = markdown_table(rows, task_names)
    command = "python tools/bench/harness.py " + " ".join(shlex.quote(a) for a in argv)
    body = "\n".join(x for x in [
        args.note or None,
        f"Made with `{command}` on {datetime.date.today().isoformat()}, {machine()}; "
        f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the machine is shared: above the core count, latencies are noisy).",
        "",
        "Each variant is produced in its own process: *time* is that process's wall time (in brackets, "
        "relative to onnx.load + onnx.save of the same model), *peak RSS* its peak resident memory. "
        "*MACs* and *act. mem* (peak of live activations, weights excluded) come from onnxopt's cost model "
        "at the inputs below (≥: some nodes had no inferable shape). Latencies are medians of the variant "
        "interleaved with the original in one process (onnxruntime, all graph optimizations on); "
        "the ratio is the median of the run-by-run ratios against the original in the same pairing. "
        "The loadsave row runs the same graph as the original: its ratios show this run's noise floor. Fidelity is the worst output's SNR and "
        "cosine against the original's outputs on the same inputs.",
        "",
        "Inputs: digits_cnn the 450 test images; MiniLM 24 sentences of 32 tokens; PP-OCR cls 1x3x48x192, "
        "det 1x3x320x320, rec 1x3x48x320 (seeded uniform in [-1, 1]); Silero op15 one 512-sample chunk, "
        "sequence 16x576 (seeded noise).",
        "",
        table,
        "",
        ("Skipped: " + "; ".join(skipped)) if skipped else None,
    ] if x is not None)
    if args.write:
        write_section(Path(args.write), args.section, body)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
