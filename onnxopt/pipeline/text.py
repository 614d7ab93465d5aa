"""Pipeline text, in the style of MLIR pipelines: parse and format.

Grammar::

    pipeline := element ( "," element )*
    element  := NAME [ "{" [ option ( "," option )* ] "}" ] [ "(" pipeline ")" ]
    option   := KEY "=" value
    value    := "[" [ scalar ( "," scalar )* ] "]" | scalar
    scalar   := QUOTED | BARE
    NAME     := [A-Za-z0-9_.:-]+        a target pipeline name or a pass name
    KEY      := [A-Za-z_][A-Za-z0-9_]*
    QUOTED   := '…' or "…"              (backslash escapes the quote)
    BARE     := a run of characters other than , { } [ ] = " ' and white space

White space between tokens is ignored. Example::

    lossless,quantize-static{calibration=percentile,percentile=99.99,ops=[Conv,MatMul]}

An element with a parenthesized pipeline is a group. The one group is ``fixed-point``:
its passes run in order, round after round, until a round changes nothing (a pass that
found nothing to do is not run again until the model changes), at most ``max_rounds`` rounds
(default 4). Only lossless passes may be in it (repeating a lossy pass would compound its
loss)::

    lift-constants,fixed-point{max_rounds=6}(fold-constants,eliminate-identity,eliminate-dead-code)

``parse`` gives raw specs (strings, lists of strings); ``resolve`` expands target pipeline
names, checks pass and option names against the registry and converts values to each
option's type; ``format`` prints specs back so that ``format(parse(t))`` is canonical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from onnxopt.errors import PipelineError

_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE = re.compile(r"[^,{}\[\]=\"'\s]+")
_SAFE_BARE = re.compile(r"[A-Za-z0-9_.:+\-/]+")


@dataclass
class PassSpec:
    """One element of a pipeline: a name and the options written for it; a group
    (``fixed-point``) also has the pipeline it repeats (``body``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    body: list["PassSpec"] | None = None

    def __str__(self) -> str:
        return format_pipeline([self])

    @property
    def is_group(self) -> bool:
        return self.body is not None


# Group constructs: name -> {option: (type, default, help)}.
GROUPS: dict[str, dict[str, tuple]] = {
    "fixed-point": {"max_rounds": (int, 4, "stop after this many rounds even if passes still change the model")},
}


def flatten(specs: list[PassSpec]) -> list[PassSpec]:
    """The passes of ``specs``, groups opened (each pass once)."""
    out = []
    for spec in specs:
        out.extend(flatten(spec.body) if spec.is_group else [spec])
    return out


class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, what: str) -> PipelineError:
        pointer = self.text[:self.pos] + " <here> " + self.text[self.pos:]
        return PipelineError(f"pipeline text: {what} at position {self.pos}: '{pointer.strip()}'")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected '{char}', found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def scalar(self) -> str:
        quote = self.peek()
        if quote in ("'", '"'):
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != quote:
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error("unterminated quoted value")
            self.pos += 1
            return "".join(out)
        return self.match(_BARE, "a value")


def parse(text: str) -> list[PassSpec]:
    """Parse pipeline text into specs; raises PipelineError pointing at the bad spot."""
    if not isinstance(text, str):
        raise PipelineError(f"pipeline must be text, not {type(text).__name__}")
    scan = _Scanner(text)
    if not scan.peek():
        raise PipelineError("pipeline text is empty")
    specs = _parse_pipeline(scan, nested=False)
    if scan.peek():
        raise scan.error(f"unexpected {scan.peek()!r}")
    return specs


def _parse_pipeline(scan: _Scanner, nested: bool) -> list[PassSpec]:
    specs: list[PassSpec] = []
    while True:
        spec = PassSpec(scan.match(_NAME, "a pass or pipeline name"))
        if scan.peek() == "{":
            scan.pos += 1
            if scan.peek() != "}":
                while True:
                    key = scan.match(_KEY, "an option name")
                    if key in spec.options:
                        raise scan.error(f"option '{key}' given twice")
                    scan.expect("=")
                    if scan.peek() == "[":
                        scan.pos += 1
                        items = []
                        if scan.peek() != "]":
                            items.append(scan.scalar())
                            while scan.peek() == ",":
                                scan.pos += 1
                                items.append(scan.scalar())
                        scan.expect("]")
                        spec.options[key] = items
                    else:
                        spec.options[key] = scan.scalar()
                    if scan.peek() != ",":
                        break
                    scan.pos += 1
            scan.expect("}")
        if scan.peek() == "(":
            scan.pos += 1
            if scan.peek() == ")":
                raise scan.error("empty group")
            spec.body = _parse_pipeline(scan, nested=True)
            scan.expect(")")
        specs.append(spec)
        if not scan.peek() or (nested and scan.peek() == ")"):
            return specs
        scan.expect(",")


