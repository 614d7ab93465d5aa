"""`optimize --validate-ep`: load and run the result on the target's execution providers.

For each provider of the target's ``runtime.execution_providers`` other than the CPU one:

* installed in this onnxruntime: the optimized model is loaded on that provider alone with
  CPU fallback disabled, which tells whether every node runs there (onnxruntime refuses the
  session otherwise, and its reason is kept); then the original and the optimized model both
  run on [provider, CPU] on the same inputs and are compared there (fidelity per output, the
  metric, the gate). A result that cannot load or run where the original can is a failed
  validation (exit 3, nothing written).
* missing: a note says so, and the comparison runs on the CPU provider instead.

A target that lists only the CPU provider is validated on it.
"""

from __future__ import annotations

from typing import Any, Callable

import onnx

from onnxopt import runtime
from onnxopt.errors import ModelError, VerificationError
from onnxopt.measure.compare import compare

CPU = runtime.CPU


def _all_nodes_on(proto: onnx.ModelProto, provider: str) -> tuple[bool, str | None]:
    """(every node runs on ``provider``, onnxruntime's reason when not)."""
    try:
        runtime.session(proto, [provider], threads=1, level="all", cpu_fallback=False)
        return True, None
    except runtime.CannotRun as exc:
        return False, str(exc)


def validate_on_providers(original, optimized: onnx.ModelProto, requested: list[str], data=None,
                          metric: str | Callable = "cosine", max_drop: float | None = None,
                          input_shapes: dict | None = None) -> dict[str, Any]:
    """{"runs": [one entry per provider validated on], "notes": [...]} (see the module doc).

    Raises VerificationError when the optimized model fails to load or run on a provider
    where the original runs.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = [p for p in dict.fromkeys(requested) if p != CPU]
    plan = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    notes = [f"validate-ep: {p} is not installed in this onnxruntime; validated on {CPU} instead" for p in missing]
    if missing or not wanted:
        plan.append(CPU)
    runs = []
    for provider in plan:
        entry: dict[str, Any] = {"provider": provider}
        if provider != CPU:
            whole, why = _all_nodes_on(optimized, provider)
            entry["all_nodes_on_provider"] = whole
            if not whole:
                entry["fallback_reason"] = why
                notes.append(f"validate-ep: not every node of the result runs on {provider}; the rest ran on "
                             f"{CPU} ({why})")
        providers = [provider] if provider == CPU else [provider, CPU]
        try:
            result = compare(original, optimized, data=data, metric=metric, max_drop=max_drop, latency=False,
                             memory=False, input_shapes=input_shapes, providers=providers)
        except ModelError as exc:
            try:  # does the original run there? then the result is what broke
                runtime.session(original if isinstance(original, onnx.ModelProto) else str(original), providers)
            except runtime.CannotRun:
                entry["status"] = "original-fails"
                notes.append(f"validate-ep: the original model does not run on {provider} either ({exc})")
                runs.append(entry)
                continue
            raise VerificationError(f"validate-ep: the optimized model fails on {provider}: {exc}") from None
        entry.update({"status": "ran", "providers": result["providers"], "metric": result["metric"],
                      "outputs": result["outputs"]})
        if "gate" in result:
            entry["gate"] = result["gate"]
        runs.append(entry)
    return {"runs": runs, "notes": notes}
