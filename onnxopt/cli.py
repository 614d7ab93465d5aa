"""The `onnxopt` command line: argparse subcommands, errors mapped to exit codes.

Exit codes (DESIGN.md section 5): 0 done; 1 internal error (traceback shown); 2 bad input
or usage (one line `onnxopt: error: …`, traceback only with --debug); 3 quality gate or
verification failed. On any non-zero exit the output file is not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from onnxopt import __version__
from onnxopt.errors import OnnxoptError, OutputError, UsageError

logger = logging.getLogger("onnxopt")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog.split()[-1] if ' ' in self.prog else 'usage'}: {message}"
                         f" (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary table")


def _add_fidelity_options(p: argparse.ArgumentParser, gate: str) -> None:
    p.add_argument("--metric", default="cosine", metavar="cosine|snr|top1|mse|module:function",
                   help="fidelity metric for the gate (default cosine); module:function is called "
                        "with (reference outputs, candidate outputs), see onnxopt/measure/metrics.py")
    p.add_argument(gate, type=float, metavar="X", dest="max_drop",
                   help="quality gate: exit 3 when the metric's drop exceeds X (cosine: 1-cosine; "
                        "top1: 1-agreement; snr: 10^(-SNR/10); mse: the mse; user metric: its drop)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxopt", description=(
        "Optimize ONNX models for a hardware target: lossless cleanup and fusion, "
        "quantization, and a report of what it cost."),
        epilog="exit codes: 0 done, 1 internal error, 2 bad input or usage, 3 quality gate not met, "
               "validation failed, or (check) the model does not conform to the target")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("optimize", help="optimize a model for a target",
                       description="Optimize IN.onnx for a target and write OUT.onnx atomically.")
    p.add_argument("input", metavar="IN.onnx", help="the model to optimize (never modified)")
    p.add_argument("-o", "--output", metavar="OUT.onnx", required=True, help="where to write the result")
    p.add_argument("--target", default="cpu", metavar="cpu|gpu|npu|FILE.toml",
                   help="hardware target: a built-in name or a target file (default: cpu)")
    p.add_argument("--pipeline", metavar="NAME|TEXT",
                   help="a pipeline name of the target (lossless, default, …) or pipeline text "
                        "such as 'lossless,fuse-conv-bn' (default: the target's 'default')")
    p.add_argument("--calibration", metavar="DATA", help="calibration data: an .npz file or a folder of them")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,…",
                   help="fix an input's shape (repeatable): the fix-shapes pass runs first and writes the "
                        "static shapes that follow; targets with static_shapes (npu) need every input fixed")
    p.add_argument("--report", metavar="FILE",
                   help="write a report: .json, or .html (a page with plots; needs matplotlib); "
                        "adds fidelity and latency of the result against IN")
    p.add_argument("--data", metavar="DATA",
                   help="evaluation inputs (.npz file or folder) for fidelity, latency and the gate; "
                        "keep them apart from --calibration data (default: random inputs)")
    _add_fidelity_options(p, gate="--max-accuracy-drop")
    p.add_argument("--search", action="store_true",
                   help="with --max-accuracy-drop and --data: search compression settings (which layers stay "
                        "float, calibration, per-channel, equalize/smooth-quant/refit, …) for the Pareto front of "
                        "size, latency and the metric within the budget, and write the front's fastest model")
    p.add_argument("--search-trials", type=int, default=16, metavar="N",
                   help="candidates the search samples after giving back sensitive layers (default 16)")
    p.add_argument("--search-prefer", choices=("latency", "size", "metric"), default="latency",
                   help="which member of the Pareto front to write (default latency: the fastest, latencies "
                        "within 5%% counting as equal and the smallest of those winning)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="search: parallel worker processes or Ray actors (default: one per core, at most 4)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="search: run candidates in local processes or on Ray (pip install 'onnxopt[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="search: the Ray cluster to use (auto, ray://host:port; default a local Ray instance)")
    p.add_argument("--min-snr-db", metavar="DB|off", type=_floor_value,
                   help="fidelity floor: a lossy pass whose worst output falls below this SNR keeps its "
                        "costliest layers as they were, or is rolled back (default: the target's)")
    p.add_argument("--min-cosine", metavar="C|off", type=_floor_value,
                   help="fidelity floor on the worst output's cosine (default: the target's)")
    p.add_argument("--max-latency-ratio", metavar="R|off", type=_floor_value,
                   help="speed floor: a pass that promises speed (int8) must leave the model at most R "
                        "times as slow as before it (1 = no slower), measured on the target's provider "
                        "(default: the target's)")
    p.add_argument("--verify", action="store_true",
                   help="check each pass in onnxruntime; roll back a lossless pass that changes outputs")
    p.add_argument("--strict", action="store_true",
                   help="a pass that fails or breaks the model stops the run (exit 1 or 3)")
    p.add_argument("--validate-ep", action="store_true",
                   help="run the result on the target's execution providers where installed (CUDA, TensorRT, "
                        "QNN, OpenVINO, …) and compare it with the original there; a missing provider falls "
                        "back to CPU with a note; a result that fails there exits 3")
    p.add_argument("--external-data", action="store_true",
                   help="write weights to OUT.onnx.data (automatic over 2 GB)")
    p.add_argument("--masks", metavar="MASKS.npz",
                   help="pruning masks of an earlier run (by initializer name) for the pruning passes to respect")
    p.add_argument("--export-masks", metavar="MASKS.npz",
                   help="write the masks the pruning passes left (by initializer name, True = kept)")
    _add_common(p)

    p = sub.add_parser("inspect", help="show a model's size, ops, interface",
                       description="Show nodes, op histogram, params, bytes, opsets, inputs and outputs.")
    p.add_argument("model", metavar="MODEL", help="an .onnx file")
    p.add_argument("--json", action="store_true", help="print JSON (with per-node and per-weight costs)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,…",
                   help="fix an input's shape so symbolic MACs and memory become numbers (repeatable)")
    _add_common(p)

    p = sub.add_parser("compare", help="compare two models: fidelity, size, latency, memory",
                       description="Run REF and CAND in onnxruntime on the same inputs and report, per "
                                   "output, cosine, SNR, max/mean absolute error and top-1 agreement; "
                                   "file sizes; interleaved median latency; peak memory of each session.")
    p.add_argument("reference", metavar="REF", help="the reference model (.onnx)")
    p.add_argument("candidate", metavar="CAND", help="the model to judge (.onnx)")
    p.add_argument("--data", metavar="DATA", help="inputs: an .npz file or a folder of them "
                   "(default: random inputs made from the input specs)")
    _add_fidelity_options(p, gate="--max-drop")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs of each model (default 20)")
    p.add_argument("--max-batches", type=int, metavar="N", help="use at most N batches of DATA")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,…",
                   help="shape of a generated input (without --data; repeatable)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = sub.add_parser("check", help="list the nodes a target cannot run as they are",
                       description="List every node of MODEL that the target cannot run as it is "
                                   "(unsupported op or attribute, float compute where integer is required, "
                                   "dynamic shape, unaligned channels, unsupported data type), with the "
                                   "reason. Exit 0 when the model conforms, 3 when it does not.")
    p.add_argument("model", metavar="MODEL", help="an .onnx file")
    p.add_argument("--target", default="cpu", metavar="cpu|cpu-avx2|gpu|npu|FILE.toml",
                   help="the target to check against (default: cpu)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,…",
                   help="check as if this input had this fixed shape (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON (every finding)")
    _add_common(p)

    p = sub.add_parser("passes", help="list every registered pass and its options")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = sub.add_parser("targets", help="list targets and their pipelines; show one target in full",
                       description="Without TARGET: every target and its pipelines. With TARGET: its "
                                   "effective descriptor (after extends, defaults filled in) as TOML.")
    p.add_argument("name", nargs="?", metavar="TARGET", help="show one target in full (name or .toml file)")
    p.add_argument("--json", action="store_true", help="print the effective targets (after extends) as JSON")
    _add_common(p)
    return parser


def _floor_value(text: str):
    """A floor bound from the command line: a number, or 'off' for no bound."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', not '{text}'") from None


