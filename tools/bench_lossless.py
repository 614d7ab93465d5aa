"""Benchmark `--pipeline lossless` against load+save and the lossless peers, side by side.

    python tools/bench_lossless.py                      # real models + chains of 10k/30k/100k
    python tools/bench_lossless.py --chains 10000 --no-real --tools onnxopt,loadsave
    python tools/bench_lossless.py --scale --no-real --big 2.2   # issue 8.4: inspect + optimize
    python tools/bench_lossless.py --phases --zoo --chains 30000   # where optimize's time goes

Every tool runs in its own child process (``--child``); the parent reads the child's wall
time and peak RSS from ``os.wait4`` (the child's own rusage, not an aggregate), and counts
the nodes left (subgraphs included) in the file the child wrote. The child also reports
the time of the work alone (load -> optimize -> save, imports excluded) as ``work``.
A tool that exceeds ``--timeout`` is killed and reported as a timeout; a crash is reported
with its exit status. With ``--check``, onnxopt's output is run in onnxruntime against the
input (ORT_DISABLE_ALL) and the result is reported as ``equal`` or the mismatch.

Tools: loadsave (onnx.load + onnx.save), onnxopt (the CLI's main, --pipeline lossless),
graphsurgeon (import, cleanup, toposort, export), onnxsim (simplify, no check),
onnxslim (slim), onnxoptimizer (its default pass list).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["loadsave", "onnxopt", "graphsurgeon", "onnxsim", "onnxslim", "onnxoptimizer", "ort-basic"]
REAL_MODELS = ["ppocr_mobile_v2_cls.onnx", "ppocr_v4_det.onnx", "ppocr_v4_rec.onnx",
               "silero_vad_16k_op15.onnx", "silero_vad_16k_sequence.onnx", "minilm_l6.onnx"]
# The exported test models of issue 19 (tools/zoo/export_zoo.py): dynamic axes, NHWC
# layout, decomposed LayerNorm at opset 14, LSTM.
ZOO_MODELS = ["vit_b_16_dynbatch.onnx", "convnext_tiny_dynbatch.onnx", "swin_t_dynbatch.onnx",
              "detector_dynhw.onnx", "nhwc_resnet.onnx", "crnn_lstm.onnx", "tiny_transformer.onnx"]


# -- child side: one tool on one model ----------------------------------------------------------
def child(tool: str, src: str, dst: str, pipeline: str) -> None:
    import onnx

    start = time.perf_counter()
    if tool == "loadsave":
        onnx.save(onnx.load(src), dst)
    elif tool == "onnxopt":
        from onnxopt.cli import main

        rc = main(["optimize", src, "-o", dst, "--pipeline", pipeline, "-q"])
        if rc:
            sys.exit(rc)
    elif tool == "inspect":
        from onnxopt.cli import main

        rc = main(["inspect", src])
        if rc:
            sys.exit(rc)
        Path(dst).write_text("inspected\n")  # the parent checks that the child got to the end
    else:
        sys.path.insert(0, str(REPO / "tools" / "bench"))
        from peers import write_peer

        write_peer(tool, src, dst)
    print(json.dumps({"work": time.perf_counter() - start}))


def phases(src: str, pipeline: str) -> dict:
    """Seconds of each phase of `onnxopt optimize` on ``src`` in this process: imports, load,
    the passes themselves, the pass manager's bookkeeping around them (snapshots, digests,
    counts, checks), writing; and the passes' own seconds by name (wall time, as the pass
    manager records it: run it on a quiet machine)."""
    import time as _time

    clock = _time.perf_counter
    t0 = clock()
    import onnx  # noqa: F401  (timed: the import is a phase)
    from onnxopt.ir.model import load
    from onnxopt.optimize import optimize
    import onnxopt.passes  # noqa: F401  (the registry imports them on first use)

    t1 = clock()
    model = load(src)
    model.source_sha256  # the hash thread's work
    t2 = clock()
    result = optimize(model, pipeline=pipeline)
    t3 = clock()
    out = Path(tempfile.mkdtemp(prefix="phases.")) / "out.onnx"
    result.save(out)
    t4 = clock()
    by_pass: dict[str, float] = {}
    for p in result.report["passes"]:
        by_pass[p["name"]] = by_pass.get(p["name"], 0.0) + p["seconds"]
    passes = sum(by_pass.values())
    return {"import": t1 - t0, "load": t2 - t1, "passes": passes, "manager": t3 - t2 - passes,
            "save": t4 - t3, "runs": len(result.report["passes"]), "by_pass": by_pass}


# -- parent side --------------------------------------------------------------------------------
def count_nodes(path: str) -> int:
    import onnx

    from onnxopt.analysis.summary import proto_nodes

    return sum(1 for _ in proto_nodes(onnx.load(path, load_external_data=False).graph))


def run_tool(tool: str, src: Path, workdir: Path, pipeline: str, timeout: float) -> dict:
    dst = workdir / f"{src.stem}.{tool}.onnx"
    dst.unlink(missing_ok=True)
    rss_file = workdir / f".{tool}.rss"
    # /usr/bin/time reports the peak RSS of its own child. Reading our child's rusage
    # directly would not do: Linux carries the forking parent's RSS into the child's
    # ru_maxrss, and this parent holds the models it counts.
    cmd = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file),
           sys.executable, str(Path(__file__).resolve()), "--child", tool, str(src), str(dst),
           "--pipeline", pipeline]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=workdir, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds time and the tool
        proc.communicate()
        return {"tool": tool, "status": f"timeout after {timeout:.0f} s", "peak_rss_mb": None}
    wall = time.perf_counter() - start
    last = rss_file.read_text().split()[-3:] if rss_file.exists() else []
    row = {"tool": tool, "wall": wall,
           "peak_rss_mb": int(last[0]) / 1024 if last and last[0].isdigit() else None,
           # CPU time (user + system) of the process: less sensitive than wall time to the
           # other jobs of a shared machine
           "cpu": float(last[1]) + float(last[2]) if len(last) == 3 else None}
    code = proc.returncode  # time exits with its child's status (128+N for a signal)
    if code != 0 or not dst.exists():
        last = (err.strip().splitlines() or ["?"])[-1]
        row["status"] = f"crash (exit {code}): {last[:160]}"
        return row
    row["status"] = "ok"
    try:
        row["work"] = json.loads(out.strip().splitlines()[-1])["work"]
    except (ValueError, IndexError, KeyError):
        row["work"] = None
    row["nodes"] = count_nodes(str(dst)) if tool != "inspect" else None
    row["output"] = str(dst)
    return row


def model_bytes(path: Path) -> int:
    """The model file plus the external-data files it names."""
    import onnx

    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    files = set()
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                files.add(e.value)
    return total + sum((path.parent / f).stat().st_size for f in files)


def _feeds(model, sizes: dict, k: int, default: int, batch: int | None = None) -> dict:
    """Inputs for ``model`` with each dynamic dim at its k-th size (``sizes`` by dim_param,
    else 1/2 for a batch (or ``batch``) and ``default``/2x``default`` for any other)."""
    import numpy as np

    rng = np.random.default_rng(k)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = []
        for d in i.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif d.dim_param in sizes:
                dims.append(sizes[d.dim_param][k])
            elif "batch" in d.dim_param.lower() or not dims:
                dims.append(batch or k + 1)
            else:
                dims.append(default * (k + 1))
        elem = i.type.tensor_type.elem_type
        if elem == 7:  # int64: a sample rate (scalar), token ids / masks / type ids (1)
            feeds[i.name] = np.full(dims, 16000 if not dims else 1, np.int64)
        elif elem == 9:
            feeds[i.name] = np.ones(dims, np.bool_)
        else:
            import onnx

            feeds[i.name] = (rng.standard_normal(dims) * 0.1).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return feeds


def check_equal(src: Path, dst: str) -> str:
    """onnxopt's output against its input in onnxruntime (ORT_DISABLE_ALL), at two sizes of
    every dynamic axis (the zoo models' ``zoo.check_sizes`` metadata, else 1 and 2 for a batch
    and 32 and 64, or 512 and 1024 for models that refuse short inputs): 'equal (n sizes)',
    the mismatch, or why it could not run."""
    import json

    import onnx

    from onnxopt.measure import verify

    ref_model, cand_model = onnx.load(str(src)), onnx.load(dst)
    meta = {p.key: p.value for p in ref_model.metadata_props}
    sizes = json.loads(meta.get("zoo.check_sizes", "{}"))
    checked, reason = 0, ""
    for k in range(2):
        # 512: models (an STFT front end) that refuse 32 samples; batch 1: models that
        # only run one (Silero's LSTM state)
        for default, batch in ((32, None), (512, None), (32, 1), (512, 1)):
            feeds = _feeds(ref_model, sizes, k, default, batch)
            try:
                _, ref = verify.run(ref_model, feeds)
            except verify.CannotRun as exc:
                reason = str(exc)
                continue
            try:
                _, got = verify.run(cand_model, feeds)
            except verify.CannotRun as exc:
                return f"optimized model does not run: {str(exc)[:80]}"
            problems = verify.compare_outputs(ref, got)
            if problems:
                shapes = {n: list(v.shape) for n, v in feeds.items()}
                return f"at {shapes}: " + "; ".join(map(str, problems[:2]))
            checked += 1
            break
    if not checked:
        return f"not run: {reason[:80]}"
    return "equal" if checked == 2 else f"equal ({checked} size)"


def lossless_text() -> str:
    from onnxopt.target import load_target

    return load_target("cpu").pipelines["lossless"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", default="lossless", help="onnxopt pipeline (default: lossless)")
    ap.add_argument("--models", default=str(REPO / ".models"), help="folder of the real models")
    ap.add_argument("--no-real", action="store_true", help="skip the real models")
    ap.add_argument("--zoo", nargs="?", const=",".join(m.removesuffix(".onnx") for m in ZOO_MODELS),
                    metavar="NAMES", help="also the exported test models of .models/zoo/ (all of "
                    "issue 19's, or the comma-separated NAMES)")
    ap.add_argument("--only", metavar="NAMES", help="only the real models whose names start with one of NAMES")
    ap.add_argument("--chains", default="10000,30000,100000", help="chain sizes ('' for none)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run")
    ap.add_argument("--check", action="store_true", help="check onnxopt's outputs in onnxruntime")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="end with the results as a markdown table")
    ap.add_argument("--workdir", help="where models and outputs go (default: a temporary folder)")
    ap.add_argument("--scale", action="store_true",
                    help="scale mode: `inspect` and `optimize --pipeline lossless` only, on the chains "
                         "and (with --big) a model over 2 GB; prints peak RSS against the model's bytes")
    ap.add_argument("--phases", action="store_true",
                    help="instead: seconds of each phase of optimize (imports, load, passes, the pass "
                         "manager's bookkeeping, save) for each model, one fresh process per model")
    ap.add_argument("--big", type=float, default=0.0, metavar="GB",
                    help="with --scale: also a weight-heavy model of this many GB (external data)")
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "phases":
            print(json.dumps(phases(args.child[1], args.pipeline)))
            return
        child(*args.child, args.pipeline)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_synthetic_models import big_model, chain_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lossless.")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    models: list[Path] = []
    if not args.no_real:
        for name in REAL_MODELS:
            if args.only and not any(name.startswith(o) for o in args.only.split(",")):
                continue
            p = (Path(args.models) / name).resolve()
            if p.exists():
                models.append(p)
            else:
                print(f"# skipped {name}: not in {args.models}", file=sys.stderr)
    for name in (args.zoo.split(",") if args.zoo else []):
        p = (Path(args.models) / "zoo" / f"{name.strip()}.onnx").resolve()
        if p.exists():
            models.append(p)
        else:
            print(f"# skipped zoo model {name}: not in {args.models}/zoo", file=sys.stderr)
    for n in [int(s) for s in args.chains.split(",") if s.strip()]:
        p = workdir / f"chain{n // 1000}k.onnx"
        if not p.exists():
            p.write_bytes(chain_model(n).SerializeToString())
        models.append(p)

    if args.scale and args.big > 0:
        p = workdir / "big" / f"big{args.big:g}gb.onnx"
        if not p.exists():
            big_model(p, args.big)
        models.append(p)
    if args.phases:
        print("| model | import | load | passes | manager | save | pass runs | top passes |")
        print("|---|---|---|---|---|---|---|---|")
        for model in models:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "phases", str(model), "-",
                                   "--pipeline", args.pipeline], capture_output=True, text=True)
            if proc.returncode:
                print(f"| {model.stem} | failed: {proc.stderr.strip().splitlines()[-1][:80]} |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            top = sorted(r["by_pass"].items(), key=lambda kv: -kv[1])[:3]
            print(f"| {model.stem} | {r['import']:.2f} | {r['load']:.2f} | {r['passes']:.2f} | {r['manager']:.2f} "
                  f"| {r['save']:.2f} | {r['runs']} | " + ", ".join(f"{k} {v:.2f}" for k, v in top) + " |", flush=True)
        return
    tools = ["inspect", "onnxopt"] if args.scale else [t for t in args.tools.split(",") if t]
    from onnxopt.hardware import cpu_model

    print(f"# {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"# onnxopt pipeline '{args.pipeline}'" +
          (f" = {lossless_text()}" if args.pipeline == "lossless" else ""))
    rows = []
    for model in models:
        base = None
        nodes_in = count_nodes(str(model))
        for tool in tools:
            row = run_tool(tool, model, workdir, args.pipeline, args.timeout)
            row.update(model=model.name, nodes_in=nodes_in, bytes=model_bytes(model))
            if row.get("peak_rss_mb"):
                row["rss_x_bytes"] = row["peak_rss_mb"] * 2**20 / row["bytes"]
            if tool == "loadsave" and row["status"] == "ok":
                base = row["wall"], row.get("cpu")
            if base and row.get("wall"):
                row["x_loadsave"] = row["wall"] / base[0]
                if base[1] and row.get("cpu"):
                    row["cpu_x_loadsave"] = row["cpu"] / base[1]
            if tool == "onnxopt" and args.check and row["status"] == "ok":
                row["check"] = check_equal(model, row["output"])
            rows.append(row)
            wall = f"{row['wall']:.2f} s" if "wall" in row else "-"
            work = f"{row['work']:.2f} s" if row.get("work") is not None else "-"
            ratio = f"{row['x_loadsave']:.1f}x" if "x_loadsave" in row else "-"
            rss = f"{row['peak_rss_mb']:7.0f} MB" if row.get("peak_rss_mb") else "      - MB"
            if args.scale:
                print(f"{model.name:<22} {tool:<8} {row['status'][:40]:<8} nodes {nodes_in:>7} "
                      f"bytes {row['bytes'] / 1e6:9.1f} MB  wall {wall:>9}  rss {rss}  "
                      f"rss/bytes {row.get('rss_x_bytes', 0):5.2f}", flush=True)
                continue
            cpu = f"cpu {row['cpu']:.2f} s ({row['cpu_x_loadsave']:.1f}x)" if row.get("cpu_x_loadsave") else ""
            print(f"{model.name:<30} {tool:<14} {row['status'][:40]:<12} wall {wall:>9} "
                  f"(work {work:>8}) {ratio:>6} {cpu} rss {rss}  "
                  f"nodes {nodes_in} -> {row.get('nodes', '-')}"
                  + (f"  [{row['check']}]" if "check" in row else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        print()
        print(scale_table(rows) if args.scale else lossless_table(rows))


def _secs(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"].split(":")[0]
    ratio = f" ({row['x_loadsave']:.1f}x)" if "x_loadsave" in row else ""
    cpu = f", cpu {row['cpu_x_loadsave']:.1f}x" if "cpu_x_loadsave" in row else ""
    return f"{row['wall']:.2f}{ratio}{cpu}"


def lossless_table(rows: list[dict]) -> str:
    """One line per model, one column per tool: nodes left; wall s (x load+save); peak RSS."""
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    lines = ["| model | nodes | " + " | ".join(tools) + " |", "|---|---|" + "---|" * len(tools)]
    by_model: dict[str, dict] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"].split(":")[0]
        rss = f"; {r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else ""
        check = r.get("check", "")
        mark = "" if not check or check == "equal" else " (outputs: " + check[:40] + ")"
        return f"{r['nodes']}; {_secs(r)}{rss}{mark}"

    for name, by_tool in by_model.items():
        first = next(iter(by_tool.values()))
        lines.append(f"| {name.removesuffix('.onnx')} | {first['nodes_in']} | "
                     + " | ".join(cell(by_tool.get(t)) for t in tools) + " |")
    return "\n".join(lines)


def scale_table(rows: list[dict]) -> str:
    """One line per model: inspect and optimize wall time and peak RSS (x the model's bytes)."""
    lines = ["| model | nodes | bytes | inspect s | inspect peak RSS | optimize s | optimize peak RSS | nodes left |",
             "|---|---|---|---|---|---|---|---|"]
    by_model: dict[str, dict] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r

    def rss(r):
        if not r.get("peak_rss_mb"):
            return "-"
        return f"{r['peak_rss_mb']:.0f} MB ({r['rss_x_bytes']:.2f}x)"

    for name, tools in by_model.items():
        i, o = tools.get("inspect", {}), tools.get("onnxopt", {})
        first = i or o
        lines.append(f"| {name.removesuffix('.onnx')} | {first['nodes_in']} | {first['bytes'] / 1e6:.1f} MB | "
                     f"{_secs(i) if i else '-'} | {rss(i)} | {_secs(o) if o else '-'} | {rss(o)} | "
                     f"{o.get('nodes', '-') if o else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
