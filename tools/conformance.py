"""Run the ONNX node conformance suite through an onnxopt pipeline.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` is first run in
onnxruntime as it is (graph optimizations disabled). The cases onnxruntime passes are
then transformed (by a pipeline, by the graph_io round trip, or by a graphsurgeon
"peer" recipe for comparison) and run again; a transform that raises, or a transformed
model onnxruntime cannot load or run, is a *crash*; outputs that no longer match the
suite's expected outputs are a *mismatch*. The comparison is the one onnx's own backend
test runner uses (assert_allclose with the case's rtol/atol, element-wise for
sequences, dtype and shape checked).

    python tools/conformance.py                      # lossless pipeline
    python tools/conformance.py --roundtrip-only     # graph_io import + export only
    python tools/conformance.py --peer gs-fold       # graphsurgeon fold_constants + cleanup
    python tools/conformance.py --pipeline default --cases 'test_conv*'

tests/test_conformance.py imports this file for the same harness.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx

# A transform returns the new model, or (model, note) where a non-empty note says what
# went wrong without breaking the model (e.g. a pass that raised and was rolled back).
Transform = Callable[[onnx.ModelProto], Any]


# --------------------------------------------------------------------------- cases


def load_cases(patterns: Iterable[str] | None = None) -> list:
    """The node suite of the installed onnx, optionally filtered by fnmatch patterns."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        # Generating the expected outputs overflows on purpose in a few cast cases.
        warnings.simplefilter("ignore")
        cases = list(collect_testcases(None))
    patterns = list(patterns or [])
    if patterns:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    return cases


# --------------------------------------------------------------------------- running


def make_session(model: onnx.ModelProto):
    """An onnxruntime CPU session with every graph optimization off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # the suite has many expected warnings
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def _as_array(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return value


def _feed_value(value: Any) -> Any:
    # onnxruntime's backend turns numpy scalars into 0-d arrays; do the same.
    value = _as_array(value)
    if isinstance(value, np.generic):
        return np.array(value)
    return value


def feeds_for(session, inputs: list) -> dict:
    """Inputs are given in the order of the session's (non-initializer) inputs."""
    return {i.name: _feed_value(v) for i, v in zip(session.get_inputs(), inputs)}


def assert_similar_outputs(ref_outputs: list, outputs: list, rtol: float, atol: float) -> None:
    """The comparison of onnx.backend.test.runner.Runner.assert_similar_outputs."""
    np.testing.assert_equal(len(outputs), len(ref_outputs))
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        ref = _as_array(ref)
        if isinstance(out, (list, tuple)):
            if not isinstance(ref, (list, tuple)):
                raise AssertionError(f"output {i} is a {type(out)}, expected {type(ref)}")
            # The runner iterates over the produced sequence; a shorter
            # sequence would pass it, so we also check the length.
            np.testing.assert_equal(len(out), len(ref), err_msg=f"output {i} length")
            assert_similar_outputs(list(ref), list(out), rtol, atol)
            continue
        np.testing.assert_array_equal(
            np.shape(out), np.shape(ref), err_msg=f"Output {i} has incorrect shape"
        )
        ref = np.asarray(ref)
        out = np.asarray(out)
        if ref.dtype == object:
            np.testing.assert_array_equal(out, ref)
            continue
        np.testing.assert_equal(out.dtype, ref.dtype)
        this_rtol = rtol
        if out.dtype.name == "bfloat16":
            this_rtol = max(rtol, 2**-6)
            out, ref = out.astype(np.float32), ref.astype(np.float32)
        np.testing.assert_allclose(out, ref, rtol=this_rtol, atol=atol)


def run_case(model: onnx.ModelProto, case, session=None) -> None:
    """Runs every data set of `case` on `model`; raises on any failure."""
    session = session or make_session(model)
    for inputs, ref_outputs in case.data_sets:
        outputs = session.run(None, feeds_for(session, list(inputs)))
        assert_similar_outputs(list(ref_outputs), outputs, case.rtol, case.atol)


def ort_passes(case) -> bool:
    """Whether onnxruntime passes the case as it is."""
    try:
        run_case(case.model, case)
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- transforms


def _gs():
    import onnx_graphsurgeon as gs

    logging.getLogger("onnx_graphsurgeon").setLevel(logging.CRITICAL)
    gs.logger.G_LOGGER.module_severity = 50  # quiet: CRITICAL
    return gs


def peer_transform(name: str) -> Transform:
    """graphsurgeon recipes a user might otherwise run, for comparison."""
    gs = _gs()

    def roundtrip(model):
        return gs.export_onnx(gs.import_onnx(model))

    def cleanup_toposort(model):
        return gs.export_onnx(gs.import_onnx(model).cleanup().toposort())

    def fold_cleanup(model):
        return gs.export_onnx(gs.import_onnx(model).fold_constants().cleanup())

    peers = {
        "gs-roundtrip": roundtrip,
        "gs-cleanup": cleanup_toposort,
        "gs-fold": fold_cleanup,
    }
    return peers[name]


