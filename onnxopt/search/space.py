"""The search space: knobs that turn the target's aggressive pipeline into candidates.

The aggressive pipeline (the target's ``default``, or the one given) is split into a
lossless prefix, its lossy passes (with their options) and what follows them. A candidate
is a choice for every knob that applies, plus ``give_back``: how many of the most sensitive
layers (``onnxopt.pipeline.sensitivity``) the lossy passes leave as they were, through each
pass's ``keep_option``. ``build`` makes the candidate's pipeline text.

A knob is data: a name, its choices (the first is the aggressive pipeline's own), when it
applies to a base pipeline, and how a choice edits the ``Plan``. ``register_knob`` adds
one, so a pass family can make its own settings searchable (pruning ratios and ranks are
added this way by the pruning and low-rank passes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxopt.pipeline.registry import get_pass
from onnxopt.pipeline.text import PassSpec, flatten, format_pipeline

QUANTIZERS = ("quantize-static", "quantize-dynamic", "quantize-weights")


@dataclass
class Plan:
    """A candidate's pipeline in parts, for knobs to edit."""

    prefix: list[PassSpec]  # lossless passes before the first lossy one
    before: list[PassSpec] = field(default_factory=list)  # passes a knob puts before the lossy ones
    lossy: list[PassSpec] = field(default_factory=list)  # the lossy passes (options editable)
    after: list[PassSpec] = field(default_factory=list)  # passes a knob puts after them (refit)
    rest: list[PassSpec] = field(default_factory=list)  # what followed the lossy passes

    def specs(self) -> list[PassSpec]:
        return self.prefix + self.before + self.lossy + self.after + self.rest

    def text(self) -> str:
        return format_pipeline(self.specs())

    def after_prefix(self) -> str:
        """The text of what runs after the lossless prefix (workers build the prefix once)."""
        return format_pipeline(self.specs()[len(self.prefix):])

    def lossy_pass(self, name: str) -> PassSpec | None:
        return next((s for s in self.lossy if s.name == name), None)


def split(specs: list[PassSpec]) -> Plan:
    """The base pipeline as a Plan."""
    first = next((i for i, s in enumerate(specs) if not _lossless(s)), len(specs))
    last = max((i for i, s in enumerate(specs) if not _lossless(s)), default=-1)
    return Plan(prefix=list(specs[:first]), lossy=[copy.deepcopy(s) for s in specs[first:last + 1]],
                rest=list(specs[last + 1:]))


def _lossless(spec: PassSpec) -> bool:
    """A pass, or a group (fixed-point) of passes, that keeps the outputs."""
    return all(get_pass(s.name).lossless for s in flatten([spec]))


@dataclass(frozen=True)
class Knob:
    """A searchable setting: ``choices`` (the first is the base pipeline's), ``applies(plan)``
    and ``apply(plan, value)``."""

    name: str
    choices: tuple
    applies: Callable[[Plan], bool]
    apply: Callable[[Plan, Any], None]


KNOBS: dict[str, Knob] = {}


def register_knob(knob: Knob) -> Knob:
    KNOBS[knob.name] = knob
    return knob


def _has(*names: str) -> Callable[[Plan], bool]:
    return lambda plan: any(plan.lossy_pass(n) is not None for n in names)


def _set_option(pass_name: str, option: str) -> Callable[[Plan, Any], None]:
    def apply(plan: Plan, value) -> None:
        spec = plan.lossy_pass(pass_name)
        if spec is not None:
            spec.options[option] = value
    return apply


def _per_channel(plan: Plan, value: bool) -> None:
    for name in ("quantize-static", "quantize-dynamic"):
        spec = plan.lossy_pass(name)
        if spec is not None:
            spec.options["per_channel"] = value


def _before(name: str) -> Callable[[Plan, Any], None]:
    def apply(plan: Plan, value: bool) -> None:
        if value:
            plan.before.append(PassSpec(name, {}))
    return apply


def _after(name: str) -> Callable[[Plan, Any], None]:
    def apply(plan: Plan, value: bool) -> None:
        if value:
            plan.after.append(PassSpec(name, {}))
    return apply


def _drop_quantizer(plan: Plan, value: str) -> None:
    """``value``: "all" keeps every quantization pass, else the one named runs alone."""
    if value != "all":
        plan.lossy = [s for s in plan.lossy if s.name not in QUANTIZERS or s.name == value]


def _quantizer_choices(plan: Plan) -> tuple:
    present = tuple(s.name for s in plan.lossy if s.name in QUANTIZERS)
    return ("all",) + present if len(present) > 1 else ("all",)


