"""Calibration data and streamed activation statistics.

Data (DESIGN.md section 5): an ``.npz`` file or a folder of them, arrays keyed by graph
input name; an array with the input's own rank is one batch, one more leading axis is a
stack of batches (axis 0 = batch index). In Python, any object with ``get_next()`` (like
onnxruntime's ``CalibrationDataReader``) returning a dict per batch and None at the end.
Wrong names, dtypes or shapes raise CalibrationError (exit 2) naming the input.

Statistics: a pass asks ``ctx.calibration.statistics(model, names, histogram)`` for the
tensors it needs. Tensors are exposed as extra outputs of an exported copy of the model,
each batch is run once in onnxruntime and every output is reduced at once into a
running min/max and (when asked) a running histogram (onnxopt/kernels.py), so memory
does not grow with the number of samples. Passes that declare
``calibration_requests(model, ctx)`` have their requests gathered by the pass manager
(``gather_requests``) before the first of a run of consecutive calibrating passes, so one
streamed run serves them all; results are cached by tensor name.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from onnxopt.errors import CalibrationError

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
HISTOGRAM_BINS = 4096  # signed bins; divisible by 4 (see onnxopt/kernels.py)


def _kernels():
    """onnxopt.data.kernels, imported on first use: minmax calibration never loads numba."""
    from onnxopt.data import kernels

    return kernels


# -- statistics of one tensor ----------------------------------------------------------------
@dataclass
class TensorStatistics:
    """Running min/max and (optionally) a signed histogram of one tensor's values."""

    name: str
    with_histogram: bool = True
    bins: int = HISTOGRAM_BINS
    min: float = np.inf
    max: float = -np.inf
    count: int = 0
    half_range: float = 0.0  # histogram covers [-half_range, half_range); 0 = not started
    hist: np.ndarray | None = None
    pending_zeros: int = 0  # values seen while every value so far was 0 (no range yet)

    def add(self, values: np.ndarray) -> None:
        """Reduce one batch of values into the running statistics."""
        flat = np.ascontiguousarray(values).reshape(-1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        if flat.size == 0:
            return
        lo, hi, n = float(flat.min()), float(flat.max()), flat.size  # SIMD fast path
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf somewhere: skip them
            lo, hi, n = _kernels().finite_min_max(flat)
        if n == 0:
            return
        self.min, self.max, self.count = min(self.min, lo), max(self.max, hi), self.count + n
        if not self.with_histogram:
            return
        absmax = max(-lo, hi)
        if self.hist is None:
            if absmax == 0:
                self.pending_zeros += n
                return
            self.hist = np.zeros(self.bins, dtype=np.float64)
            self.half_range = float(absmax) * (1 + 1e-6)
        kernels = _kernels()
        while absmax >= self.half_range:
            self.hist = kernels.double_range(self.hist)
            self.half_range *= 2.0
        kernels.histogram_add(self.hist, flat, self.half_range)

    def histogram(self) -> tuple[np.ndarray, float]:
        """(counts, half_range), with any all-zero batches seen before the first nonzero
        one counted in the bin that starts at zero."""
        if self.hist is None:
            hist = np.zeros(self.bins, dtype=np.float64)
            hist[self.bins // 2] = self.pending_zeros
            return hist, 1.0
        hist = self.hist
        if self.pending_zeros:
            hist = hist.copy()
            hist[self.bins // 2] += self.pending_zeros
        return hist, self.half_range

    def range(self, method: str = "minmax", percentile: float = 99.999, qmin: int = 0, qmax: int = 255,
              symmetric: bool = False, levels: int = 128, max_clipped: float = 1e-3) -> tuple[float, float]:
        """The clipping range (lo, hi) that ``method`` chooses for these values."""
        if self.count == 0:
            return 0.0, 0.0
        lo, hi = float(self.min), float(self.max)
        if method == "minmax":
            return lo, hi
        if not self.with_histogram:
            raise ValueError(f"{self.name}: method '{method}' needs histograms (collected with minmax only)")
        hist, half = self.histogram()
        kernels = _kernels()
        if method == "percentile":
            plo, phi = kernels.percentile_range(hist, half, float(percentile))
            plo, phi = max(lo, plo), min(hi, phi)
            return min(plo, phi), phi
        if method == "entropy":
            abs_hist = kernels.fold_abs(hist)
            # at most ~512 candidate thresholds: a step of a few of 2048 bins changes the
            # range by under 0.2% and makes this 3-4x faster
            stride = max(1, -(-(abs_hist.size - int(levels)) // 512))
            threshold = kernels.entropy_threshold(abs_hist, half / abs_hist.size, int(levels), float(max_clipped),
                                                  stride)
            elo, ehi = max(lo, -threshold), min(hi, threshold)
            return min(elo, ehi), ehi
        if method == "mse":
            steps = 100
            return kernels.mse_range(hist, half, lo, hi, int(qmin), int(qmax), bool(symmetric), steps)
        raise ValueError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")


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


# -- the calibration object passes see ---------------------------------------------------------
@dataclass(frozen=True)
class StatsRequest:
    """Tensors a pass needs statistics for; ``histogram`` for percentile/entropy/mse."""

    tensors: tuple[str, ...]
    histogram: bool = True


@dataclass
class Calibration:
    """Calibration data plus the statistics collected from it so far (ctx.calibration)."""

    source: Any
    progress: bool = False
    stats: dict[str, TensorStatistics] = field(default_factory=dict)
    pending: dict[str, bool] = field(default_factory=dict)  # name -> needs histogram
    runs: int = 0  # streamed onnxruntime runs over the data so far
    batches: int = 0
    seconds: float = 0.0

    def request(self, request: StatsRequest) -> None:
        """Ask for statistics to be collected in the next streamed run."""
        for name in request.tensors:
            self.pending[name] = self.pending.get(name, False) or request.histogram

    def statistics(self, model, tensors, histogram: bool = True) -> dict[str, TensorStatistics]:
        """Statistics of ``tensors`` (names in ``model``'s main graph), collected now if
        not cached; every pending request is collected in the same run."""
        self.request(StatsRequest(tuple(tensors), histogram))
        todo = {name: hist for name, hist in self.pending.items()
                if name not in self.stats or (hist and not self.stats[name].with_histogram)}
        if todo:
            self._collect(model, todo)
        self.pending.clear()
        return {name: self.stats[name] for name in tensors if name in self.stats}

    def _collect(self, model, todo: dict[str, bool]) -> None:
        from onnxopt.ir.graph_io import export_model

        proto = model if isinstance(model, onnx.ModelProto) else export_model(model.graph, model.template)
        available = _main_graph_values(proto)
        names = [n for n in todo if n in available]
        skipped = [n for n in todo if n not in available]
        if skipped:
            logger.debug("no statistics for %d tensor(s) not in the main graph: %s", len(skipped), skipped[:5])
        if not names:
            return
        session, output_names = _statistics_session(proto, names)
        fresh = {n: TensorStatistics(n, with_histogram=todo[n]) for n in names}
        start = time.perf_counter()
        from tqdm import tqdm

        batches = 0
        bar = tqdm(self.source, total=getattr(self.source, "count", None), desc="calibration",
                   unit="batch", disable=not self.progress, leave=False)
        for batch in bar:
            try:
                values = session.run(output_names, batch)
            except Exception as exc:
                raise CalibrationError(f"onnxruntime could not run calibration batch {batches}: "
                                       f"{str(exc).splitlines()[0]}") from None
            for name, value in zip(output_names, values):
                if name in fresh:
                    fresh[name].add(value)
            del values
            batches += 1
        bar.close()
        if batches == 0:
            raise CalibrationError("calibration data holds no batches")
        self.stats.update(fresh)
        self.runs += 1
        self.batches += batches
        self.seconds += time.perf_counter() - start
        logger.info("calibration: %d tensors over %d batches in %.1f s", len(names), batches,
                    time.perf_counter() - start)


def _main_graph_values(proto: onnx.ModelProto) -> set[str]:
    names = {i.name for i in proto.graph.input}
    for node in proto.graph.node:
        names.update(o for o in node.output if o)
    return names


def _statistics_session(proto: onnx.ModelProto, names: list[str]):
    """An onnxruntime session of a copy of ``proto`` whose outputs include ``names``."""
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    # Basic level keeps every requested tensor (they are outputs) while folding constants.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    # No arena or memory pattern: each batch's activations are freed as soon as they are
    # reduced, so peak memory stays at one batch (the arena would keep its high-water mark).
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    try:
        session = ort.InferenceSession(copy.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CalibrationError(f"onnxruntime cannot run the model for calibration: "
                               f"{str(exc).splitlines()[0]}") from None
    return session, list(names)


def open_calibration(data: Any, model, progress: bool = False) -> Calibration:
    """A Calibration for ``data`` (an .npz path, a folder of them, an object with
    ``get_next()``, or a Calibration) checked against ``model``'s inputs."""
    if isinstance(data, Calibration):
        return data
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
    return Calibration(source=source, progress=progress)


def gather_requests(specs: list, index: int, model, ctx, progress: bool = False) -> None:
    """Pass manager hook, called before pass ``specs[index]`` runs: when it starts a run of
    consecutive calibrating passes, register the statistics requests of all of them, so the
    first one's ``statistics()`` call collects everything in one streamed run."""
    from onnxopt.pipeline.registry import get_pass

    if ctx.calibration is None or not get_pass(specs[index].name).needs_calibration:
        return
    if index > 0 and get_pass(specs[index - 1].name).needs_calibration:
        return  # inside a block already gathered
    ctx.calibration.progress = progress
    for spec in specs[index:]:
        cls = get_pass(spec.name)
        if not cls.needs_calibration:
            break
        ask = getattr(cls, "calibration_requests", None)
        if ask is None:
            continue
        try:
            for request in cls(**spec.options).calibration_requests(model, ctx) or ():
                ctx.calibration.request(request)
        except Exception as exc:  # the pass will ask again itself when it runs
            if isinstance(exc, CalibrationError):
                raise
            logger.debug("calibration_requests of %s failed: %s", spec.name, exc)
