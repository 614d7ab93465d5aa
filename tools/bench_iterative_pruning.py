"""Iterative magnitude pruning with a refit between rounds, against one shot.

    python tools/bench_iterative_pruning.py [--models digits_cnn,ppocr_mobile_v2_cls,ppocr_v4_rec]
        [--sparsities 0.5 0.7 0.8 0.9] [--rounds 3] [--json OUT]

For each model and sparsity S, three variants made from the original in this run:

- ``one shot`` = ``lossless,prune-magnitude{sparsity=S,refit=off}`` (no data);
- ``one shot + refit`` = the same with ``refit=on``: the kept weights of every pruned layer
  refitted, layer by layer on the calibration data, to the original model's outputs, the
  zeros staying zero (least squares, then the OBS sweep of onnxopt.data.obs);
- ``N rounds + refit`` = ``schedule=[S/N, 2S/N, …, S]`` with the refit after every round,
  each round ranking the refitted weights.

Judged on the evaluation inputs of tools/bench_pruning.py (other images than the
calibration ones): the worst output's SNR against the original and the task metric there
(digits accuracy on the test split, PP-OCR cls 0/180 accuracy, rec greedy-CTC character
agreement with the original). Sparsity is of the pruned op weights (Conv, MatMul, Gemm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_pruning import model_data, outputs, snr_db, task_metric  # noqa: E402


def variants(s: float, rounds: int) -> list[tuple[str, str]]:
    schedule = ",".join(f"{s * (i + 1) / rounds:.4g}" for i in range(rounds))
    return [("one shot", f"lossless,prune-magnitude{{sparsity={s},refit=off}}"),
            ("one shot + refit", f"lossless,prune-magnitude{{sparsity={s},refit=on}}"),
            (f"{rounds} rounds + refit", f"lossless,prune-magnitude{{schedule=[{schedule}],refit=on}}")]


def bench(name: str, sparsities: list[float], rounds: int, work: Path) -> list[dict]:
    from onnxopt.optimize import optimize

    src, calib, feeds, labels = model_data(name, work)
    ref = outputs(src, feeds)
    rows = []
    for s in sparsities:
        for label, pipeline in variants(s, rounds):
            row = {"model": name, "sparsity": s, "variant": label, "pipeline": pipeline}
            start = time.perf_counter()
            try:
                result = optimize(str(src), pipeline=pipeline, calibration=str(calib))
                dst = work / f"{name}.{s}.{label.replace(' ', '_').replace('+', 'p')}.onnx"
                result.save(dst)
                row["seconds"] = round(time.perf_counter() - start, 1)
                stats = next(p["stats"] for p in result.report["passes"] if p["name"] == "prune-magnitude")
                row["sparsity_reached"] = stats.get("sparsity")
                row["refit"] = stats.get("refit")
                cand = outputs(dst, feeds)
                row["snr_db"] = round(snr_db(ref, cand), 2)
                tm = task_metric(name, ref, cand, feeds, labels)
                if tm:
                    row["task"], row["task_ref"], row["task_value"] = tm
            except Exception as exc:  # noqa: BLE001  (a row, not a stop)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    return rows


def table(rows: list[dict], rounds: int) -> str:
    labels = ["one shot", "one shot + refit", f"{rounds} rounds + refit"]
    out = ["| model | sparsity | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    keyed = {(r["model"], r["sparsity"], r["variant"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for s in dict.fromkeys(r["sparsity"] for r in rows if r["model"] == model):
            cells = []
            for label in labels:
                r = keyed.get((model, s, label), {})
                if "error" in r or not r:
                    cells.append(r.get("error", "-")[:40])
                    continue
                task = f", {r['task']} {r['task_value']:.3f}" if "task" in r else ""
                cells.append(f"{r['snr_db']:.1f} dB{task}")
            out.append(f"| {model} | {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits_cnn,ppocr_mobile_v2_cls,ppocr_v4_rec")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench(name, args.sparsities, args.rounds, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    print(table(rows, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
