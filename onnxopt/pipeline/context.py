"""PassContext: what a pass may know besides the model (target, data, reference, analyses).

Analyses are computed lazily on first use and cached until a pass changes the graph; the
pass manager then drops every cached analysis the pass does not list in ``preserves``
(as MLIR and LLVM's new pass manager do). Activation statistics collected from the
calibration data (``ctx.calibration``) are dropped the same way unless the pass lists
``"statistics"``: a pass that prunes before ``quantize-static`` makes quantization see the
pruned model's ranges.

``reference`` is the model as it was loaded, before any pass: the teacher whose
activations a pass can pair with the current model's on the same batches
(``onnxopt.data.statistics``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxopt.pipeline.lineage import Lineage
from onnxopt.target import Target

logger = logging.getLogger(__name__)

# name -> function(model, ctx) -> result; filled by @register_analysis
_ANALYSES: dict[str, Callable] = {}

STATISTICS = "statistics"  # the name a pass lists in ``preserves`` to keep activation statistics


def register_analysis(name: str) -> Callable:
    """Decorator: make ``fn(model, ctx)`` available as ``ctx.analysis(name, model)``."""

    def decorate(fn: Callable) -> Callable:
        _ANALYSES[name] = fn
        return fn

    return decorate


@dataclass
class PassContext:
    target: Target
    calibration: Any = None  # onnxopt.data.statistics.Calibration or None
    reference: Any = None  # the model as loaded (onnxopt.ir.model.Model), before any pass
    seed: int = 0
    # Free-form results that passes hand to the report (for example fidelity notes).
    notes: list[str] = field(default_factory=list)
    # What passes found out and chose where the target leaves a setting to "auto" (a probe
    # of the machine): written to the report and to the output model's metadata.
    metadata: dict[str, str] = field(default_factory=dict)
    # Pruning masks keyed by initializer name (True = weight kept). ``masks``: given to the
    # run by its caller (``--masks``: an earlier run's), which pruning passes respect;
    # ``pruned_masks``: the masks the pruning passes of this run leave, for the caller to
    # write (``--export-masks``). Passes never read or write mask files themselves.
    masks: dict[str, Any] = field(default_factory=dict)
    pruned_masks: dict[str, Any] = field(default_factory=dict)
    # Layers that lossy passes changed, what they were, for passes that recover from them
    # (refit): onnxopt.pipeline.lineage.
    lineage: Lineage = field(default_factory=Lineage)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _providers: list[str] | None = field(default=None, repr=False)

    @property
    def providers(self) -> list[str]:
        """The target's execution providers that this onnxruntime has (CPU as the fallback);
        resolved on first use (it imports onnxruntime), with a note when one is missing."""
        if self._providers is None:
            from onnxopt.runtime import resolve_providers

            self._providers, note = resolve_providers(list(self.target.runtime.execution_providers))
            if note:
                self.notes.append(note)
        return self._providers

    @property
    def resolved_providers(self) -> list[str] | None:
        """``providers`` if something asked for them already, else None (nothing ran)."""
        return self._providers

    @property
    def threads(self) -> int:
        """Intra-op threads for sessions onnxopt creates (0: onnxruntime's choice)."""
        return int(self.target.runtime.intra_op_threads)

    def analysis(self, name: str, model) -> Any:
        """The cached result of analysis ``name`` on ``model``, computed when missing."""
        if name not in self._cache:
            if name not in _ANALYSES:
                import onnxopt.analysis  # noqa: F401  (registers the built-in analyses)
            if name not in _ANALYSES:
                raise KeyError(f"unknown analysis '{name}' (known: {', '.join(sorted(_ANALYSES))})")
            self._cache[name] = _ANALYSES[name](model, self)
        return self._cache[name]

    def provide(self, name: str, result: Any) -> None:
        """Store the result of analysis ``name`` that a pass computed itself (incrementally),
        for the passes after it; it must be what ``analysis(name, model)`` would give now."""
        self._cache[name] = result

    def invalidate(self, preserved: frozenset[str] = frozenset()) -> None:
        """Drop every cached analysis, and the activation statistics, except those named in
        ``preserved``."""
        for name in list(self._cache):
            if name not in preserved:
                del self._cache[name]
        if self.calibration is not None and STATISTICS not in preserved:
            self.calibration.invalidate()

    @property
    def cached_analyses(self) -> list[str]:
        return sorted(self._cache)

    # -- rollback --------------------------------------------------------------------------
    def checkpoint(self) -> tuple:
        """What a pass can add to the context, for ``rollback`` when the pass is undone."""
        return dict(self.metadata), dict(self.pruned_masks)

    def rollback(self, state: tuple) -> None:
        """Forget what the undone pass chose, and every analysis and statistic of the model it
        left (the model is back as it was; notes stay, they may say why)."""
        metadata, masks = state
        self.metadata = dict(metadata)
        self.pruned_masks = dict(masks)
        self.invalidate()
