"""Accuracy-aware search: the most compressed, fastest models within a metric budget.

``search(model, max_drop=X, metric=M, data=EVAL, calibration=CAL)``:

1. the target's aggressive pipeline (its ``default``, or the pipeline given) is split into
   knobs (``onnxopt.search.space``): calibration method, per-channel or per-tensor weights,
   which quantization passes run, equalize / smooth-quant before them, refit after them —
   and pass families register their own;
2. sensitivity: for every lossy pass with a ``keep_option``, each layer's fidelity when
   only it is compressed, on calibration batches, one worker task per layer, cached on disk
   by model, pass, options and data (``onnxopt.pipeline.sensitivity``); one ranking, most
   sensitive first;
3. give back: the aggressive pipeline with the 0, 1, 2, 4, … most sensitive layers kept as
   they were, evaluated in parallel, then bisected to the fewest that meet the budget;
4. the recovery knobs (refit, equalize) on the aggressive pipeline with none and half of
   those layers given back, then optuna (multi-objective TPE with the budget as a
   constraint) over every knob and the number of layers given back (on a log scale), with
   everything evaluated so far as its history;
5. the Pareto front of size, latency and metric drop among the candidates within budget,
   timed again here member by member (A B B A pairs); the member written is the best on
   ``prefer`` (latency by default, latencies within 5 % of the best counting as equal and
   the smaller model winning).

Every candidate is evaluated in full by a worker (``onnxopt.search.worker``): built from the
original model, measured on the evaluation data with the metric, timed against the original
interleaved; workers are local processes or Ray actors (``onnxopt.search.executor``), and
the model and data are shipped to each once. The chosen candidate (the front's best on
``prefer``) is built again here and returned with the report; when no candidate meets the
budget, QualityGateError (exit 3) names the closest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from onnxopt.errors import QualityGateError, UsageError
from onnxopt.search import pareto
from onnxopt.search.space import Candidate, Plan, base_config, build, knobs_for, split

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The chosen model (an OptimizeResult), and the search's own report."""

    result: Any  # onnxopt.optimize.OptimizeResult of the chosen candidate
    report: dict
    candidates: list[dict] = field(default_factory=list)
    front: list[dict] = field(default_factory=list)


def _batches(data, proto, limit: int | None = None) -> list[dict]:
    from onnxopt.measure.compare import read_batches

    return read_batches(data, proto, limit)


def search(model, max_drop: float, metric: str = "cosine", data=None, calibration=None,
           target="cpu", pipeline: str | None = None, trials: int = 16, workers: int | None = None,
           executor: str = "local", ray_address: str | None = None, prefer: str = "latency",
           cache: bool = True, seed: int = 0, progress: bool = False, max_calibration: int = 32) -> SearchResult:
    """See the module docstring. ``data`` (evaluation inputs) is required; ``calibration``
    enables static quantization, smoothing and refit."""
    from onnxopt.ir.model import load
    from onnxopt.optimize import plan as plan_pipeline
    from onnxopt.search.executor import make_executor
    from onnxopt.target import load_target

    started = time.perf_counter()
    if data is None:
        raise UsageError("a search needs evaluation data (--data DATA) to measure the metric on")
    if prefer not in pareto.PREFERENCES:
        raise UsageError(f"unknown preference '{prefer}' (latency, size or metric)")
    m = load(model)
    proto = m.to_proto()
    target_obj = load_target(target)
    _, specs, notes = plan_pipeline(target_obj, pipeline, has_calibration=calibration is not None)
    base = split(specs)
    if not base.lossy:
        raise UsageError(f"the pipeline '{pipeline or 'default'}' has no lossy pass: nothing to search")
    knobs = knobs_for(base, calibration is not None)
    evaluation = _batches(data, proto)
    calib = _batches(calibration, proto, max_calibration) if calibration is not None else []
    payload = {"model": proto.SerializeToString(), "target": target_obj, "metric": metric,
               "calibration": calib, "evaluation": evaluation, "threads": 1}
    pool = make_executor(executor, payload, workers, ray_address)
    report: dict[str, Any] = {"max_drop": max_drop, "metric": metric if isinstance(metric, str) else
                              f"{metric.__module__}:{metric.__name__}", "executor": pool.describe(),
                              "base_pipeline": base.text(), "knobs": {k: list(v) for k, v in knobs.items()},
                              "notes": notes}
    try:
        ranking, sensitivities = _sensitivity(pool, m, base, target_obj, calib or evaluation, cache, report, progress)
        candidates = _explore(pool, base, knobs, ranking, max_drop, trials, seed, progress, report)
    finally:
        pool.close()
    for c in candidates:
        if "size" in c:
            c["size_ratio"] = c["size"] / max(1, len(payload["model"]))
    good = [c for c in candidates if "error" not in c and c["drop"] <= max_drop]
    report["evaluations"] = len(candidates)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["candidates"] = candidates
    report["sensitivity"] = [s.to_json() for s in sensitivities]
    if not good:
        finished = [c for c in candidates if "error" not in c]
        closest = min(finished, key=lambda c: c["drop"], default=None)
        where = (f"; closest: drop {closest['drop']:.6g} with pipeline '{closest['pipeline']}'" if closest
                 else "; every candidate failed")
        raise QualityGateError(f"no candidate meets --max-accuracy-drop {max_drop:g} on {report['metric']} after "
                               f"{len(candidates)} evaluation(s){where}")
    from onnxopt.measure.fidelity import Floor
    from onnxopt.optimize import optimize

    # Latency measured by workers side by side is noisy: the front is timed again here, with
    # no worker running, before one is chosen.
    front = pareto.front(good)
    built = {c["id"]: optimize(m, target=target_obj, pipeline=c["pipeline"], calibration=calibration, floor=Floor())
             for c in front}
    _retime(proto, {i: r.model for i, r in built.items()}, evaluation[0], front)
    front = pareto.front(front)
    chosen = pareto.choose(front, prefer)
    report["front"] = front
    report["chosen"] = chosen
    report["prefer"] = prefer
    result = built[chosen["id"]]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return SearchResult(result, report, candidates, front)


