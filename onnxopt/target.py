"""Target descriptors: TOML data that chooses and parameterizes passes for some hardware.

A target file is validated strictly on load against ``SCHEMA`` below: an unknown key or a
value of the wrong type is an error that names the file, the table and the nearest valid
key. ``extends`` names another target (a built-in name or a path relative to the file);
tables merge key by key, the extending file winning. Passes read the target through the
PassContext (``ctx.target.capabilities.float16``), never by its name. targets/README.md
documents every key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from onnxopt.errors import TargetError

SCHEMA_VERSION = 1


# -- schema description ----------------------------------------------------------------------
@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class Table:
    """A table with a fixed set of keys (each optional; defaults come from ``DEFAULTS``)."""

    keys: dict


@dataclass(frozen=True)
class MapOf:
    """A table whose keys are free names (pipelines, pass names, scheme names)."""

    value: Any


ANY_OPTION = "any-option"  # a pass option value: checked against the pass itself
SCALAR = "scalar"  # a string, number or boolean (an attribute value in an op constraint)

# [capabilities.ops.OP]: what the hardware runs of one op type (onnxopt/analysis/target_check.py)
OP_CONSTRAINTS = Table({
    "attributes": MapOf(ListOf(SCALAR)),
    "constant_inputs": ListOf(int),
    "nonnegative_inputs": ListOf(int),
    "input_types": ListOf(str),
    "per_channel_weights": bool,
})

SCHEMA = Table({
    "schema": int,
    "name": str,
    "description": str,
    "extends": str,
    "runtime": Table({
        "execution_providers": ListOf(str),
        "contrib_ops": bool,
        "intra_op_threads": int,
    }),
    "capabilities": Table({
        "float16": bool,
        "bfloat16": bool,
        "int4": bool,
        "nm_sparsity": ListOf(str),
        "channel_multiple": int,
        "aligned_channels": bool,
        "allowed_ops": ListOf(str),
        "static_shapes": bool,
        "integer_only": bool,
        "tensor_types": ListOf(str),
        "ops": MapOf(OP_CONSTRAINTS),
    }),
    "quantization": Table({
        "activations": str,
        "weights": str,
        "bias_bits": int,
        "schemes": MapOf(Table({
            "dtype": str,
            "symmetric": bool,
            "granularity": str,
            "reduce_range": bool,
        })),
        "weight_schemes": MapOf(str),
        "quantized_ops": ListOf(str),
        "unified_scale_ops": ListOf(str),
        "passthrough_ops": ListOf(str),
        "float_ops": ListOf(str),
        "residual_add": bool,
        "full_graph": bool,
        "quantize_outputs": bool,
    }),
    "floor": Table({
        "min_snr_db": float,
        "min_cosine": float,
        "max_latency_ratio": float,
    }),
    "pipelines": MapOf(str),
    "passes": MapOf(MapOf(ANY_OPTION)),
})

DEFAULTS: dict[str, Any] = {
    "description": "",
    "runtime": {"execution_providers": ["CPUExecutionProvider"], "contrib_ops": False,
                "intra_op_threads": 0},
    "capabilities": {"float16": False, "bfloat16": False, "int4": False, "nm_sparsity": [],
                     "channel_multiple": 1, "aligned_channels": False, "allowed_ops": [],
                     "static_shapes": False, "integer_only": False, "tensor_types": [], "ops": {}},
    "quantization": {"activations": "", "weights": "", "bias_bits": 32, "schemes": {}, "weight_schemes": {},
                     "quantized_ops": [], "unified_scale_ops": [], "passthrough_ops": [],
                     "float_ops": [], "residual_add": False, "full_graph": False,
                     "quantize_outputs": True},
    "floor": {},
    "pipelines": {},
    "passes": {},
}

REQUIRED_PIPELINES = ("lossless", "default")
# What `optimize` runs without --pipeline and without calibration data, when the target
# defines it (else `default` minus the passes that need data).
WITHOUT_DATA_PIPELINE = "default-without-data"


class Section(dict):
    """A validated table: a dict whose keys also read as attributes."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _sectioned(value: Any) -> Any:
    if isinstance(value, dict):
        return Section({k: _sectioned(v) for k, v in value.items()})
    return value


