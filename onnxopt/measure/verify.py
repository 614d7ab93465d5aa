"""Run models in onnxruntime and compare their outputs.

Used by the pass manager's --verify (each lossless pass against its input) and by tests.
Sessions use ORT_DISABLE_ALL so that onnxruntime's own fusions cannot hide a bug on
either side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.runtime import CannotRun

logger = logging.getLogger(__name__)

# Symbolic dims get one of these sizes when no data is given: batch-like dims 1, the
# others the first size the model runs with (audio front ends need long inputs, CNNs
# sizes divisible by their strides, some recognizers fixed-size tails). A dim name keeps
# one size across all inputs.
DEFAULT_BATCH = 1
DIM_CANDIDATES = (128, 512, 32, 1024, 64, 256, 16, 8)


def _dim_size(dim, position: int, named: dict, size: int) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and dim:
        if dim not in named:
            batch_like = "batch" in dim.lower() or dim in ("N", "n", "B", "b")
            named[dim] = DEFAULT_BATCH if batch_like or position == 0 else size
        return named[dim]
    return DEFAULT_BATCH if position == 0 else size


def session(proto: onnx.ModelProto, providers: list[str] | None = None, threads: int = 1,
            optimize: bool = False):
    """A session that runs ``proto`` as written (ORT_DISABLE_ALL unless ``optimize``)."""
    return runtime.session(proto, providers, threads, level="all" if optimize else "disable")


def _ort_dtype(type_str: str) -> np.dtype:
    name = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else "float"
    table = {"float": np.float32, "double": np.float64, "float16": np.float16, "int64": np.int64,
             "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
             "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
             "string": np.str_}
    if name not in table:
        raise CannotRun(f"cannot make sample input of type {type_str}")
    return np.dtype(table[name])


def sample_inputs(sess, seed: int = 0, probe: bool = True) -> dict[str, np.ndarray]:
    """Inputs made from the model's input specs (seeded).

    Symbolic dims take the first size of DIM_CANDIDATES with which the model runs
    (``probe``: one trial run per size tried); the first size when none does.
    """
    first = None
    for size in DIM_CANDIDATES:
        feeds = _make_inputs(sess, seed, size)
        if first is None:
            first = feeds
        if not probe:
            break
        if all(isinstance(d, int) and d >= 0 for i in sess.get_inputs() for d in (i.shape or [])):
            return feeds  # nothing symbolic: no size to choose
        try:
            sess.run(None, feeds)
            return feeds
        except Exception:  # the model refuses this size: try the next
            continue
    return first


def _make_inputs(sess, seed: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    named: dict[str, int] = {}
    for inp in sess.get_inputs():
        if not inp.type.startswith("tensor("):
            raise CannotRun(f"input '{inp.name}' is a {inp.type}, not a tensor")
        dtype = _ort_dtype(inp.type)
        shape = [_dim_size(d, i, named, size) for i, d in enumerate(inp.shape or [])]
        if dtype.kind == "f":
            value = rng.standard_normal(shape)
        elif dtype.kind == "b":
            value = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            value = rng.integers(0, 2, size=shape)
        else:
            value = np.full(shape, "a", dtype=object)
        feeds[inp.name] = np.asarray(value, dtype=object if dtype.kind == "U" else dtype)
    return feeds


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None, seed: int = 0,
        providers: list[str] | None = None, threads: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds, outputs by name) of one run; raises CannotRun when ORT refuses the model."""
    sess = session(proto, providers, threads)
    if feeds is None:
        feeds = sample_inputs(sess, seed)
    else:
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
    try:
        values = sess.run(None, feeds)
    except Exception as exc:
        raise CannotRun(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None
    return feeds, {o.name: v for o, v in zip(sess.get_outputs(), values)}


@dataclass
class Mismatch:
    output: str
    reason: str

    def __str__(self) -> str:
        return f"output '{self.output}': {self.reason}"


def compare_outputs(ref: dict, cand: dict, rtol: float = 1e-3, atol: float = 1e-5) -> list[Mismatch]:
    """Differences beyond tolerance, output by output (empty list = equivalent).

    Floats: max |a-b| <= atol + rtol * max|ref| over the whole tensor (scale-aware, so a
    fusion's reassociation of large sums is not flagged); NaNs must sit in the same places.
    Integers, booleans and strings must be equal.
    """
    problems = []
    for name, a in ref.items():
        if name not in cand:
            problems.append(Mismatch(name, "missing from the optimized model"))
            continue
        problems.extend(_compare_value(name, a, cand[name], rtol, atol))
    return problems


def _compare_value(name, a, b, rtol, atol) -> list[Mismatch]:
    if isinstance(a, list) or isinstance(b, list):  # sequences
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
            return [Mismatch(name, "sequence length or kind differs")]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(_compare_value(f"{name}[{i}]", x, y, rtol, atol))
        return out
    if a is None or b is None:
        return [] if a is None and b is None else [Mismatch(name, "optional presence differs")]
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return [Mismatch(name, f"shape {b.shape} instead of {a.shape}")]
    if a.dtype != b.dtype:
        return [Mismatch(name, f"dtype {b.dtype} instead of {a.dtype}")]
    if a.dtype.kind in "fc":
        a64, b64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64), b.astype(
            np.complex128 if a.dtype.kind == "c" else np.float64)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        if not np.array_equal(nan_a, nan_b):
            return [Mismatch(name, "NaNs in different places")]
        fin = ~nan_a
        if not np.array_equal(np.isinf(a64[fin]), np.isinf(b64[fin])) or \
                not np.array_equal(a64[fin][np.isinf(a64[fin])], b64[fin][np.isinf(b64[fin])]):
            return [Mismatch(name, "infinities differ")]
        finite = fin & ~np.isinf(a64)
        if not finite.any():
            return []
        err = float(np.max(np.abs(a64[finite] - b64[finite])))
        scale = float(np.max(np.abs(a64[finite])))
        if err > atol + rtol * scale:
            return [Mismatch(name, f"max abs error {err:.3g} > {atol + rtol * scale:.3g} (max |ref| {scale:.3g})")]
        return []
    if not np.array_equal(a, b):
        return [Mismatch(name, f"{int(np.sum(a != b))} of {a.size} values differ")]
    return []
