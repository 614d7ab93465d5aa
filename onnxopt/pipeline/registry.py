"""Where passes and targets are found: built-ins, then entry-point plugins, lazily.

Built-in passes live in ``onnxopt.passes`` (the top-level passes/ folder) and register
themselves with ``@register_pass`` on import. Third-party passes come from the entry-point
group ``onnxopt.passes``: each entry point is named after its pass and points to the Pass
class (``my-pass = "my_pkg.passes:MyPass"``). Plugins load only when a name is not a
built-in or when every pass is listed. A plugin that fails to load warns, unless it is
the one asked for; a plugin that takes a built-in's name is an error.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from importlib.metadata import entry_points
from typing import Callable, TypeVar

from onnxopt.errors import PipelineError, UsageError

logger = logging.getLogger(__name__)

PASS_GROUP = "onnxopt.passes"
TARGET_GROUP = "onnxopt.targets"

_passes: dict[str, type] = {}
_builtins_loaded = False
_plugins_loaded: set[str] = set()  # entry-point names already tried

P = TypeVar("P", bound=type)


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: register a Pass subclass under a kebab-case ``name``."""

    def decorate(cls: P) -> P:
        if not name or name != name.strip().lower() or " " in name or "_" in name:
            raise UsageError(f"pass name '{name}' must be kebab-case (lowercase, '-' between words)")
        existing = _passes.get(name)
        if existing is not None and existing is not cls and _qualname(existing) != _qualname(cls):
            raise UsageError(f"pass '{name}' of {_qualname(cls)} clashes with {_qualname(existing)}")
        cls.name = name
        _passes[name] = cls
        return cls

    return decorate


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("onnxopt.passes")


def builtin_names() -> set[str]:
    _load_builtins()
    return {n for n, c in _passes.items() if c.__module__.startswith("onnxopt.passes")}


def _load_plugins(only: str | None = None) -> None:
    """Load pass plugins (all, or the one named ``only``); warn on broken ones."""
    builtins = builtin_names()
    for ep in entry_points(group=PASS_GROUP):
        if ep.name in _plugins_loaded or (only is not None and ep.name != only):
            continue
        _plugins_loaded.add(ep.name)
        if ep.name in builtins:
            raise UsageError(f"plugin pass '{ep.name}' ({ep.value}) clashes with a built-in pass")
        try:
            cls = ep.load()
        except Exception as exc:  # a plugin's own bug: only fatal when it is the one asked for
            if only is not None:
                raise UsageError(f"pass plugin '{ep.name}' ({ep.value}) failed to load: {exc}") from None
            warnings.warn(f"onnxopt: pass plugin '{ep.name}' ({ep.value}) failed to load: {exc}")
            continue
        from onnxopt.pipeline.pass_api import Pass

        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            message = f"pass plugin '{ep.name}' ({ep.value}) is not a Pass subclass"
            if only is not None:
                raise UsageError(message)
            warnings.warn("onnxopt: " + message)
            continue
        if _passes.get(ep.name) is not cls:
            register_pass(ep.name)(cls)


def get_pass(name: str) -> type:
    """The Pass class registered as ``name``; PipelineError naming the nearest otherwise."""
    _load_builtins()
    if name not in _passes:
        _load_plugins(only=name)
    if name not in _passes:
        _load_plugins()
        hint = nearest(name, list(_passes))
        raise PipelineError(f"unknown pass '{name}'" + (f"; did you mean '{hint}'?" if hint else "")
                            + " (`onnxopt passes` lists them)")
    return _passes[name]


def all_passes() -> dict[str, type]:
    """Every pass, built-in and plugin, by name (sorted)."""
    _load_builtins()
    _load_plugins()
    return dict(sorted(_passes.items()))


def nearest(name: str, candidates: list[str]) -> str | None:
    """The closest candidate to a misspelt name, or None when nothing is close."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return matches[0] if matches else None