def _floor(args):
    """The run's floor: the command line's bounds over the target's (for its default
    pipeline; another pipeline has none of its own)."""
    if args.min_snr_db is None and args.min_cosine is None and args.max_latency_ratio is None:
        return None  # the target's
    from onnxopt.measure.fidelity import Floor
    from onnxopt.optimize import target_floor
    from onnxopt.target import load_target

    base = target_floor(load_target(args.target)) if args.pipeline in (None, "default") else Floor()

    def pick(given, default):
        return default if given is None else (None if given == "off" else given)

    return Floor(pick(args.min_snr_db, base.min_snr_db), pick(args.min_cosine, base.min_cosine),
                 pick(args.max_latency_ratio, base.max_latency_ratio))


# -- subcommands -------------------------------------------------------------------------------
def _check_output(input_path: str, output: str) -> None:
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"{output}: is a folder; give a file name")
    if Path(input_path).exists() and out.exists() and os.path.samefile(input_path, out):
        raise UsageError(f"{output}: output would overwrite the input (the input is never modified)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{output}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{output}: output folder '{folder}' is not writable")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts)
        import tempfile

        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{output}: cannot write in output folder '{folder}' "
                          f"({exc.strerror or exc})") from None


def cmd_optimize(args) -> int:
    from onnxopt.optimize import optimize

    from onnxopt.errors import QualityGateError
    from onnxopt.measure.metrics import load_metric
    from onnxopt.measure.report import add_measurements, render, require_matplotlib

    _check_output(args.input, args.output)
    if args.export_masks:
        _check_output(args.input, args.export_masks)
    if args.report:
        _check_output(args.input, args.report)
        if args.report.lower().endswith((".html", ".htm")):
            require_matplotlib()
    from onnxopt.analysis.cost import parse_input_shapes

    metric = load_metric(args.metric)  # a bad metric fails before the pipeline runs
    input_shapes = parse_input_shapes(args.input_shape)
    progress = not args.quiet and sys.stderr.isatty()
    if args.search:
        result = _search(args, progress)
    else:
        if args.executor != "local" or args.ray_address or args.workers is not None:
            raise UsageError("--workers, --executor and --ray-address go with --search")
        result = optimize(args.input, target=args.target, pipeline=args.pipeline,
                          calibration=args.calibration, verify=args.verify, strict=args.strict,
                          progress=progress, data=args.data, floor=_floor(args), input_shapes=input_shapes,
                          masks=args.masks)
    report = result.report
    comparison = None
    if args.report or args.data or args.max_drop is not None:
        # Fidelity (and, for a report, latency and memory) of the result against IN, before
        # anything is written: a failed gate leaves no output behind.
        from onnxopt.runtime import resolve_providers

        providers, note = resolve_providers(list(result.target.runtime.execution_providers))
        if note and note not in report["notes"]:
            report["notes"].append(note)
        comparison = add_measurements(report, args.input, result.model, data=args.data, metric=metric,
                                      max_drop=args.max_drop, latency=bool(args.report),
                                      progress=progress, providers=providers, input_shapes=input_shapes)
    gate = comparison.get("gate") if comparison else None
    if args.validate_ep:
        from onnxopt.measure.validate_ep import validate_on_providers

        validation = validate_on_providers(args.input, result.model, list(result.target.runtime.execution_providers),
                                           data=args.data, metric=metric, max_drop=args.max_drop,
                                           input_shapes=input_shapes)
        report["validate_ep"] = validation["runs"]
        report["notes"].extend(n for n in validation["notes"] if n not in report["notes"])
        failed = [r for r in validation["runs"] if r.get("gate") and not r["gate"]["passed"]]
        if failed and (gate is None or gate["passed"]):  # the first failed gate is the one reported
            gate = failed[0]["gate"] | {"provider": failed[0]["provider"]}
            comparison = {"metric": failed[0]["metric"], "gate": gate}
    if gate and not gate["passed"]:
        if not args.quiet:
            print(_summary_table(report | {"input_bytes": Path(args.input).stat().st_size}))
        raise QualityGateError(f"{comparison['metric']['metric']} drop {gate['drop']:.6g} exceeds "
                               f"--max-accuracy-drop {gate['max_drop']:g}; {args.output} not written")
    # Written straight from the optimized graph, weight by weight (no copy of the model).
    result.save(args.output, external_data=True if args.external_data else None)
    report["output"] = args.output
    report["output_bytes"] = Path(args.output).stat().st_size
    report["input_bytes"] = Path(args.input).stat().st_size
    if args.export_masks:
        from onnxopt.optimize import save_masks

        save_masks(result.masks, args.export_masks)
        report["masks"] = {"file": args.export_masks, "weights": len(result.masks)}
    if args.report:
        _write_text_atomic(Path(args.report), render(report, args.report))
    if not args.quiet:
        print(_summary_table(report))
        if "search" in report:
            from onnxopt.measure.report import search_lines

            print("\n".join(search_lines(report["search"])))
    return 0


