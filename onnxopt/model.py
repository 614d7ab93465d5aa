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

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from . import graph_io
from .errors import ExternalDataError, ModelError, OutputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; stay a little below.
PROTOBUF_LIMIT = 2**31 - 2**20


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
        """Version of the default ONNX domain this model imports."""
        return self.opset_of("")

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


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    yield graph
    for node in graph.nodes:
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
def save(proto: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``proto`` to ``path`` atomically; external data when asked or over 2 GB.

    The file (and its ``<name>.data`` file) are first written in a temporary folder
    beside the destination and renamed into place only when complete, so an interrupted
    or failed save leaves no partial output.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: output folder '{folder}' is not writable")
    if external_data is None:
        external_data = _serialized_size(proto) >= PROTOBUF_LIMIT
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    try:
        tmp_model = tmp_dir / path.name
        data_name = path.name + ".data"
        if external_data:
            proto = _with_external_data(proto, data_name)
            onnx.save_model(proto, str(tmp_model), save_as_external_data=False)
            os.replace(tmp_dir / data_name, folder / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString(deterministic=True))
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink(missing_ok=True)
        tmp_dir.rmdir()
    return path


def _serialized_size(proto: onnx.ModelProto) -> int:
    return proto.ByteSize()


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