@dataclass
class Target:
    """An effective target (after ``extends``)."""

    name: str
    description: str
    source: str  # file it came from
    runtime: Section
    capabilities: Section
    quantization: Section
    floor: Section
    pipelines: dict[str, str]
    passes: dict[str, dict[str, Any]]
    raw: dict = field(repr=False, default_factory=dict)

    def to_json(self) -> dict:
        return json.loads(json.dumps(self.raw))

    def to_toml(self) -> str:
        """The effective descriptor (after ``extends``, defaults filled in) as TOML text that
        loads back to the same target."""
        import re

        first = {k: self.raw[k] for k in ("schema", "name", "description") if k in self.raw}
        return re.sub(r"\n{3,}", "\n\n", _toml_table(first | self.raw, ()))


# -- writing -----------------------------------------------------------------------------------
def _toml_key(key: str) -> str:
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)  # TOML bare keys are ASCII


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(data: dict, path: tuple[str, ...]) -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    parts = []
    if path and (lines or not data):  # a table of subtables only needs no header of its own
        parts.append("\n[" + ".".join(map(_toml_key, path)) + "]")
    parts += lines
    text = "\n".join(parts)
    for k, v in data.items():
        if isinstance(v, dict):
            text += "\n" + _toml_table(v, path + (k,))
    return text.lstrip("\n") if not path else text


# -- validation ------------------------------------------------------------------------------
def _type_name(spec: Any) -> str:
    if isinstance(spec, ListOf):
        return f"a list of {_type_name(spec.item)}"
    if isinstance(spec, (Table, MapOf)):
        return "a table"
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(spec, str(spec))


