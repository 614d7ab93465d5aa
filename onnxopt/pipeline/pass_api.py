"""The pass API: a pass is a small class with a name, typed options and ``run``.

    @register_pass("eliminate-identity")
    class EliminateIdentityPass(Pass):
        '''Remove Identity nodes and ops that do nothing (first line = summary).'''

        lossless = True

        @dataclass
        class Options:
            keep_outputs: bool = option(True, "never rename a graph output")

        def run(self, model, ctx) -> PassResult:
            ...
            return PassResult(changed=n > 0, stats={"removed": n})

Options are a dataclass nested in the pass; their annotations give the types that the
pipeline text is converted to (int, float, bool, str, list[str], list[int], list[float]).
Passes rewrite ``model.graph`` in place and never print, read files or parse the CLI:
everything comes through their options and the PassContext.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from onnxopt.errors import PipelineError


def option(default: Any, help: str, choices: typing.Sequence[Any] | None = None) -> Any:
    """Declare an option field with its default, a one-line help and allowed values."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class OptionSpec:
    """What the registry, `onnxopt passes` and the pipeline parser know of one option."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def type_name(self) -> str:
        return getattr(self.type, "__name__", None) if typing.get_origin(self.type) is None \
            else f"list[{typing.get_args(self.type)[0].__name__}]"


@dataclass
class PassResult:
    """What a pass did: ``changed`` must be honest (the manager checks it on every run)."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""  # kebab-case, set by @register_pass
    lossless: ClassVar[bool] = True  # outputs identical within float tolerance
    # Analyses (names in the PassContext cache) that stay valid when this pass changes the
    # graph; every other cached analysis is dropped after a change. "statistics" keeps the
    # activation statistics collected so far (only for a pass that leaves every tensor's
    # values as they were).
    preserves: ClassVar[frozenset[str]] = frozenset()
    # True for passes that need calibration data (activation statistics). Such a pass may
    # define ``calibration_requests(model, ctx) -> list[Reducer]``: the manager gathers the
    # requests of a block of calibrating passes so that one streamed run serves them.
    needs_calibration: ClassVar[bool] = False
    # Lossy passes that change layers one by one (quantization, float16) name the option
    # that leaves given layers as they are (node names, or first output names); the
    # fidelity floor gives the layers that cost most back through it, and ``layers`` lists
    # the layers the pass would change in ``model`` (same keys: onnxopt.ir.graphs.node_key).
    keep_option: ClassVar[str | None] = None
    # A pass that exists to make the model faster on the target (int8 kernels): under a
    # speed floor (``max_latency_ratio``) it must not leave the model slower than before.
    promises_speed: ClassVar[bool] = False

    def layers(self, model, ctx) -> list[str]:
        """Keys of the layers this pass would change in ``model`` (for ``keep_option``)."""
        return []
    # Op types (default domain) without which the pass cannot change anything: when the
    # model (every graph) has none of them, the manager does not run it. Empty: always run.
    requires_ops: ClassVar[frozenset[str]] = frozenset()

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        specs = {s.name: s for s in self.option_specs()}
        values = {}
        for key, value in options.items():
            if key not in specs:
                raise PipelineError(unknown_option_message(self.name or type(self).__name__, key, specs))
            values[key] = coerce_option(self.name, specs[key], value)
        self.options = self.Options(**values)

    def run(self, model, ctx) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    # -- introspection ---------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls.Options)
        specs = []
        for f in dataclasses.fields(cls.Options):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            choices = f.metadata.get("choices")
            specs.append(OptionSpec(f.name, hints[f.name], default, f.metadata.get("help", ""),
                                    tuple(choices) if choices else None))
        return specs


def unknown_option_message(pass_name: str, key: str, specs: dict) -> str:
    from onnxopt.pipeline.registry import nearest

    hint = nearest(key, list(specs))
    valid = ", ".join(sorted(specs)) or "none"
    return (f"pass '{pass_name}' has no option '{key}'"
            + (f"; did you mean '{hint}'?" if hint else "") + f" (options: {valid})")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce_option(pass_name: str, spec: OptionSpec, value: Any) -> Any:
    """Convert a value from pipeline text, TOML or Python to the option's declared type."""
    where = f"option '{spec.name}' of pass '{pass_name}'"
    origin = typing.get_origin(spec.type)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(spec.type)[:1]
        items = value if isinstance(value, (list, tuple)) else [value]
        result = [_coerce_scalar(where, item_type, v) for v in items]
        if spec.choices:
            for v in result:
                _check_choice(where, spec, v)
        return result
    result = _coerce_scalar(where, spec.type, value)
    if spec.choices:
        _check_choice(where, spec, result)
    return result


def _check_choice(where: str, spec: OptionSpec, value: Any) -> None:
    if value not in spec.choices:
        from onnxopt.pipeline.registry import nearest

        hint = nearest(str(value), [str(c) for c in spec.choices])
        raise PipelineError(f"{where} takes one of {', '.join(map(str, spec.choices))}, not '{value}'"
                            + (f"; did you mean '{hint}'?" if hint else ""))


def _coerce_scalar(where: str, typ: Any, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        raise PipelineError(f"{where} takes one {typ.__name__}, not a list")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise PipelineError(f"{where} takes a {typ.__name__}, not '{value}'") from None
    raise PipelineError(f"{where} has an unsupported type {typ!r}")