PEERS = ("gs-roundtrip", "gs-cleanup", "gs-fold")


def graph_io_roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxopt.ir.graph_io import export_model, import_graph

    return export_model(import_graph(model), model)


def pipeline_transform(pipeline: str, target: str = "cpu") -> Transform:
    """optimize(); the note lists passes that raised or were rolled back."""
    import onnxopt

    def transform(model):
        result = onnxopt.optimize(model, target=target, pipeline=pipeline)
        return result.model, pass_problems(result.report)

    return transform


def pass_problems(report: dict) -> str:
    """Passes of an optimize() report that did not end 'changed' or 'unchanged' (or
    'skipped': none of the ops they act on was in the model)."""
    problems = [
        f"{p['name']} {p['status']}: {p.get('error')}"
        for p in report.get("passes", [])
        if p.get("status") not in ("changed", "unchanged", "skipped")
    ]
    return "; ".join(problems)


# --------------------------------------------------------------------------- suite


@dataclass
class SuiteResult:
    cases: int = 0
    ort_passing: list[str] = field(default_factory=list)
    crashes: dict[str, str] = field(default_factory=dict)  # name -> error
    mismatches: dict[str, str] = field(default_factory=dict)  # name -> error
    # Transforms must not modify the caller's model; counted apart from crashes so
    # that peers which do (graphsurgeon's export names Constant tensors) can still
    # be compared on their results.
    input_modified: list[str] = field(default_factory=list)
    # Cases whose transformed model serializes exactly as the original (informative).
    byte_identical: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # name -> note of the transform

    def summary(self) -> str:
        return (
            f"cases={self.cases} ort_passing={len(self.ort_passing)} "
            f"crashes={len(self.crashes)} mismatches={len(self.mismatches)} "
            f"input_modified={len(self.input_modified)} byte_identical={len(self.byte_identical)} "
            f"noted={len(self.notes)}"
        )


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:4])[:400]


def run_suite(cases: list, transforms: dict[str, Transform], progress: bool = False) -> dict[str, SuiteResult]:
    """Runs each transform on every ORT-passing case; one baseline session per case."""
    results = {name: SuiteResult(cases=len(cases)) for name in transforms}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, file=sys.stderr, mininterval=2)
    for case in iterator:
        if not ort_passes(case):
            continue
        for name, transform in transforms.items():
            result = results[name]
            result.ort_passing.append(case.name)
            model = onnx.ModelProto()
            model.CopyFrom(case.model)
            try:
                # Transforms may log or print; keep the console for the summary.
                with contextlib.redirect_stdout(io.StringIO()):
                    new_model = transform(model)
                if isinstance(new_model, tuple):
                    new_model, note = new_model
                    if note:
                        result.notes[case.name] = note
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                result.crashes[case.name] = "transform: " + _first_line(exc)
                continue
            if model.SerializeToString() != case.model.SerializeToString():
                result.input_modified.append(case.name)
            if new_model.SerializeToString() == case.model.SerializeToString():
                result.byte_identical.append(case.name)
            try:
                session = make_session(new_model)
            except Exception as exc:  # noqa: BLE001
                result.crashes[case.name] = "load: " + _first_line(exc)
                continue
            try:
                run_case(new_model, case, session)
            except AssertionError as exc:
                result.mismatches[case.name] = _first_line(exc)
            except Exception as exc:  # noqa: BLE001
                result.crashes[case.name] = "run: " + _first_line(exc)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pipeline", default="lossless", help="pipeline name or text (default: lossless)")
    group.add_argument("--roundtrip-only", action="store_true", help="graph_io import + export only")
    group.add_argument("--peer", action="append", choices=PEERS, help="a graphsurgeon recipe (repeatable)")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--cases", action="append", help="fnmatch pattern on case names (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="counts only, no failing names")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    if args.peer:
        transforms = {name: peer_transform(name) for name in args.peer}
    elif args.roundtrip_only:
        transforms = {"graph_io-roundtrip": graph_io_roundtrip}
    else:
        transforms = {f"pipeline={args.pipeline}": pipeline_transform(args.pipeline, args.target)}

    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()
    cases = load_cases(args.cases)
    results = run_suite(cases, transforms, progress=args.progress)
    elapsed = time.perf_counter() - start
    failed = False
    for name, result in results.items():
        print(f"[{name}] {result.summary()}")
        if not args.quiet:
            for kind, items in (("CRASH", result.crashes), ("MISMATCH", result.mismatches),
                                ("NOTE", result.notes)):
                for case_name, error in sorted(items.items()):
                    print(f"  {kind} {case_name}: {error}")
        if not args.quiet and result.input_modified:
            print("  INPUT MODIFIED " + " ".join(sorted(result.input_modified)))
        failed |= bool(result.crashes or result.mismatches or result.input_modified)
    print(f"elapsed {elapsed:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
