"""Model files: reading with external data (path safety), atomic writing, provenance.

Safety (DESIGN.md section 6): external data must stay inside the model's folder; output
goes to a temporary file in the destination folder and is renamed into place; the input
file is never written. Models over 2 GB are written with external data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from onnxopt.errors import ExternalDataError, ModelError, OutputError

if TYPE_CHECKING:
    import numpy as np


def read_proto(path: Path) -> tuple[onnx.ModelProto, Callable[[], str]]:
    """Parse ``path`` and resolve its external data safely; returns (proto, a function giving
    the sha256 of the file). The file is hashed in a thread while it is parsed (hashlib lets
    go of the GIL: on a 346 MB model that takes 0.45 s off the load)."""
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX model")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: file is empty")
    digest = _hash_in_background(data)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not an ONNX model (protobuf does not parse: {exc})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    locate_external_data(proto, path.parent.resolve(), str(path))
    return proto, digest



def _hash_in_background(data: bytes) -> Callable[[], str]:
    """sha256 of ``data`` computed by a thread; the function returned waits for it."""
    import threading

    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(hashlib.sha256(data).hexdigest()), daemon=True)
    worker.start()

    def hexdigest() -> str:
        worker.join()
        return result[0]

    return hexdigest


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _all_tensors(attr.g)
        for g in attr.graphs:
            yield from _all_tensors(g)


def model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: initializers, Constant values, subgraphs, functions."""
    yield from _all_tensors(proto.graph)
    for func in proto.functions:
        for node in func.node:
            yield from _attribute_tensors(node)


def locate_external_data(proto: onnx.ModelProto, base_dir: Path, where: str) -> None:
    """Check every external-data reference of ``proto`` (inside ``base_dir``, the file there,
    the bytes within it) and make its location absolute; the data stays on disk.

    Weights are read when a pass asks for them (``external_array``: a read-only map of the
    file) and copied to the output when it is written, so a model with 2.4 GB of external
    weights is optimized in little more memory than its graph. In memory, an external
    tensor's location is always absolute and already checked; on disk, locations stay
    relative (``save`` writes the output's own data file).
    """
    for tensor in model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = _safe_external_path(location, base_dir, where, tensor.name)
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        size = target.stat().st_size
        if offset > size or (length is not None and offset + int(length) > size):
            raise ExternalDataError(
                f"{where}: external data of tensor '{tensor.name}' lies beyond the end of "
                f"'{location}' ({size} bytes)")
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(target)


def external_span(tensor: onnx.TensorProto) -> tuple[Path, int, int] | None:
    """(absolute file, offset, length) of a tensor's external data as ``locate_external_data``
    left it; None for inline data or a location that is not absolute (not checked)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not os.path.isabs(location):
        return None
    offset = int(info.get("offset", 0) or 0)
    length = info.get("length")
    if length is None:
        length = _declared_bytes(tensor.data_type, tensor.dims)
    return Path(location), offset, int(length)


def external_array(tensor: onnx.TensorProto, dtype) -> "np.ndarray | None":
    """The values of an external tensor as a read-only map of its file (no copy)."""
    import numpy as np

    span = external_span(tensor)
    if span is None:
        return None
    path, offset, length = span
    dtype = np.dtype(dtype).newbyteorder("<")
    count = length // dtype.itemsize
    if count != _declared_bytes(tensor.data_type, tensor.dims) // max(dtype.itemsize, 1):
        return None
    if count == 0:
        return np.zeros(tuple(tensor.dims), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(tuple(tensor.dims))


def read_external(tensor: onnx.TensorProto) -> bytes | None:
    """The bytes of an external tensor (as ``locate_external_data`` left it)."""
    span = external_span(tensor)
    if span is None:
        return None
    path, offset, length = span
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def inline_external_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with the data of every located external tensor read into it (a model
    onnxruntime can load from bytes); returns ``proto``."""
    for tensor in model_tensors(proto):
        data = read_external(tensor)
        if data is None:
            continue
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return proto


