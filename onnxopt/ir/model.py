"""Model I/O: load from a path or ModelProto, save atomically, keep what the graph IR drops.

The graph that passes rewrite is onnx-graphsurgeon's ``Graph`` (one IR, DESIGN.md
section 1). Everything the Graph does not hold — opset imports, local functions,
metadata, the IR version, training info — stays on the original ModelProto, which serves
as the template when the graph is exported again. A model whose passes changed nothing is
written from the original proto, so a no-op run keeps the file byte-identical apart from
the provenance metadata.

Safety (DESIGN.md section 6): external data must stay inside the model's folder; output
goes to a temporary file in the destination folder and is renamed into place; the input
file is never written.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError

from onnxopt.ir import graph_io
from onnxopt.errors import ExternalDataError, ModelError, OutputError

logger = logging.getLogger(__name__)

class Model:
    """An ONNX model as passes see it: ``graph`` (graphsurgeon) plus the original proto."""

    def __init__(self, proto: onnx.ModelProto, path: Path | None = None, sha256: str | None = None):
        self._template = proto
        self.path = path
        self.source_sha256 = sha256 or _sha256_of_proto(proto)
        self.graph: gs.Graph = graph_io.import_graph(proto)
        # Set by the pass manager when a pass reports a change; until then the original
        # proto is what gets written.
        self.modified = False

    # -- opsets ----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """Version of the default ONNX domain this model imports (0 when it imports none,
        as ai.onnx.ml-only models do)."""
        return self.opset_of("") or 0

    def opset_of(self, domain: str) -> int | None:
        aliases = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
        for imp in self._template.opset_import:
            if imp.domain in aliases:
                return imp.version
        return None

    def require_opset(self, domain: str, version: int) -> None:
        """Import ``domain`` at ``version`` at least (a pass that emits newer ops calls this).

        Raising the default domain's version is the pass's responsibility: only call it
        when every op of the graph keeps its meaning at the new version.
        """
        current = self.opset_of(domain)
        if current is not None and current >= version:
            return
        for imp in self._template.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                imp.version = version
                break
        else:
            self._template.opset_import.append(onnx.helper.make_opsetid(domain, version))
        self.graph.opset = self.opset
        self.modified = True

    # -- graphs ----------------------------------------------------------------------------
    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph, then every If/Loop/Scan body inside it, depth first."""
        yield from iter_graphs(self.graph)

    # -- export ----------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        """The model as a new ModelProto (the original one when nothing changed)."""
        if not self.modified:
            out = onnx.ModelProto()
            out.CopyFrom(self._template)
            return out
        return graph_io.export_model(self.graph, self._template)

    @property
    def template(self) -> onnx.ModelProto:
        """The proto that holds opsets, functions and metadata (read only)."""
        return self._template


# The default-domain ops that carry graph attributes; ops of other domains may too.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph``, then every subgraph inside it, depth first."""
    yield graph
    for node in graph.nodes:
        if node.op not in _SUBGRAPH_OPS and node.domain in (None, "", "ai.onnx"):
            continue  # no other standard op has a graph attribute: skip its attributes
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


# -- loading -------------------------------------------------------------------------------
def load(source: str | os.PathLike | onnx.ModelProto | Model) -> Model:
    """Read a model from a path or wrap a ModelProto. Raises ModelError on bad input."""
    if isinstance(source, Model):
        return source
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)  # the caller's proto is never modified
        _check_proto(proto, "<ModelProto>")
        return Model(proto)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"expected a path or onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    proto, digest = read_proto(path)
    _check_proto(proto, str(path))
    return Model(proto, path=path, sha256=digest)


def read_proto(path: Path) -> tuple[onnx.ModelProto, str]:
    """Parse ``path`` and resolve its external data safely; returns (proto, sha256 of file)."""
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX model")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: file is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not an ONNX model (protobuf does not parse: {exc})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    load_external_data(proto, path.parent.resolve(), str(path))
    return proto, hashlib.sha256(data).hexdigest()


def _sha256_of_proto(proto: onnx.ModelProto) -> str:
    try:
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    except ValueError:  # over 2 GB
        return ""


