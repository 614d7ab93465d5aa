"""Check the symbolic shape analysis against what onnxruntime computes.

For every case of the ONNX node conformance suite (and any models given), the analysis
(``onnxopt.analysis.shapes``) is run with the graph inputs fixed to the shapes of the
case's inputs, and every static dim and every fully known value it claims for a graph
output is compared with the output onnxruntime produces. A claim that disagrees is a bug
in a shape rule (the passes fold Shape nodes and rewrite Reshape targets from these
claims); a dim the analysis leaves symbolic is only a missed fact.

    python tools/check_shapes.py                  # the node suite
    python tools/check_shapes.py --cases 'test_resize*' -v
    python tools/check_shapes.py model.onnx data.npz ...   # models with their inputs (first batch)
    python tools/check_shapes.py --symbolic .models/zoo/detector_dynhw.onnx ...

``--symbolic`` checks the symbolic claims themselves on models with dynamic axes: the
analysis runs once on the model as it is, then the model runs at two sizes of each dynamic
axis (the ``zoo.check_sizes`` metadata of the zoo models, else 1 and 3) and every dim of
every main-graph tensor that is a polynomial of the input symbols is evaluated with the
sizes fed and compared with the computed shape (and small int values likewise).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fixed_inputs(proto: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph inputs have the static shapes of ``feeds``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for v in out.graph.input:
        if v.name in feeds and hasattr(feeds[v.name], "shape") and v.type.HasField("tensor_type"):
            shape = v.type.tensor_type.shape
            shape.ClearField("dim")
            for d in np.shape(feeds[v.name]):
                shape.dim.add().dim_value = int(d)
    return out


CLAIMS = {"dims": 0, "values": 0}


def check(proto: onnx.ModelProto, outputs: dict) -> list[str]:
    """Claims of the analysis about the graph outputs that ``outputs`` (name -> array) refute."""
    from onnxopt.analysis.shapes import symbolic_shapes
    from onnxopt.ir.model import load

    facts = symbolic_shapes(load(proto))
    problems = []
    for name, array in outputs.items():
        if not isinstance(array, np.ndarray):
            continue
        shape = facts.shape(name)
        if shape is not None:
            if len(shape) != array.ndim:
                problems.append(f"{name}: rank {len(shape)} claimed, {array.ndim} computed")
                continue
            for k, (d, n) in enumerate(zip(shape, array.shape)):
                CLAIMS["dims"] += type(d) is int
                if type(d) is int and d != n:
                    problems.append(f"{name}: dim {k} = {d} claimed, {n} computed ({shape} vs {array.shape})")
        value = facts.static_value(name)
        CLAIMS["values"] += value is not None
        if value is not None and (value.shape != array.shape or not np.array_equal(value, array)):
            problems.append(f"{name}: value {value.tolist()} claimed, {array.tolist()} computed")
    return problems


def evaluate(d, bindings: dict):
    """A dim as an int under ``bindings`` (symbol -> size), or None when it has another atom."""
    if type(d) is int:
        return d
    total = 0
    for mono, coef in d.terms:
        term = coef
        for atom in mono:
            if atom not in bindings:
                return None
            term *= bindings[atom]
        total += term
    return total


def symbolic_check(path: str) -> tuple[int, list[str]]:
    """(claims checked, claims refuted) of the analysis on ``path`` at two sizes per axis."""
    import json

    import onnxruntime as ort

    from onnxopt.analysis.shapes import symbolic_shapes
    from onnxopt.ir.model import load

    model = load(path)
    facts = symbolic_shapes(model)
    proto = model.template
    meta = {p.key: p.value for p in proto.metadata_props}
    sizes = json.loads(meta.get("zoo.check_sizes", "{}"))
    names = [n for node in proto.graph.node for n in node.output if n and facts.shape(n) is not None]
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.output[:]
    for n in names:
        copy.graph.output.add().name = n
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(copy.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    checked, problems = 0, []
    for k in range(2):
        feeds, bindings = {}, {}
        for i in proto.graph.input:
            dims = []
            for d in i.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value >= 0:
                    dims.append(d.dim_value)
                else:
                    size = sizes.get(d.dim_param, [1, 3])[k]
                    if d.dim_param:
                        bindings[d.dim_param] = size
                    dims.append(size)
            elem = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            feeds[i.name] = (rng.standard_normal(dims) * 0.5).astype(elem) if elem.kind == "f" \
                else rng.integers(0, 2, dims).astype(elem)
        outs = dict(zip(names, sess.run(names, feeds)))
        for n, array in outs.items():
            shape = facts.shape(n)
            if len(shape) != array.ndim:
                problems.append(f"{n}: rank {len(shape)} claimed, {array.ndim} computed")
                continue
            for j, d in enumerate(shape):
                want = evaluate(d, bindings)
                if want is None:
                    continue
                checked += 1
                if want != array.shape[j]:
                    problems.append(f"{n}: dim {j} = {d} = {want} at {bindings}, {array.shape[j]} computed")
            value = facts.value(n)
            if value is not None and array.ndim <= 1:
                got = array.reshape(-1).tolist()
                want = [evaluate(x, bindings) for x in value]
                if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                    problems.append(f"{n}: value {value} = {want} at {bindings}, {got} computed")
                checked += 1
    return checked, problems


def main() -> None:
    import conformance

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="MODEL.onnx DATA.npz pairs")
    ap.add_argument("--cases", action="append", help="fnmatch pattern of suite cases (repeatable)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--symbolic", action="store_true", help="check symbolic claims on the models given")
    args = ap.parse_args()
    if args.symbolic:
        failed = False
        for path in args.models:
            checked, problems = symbolic_check(path)
            failed |= bool(problems)
            print(f"{Path(path).name}: {checked} symbolic claims checked, {len(problems)} refuted")
            for p in problems[:5]:
                print("   ", p)
        sys.exit(1 if failed else 0)
    checked = bad = 0
    items = []
    if args.models:
        for model, data in zip(args.models[::2], args.models[1::2]):
            with np.load(data) as d:
                feeds = {k: d[k][0] for k in d.files}
            items.append((Path(model).name, onnx.load(model), [feeds]))
    else:
        for case in conformance.load_cases(args.cases):
            feeds = [{n: conformance._feed_value(conformance._as_array(v)) for n, v in zip(
                [i.name for i in case.model.graph.input], inputs)} for inputs, _ in case.data_sets]
            items.append((case.name, case.model, feeds[:1]))
    for name, proto, feed_sets in items:
        for feeds in feed_sets:
            fixed = fixed_inputs(proto, feeds)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sess = conformance.make_session(fixed)
                    names = [o.name for o in sess.get_outputs()]
                    got = dict(zip(names, sess.run(names, feeds)))
            except Exception:
                continue  # onnxruntime refuses the case: nothing to compare
            checked += 1
            problems = check(fixed, got)
            if problems:
                bad += 1
                print(f"{name}: " + "; ".join(problems[:3]))
            elif args.verbose:
                print(f"{name}: ok")
    print(f"{checked} checked ({CLAIMS['dims']} static dims and {CLAIMS['values']} values claimed), "
          f"{bad} with wrong claims")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
