"""Calibration data: batches of model inputs, read and checked against the model.

Data (DESIGN.md section 5): an ``.npz`` file or a folder of them, arrays keyed by graph
input name; an array with the input's own rank is one batch, one more leading axis is a
stack of batches (axis 0 = batch index). In Python, any object with ``get_next()`` (like
onnxruntime's ``CalibrationDataReader``) returning a dict per batch and None at the end.
Wrong names, dtypes or shapes raise CalibrationError (exit 2) naming the input. Stacks
are read one batch at a time, so a big stack never sits in memory whole.

What passes learn from these batches is in ``onnxopt.data.statistics``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from onnxopt.errors import CalibrationError

logger = logging.getLogger(__name__)

# -- data sources ------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None/str for free ones


def input_specs(model) -> dict[str, InputSpec]:
    """The graph inputs that are not initializers, from an onnxopt Model or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        specs = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
            # exporters write -1 for "any size": a free dim, like a missing one
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                          for d in tt.shape.dim) if tt.HasField("shape") else None
            specs[vi.name] = InputSpec(vi.name, np.dtype(dtype) if dtype is not None else None, shape)
        return specs
    specs = {}
    for t in model.graph.inputs:
        dtype = np.dtype(t.dtype) if t.dtype is not None else None
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in t.shape) if t.shape is not None else None
        specs[t.name] = InputSpec(t.name, dtype, shape)
    return specs


def _shape_problem(spec: InputSpec, shape: tuple) -> str | None:
    if spec.shape is None:
        return None
    if len(shape) != len(spec.shape):
        return f"rank {len(shape)}, the model wants rank {len(spec.shape)} {_fmt(spec.shape)}"
    for i, (got, want) in enumerate(zip(shape, spec.shape)):
        if isinstance(want, int) and got != want:
            return f"shape {tuple(shape)}, the model wants {_fmt(spec.shape)} (axis {i})"
    return None


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"