def _check_proto(proto: onnx.ModelProto, where: str) -> None:
    if not proto.opset_import:
        raise ModelError(f"{where}: model imports no opset")
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            newest = onnx.defs.onnx_opset_version()
            if imp.version > newest:
                raise ModelError(
                    f"{where}: opset {imp.version} of the default domain is newer than the "
                    f"installed onnx supports ({newest})")
    opset = next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), None)
    functions = {(f.domain, f.name) for f in proto.functions}
    check_graph_structure(proto.graph, where, opset, functions)


# -- structural validation -------------------------------------------------------------------
# graphsurgeon imports a cyclic graph, a doubly defined tensor or a dangling input without a
# word and passes would then rewrite garbage; these checks run once at load, in linear time.
def check_graph_structure(graph: onnx.GraphProto, where: str, opset: int | None,
                          functions: set = frozenset(), outer: frozenset = frozenset()) -> None:
    """Raise ModelError for duplicate tensor names, dangling inputs, cycles, unknown ops
    of the default domain and tensors whose data does not fit their declared shape."""
    defined = {v.name for v in graph.input}
    seen_init: set[str] = set()
    for t in graph.initializer:
        if t.name in seen_init:
            raise ModelError(f"{where}: initializer '{t.name}' is defined twice")
        seen_init.add(t.name)
        _check_tensor_data(t, where, f"initializer '{t.name}'")
    defined |= seen_init
    defined.update(s.values.name for s in graph.sparse_initializer)
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in defined:
                first = (f"node {_node_label(graph.node[producer[name]])}" if name in producer
                         else "a graph input or initializer")
                raise ModelError(f"{where}: tensor '{name}' is defined twice: by {first} and by "
                                 f"node {_node_label(node)}")
            producer[name] = i
    visible = outer | defined | producer.keys()
    deps: list[set[int]] = []
    for node in graph.node:
        needs = set()
        for name in node.input:
            if name and name not in visible:
                raise ModelError(f"{where}: node {_node_label(node)} reads '{name}', which no node, "
                                 "graph input or initializer produces")
            if name in producer:
                needs.add(producer[name])
        if node.domain in ("", "ai.onnx") and ("", node.op_type) not in functions \
                and (node.domain, node.op_type) not in functions and opset is not None:
            _check_known_op(node, where, opset)
        for attr in node.attribute:
            if attr.HasField("t"):
                _check_tensor_data(attr.t, where, f"attribute '{attr.name}' of node {_node_label(node)}")
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                check_graph_structure(sub, where, opset, functions, frozenset(visible))
                needs.update(producer[n] for n in _names_read(sub) if n in producer)
        deps.append(needs)
    _check_acyclic(graph, deps, where)
    for out in graph.output:
        if out.name not in visible:
            raise ModelError(f"{where}: graph output '{out.name}' is produced by no node, input or initializer")


def _node_label(node: onnx.NodeProto) -> str:
    return f"'{node.name or (node.output[0] if node.output else '?')}' ({node.op_type})"


def _check_known_op(node: onnx.NodeProto, where: str, opset: int) -> None:
    problem = _op_problem(node.op_type, opset)
    if problem == "unknown":
        raise ModelError(f"{where}: node {_node_label(node)} uses op '{node.op_type}', which the "
                         "default ONNX domain does not define (a custom op needs its own domain)")
    if problem == "too new":
        raise ModelError(f"{where}: node {_node_label(node)}: op '{node.op_type}' does not exist at "
                         f"opset {opset}, which the model imports")


@functools.lru_cache(maxsize=None)
def _op_problem(op_type: str, opset: int) -> str | None:
    """Schema lookups are slow next to a dict: a model of 100k nodes has a few dozen op types."""
    if not onnx.defs.has(op_type):
        return "unknown"
    try:
        onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return "too new"
    return None


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    names.update(o.name for o in graph.output)
    return names


