"""Sample inputs for passes that judge their own error without calibration data.

``sample_batches(model, ctx)`` gives a few batches: from the calibration data when there is
some (``ctx.calibration``), else made from the model's input specs the way real inputs look:
symbolic dims take 16 (the first) and 64 (the others); an integer input that indexes an
embedding table (a Gather of a constant table on axis 0) gets random ids below the table's
row count, other integer inputs ones, and each 2-D integer input is right-padded with
zeros to a random length per row, as a tokenizer's batch is (padding rows carry their own
outliers); float inputs are standard normal.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_op


def sample_batches(model, ctx, batches: int = 4) -> tuple[list[dict[str, np.ndarray]], str]:
    """(up to ``batches`` batches, where they come from)."""
    calib = getattr(ctx, "calibration", None)
    if calib is not None:
        feeds = first_batches(calib.source, batches)
        if feeds:
            return feeds, "calibration data"
    feeds = generated_batch(model.graph, getattr(ctx, "seed", 0))
    return ([feeds], "generated from the input specs") if feeds is not None else ([], "none")


def first_batches(source, limit: int) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` batches of a batch source (an iterable of dicts, or an object with
    ``get_next()`` like onnxruntime's CalibrationDataReader)."""
    out: list[dict[str, np.ndarray]] = []
    if hasattr(source, "get_next"):
        while len(out) < limit:
            batch = source.get_next()
            if batch is None:
                break
            out.append(dict(batch))
        return out
    for batch in source:
        out.append(dict(batch))
        if len(out) >= limit:
            break
    return out


def generated_batch(graph: gs.Graph, seed: int = 0) -> dict[str, np.ndarray] | None:
    """One batch made from the graph's input specs (see the module docstring); None when an
    input has a type this cannot make (strings)."""
    rng = np.random.default_rng(seed)
    out = {}
    lengths = None  # token sequences: per row, how many leading positions are real tokens
    for inp in graph.inputs:
        shape = [d if isinstance(d, (int, np.integer)) and d >= 0 else (16 if i == 0 else 64)
                 for i, d in enumerate(inp.shape or [])]
        dtype = np.dtype(inp.dtype) if inp.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            rows = indexed_rows(inp)
            if len(shape) == 2 and lengths is None:
                lengths = rng.integers(max(1, shape[1] // 4), shape[1] + 1, size=shape[0])
            values = rng.integers(0, rows, size=shape) if rows else np.ones(shape)
            if len(shape) == 2:
                values = np.where(np.arange(shape[1])[None, :] < lengths[:, None], values, 0)
            out[inp.name] = values.astype(dtype)
        elif dtype.kind == "b":
            out[inp.name] = np.ones(shape, dtype=bool)
        else:
            return None
    return out


def indexed_rows(t: gs.Tensor) -> int | None:
    """Row count of the smallest constant table that ``t`` indexes through Gather (axis 0)."""
    rows = []
    for node in t.outputs:
        if is_op(node, "Gather") and len(node.inputs) == 2 and node.inputs[1] is t \
                and isinstance(node.inputs[0], gs.Constant) and node.attrs.get("axis", 0) == 0:
            rows.append(node.inputs[0].shape[0])
    return min(rows) if rows else None