def check_batch(batch: dict, specs: dict[str, InputSpec], where: str) -> dict[str, np.ndarray]:
    """Validate one batch (names, dtypes, shapes); returns it with arrays as numpy."""
    if not isinstance(batch, dict):
        raise CalibrationError(f"{where}: a batch must be a dict of input name -> array, not {type(batch).__name__}")
    out = {}
    for name, value in batch.items():
        if name not in specs:
            from onnxopt.pipeline.registry import nearest

            hint = nearest(name, list(specs))
            raise CalibrationError(f"{where}: '{name}' is not an input of the model"
                                   + (f"; did you mean '{hint}'?" if hint else "")
                                   + f" (inputs: {', '.join(specs)})")
        array = np.asarray(value)
        spec = specs[name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise CalibrationError(f"{where}: input '{name}' has dtype {array.dtype}, the model wants {spec.dtype}")
        problem = _shape_problem(spec, array.shape)
        if problem:
            raise CalibrationError(f"{where}: input '{name}' has {problem}")
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            nan = int(np.isnan(array).sum())
            raise CalibrationError(f"{where}: input '{name}' has non-finite values ({nan} NaN, "
                                   f"{int(np.isinf(array).sum())} Inf); the data must be finite")
        out[name] = array
    missing = [n for n in specs if n not in out]
    if missing:
        raise CalibrationError(f"{where}: no data for input(s) {', '.join(repr(m) for m in missing)}")
    return out


def _npz_shapes(path: Path) -> dict[str, tuple]:
    """Array shapes of an .npz from the headers only (no data read)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(fh)
                shapes[info.filename[:-4]] = tuple(shape)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    return shapes


class NpzSource:
    """Batches from .npz files (a file or a folder of them, read in name order)."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, InputSpec]):
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
            if not files:
                raise CalibrationError(f"{path}: folder holds no .npz files")
        elif path.is_file():
            if path.suffix != ".npz":
                raise CalibrationError(f"{path}: calibration data must be an .npz file or a folder of them")
            files = [path]
        else:
            raise CalibrationError(f"{path}: no such calibration file or folder")
        self.files = files
        self.specs = specs
        self.reopenable = True  # files: another process can read them again
        self.count = 0
        self._stacked: dict[Path, bool] = {}
        for f in files:  # check names and shapes up front, from the headers only
            shapes = _npz_shapes(f)
            stacks = set()
            for name, shape in shapes.items():
                if name not in specs:
                    check_batch({name: np.zeros(0)}, specs, str(f))  # raises naming the input
                spec = specs[name]
                rank = len(spec.shape) if spec.shape is not None else len(shape)
                if len(shape) == rank + 1:
                    stacks.add(shape[0])
                    problem = _shape_problem(spec, shape[1:])
                elif len(shape) == rank:
                    stacks.add(None)
                    problem = _shape_problem(spec, shape)
                else:
                    problem = _shape_problem(spec, shape)
                if problem:
                    raise CalibrationError(f"{f}: input '{name}' has {problem} "
                                           "(or one more leading axis for a stack of batches)")
            missing = [n for n in specs if n not in shapes]
            if missing:
                raise CalibrationError(f"{f}: no data for input(s) {', '.join(repr(m) for m in missing)}")
            if len(stacks) > 1:
                raise CalibrationError(f"{f}: inputs disagree on the number of batches "
                                       "(mix of stacked and single batches, or stacks of different lengths)")
            (n,) = stacks
            self._stacked[f] = n is not None
            self.count += 1 if n is None else n

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for f in self.files:
            if not self._stacked[f]:
                with np.load(f, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                yield check_batch(arrays, self.specs, str(f))
                continue
            for i, batch in enumerate(_stream_stacks(f)):
                yield check_batch(batch, self.specs, f"{f} [batch {i}]")


def _stream_stacks(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Batch i of every array of an .npz whose arrays are stacks of batches, read one
    batch at a time from the zip members (compressed or not), so a stack of many samples
    never sits in memory whole."""
    with zipfile.ZipFile(path) as zf:
        streams = {}
        try:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                fh = zf.open(info)
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                if fortran or dtype.hasobject:  # rare: read it whole
                    fh.close()
                    with np.load(path, allow_pickle=False) as data:
                        whole = data[info.filename[:-4]]
                    streams[info.filename[:-4]] = (None, whole, shape, dtype)
                else:
                    streams[info.filename[:-4]] = (fh, None, shape, dtype)
            count = next(iter(streams.values()))[2][0] if streams else 0
            for i in range(count):
                batch = {}
                for name, (fh, whole, shape, dtype) in streams.items():
                    if whole is not None:
                        batch[name] = whole[i]
                        continue
                    size = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                    data = fh.read(size)
                    if len(data) != size:
                        raise CalibrationError(f"{path}: array '{name}' is truncated")
                    batch[name] = np.frombuffer(data, dtype=dtype).reshape(shape[1:]).copy()
                yield batch
        finally:
            for fh, *_ in streams.values():
                if fh is not None:
                    fh.close()


class ReaderSource:
    """Batches from an object with ``get_next()`` (and optionally ``rewind()``)."""

    reopenable = False  # a Python object: it cannot be read again in another process

    def __init__(self, reader: Any, specs: dict[str, InputSpec]):
        self.reader = reader
        self.specs = specs
        self.count = None
        self._used = False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._used:
            if not hasattr(self.reader, "rewind"):
                raise CalibrationError("the calibration reader was already read and has no rewind(); "
                                       "give an .npz file, or a reader with rewind()")
            self.reader.rewind()
        self._used = True
        i = 0
        while True:
            batch = self.reader.get_next()
            if batch is None:
                break
            yield check_batch(batch, self.specs, f"calibration reader batch {i}")
            i += 1
        if i == 0:
            raise CalibrationError("the calibration reader gave no batches")


def open_source(data: Any, model):
    """Batches of ``data`` (an .npz path, a folder of them, an object with ``get_next()`` or
    one batch as a dict), checked against ``model``'s inputs: an iterable with ``count``."""
    specs = input_specs(model)
    if isinstance(data, (str, os.PathLike)):
        source = NpzSource(data, specs)
    elif hasattr(data, "get_next"):
        source = ReaderSource(data, specs)
    elif isinstance(data, dict):  # one batch given directly (Python API convenience)
        source = [check_batch(data, specs, "calibration dict")]
    else:
        raise CalibrationError(f"calibration data must be an .npz path, a folder of .npz files or an "
                               f"object with get_next(), not {type(data).__name__}")
    return source


def batch_count(source) -> int | None:
    """How many batches a source holds, when known without reading it."""
    if isinstance(source, (list, tuple)):
        return len(source)
    count = getattr(source, "count", None)
    return count if isinstance(count, int) else None


class Subset:
    """The batches of ``source`` from index ``start`` up to (not including) ``stop``."""

    def __init__(self, source, start: int = 0, stop: int | None = None):
        self.source, self.start, self.stop = source, start, stop
        count = batch_count(source)
        end = stop if stop is not None else count
        self.count = None if end is None else max(0, end - start)
        self.reopenable = getattr(source, "reopenable", False)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i, batch in enumerate(self.source):
            if self.stop is not None and i >= self.stop:
                break
            if i >= self.start:
                yield batch


def hold_back(source, wanted: int = 4) -> tuple[Any, list[dict[str, np.ndarray]], str]:
    """(what calibration reads, batches held back to judge fidelity, where those come from).

    A fifth of the batches at most (``wanted`` at most, one at least) is held back and not
    calibrated on: the last ones of a source of known length, the first ones of a reader.
    A source of one batch cannot spare it: that batch serves both, and the description says so.
    """
    count = batch_count(source)
    if count is None:  # a reader: take the first batches, calibrate on the rest
        first = []
        for batch in source:
            first.append(batch)
            if len(first) > wanted:
                break
        if len(first) <= 1:
            return source, first, "the calibration data (only one batch: calibrated on too)"
        k = min(wanted, len(first) - 1)
        return Subset(source, start=k), first[:k], f"{k} batch(es) held back from the calibration data"
    if count <= 1:
        return source, list(source), "the calibration data (only one batch: calibrated on too)"
    k = min(wanted, max(1, count // 5))
    held = [batch for i, batch in enumerate(source) if i >= count - k]
    return Subset(source, stop=count - k), held, f"{k} batch(es) held back from the calibration data"