def _retime(original, models: dict, feeds: dict, front: list[dict], runs: int = 400, budget_s: float = 8.0) -> None:
    """Latency of each front member against the original, timed again here one member at a
    time (A B B A pairs, one thread: ``onnxopt.measure.speed``), with no worker competing."""
    from onnxopt.measure.speed import compare_speed

    for c in front:
        speed = compare_speed(original, models[c["id"]], feeds, None, 1, runs=runs, budget_s=budget_s)
        c["latency_ratio_parallel"] = c["latency_ratio"]
        c["latency_ratio"], c["ms"] = float(speed.ratio), float(speed.ms_b)


# -- sensitivity ---------------------------------------------------------------------------------
def _mapped(pool, task: str, items: list, bar) -> list:
    """``pool.map`` in chunks of a few per worker, so a progress bar moves."""
    out: list = []
    step = max(1, 2 * getattr(pool, "workers", 1))
    for start in range(0, len(items), step):
        out += pool.map(task, items[start:start + step])
        bar.update(len(items[start:start + step]))
    return out


def _sensitivity(pool, model, base: Plan, target, batches, use_cache: bool, report: dict, progress: bool = False):
    """Per lossy pass of ``base`` with a keep option: each layer's fidelity alone (cached);
    returns the ranking [(layer, passes that change it)], most sensitive first, and the
    Sensitivities."""
    from onnxopt.ir.model import load
    from onnxopt.measure.fidelity import Fidelity
    from onnxopt.optimize import optimize
    from onnxopt.pipeline.context import PassContext
    from onnxopt.pipeline.registry import get_pass
    from onnxopt.pipeline.sensitivity import Sensitivity, SensitivityCache, alone, digest_batches
    from onnxopt.pipeline.text import format_pipeline

    prefix = format_pipeline(base.prefix)
    after_prefix = load(optimize(model, target=target, pipeline=prefix).model) if prefix else model
    ctx = PassContext(target=target)
    store = SensitivityCache() if use_cache else None
    data = digest_batches(batches[:4])
    out, merged = [], []
    started = time.perf_counter()
    for spec in base.lossy:
        cls = get_pass(spec.name)
        if cls.keep_option is None:
            continue
        options = dict(spec.options)
        found = store.get(model.source_sha256, spec.name, options, data) if store else None
        if found is None:
            keys = [k for k in cls(**options).layers(after_prefix, ctx) if k]
            items = [{"prefix": prefix, "pass": spec.name, "options": options, "layer": k, "keep": alone(keys, k)}
                     for k in keys]
            found = Sensitivity(spec.name, options, data=f"{min(4, len(batches))} calibration batch(es)")
            from tqdm import tqdm

            with tqdm(total=len(items), desc=f"sensitivity {spec.name}", unit="layer", disable=not progress,
                      leave=False) as bar:
                rows = _mapped(pool, "layer_alone", items, bar)
            for row in rows:
                found.layers[row["layer"]] = Fidelity(row["snr_db"], row["cosine"], row["output"])
            if store:
                store.put(model.source_sha256, found, data)
        out.append(found)
        merged += [(found.layers[k].snr_db, spec.name, k) for k in found.ranking()]
    report["sensitivity_seconds"] = round(time.perf_counter() - started, 2)
    # one entry per layer (its worst technique first): giving a layer back keeps it in every pass
    by_layer: dict[str, list] = {}
    for snr, name, key in merged:
        entry = by_layer.setdefault(key, [snr, []])
        entry[0] = min(entry[0], snr)
        entry[1].append(name)
    ranking = sorted(by_layer.items(), key=lambda kv: kv[1][0])
    return [(key, tuple(passes)) for key, (_, passes) in ranking], out