def _format_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    if _SAFE_BARE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_pipeline(specs: list[PassSpec]) -> str:
    """Canonical text of ``specs`` (options in the order given)."""
    parts = []
    for spec in specs:
        text = spec.name
        if spec.options:
            opts = []
            for key, value in spec.options.items():
                if isinstance(value, (list, tuple)):
                    opts.append(f"{key}=[{','.join(_format_scalar(v) for v in value)}]")
                else:
                    opts.append(f"{key}={_format_scalar(value)}")
            text += f"{{{','.join(opts)}}}"
        if spec.is_group:
            text += f"({format_pipeline(spec.body)})"
        parts.append(text)
    return ",".join(parts)


def resolve(text_or_specs: str | list[PassSpec], pipelines: dict[str, str] | None = None,
            pass_defaults: dict[str, dict[str, Any]] | None = None) -> list[PassSpec]:
    """Expand pipeline names, check names, apply precedence and convert option values.

    Precedence of an option's value: the pass's default < ``pass_defaults`` (the target's
    ``[passes.NAME]`` tables) < the pipeline text. The returned specs hold every option
    whose effective value differs from the pass's own default, with its declared type.
    """
    from onnxopt.pipeline.pass_api import coerce_option, unknown_option_message
    from onnxopt.pipeline.registry import get_pass, nearest

    pipelines = pipelines or {}
    pass_defaults = pass_defaults or {}
    specs = parse(text_or_specs) if isinstance(text_or_specs, str) else list(text_or_specs)
    out: list[PassSpec] = []

    def expand(items: list[PassSpec], stack: tuple[str, ...], out: list[PassSpec], group: str | None) -> None:
        for spec in items:
            if spec.is_group or spec.name in GROUPS:
                out.append(resolve_group(spec, stack))
                continue
            if spec.name in pipelines:
                if spec.options:
                    raise PipelineError(f"pipeline '{spec.name}' takes no options (only passes do)")
                if spec.name in stack:
                    raise PipelineError("pipeline names form a cycle: " + " -> ".join(stack + (spec.name,)))
                expand(parse(pipelines[spec.name]), stack + (spec.name,), out, group)
                continue
            cls = get_pass(spec.name)
            if group is not None and (not cls.lossless or cls.needs_calibration):
                raise PipelineError(f"pass '{spec.name}' cannot be in a {group} group: only lossless "
                                    "passes without calibration may be repeated")
            option_specs = {s.name: s for s in cls.option_specs()}
            merged = dict(pass_defaults.get(spec.name, {}))
            merged.update(spec.options)
            options = {}
            for key, value in merged.items():
                if key not in option_specs:
                    raise PipelineError(unknown_option_message(spec.name, key, option_specs))
                value = coerce_option(spec.name, option_specs[key], value)
                if value != option_specs[key].default:
                    options[key] = value
            out.append(PassSpec(spec.name, options))

    def resolve_group(spec: PassSpec, stack: tuple[str, ...]) -> PassSpec:
        known = GROUPS.get(spec.name)
        if known is None:
            hint = nearest(spec.name, list(GROUPS))
            raise PipelineError(f"'{spec.name}(...)': unknown group" + (f"; did you mean '{hint}'?" if hint else "")
                                + f" (groups: {', '.join(GROUPS)})")
        if not spec.is_group:
            raise PipelineError(f"group '{spec.name}' needs a pipeline in parentheses: {spec.name}(a,b,...)")
        options = {}
        for key, value in spec.options.items():
            if key not in known:
                raise PipelineError(f"group '{spec.name}' has no option '{key}' (options: {', '.join(known)})")
            kind, default, _ = known[key]
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise PipelineError(f"group '{spec.name}' option '{key}': expected {kind.__name__}, "
                                    f"got '{value}'") from None
            if key == "max_rounds" and value < 1:
                raise PipelineError(f"group '{spec.name}' option max_rounds must be at least 1, got {value}")
            if value != default:
                options[key] = value
        body: list[PassSpec] = []
        expand(spec.body, stack, body, spec.name)
        return PassSpec(spec.name, options, body)

    expand(specs, (), out, None)
    if not out:
        raise PipelineError("pipeline has no passes")
    return out