def _safe_external_path(location: str, base_dir: Path, where: str, tensor: str) -> Path:
    if not location:
        raise ExternalDataError(f"{where}: tensor '{tensor}' has external data with no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ExternalDataError(
            f"{where}: tensor '{tensor}' has an absolute external-data path '{location}' (refused)")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise ExternalDataError(
            f"{where}: tensor '{tensor}' has an external-data path with '..': '{location}' (refused)")
    target = (base_dir / location).resolve()
    try:
        target.relative_to(base_dir)
    except ValueError:
        raise ExternalDataError(
            f"{where}: external data '{location}' of tensor '{tensor}' resolves outside the "
            f"model's folder (through a symlink?) (refused)") from None
    if not target.is_file():
        raise ExternalDataError(f"{where}: external data file '{location}' of tensor '{tensor}' is missing")
    return target



# -- saving --------------------------------------------------------------------------------
def save(proto: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
         consume: bool = False) -> Path:
    """Write ``proto`` to ``path`` atomically; external data when asked or over 2 GB.

    The file (and its ``<name>.data`` file) are first written in a temporary folder
    beside the destination and renamed into place only when complete, so an interrupted
    or failed save leaves no partial output.

    ``consume=True`` moves large tensors' bytes out of ``proto`` into the data file instead
    of copying the whole model first (one model-sized copy less: 2.4 GB on a 2.4 GB model);
    ``proto`` must not be used afterwards. The CLI saves this way.
    """
    path = Path(path)
    folder = _check_folder(path)
    data = None
    if not external_data:
        # Trying to serialize a model over 2 GB first builds (then drops) a buffer of its
        # whole size: +3.4 GB of peak memory on a 2.4 GB model. The weights' declared sizes
        # settle it for weight-heavy models without serializing anything; otherwise
        # serializing once both measures and produces the bytes (upb's ByteSize serializes).
        data = _serialize(proto) if _declared_fits(proto) else None
        if data is None and external_data is False:
            raise OutputError(f"{path}: model is over 2 GB; it can only be written with external data")
    data_name = path.name + ".data"

    def write(tmp_dir: Path) -> bool:
        tmp_model = tmp_dir / path.name
        if data is None and consume:
            _move_to_external_data(proto, tmp_model, tmp_dir / data_name, data_name)
            return True
        if data is None:
            onnx.save_model(_with_external_data(proto, data_name), str(tmp_model), save_as_external_data=False)
            return True
        with open(tmp_model, "wb") as f:
            f.write(data)
        return False

    _atomic(path, folder, data_name, write)
    return path


# Protobuf cannot serialize a message of 2 GiB or more; stay a little below.
_ONE_MESSAGE_LIMIT = 2**31 - 2**20


def _declared_fits(proto: onnx.ModelProto) -> bool:
    """Whether the tensors' declared sizes (dims x item size, no copy) leave room for the
    model to be one protobuf message (under 2 GB)."""
    declared = 0
    for tensor in model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            declared += _declared_bytes(tensor.data_type, tensor.dims)
    return declared < _ONE_MESSAGE_LIMIT


