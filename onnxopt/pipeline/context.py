"""PassContext: what a pass may know besides the model (target, data, analyses, seed).

Analyses are computed lazily on first use and cached until a pass changes the graph; the
pass manager then drops every cached analysis the pass does not list in ``preserves``
(as MLIR and LLVM's new pass manager do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxopt.target import Target

logger = logging.getLogger(__name__)

# name -> function(model, ctx) -> result; filled by @register_analysis
_ANALYSES: dict[str, Callable] = {}


def register_analysis(name: str) -> Callable:
    """Decorator: make ``fn(model, ctx)`` available as ``ctx.analysis(name, model)``."""

    def decorate(fn: Callable) -> Callable:
        _ANALYSES[name] = fn
        return fn

    return decorate


@dataclass
class PassContext:
    target: Target
    calibration: Any = None  # a calibration source (onnxopt.data.calibration) or None
    seed: int = 0
    # Free-form results that passes hand to the report (for example fidelity notes).
    notes: list[str] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def analysis(self, name: str, model) -> Any:
        """The cached result of analysis ``name`` on ``model``, computed when missing."""
        if name not in self._cache:
            if name not in _ANALYSES:
                import onnxopt.analysis  # noqa: F401  (registers the built-in analyses)
            if name not in _ANALYSES:
                raise KeyError(f"unknown analysis '{name}' (known: {', '.join(sorted(_ANALYSES))})")
            self._cache[name] = _ANALYSES[name](model, self)
        return self._cache[name]

    def invalidate(self, preserved: frozenset[str] = frozenset()) -> None:
        """Drop every cached analysis except those named in ``preserved``."""
        for name in list(self._cache):
            if name not in preserved:
                del self._cache[name]

    @property
    def cached_analyses(self) -> list[str]:
        return sorted(self._cache)