def _check_acyclic(graph: onnx.GraphProto, deps: list[set[int]], where: str) -> None:
    """Kahn's algorithm; on a cycle, name a node that lies on it."""
    users: list[list[int]] = [[] for _ in deps]
    indegree = [0] * len(deps)
    for i, needs in enumerate(deps):
        for j in needs:
            users[j].append(i)
            indegree[i] += 1
    ready = [i for i, d in enumerate(indegree) if d == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users[i]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    if done == len(deps):
        return
    # Walk back through unfinished producers until a node repeats: that node is on a cycle.
    node = next(i for i, d in enumerate(indegree) if d > 0)
    visited: set[int] = set()
    while node not in visited:
        visited.add(node)
        node = next(j for j in deps[node] if indegree[j] > 0)
    raise ModelError(f"{where}: the graph has a cycle through node {_node_label(graph.node[node])}")


def _check_tensor_data(t: onnx.TensorProto, where: str, what: str) -> None:
    """The stored data holds exactly as many elements as the declared shape."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return  # resolved (and length-checked) by load_external_data
    count = 1
    for d in t.dims:
        count *= d
    if t.HasField("raw_data") or t.raw_data:
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
        if bits is None and getattr(onnx.TensorProto, "FLOAT4E2M1", None) == t.data_type:
            bits = 4
        if bits is not None:
            expected = (count * bits + 7) // 8
        else:
            try:
                expected = count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:
                return  # a type numpy has no size for (strings never use raw_data)
        if len(t.raw_data) != expected:
            raise ModelError(f"{where}: {what} declares shape {list(t.dims)} ({expected} bytes) "
                             f"but holds {len(t.raw_data)} bytes")
        return
    fields = {"float_data": t.float_data, "int32_data": t.int32_data, "int64_data": t.int64_data,
              "double_data": t.double_data, "uint64_data": t.uint64_data, "string_data": t.string_data}
    held = max(len(v) for v in fields.values())
    if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        held //= 2
    elif t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and held * 2 in (count, count + 1):
        return  # int4 in int32_data is packed two a value
    if held != count:
        raise ModelError(f"{where}: {what} declares shape {list(t.dims)} ({count} elements) "
                         f"but holds {held}")


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


def load_external_data(proto: onnx.ModelProto, base_dir: Path, where: str) -> None:
    """Read external tensor data into the proto, refusing any location outside base_dir."""
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
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(int(length)) if length is not None else f.read()
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


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
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: output folder '{folder}' is not writable")
    data = None
    if not external_data:
        # Trying to serialize a model over 2 GB first builds (then drops) a buffer of its
        # whole size: +3.4 GB of peak memory on a 2.4 GB model. Check the size first.
        data = _serialize(proto) if _fits_one_message(proto) else None
        if data is None and external_data is False:
            raise OutputError(f"{path}: model is over 2 GB; it can only be written with external data")
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:  # e.g. a read-only or pseudo file system (root passes os.access)
        raise OutputError(f"{path}: cannot write in '{folder}' ({exc.strerror or exc})") from None
    try:
        tmp_model = tmp_dir / path.name
        data_name = path.name + ".data"
        if data is None and consume:
            _move_to_external_data(proto, tmp_model, tmp_dir / data_name, data_name)
            os.replace(tmp_dir / data_name, folder / data_name)
        elif data is None:
            proto = _with_external_data(proto, data_name)
            onnx.save_model(proto, str(tmp_model), save_as_external_data=False)
            os.replace(tmp_dir / data_name, folder / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(data)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink(missing_ok=True)
        tmp_dir.rmdir()
    return path


# Protobuf cannot serialize a message of 2 GiB or more; stay a little below.
_ONE_MESSAGE_LIMIT = 2**31 - 2**20


def _fits_one_message(proto: onnx.ModelProto) -> bool:
    """Whether protobuf can serialize ``proto`` as one message (under 2 GB).

    upb's ByteSize() serializes to measure: on a 2.4 GB model it built a 3.4 GB buffer
    before failing. The tensors' declared sizes (dims x item size, no copy) settle the
    question for weight-heavy models first.
    """
    declared = 0
    for tensor in model_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            declared += _declared_bytes(tensor.data_type, tensor.dims)
    if declared >= _ONE_MESSAGE_LIMIT:
        return False
    try:
        return proto.ByteSize() < _ONE_MESSAGE_LIMIT
    except (ValueError, EncodeError):  # upb refuses to size a message over 2 GB
        return False


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
        return proto.SerializeToString(deterministic=True)
    except (ValueError, EncodeError):
        return None


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


def add_provenance(proto: onnx.ModelProto, **props: str) -> None:
    """Set ``onnxopt.<key>`` metadata entries, replacing older ones of the same key."""
    keys = {f"onnxopt.{k}": str(v) for k, v in props.items()}
    kept = [p for p in proto.metadata_props if p.key not in keys]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in keys.items():
        proto.metadata_props.add(key=key, value=value)