register_knob(Knob("calibration", ("minmax", "percentile", "entropy", "mse"), _has("quantize-static"),
                   _set_option("quantize-static", "calibration")))
register_knob(Knob("per_channel", (True, False), _has("quantize-static", "quantize-dynamic"), _per_channel))
register_knob(Knob("equalize", (False, True), _has(*QUANTIZERS), _before("equalize")))
register_knob(Knob("smooth_quant", (False, True), _has("quantize-static"), _before("smooth-quant")))
register_knob(Knob("refit", (False, True), _has(*QUANTIZERS), _after("refit")))


# Structural passes: how much they remove, scaled (1: as the pipeline says, 0: the pass is
# dropped). Pruning ratios scale down; low-rank keeps more of each layer (budget or energy
# closer to 1).
STRUCTURAL = {"prune-channels": "ratio", "prune-magnitude": "sparsity",
              "lowrank-matmul": "budget", "lowrank-conv": "budget"}


def _option_value(spec: PassSpec, option: str):
    if option in spec.options:
        return spec.options[option]
    return getattr(get_pass(spec.name).Options(), option)


def _scale_structure(names: tuple[str, ...]) -> Callable[[Plan, float], None]:
    def apply(plan: Plan, scale: float) -> None:
        kept = []
        for spec in plan.lossy:
            if spec.name not in names or scale == 1.0:
                kept.append(spec)
                continue
            if scale == 0.0:
                continue  # the pass is not run
            option = STRUCTURAL[spec.name]
            if spec.name.startswith("lowrank"):
                budget = float(_option_value(spec, "budget"))
                if budget > 0:  # keep a share of the parameters: keep more
                    spec.options["budget"] = round(1 - (1 - budget) * scale, 4)
                else:  # per-layer energy: keep more of it
                    energy = float(_option_value(spec, "energy"))
                    spec.options["energy"] = round(1 - (1 - energy) * scale, 6)
            else:
                spec.options[option] = round(float(_option_value(spec, option)) * scale, 4)
                if spec.options.get("schedule"):
                    spec.options["schedule"] = [round(float(x) * scale, 4) for x in spec.options["schedule"]]
            kept.append(spec)
        plan.lossy = kept
    return apply


register_knob(Knob("prune_scale", (1.0, 0.5, 0.0), _has("prune-channels", "prune-magnitude"),
                   _scale_structure(("prune-channels", "prune-magnitude"))))
register_knob(Knob("lowrank_scale", (1.0, 0.5, 0.0), _has("lowrank-matmul", "lowrank-conv"),
                   _scale_structure(("lowrank-matmul", "lowrank-conv"))))


def knobs_for(plan: Plan, has_calibration: bool) -> dict[str, tuple]:
    """The knobs that apply to ``plan`` and their choices (refit needs calibration data)."""
    out = {}
    for knob in KNOBS.values():
        if not knob.applies(plan) or (knob.name in ("refit", "smooth_quant") and not has_calibration):
            continue
        out[knob.name] = knob.choices
    quantizers = _quantizer_choices(plan)
    if len(quantizers) > 1:
        out["quantizers"] = quantizers
    return out


@dataclass
class Candidate:
    """A choice per knob and the number of most sensitive layers given back."""

    config: dict
    give_back: int = 0

    def key(self) -> tuple:
        return tuple(sorted(self.config.items())) + (("give_back", self.give_back),)


def build(base: Plan, candidate: Candidate, ranking: list[tuple[str, tuple]]) -> Plan:
    """The Plan of ``candidate`` on ``base``; ``ranking`` lists (layer key, the passes that
    change it), most sensitive first: a layer given back is kept by every one of them."""
    plan = copy.deepcopy(base)
    for name, value in candidate.config.items():
        if name == "quantizers":
            _drop_quantizer(plan, value)
        elif name in KNOBS:
            KNOBS[name].apply(plan, value)
    keep: dict[str, list[str]] = {}
    for layer, passes in ranking[:candidate.give_back]:
        for pass_name in passes:
            keep.setdefault(pass_name, []).append(layer)
    for spec in plan.lossy:
        option = get_pass(spec.name).keep_option
        if option and keep.get(spec.name):
            spec.options[option] = list(spec.options.get(option, [])) + keep[spec.name]
    return plan


def base_config(knobs: dict[str, tuple]) -> dict:
    """The aggressive pipeline's own choice of every knob."""
    return {name: choices[0] for name, choices in knobs.items()}