def _validate(value: Any, spec: Any, where: str, file: str) -> None:
    from onnxopt.pipeline.registry import nearest

    if spec is ANY_OPTION:
        return
    if spec is SCALAR:
        if not isinstance(value, (str, int, float, bool)):
            raise TargetError(f"{file}: {where} must be a string, a number or true/false, not {value!r}")
        return
    if isinstance(spec, Table):
        if not isinstance(value, dict):
            raise TargetError(f"{file}: {where} must be a table")
        for key, item in value.items():
            if key not in spec.keys:
                hint = nearest(key, list(spec.keys))
                table = f"[{where}]" if where else "top level"
                raise TargetError(f"{file}: {table}: unknown key '{key}'"
                                  + (f"; did you mean '{hint}'?" if hint else "")
                                  + f" (valid: {', '.join(spec.keys)})")
            _validate(item, spec.keys[key], f"{where}.{key}" if where else key, file)
        return
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise TargetError(f"{file}: {where} must be a table")
        for key, item in value.items():
            _validate(item, spec.value, f"{where}.{key}", file)
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise TargetError(f"{file}: {where} must be {_type_name(spec)}, not {value!r}")
        for i, item in enumerate(value):
            _validate(item, spec.item, f"{where}[{i}]", file)
        return
    ok = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
    if spec is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise TargetError(f"{file}: {where} must be {_type_name(spec)}, not {value!r}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- loading -------------------------------------------------------------------------------------
def builtin_target_names() -> list[str]:
    folder = resources.files("onnxopt.targets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _plugin_targets() -> dict[str, str]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group="onnxopt.targets"):
        found[ep.name] = ep.value
    return found


def _find(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> tuple[str, str]:
    """(file label, TOML text) for a built-in name, a plugin name or a path."""
    text_name = str(name_or_path)
    if text_name in builtin_target_names():
        res = resources.files("onnxopt.targets") / f"{text_name}.toml"
        return f"targets/{text_name}.toml", res.read_text(encoding="utf-8")
    plugins = _plugin_targets()
    if text_name in plugins:
        from importlib.metadata import entry_points

        (ep,) = [e for e in entry_points(group="onnxopt.targets") if e.name == text_name]
        try:
            path = Path(ep.load())
            return str(path), path.read_text(encoding="utf-8")
        except Exception as exc:
            raise TargetError(f"target plugin '{text_name}' ({ep.value}) failed to load: {exc}") from None
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise TargetError(f"{path}: target file not found")
        try:
            return str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetError(f"{path}: cannot read target file ({exc})") from None
    from onnxopt.pipeline.registry import nearest

    names = builtin_target_names() + sorted(plugins)
    hint = nearest(text_name, names)
    raise TargetError(f"unknown target '{text_name}'" + (f"; did you mean '{hint}'?" if hint else "")
                      + f" (built-in: {', '.join(names)}; or give a .toml file)")


def _read_raw(name_or_path: str | os.PathLike, relative_to: Path | None, chain: tuple) -> tuple[dict, str]:
    label, text = _find(name_or_path, relative_to)
    if label in chain:
        raise TargetError(f"{label}: 'extends' forms a cycle: {' -> '.join(chain + (label,))}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{label}: not valid TOML ({exc})") from None
    _validate(data, SCHEMA, "", label)
    if data.get("schema") != SCHEMA_VERSION:
        raise TargetError(f"{label}: 'schema' must be {SCHEMA_VERSION} (got {data.get('schema')!r})")
    if "extends" in data:
        here = Path(label).parent if not label.startswith("targets/") else None
        base, _ = _read_raw(data["extends"], here, chain + (label,))
        data = _merge(base, {k: v for k, v in data.items() if k != "extends"})
    return data, label


def load_target(name_or_path: str | os.PathLike) -> Target:
    """Load a built-in target by name, a plugin target, or a user's TOML file."""
    if isinstance(name_or_path, Target):
        return name_or_path
    raw, label = _read_raw(name_or_path, None, ())
    data = _merge(DEFAULTS, raw)
    if "name" not in data:
        raise TargetError(f"{label}: missing required key 'name'")
    for pipeline in REQUIRED_PIPELINES:
        if pipeline not in data["pipelines"]:
            raise TargetError(f"{label}: [pipelines] must define '{pipeline}'")
    _check_quantization(data["quantization"], label)
    _check_capabilities(data["capabilities"], label)
    _check_sparsity_and_channels(data["capabilities"], label)
    _check_floor(data["floor"], label)
    _check_passes(data, label)
    target = Target(
        name=data["name"], description=data["description"], source=label,
        runtime=_sectioned(data["runtime"]), capabilities=_sectioned(data["capabilities"]),
        quantization=_sectioned(data["quantization"]), floor=_sectioned(data["floor"]),
        pipelines=dict(data["pipelines"]),
        passes={k: dict(v) for k, v in data["passes"].items()}, raw=data)
    return target


# Values the quantization passes can honor (anything else is refused when the target loads,
# rather than failing, or being ignored, in the middle of a run).
ACTIVATION_DTYPES = ("uint8", "int8", "uint16", "int16")
WEIGHT_DTYPES = ("int8", "uint8", "int16", "uint16")
GRANULARITIES = ("per_tensor", "per_channel")
BIAS_BITS = (0, 32)


def choice_error(label: str, table: str, key: str, value, choices, what: str) -> str:
    return f"{label}: [{table}] {key} = {value!r}: {what} {', '.join(map(str, choices))}"


def _check_quantization(q: dict, label: str) -> None:
    """Every [quantization] value is one the passes honor; schemes named exist."""
    if q["bias_bits"] not in BIAS_BITS:
        raise TargetError(choice_error(label, "quantization", "bias_bits", q["bias_bits"], BIAS_BITS,
                                       "the passes take"))
    roles = [("activations", q["activations"], "[quantization] activations", ACTIVATION_DTYPES),
             ("weights", q["weights"], "[quantization] weights", WEIGHT_DTYPES)]
    for op, name in q["weight_schemes"].items():
        _check_op_name(op, label, "quantization.weight_schemes")
        roles.append(("weights", name, f"[quantization.weight_schemes] {op}", WEIGHT_DTYPES))
    for role, name, key, dtypes in roles:
        if name:
            _check_scheme(q["schemes"], role, name, key, dtypes, label)


def _check_scheme(schemes: dict, role: str, name: str, key: str, dtypes, label: str) -> None:
    if name not in schemes:
        from onnxopt.pipeline.registry import nearest

        hint = nearest(name, list(schemes))
        raise TargetError(f"{label}: {key} = '{name}' names no scheme"
                          + (f"; did you mean '{hint}'?" if hint else "")
                          + f" (schemes: {', '.join(schemes) or 'none'})")
    table, where = schemes[name], f"quantization.schemes.{name}"
    if "dtype" in table and table["dtype"] not in dtypes:
        raise TargetError(choice_error(label, where, "dtype", table["dtype"], dtypes, f"{role} can be"))
    granularity = table.get("granularity", "per_tensor").replace("-", "_")
    if granularity not in GRANULARITIES:
        raise TargetError(choice_error(label, where, "granularity", table["granularity"], GRANULARITIES,
                                       "one of"))
    if role == "activations" and granularity != "per_tensor":
        raise TargetError(f"{label}: [{where}] granularity = '{table['granularity']}': activations are "
                          "quantized per tensor (per_tensor)")


# Element types a target can name in tensor_types / input_types (numpy's names).
TENSOR_TYPES = ("float32", "float16", "bfloat16", "float64", "int4", "uint4", "int8", "uint8", "int16",
                "uint16", "int32", "uint32", "int64", "uint64", "bool", "str")


def _check_op_name(op: str, label: str, table: str) -> None:
    """A default-domain op type must exist in ONNX (another domain's ops cannot be checked)."""
    import onnx

    domain, _, name = op.rpartition(":")
    if domain not in ("", "ai.onnx") or onnx.defs.has(name):
        return
    from onnxopt.pipeline.registry import nearest

    hint = nearest(name, sorted({s.name for s in onnx.defs.get_all_schemas() if s.domain in ("", "ai.onnx")}))
    raise TargetError(f"{label}: [{table}] '{op}' is not an ONNX op" + (f"; did you mean '{hint}'?" if hint else "")
                      + " (write 'domain:Op' for another domain's op)")


def _check_types(types: list, label: str, table: str, key: str) -> None:
    for t in types:
        if t not in TENSOR_TYPES:
            raise TargetError(choice_error(label, table, key, t, TENSOR_TYPES, "types are"))


def _check_capabilities(c: dict, label: str) -> None:
    """Op names are ONNX ops; constraint attributes are attributes of their op; types are known."""
    import onnx

    for op in c["allowed_ops"]:
        _check_op_name(op, label, "capabilities")
    _check_types(c["tensor_types"], label, "capabilities", "tensor_types")
    for op, rules in c["ops"].items():
        where = f"capabilities.ops.{op}"
        _check_op_name(op, label, "capabilities.ops")
        _check_types(rules.get("input_types", []), label, where, "input_types")
        domain, _, name = op.rpartition(":")
        if domain not in ("", "ai.onnx"):
            continue
        known = sorted(onnx.defs.get_schema(name).attributes)
        for attr in rules.get("attributes", {}):
            if attr not in known:
                from onnxopt.pipeline.registry import nearest

                hint = nearest(attr, known)
                raise TargetError(f"{label}: [{where}.attributes] {name} has no attribute '{attr}'"
                                  + (f"; did you mean '{hint}'?" if hint else "")
                                  + f" (attributes: {', '.join(known) or 'none'})")
        for key in ("constant_inputs", "nonnegative_inputs"):
            if any(i < 0 for i in rules.get(key, [])):
                raise TargetError(f"{label}: [{where}] {key}: input indices start at 0")


def _check_floor(floor: dict, label: str) -> None:
    cosine = floor.get("min_cosine")
    if cosine is not None and not -1.0 <= cosine <= 1.0:
        raise TargetError(f"{label}: [floor] min_cosine = {cosine!r}: a cosine lies between -1 and 1")
    ratio = floor.get("max_latency_ratio")
    if ratio is not None and ratio <= 0:
        raise TargetError(f"{label}: [floor] max_latency_ratio = {ratio!r}: must be above 0 (1.0 = no slower)")


def parse_nm(text: str) -> tuple[int, int] | None:
    """(n, m) of an "n:m" sparsity pattern (n of every m weights kept, 0 < n < m), else None."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return None
    n, m = int(parts[0]), int(parts[1])
    return (n, m) if 0 < n < m else None


def _check_sparsity_and_channels(c: dict, label: str) -> None:
    """nm_sparsity holds "n:m" patterns; channel_multiple is a positive integer."""
    for pattern in c["nm_sparsity"]:
        if parse_nm(pattern) is None:
            raise TargetError(f"{label}: [capabilities] nm_sparsity: '{pattern}' is not an 'n:m' pattern "
                              "with 0 < n < m (such as '2:4')")
    if c["channel_multiple"] < 1:
        raise TargetError(f"{label}: [capabilities] channel_multiple = {c['channel_multiple']}: must be 1 or more")


def _check_passes(data: dict, label: str) -> None:
    """Check [passes.NAME] tables and pipeline texts against the registry."""
    from onnxopt.errors import PipelineError
    from onnxopt.pipeline.text import resolve

    for name, options in data["passes"].items():
        try:
            resolve([_spec(name, options)])
        except PipelineError as exc:
            raise TargetError(f"{label}: [passes.{name}]: {exc}") from None
    for name, text in data["pipelines"].items():
        try:
            resolve(text, data["pipelines"])
        except PipelineError as exc:
            raise TargetError(f"{label}: [pipelines] {name}: {exc}") from None


def _spec(name: str, options: dict):
    from onnxopt.pipeline.text import PassSpec

    return PassSpec(name, dict(options))