def _search(args, progress: bool):
    """The accuracy-aware search (onnxopt.search): the chosen candidate's OptimizeResult,
    with the search in its report."""
    from onnxopt.search import search

    if args.max_drop is None or args.data is None:
        raise UsageError("--search needs --max-accuracy-drop X and --data DATA (the metric is measured on it)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers takes a count of 1 or more, not {args.workers}")
    if args.search_trials < 0:
        raise UsageError(f"--search-trials takes 0 or more, not {args.search_trials}")
    if args.input_shape or args.masks:
        raise UsageError("--input-shape and --masks do not go with --search yet")
    found = search(args.input, max_drop=args.max_drop, metric=args.metric, data=args.data,
                   calibration=args.calibration, target=args.target, pipeline=args.pipeline,
                   trials=args.search_trials, workers=args.workers, executor=args.executor,
                   ray_address=args.ray_address, prefer=args.search_prefer, progress=progress)
    found.result.report["search"] = found.report
    return found.result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _summary_table(report: dict) -> str:
    from onnxopt.measure.report import fidelity_line, summary_rows

    rows = [("", "before", "after", "ratio")] + summary_rows(report)
    lines = [f"{r[0]:<15}{r[1]!s:>14}{r[2]!s:>14}{r[3]!s:>9}" for r in rows]
    changed = [p["name"] for p in report["passes"] if p["status"] == "changed"]
    trouble = [f"{p['name']} ({p['status']}: {p['error']})" for p in report["passes"]
               if p["status"] in ("failed", "rolled-back")]
    if fidelity_line(report):
        lines.append(fidelity_line(report))
    for run in report.get("validate_ep", []):
        if run["status"] == "ran":
            m = run["metric"]
            where = "" if run.get("all_nodes_on_provider", True) else " (some nodes on CPU)"
            lines.append(f"validated on {run['provider']}{where}: {m['metric']} {m.get('value', float('nan')):.6g} "
                         f"(drop {m['drop']:.3g})")
    lines.append(f"target {report['target']}; pipeline {report['pipeline']}")
    lines.append(f"changed by: {', '.join(changed) or 'nothing'}; {report['seconds']:.2f} s")
    for t in trouble:
        lines.append(f"rolled back: {t}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from onnxopt.analysis.summary import summarize
    from onnxopt.ir.model import load

    from onnxopt.analysis.cost import parse_input_shapes

    # The text output shows no per-weight sparsity: then no weight's bytes are read.
    info = summarize(load(args.model), parse_input_shapes(args.input_shape), count_zeros=args.json)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['file_bytes']:,} bytes, IR {info['ir_version']}, opsets "
          + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    print(f"nodes {info['nodes']:,}, params {info['params']:,} ({info['weight_bytes']:,} bytes), "
          f"functions {info['functions']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            print(f"  {kind[:-1]:<6} {v['name']}: {v['dtype']} {v['shape']}")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in info["op_histogram"].items()))
    print(_cost_lines(info["cost"]))
    return 0


def _cost_lines(cost: dict) -> str:
    """The cost model's figures for `inspect` (onnxopt.analysis.cost)."""
    from onnxopt.analysis.cost import human

    mem = cost["activation_memory"]
    lines = [f"MACs {human(cost['macs'])}, FLOPs {human(cost['flops'])}"
             + (f" (lower bound: {len(cost['uncounted_nodes'])} node(s) of unknown shape)"
                if cost["uncounted_nodes"] else ""),
             "MACs by kind: " + ", ".join(f"{k} {human(v)}" for k, v in cost["macs_by_category"].items()),
             f"peak activation memory {human(mem['peak_bytes'], 'B')} at {mem['at_node']}"
             + (f" ({mem['unsized_tensors']} tensor(s) of unknown size not counted)"
                if mem["unsized_tensors"] else "")
             + f"; weights {human(mem['weight_bytes'], 'B')}"]
    if cost["symbolic_dims"]:
        lines.append(f"symbolic dims: {', '.join(cost['symbolic_dims'])} "
                     "(fix them with --input-shape NAME:D1,D2,…)")
    return "\n".join(lines)


def cmd_check(args) -> int:
    from onnxopt.analysis.cost import parse_input_shapes
    from onnxopt.analysis.target_check import check_model

    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model file")
    result = check_model(args.model, args.target, parse_input_shapes(args.input_shape))
    print(json.dumps(result.to_json(), indent=2) if args.json else result.format())
    return 0 if result.conforms else 3


def cmd_passes(args) -> int:
    from onnxopt.pipeline.registry import all_passes

    passes = all_passes()
    if args.json:
        out = [{"name": name, "summary": cls.summary(), "lossless": cls.lossless,
                "needs_calibration": cls.needs_calibration, "module": cls.__module__,
                "options": [{"name": s.name, "type": s.type_name, "default": s.default,
                             "help": s.help, "choices": list(s.choices) if s.choices else None}
                            for s in cls.option_specs()]} for name, cls in passes.items()]
        print(json.dumps(out, indent=2))
        return 0
    for name, cls in passes.items():
        kind = "lossless" if cls.lossless else "lossy"
        print(f"{name:<24} {kind:<9} {cls.summary()}")
        for s in cls.option_specs():
            choices = f" ({'|'.join(map(str, s.choices))})" if s.choices else ""
            print(f"    {s.name}={s.default!r} [{s.type_name}]{choices}  {s.help}")
    return 0


def cmd_targets(args) -> int:
    from onnxopt.target import _plugin_targets, builtin_target_names, load_target

    names = [args.name] if args.name else builtin_target_names() + sorted(_plugin_targets())
    targets = [load_target(n) for n in names]
    if args.json:
        print(json.dumps([t.to_json() | {"source": t.source} for t in targets], indent=2))
        return 0
    if args.name:
        (t,) = targets
        print(f"# target '{t.name}' from {t.source}: the effective descriptor (after extends, with defaults)")
        print(t.to_toml())
        return 0
    for t in targets:
        print(f"{t.name}: {t.description} ({t.source})")
        for pname, text in t.pipelines.items():
            print(f"    {pname:<10} {text}")
    return 0


def cmd_compare(args) -> int:
    from onnxopt.analysis.cost import parse_input_shapes
    from onnxopt.measure.compare import compare, format_comparison
    from onnxopt.errors import QualityGateError
    from onnxopt.measure.metrics import load_metric

    for path in (args.reference, args.candidate):
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such model file")
    metric = load_metric(args.metric)  # a bad name fails before any model runs
    result = compare(args.reference, args.candidate, data=args.data, metric=metric,
                     max_drop=args.max_drop, threads=args.threads, runs=args.runs,
                     latency=not args.no_latency, memory=not args.no_memory,
                     max_batches=args.max_batches, input_shapes=parse_input_shapes(args.input_shape),
                     progress=not args.quiet and sys.stderr.isatty())
    print(json.dumps(result, indent=2, default=str) if args.json else format_comparison(result))
    gate = result.get("gate")
    if gate and not gate["passed"]:
        raise QualityGateError(f"{result['metric']['metric']} drop {gate['drop']:.6g} exceeds "
                               f"--max-drop {gate['max_drop']:g}")
    return 0


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "check": cmd_check, "passes": cmd_passes,
            "targets": cmd_targets, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    quiet = "-q" in argv or "--quiet" in argv
    logging.basicConfig(level=logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING),
                        format="onnxopt: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except OnnxoptError as exc:
        if debug:
            traceback.print_exc()
        message = str(exc).replace("\n", " ")
        print(f"onnxopt: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`onnxopt passes | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("onnxopt: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
