"""Check every model of the zoo in the main environment (onnx + onnxruntime, no torch).

    python tools/zoo/check_zoo.py                       # every .onnx in .models/zoo/
    python tools/zoo/check_zoo.py --only resnet18,crnn_lstm --top 12

For each model: onnx.checker (full), nodes (subgraphs included), parameters (initializers
and Constant-node tensors), file size, opsets, inputs and outputs with their dynamic axes,
the top entries of the op histogram; then onnxruntime runs it on seeded random inputs of a
realistic size (twice, at two different sizes, when it has dynamic axes: the sizes come
from the model's ``zoo.check_sizes`` metadata) and on the first batch of NAME.calib.npz and
NAME.eval.npz, printing output shapes and checking that outputs are finite. Exit 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SIZES = (1, 2)  # a dynamic axis without check_sizes metadata


def walk_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from walk_nodes(g)


def count_params(model) -> int:
    n = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in walk_nodes(model.graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    n += int(np.prod(attr.t.dims))
    return n


def shape_of(value_info):
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in value_info.type.tensor_type.shape.dim]


def concrete(shape, sizes, k):
    return [d if isinstance(d, int) else sizes.get(d, DEFAULT_SIZES)[k] for d in shape]


def random_inputs(sess, model, sizes, k, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = concrete(shape_of(vi), sizes, k)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        x = rng.standard_normal(shape)
        if len(shape) == 2 and "wave" in vi.name:  # audio: waveform amplitudes
            x *= 0.1
        feeds[vi.name] = x.astype(dtype)
    return feeds


def run(sess, feeds):
    t0 = time.perf_counter()
    outs = sess.run(None, feeds)
    ms = (time.perf_counter() - t0) * 1e3
    for o in outs:
        if not np.all(np.isfinite(o)):
            raise RuntimeError("non-finite output")
    return outs, ms


def check(path: Path, top: int, threads: int) -> dict:
    row = {"name": path.stem, "ok": False, "runs": []}
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    sizes = json.loads(meta.get("zoo.check_sizes", "{}"))
    nodes = list(walk_nodes(model.graph))
    hist = collections.Counter(n.op_type for n in nodes)
    row.update(nodes=len(nodes), params=count_params(model), bytes=path.stat().st_size,
               opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None))
    print(f"\n== {path.name}: opset {row['opset']}, {row['nodes']} nodes, {row['params']:,} params, "
          f"{row['bytes'] / 1e6:.2f} MB, {len(model.graph.initializer)} initializers, "
          f"{hist.get('Constant', 0)} Constant nodes")
    if model.doc_string:
        print(f"   {model.doc_string}")
    for vi in model.graph.input:
        print(f"   input  {vi.name}: {shape_of(vi)}")
    for vi in model.graph.output:
        print(f"   output {vi.name}: {shape_of(vi)}")
    print("   ops: " + ", ".join(f"{op} {n}" for op, n in hist.most_common(top))
          + (f", … ({len(hist)} op types)" if len(hist) > top else ""))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    dynamic = any(isinstance(d, str) for vi in model.graph.input for d in shape_of(vi))
    for k in range(2 if dynamic else 1):
        feeds = random_inputs(sess, model, sizes, k, seed=1234 + k)
        outs, ms = run(sess, feeds)
        ins = ", ".join(f"{n}{list(v.shape)}" for n, v in feeds.items())
        print(f"   random {ins} -> " + ", ".join(str(list(o.shape)) for o in outs) + f"  ({ms:.0f} ms)")
        row["runs"].append([list(v.shape) for v in feeds.values()])
    for split in ("calib", "eval"):
        npz = path.with_name(f"{path.stem}.{split}.npz")
        if not npz.exists():
            raise RuntimeError(f"{npz.name} missing")
        with np.load(npz) as data:
            names = sorted(data.files)
            want = sorted(vi.name for vi in model.graph.input)
            if names != want:
                raise RuntimeError(f"{npz.name} has arrays {names}, the model's inputs are {want}")
            feeds = {n: data[n][0] for n in names}
            stacks = {n: data[n].shape for n in names}
        outs, ms = run(sess, feeds)
        stat = ", ".join(f"{n}: mean {v.mean():+.2f} std {v.std():.2f}" for n, v in feeds.items())
        print(f"   {split}: {stacks} ({npz.stat().st_size / 1e6:.1f} MB; batch 0 {stat}) -> "
              + ", ".join(str(list(o.shape)) for o in outs) + f"  ({ms:.0f} ms)")
        flat = [o.std() for o in outs if o.size > 1]
        if flat and max(flat) == 0:
            raise RuntimeError(f"constant outputs on {split} data")
    row["ok"] = True
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=REPO / ".models" / "zoo")
    p.add_argument("--only", default="", help="comma-separated model names (default: every .onnx in --dir)")
    p.add_argument("--top", type=int, default=8, help="op histogram entries to print")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    paths = [a.dir / f"{n}.onnx" for n in names] if names else sorted(a.dir.glob("*.onnx"))
    if not paths:
        print(f"no models in {a.dir}; run tools/zoo/export_zoo.py first", file=sys.stderr)
        return 1
    rows = []
    for path in paths:
        try:
            rows.append(check(path, a.top, a.threads))
        except Exception as e:  # noqa: BLE001  (reported; the other models are still checked)
            print(f"   FAILED: {type(e).__name__}: {e}")
            rows.append({"name": path.stem, "ok": False, "error": str(e)})
    print(f"\n{'model':24s} {'nodes':>6s} {'params':>12s} {'MB':>8s}  ran in onnxruntime at")
    for r in rows:
        if r["ok"]:
            runs = "; ".join(" ".join("x".join(map(str, s)) for s in run) for run in r["runs"])
            print(f"{r['name']:24s} {r['nodes']:6d} {r['params']:12,d} {r['bytes'] / 1e6:8.2f}  ok: {runs}")
        else:
            print(f"{r['name']:24s} FAILED: {r.get('error', '')[:200]}")
    bad = [r["name"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