def _declared_bytes(data_type: int, dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count * _itemsize(data_type)


@functools.lru_cache(maxsize=None)
def _itemsize(data_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # strings and types numpy cannot hold: not the bulk of any model
        return 0


def _serialize(proto: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when protobuf cannot hold it in one message (2 GB)."""
    try:
        data = proto.SerializeToString(deterministic=True)
    except (ValueError, EncodeError):
        return None
    return data if len(data) < _ONE_MESSAGE_LIMIT else None


def _move_to_external_data(proto: onnx.ModelProto, model_path: Path, data_path: Path, data_name: str,
                           threshold: int = 1024) -> None:
    """Write tensors of ``threshold`` bytes or more to ``data_path`` and clear them from
    ``proto`` (no copy of the model), then the remaining small proto to ``model_path``."""
    with open(data_path, "wb") as data_file:
        for tensor in model_tensors(proto):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                continue
            raw = tensor.raw_data  # a transient copy of one tensor
            if len(raw) < threshold:
                continue
            offset = data_file.tell()
            data_file.write(raw)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            del raw
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))


def _with_external_data(proto: onnx.ModelProto, data_name: str) -> onnx.ModelProto:
    """A copy of ``proto`` whose large tensors are written to ``data_name`` (done by onnx)."""
    from onnx.external_data_helper import convert_model_to_external_data

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    convert_model_to_external_data(out, all_tensors_to_one_file=True, location=data_name,
                                   size_threshold=1024)
    return out


def write_model(model: onnx.ModelProto, initializers: list, path: str | os.PathLike,
                external_data: bool | None = None, threshold: int = 1024) -> Path:
    """Write ``model`` to ``path`` with ``initializers`` as (more of) its main graph's
    initializers, without building the whole model in memory first.

    The initializers are serialized one at a time from where they are (the original proto,
    or, for a weight left in the input's data file, that file) and spliced into the graph's
    bytes in protobuf's field order, so the file is byte for byte what serializing the whole
    model would give. With external data (asked for, or when the weights' declared sizes
    reach 2 GB) every tensor of ``threshold`` bytes or more goes to ``<name>.data``, copied
    in chunks from a data file when it came from one: peak memory stays near the size of the
    graph, not of the weights. Atomic as ``save`` is; ``model`` is changed (external tensors
    in its subgraphs are moved or read in) and must not be used afterwards.
    """
    path = Path(path)
    folder = _check_folder(path)
    if external_data is None:
        declared = sum(_declared_bytes(t.data_type, t.dims) for t in initializers)
        declared += sum(_declared_bytes(t.data_type, t.dims) for t in model_tensors(model))
        external_data = declared >= _ONE_MESSAGE_LIMIT
    data_name = path.name + ".data"

    def write(tmp_dir: Path) -> bool:
        if not external_data:
            inline_external_data(model)
            pieces = [_serialized(t) for t in initializers]
            if _write_spliced(tmp_dir / path.name, model, pieces):
                return False
            del pieces  # over 2 GB after all: external data
        with open(tmp_dir / data_name, "wb") as data_file:
            light = [_to_data_file(t, data_file, data_name, threshold) for t in initializers]
            for t in model_tensors(model):
                _to_data_file(t, data_file, data_name, threshold, in_place=True)
        _write_spliced(tmp_dir / path.name, model, [t.SerializeToString(deterministic=True) for t in light],
                       limit=None)
        return True

    _atomic(path, folder, data_name, write)
    return path


def _check_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: output folder '{folder}' is not writable")
    return folder


def _atomic(path: Path, folder: Path, data_name: str, write: Callable[[Path], bool]) -> None:
    """Run ``write(tmp_dir)`` (True when it wrote a data file too) in a temporary folder
    beside ``path``, then rename what it wrote into place; nothing is left on failure."""
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:  # e.g. a read-only or pseudo file system (root passes os.access)
        raise OutputError(f"{path}: cannot write in '{folder}' ({exc.strerror or exc})") from None
    try:
        if write(tmp_dir):
            os.replace(tmp_dir / data_name, folder / data_name)
        os.replace(tmp_dir / path.name, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink(missing_ok=True)
        tmp_dir.rmdir()


def _serialized(t: onnx.TensorProto) -> bytes:
    """The bytes of ``t`` as an inline tensor (external data read in)."""
    data = read_external(t)
    if data is None:
        return t.SerializeToString(deterministic=True)
    inline = _light_tensor(t)
    inline.raw_data = data
    return inline.SerializeToString(deterministic=True)


_TENSOR_FIELDS = ("dims", "data_type", "segment", "name", "doc_string", "metadata_props")


def _light_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    """``t`` without its data (and without reading it)."""
    out = onnx.TensorProto()
    for name in _TENSOR_FIELDS:
        if not hasattr(t, name):
            continue
        value = getattr(t, name)
        if hasattr(value, "extend"):
            getattr(out, name).extend(value)
        elif name == "segment":
            if t.HasField("segment"):
                out.segment.CopyFrom(value)
        elif t.HasField(name):
            setattr(out, name, value)
    return out


_CHUNK = 1 << 24


def _to_data_file(t: onnx.TensorProto, data_file, data_name: str, threshold: int,
                  in_place: bool = False) -> onnx.TensorProto:
    """``t`` with its data (when at least ``threshold`` bytes) written to ``data_file``."""
    span = external_span(t)
    if span is None and (not t.HasField("raw_data") or _declared_bytes(t.data_type, t.dims) < threshold):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise OutputError(f"tensor '{t.name}' has external data that was not located")
        return t
    offset = data_file.tell()
    if span is not None:
        source, start, length = span
        with open(source, "rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OutputError(f"external data of tensor '{t.name}' ends early in '{source}'")
                data_file.write(chunk)
                left -= len(chunk)
    else:
        raw = t.raw_data  # a transient copy of one tensor
        length = len(raw)
        data_file.write(raw)
        del raw
    light = t if in_place else _light_tensor(t)
    if in_place:
        t.ClearField("raw_data")
        del t.external_data[:]
    light.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        light.external_data.add(key=key, value=value)
    return light


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _field_spans(buf: bytes) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each top-level field of a serialized message."""
    spans, pos, n = [], 0, len(buf)
    while pos < n:
        start = pos
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
        spans.append((tag >> 3, start, pos))
    return spans


def _write_spliced(path: Path, model: onnx.ModelProto, initializers: list[bytes],
                   limit: int | None = _ONE_MESSAGE_LIMIT) -> bool:
    """Write ``model`` with ``initializers`` (serialized tensors) appended to its main graph's
    initializers, in protobuf's field order, streaming the pieces (no joined copy); False
    (nothing written) when the result would reach ``limit`` bytes."""
    graph = model.graph.SerializeToString(deterministic=True)
    # Fields are written in number order: the initializers go before the graph's fields
    # numbered above 5 (doc_string, input, output, value_info, ...), whose bytes are those
    # of a graph holding only them (scanning the nodes' fields instead costs seconds on
    # 100k nodes).
    from onnxopt.ir.graph_io import copy_fields

    tail = copy_fields(model.graph, onnx.GraphProto(), skip=("node", "name", "initializer"))
    cut = len(graph) - len(tail.SerializeToString(deterministic=True))
    tag = _varint(5 << 3 | 2)
    heads = [tag + _varint(len(p)) for p in initializers]
    graph_len = len(graph) + sum(len(h) + len(p) for h, p in zip(heads, initializers))
    outer = model.SerializeToString(deterministic=True)
    spans = _field_spans(outer)
    before = b"".join(outer[a:b] for num, a, b in spans if num < 7)
    after = b"".join(outer[a:b] for num, a, b in spans if num > 7)
    graph_head = _varint(7 << 3 | 2) + _varint(graph_len)
    if limit is not None and len(before) + len(graph_head) + graph_len + len(after) >= limit:
        return False
    with open(path, "wb") as f:
        f.write(before)
        f.write(graph_head)
        f.write(graph[:cut])
        for head, piece in zip(heads, initializers):
            f.write(head)
            f.write(piece)
        f.write(graph[cut:])
        f.write(after)
    return True


def add_provenance(proto: onnx.ModelProto, **props: str) -> None:
    """Set ``onnxopt.<key>`` metadata entries, replacing older ones of the same key."""
    keys = {f"onnxopt.{k}": str(v) for k, v in props.items()}
    kept = [p for p in proto.metadata_props if p.key not in keys]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in keys.items():
        proto.metadata_props.add(key=key, value=value)