# -- candidates ----------------------------------------------------------------------------------
def _explore(pool, base: Plan, knobs: dict, ranking, max_drop: float, trials: int, seed: int, progress: bool,
             report: dict, timing_runs: int = 400) -> list[dict]:
    """Steps 3 and 4 of the module docstring; every evaluated candidate, in order."""
    import optuna

    from onnxopt.pipeline.text import format_pipeline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = len(ranking)
    distributions = {name: optuna.distributions.CategoricalDistribution(list(choices))
                     for name, choices in knobs.items()}
    # layers given back, plus one, on a log scale: a few layers matter more than the many after them
    distributions["give_back"] = optuna.distributions.IntDistribution(1, n + 1, log=True)

    # the budget is a constraint (optuna's docs advise constraints over extra objectives);
    # optuna >= 5 takes it from the trial, older versions from a function
    modern = hasattr(optuna.trial.Trial, "set_constraint")
    extra = {} if modern else {"constraints_func": lambda t: [t.user_attrs.get("constraint", 1.0)]}
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(4, trials // 3), **extra)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
    seen: dict[tuple, dict] = {}
    evaluated: list[dict] = []
    prefix = format_pipeline(base.prefix)
    width = max(1, getattr(pool, "workers", 1))
    from tqdm import tqdm

    bar = tqdm(desc="search", unit="candidate", disable=not progress, leave=False)

    def run(cands: list[Candidate], trial_objs: list) -> list[dict]:
        """Evaluate candidates (cached by key), tell optuna, return their results."""
        todo, order = [], []
        for c in cands:
            key = c.key()
            order.append(key)
            if key not in seen and all(key != k for k, _ in todo):
                todo.append((key, c))
        plans = [build(base, c, ranking) for _, c in todo]
        items = [{"id": len(evaluated) + i, "pipeline": p.text(), "prefix": prefix, "rest": p.after_prefix(),
                  "runs": timing_runs} for i, p in enumerate(plans)]
        for (key, c), res in zip(todo, _mapped(pool, "evaluate", items, bar)):
            res.update({"config": dict(c.config), "give_back": c.give_back})
            seen[key] = res
            evaluated.append(res)
            logger.info("candidate %s: %s", res["pipeline"], {k: res.get(k) for k in ("drop", "size", "latency_ratio",
                                                                                       "error")})
        results = [seen[k] for k in order]
        for trial, res in zip(trial_objs, results):
            if "error" in res:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            if modern:
                trial.set_constraint("budget", res["drop"] - max_drop)
            else:
                trial.set_user_attr("constraint", res["drop"] - max_drop)
            study.tell(trial, [float(res["size"]), float(res["latency_ratio"]), float(res["drop"])])
        return results

    def asked(cands: list[Candidate]) -> list:
        out = []
        for c in cands:
            study.enqueue_trial({**c.config, "give_back": c.give_back + 1})
            out.append(study.ask(distributions))
        return out

    config = base_config(knobs)
    # step 3: give back the most sensitive layers, 0, 1, 2, 4, … then bisect
    ladder = sorted({0, n} | {2 ** i for i in range(int(math.log2(n)) + 1)} if n else {0})
    ok: dict[int, bool] = {}
    for start in range(0, len(ladder), width):
        chunk = ladder[start:start + width]
        cands = [Candidate(dict(config), k) for k in chunk]
        for k, res in zip(chunk, run(cands, asked(cands))):
            ok[k] = "error" not in res and res["drop"] <= max_drop
        if any(ok[k] for k in chunk):
            break
    passing = sorted(k for k, v in ok.items() if v)
    if passing:
        hi = passing[0]
        lo = max((k for k, v in ok.items() if not v and k < hi), default=-1)
        while hi - lo > 1:
            step = max(1, (hi - lo) // (width + 1))
            mids = sorted({min(hi - 1, lo + step * (i + 1)) for i in range(width)} - {lo, hi})
            mids = [k for k in mids if lo < k < hi]
            if not mids:
                break
            cands = [Candidate(dict(config), k) for k in mids]
            for k, res in zip(mids, run(cands, asked(cands))):
                ok[k] = "error" not in res and res["drop"] <= max_drop
            lo = max([lo] + [k for k in mids if not ok[k]])
            hi = min([hi] + [k for k in mids if ok[k]])
        report["give_back"] = hi
    else:
        report["give_back"] = None
    # step 4: the recovery passes on the aggressive pipeline first (they tend to make the
    # front), then optuna over every knob and the count given back
    remaining = max(0, trials)
    known = report["give_back"]
    seeds = []
    for flags in (("refit",), ("equalize",), ("equalize", "refit")):
        if all(f in knobs for f in flags):
            for k in sorted({0, (known or 0) // 2}):
                seeds.append(Candidate({**config, **{f: True for f in flags}}, k))
    seeds = seeds[:remaining]
    for start in range(0, len(seeds), width):
        chunk = seeds[start:start + width]
        run(chunk, asked(chunk))
    remaining -= len(seeds)
    while remaining > 0:
        batch = [study.ask(distributions) for _ in range(min(width, remaining))]
        cands = [Candidate({k: t.params[k] for k in knobs}, int(t.params["give_back"]) - 1) for t in batch]
        run(cands, batch)
        remaining -= len(batch)
    bar.close()
    return evaluated
