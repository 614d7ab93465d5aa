"""How onnxopt opens onnxruntime sessions: one place for providers, threads and options.

Verification, comparison, calibration and the passes that evaluate something all run
models in onnxruntime. They take the execution providers of the target
(``runtime.execution_providers``); a provider that this onnxruntime build does not have is
left out, falling back to the CPU provider, and ``resolve_providers`` says so in a note.
"""

from __future__ import annotations

import logging

import onnx

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


class CannotRun(Exception):
    """onnxruntime cannot load or run this model (custom op, too large, a kernel error, …)."""


def resolve_providers(requested: list[str] | None) -> tuple[list[str], str | None]:
    """(providers to use, a note or None): ``requested`` minus the ones not installed, CPU last."""
    import onnxruntime as ort

    wanted = list(requested or [CPU])
    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if CPU not in usable:
        usable.append(CPU)
    note = None
    if missing:
        note = (f"execution provider(s) {', '.join(missing)} not installed in this onnxruntime: "
                f"sessions run on {', '.join(usable)}")
    return usable, note


def session(model: onnx.ModelProto | bytes | str, providers: list[str] | None = None, threads: int = 1,
            level: str = "disable", arena: bool = True, spinning: bool = True, cpu_fallback: bool = True):
    """An InferenceSession of ``model`` (a proto, its bytes or a path).

    ``level``: "disable" (ORT_DISABLE_ALL: what onnxopt checks, exactly as written),
    "basic" or "all". ``threads`` 0 lets onnxruntime choose. ``arena=False`` frees each run's
    activations (flat memory over many batches); ``spinning=False`` keeps an idle session's
    threads from spin-waiting on cores another session is timed on. ``cpu_fallback=False``
    makes a session whose nodes the first provider cannot all run fail to load instead of
    running those nodes on the CPU provider. Raises CannotRun.
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # silence kernel errors: CannotRun reports them
    if not arena:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not cpu_fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if isinstance(model, onnx.ModelProto):
        try:
            model = model.SerializeToString()
        except ValueError as exc:
            raise CannotRun(f"model too large to run from memory ({exc})") from None
    try:
        return ort.InferenceSession(model, opts, providers=providers or [CPU])
    except Exception as exc:
        raise CannotRun(first_line(exc)) from None


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (onnxruntime's run on for pages)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
