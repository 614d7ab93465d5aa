"""The Model passes see: a graphsurgeon graph plus what the graph IR does not hold.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import ModelError
from onnxopt.ir import graph_io
from onnxopt.ir.graphs import iter_graphs
from onnxopt.ir.storage import (add_provenance, inline_external_data, model_tensors, read_proto,  # noqa: F401
                                save, write_model)
from onnxopt.ir.validate import check_proto

logger = logging.getLogger(__name__)


class Model:
    """An ONNX model as passes see it: ``graph`` (graphsurgeon) plus what the graph does not
    hold (opset imports, local functions, metadata, IR version), read from the original proto.

    The original proto (``template``) is never modified: a pass that imports a newer opset
    changes ``opset_import`` here, so a snapshot of the model (``snapshot``) holds everything
    a pass can touch and ``restore`` undoes it all.
    """

    def __init__(self, proto: onnx.ModelProto, path: Path | None = None,
                 sha256: str | Callable[[], str] | None = None):
        self._template = proto
        self.path = path
        self._sha256 = sha256  # the hash, a function that gives it (computed lazily), or None
        self.graph: gs.Graph = graph_io.import_graph(proto)
        self.opset_import: list[tuple[str, int]] = [(imp.domain, imp.version) for imp in proto.opset_import]
        # Set by the pass manager when a pass reports a change; until then the original
        # proto is what gets written.
        self.modified = False

    @property
    def source_sha256(self) -> str:
        """sha256 of the file the model was read from (of its serialized proto otherwise)."""
        if callable(self._sha256):
            self._sha256 = self._sha256()
        elif self._sha256 is None:
            self._sha256 = _sha256_of_proto(self._template)
        return self._sha256

    # -- opsets ----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """Version of the default ONNX domain this model imports (0 when it imports none,
        as ai.onnx.ml-only models do)."""
        return self.opset_of("") or 0

    def opset_of(self, domain: str) -> int | None:
        aliases = _aliases(domain)
        for name, version in self.opset_import:
            if name in aliases:
                return version
        return None

    def require_opset(self, domain: str, version: int) -> None:
        """Import ``domain`` at ``version`` at least (a pass that emits newer ops calls this).

        Raising the default domain's version changes the meaning of ops whose schema changed
        in between: do it through ``onnxopt.ir.opsets.raise_opset``, which checks that.
        """
        current = self.opset_of(domain)
        if current is not None and current >= version:
            return
        aliases = _aliases(domain)
        for i, (name, _) in enumerate(self.opset_import):
            if name in aliases:
                self.opset_import[i] = (name, version)
                break
        else:
            self.opset_import.append((domain, version))
        self.graph.opset = self.opset
        self.modified = True

    # -- graphs ----------------------------------------------------------------------------
    def graphs(self) -> Iterator[gs.Graph]:
        """The main graph, then every If/Loop/Scan body inside it, depth first."""
        yield from iter_graphs(self.graph)

    # -- snapshots (rollback) ----------------------------------------------------------------
    def copy(self, state: "ModelState | None" = None) -> "Model":
        """Another Model of the same template holding a copy of ``state`` (default: this
        model's contents): its own graph, weight arrays shared (passes replace a constant's
        array, they never write into it)."""
        other = Model.__new__(Model)
        other.__dict__.update(self.__dict__)
        other.restore(state.copy() if state is not None else self.snapshot())
        return other

    def snapshot(self) -> "ModelState":
        """A copy of everything a pass can change, for ``restore``."""
        return ModelState(self.graph.copy(), list(self.opset_import), self.modified)

    def restore(self, state: "ModelState") -> None:
        """Put the model back as it was at ``state`` (the state's graph becomes the live one)."""
        self.graph = state.graph
        self.opset_import = list(state.opset_import)
        self.graph.opset = self.opset
        self.modified = state.modified

    # -- export ----------------------------------------------------------------------------
    def export(self) -> onnx.ModelProto:
        """The model as it is now, as a new self-contained ModelProto (what a pass hands to
        onnxruntime): weights left in an external file are read into it."""
        return inline_external_data(self._with_ir_version(
            graph_io.export_model(self.graph, self._template, self.opset_protos())))

    def _with_ir_version(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """``proto`` with at least the IR version its opsets were released with (a raised
        opset 17 needs IR 8, 20 needs IR 9)."""
        try:
            needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        except Exception:  # an opset newer than this onnx knows: leave the version as it is
            return proto
        if proto.ir_version < needed:
            proto.ir_version = needed
        return proto

    def to_proto(self) -> onnx.ModelProto:
        """The model to write: a copy of the original proto when nothing changed, else
        ``export()``; self-contained either way."""
        if not self.modified:
            out = onnx.ModelProto()
            out.CopyFrom(self._template)
            return inline_external_data(out)
        return self.export()

    def save(self, path: str | os.PathLike, external_data: bool | None = None, **provenance: str) -> Path:
        """Write the model as it is now to ``path`` (atomically, external data when asked or
        over 2 GB) without building a copy of it in memory first: the weights are written
        one by one from where they are (the original proto, or the input's data file).
        ``provenance`` entries become ``onnxopt.<key>`` metadata."""
        initializers: list = []
        if self.modified:
            light = self._with_ir_version(graph_io.export_model(self.graph, self._template, self.opset_protos(),
                                                                initializers=initializers))
        else:  # the original proto, all but the main graph's weights
            light = graph_io.copy_fields(self._template, onnx.ModelProto(), skip=("graph",))
            graph_io.copy_fields(self._template.graph, light.graph, skip=("initializer",))
            initializers = list(self._template.graph.initializer)
        if provenance:
            add_provenance(light, **provenance)
        return write_model(light, initializers, path, external_data=external_data)

    def opset_protos(self) -> list[onnx.OperatorSetIdProto]:
        return [onnx.helper.make_opsetid(domain, version) for domain, version in self.opset_import]

    @property
    def template(self) -> onnx.ModelProto:
        """The original proto (functions, metadata, IR version); never modified."""
        return self._template


@dataclass
class ModelState:
    """What ``Model.snapshot`` keeps: the graph, the opset imports and the modified flag."""

    graph: gs.Graph
    opset_import: list[tuple[str, int]]
    modified: bool

    def copy(self) -> "ModelState":
        """A copy, so this state can be restored again later."""
        return ModelState(self.graph.copy(), list(self.opset_import), self.modified)


class Reference:
    """The model as it was loaded, before any pass ran: the teacher a pass compares with.

    ``proto`` is the original ModelProto, self-contained (weights left in an external file
    are read into a copy on first use, so onnxruntime can load it); ``model`` imports it as
    a Model on first use.
    """

    def __init__(self, model: Model):
        self._template = model.template
        self._proto: onnx.ModelProto | None = None
        self._model: Model | None = None

    @property
    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model_tensors(self._template)):
                copy = onnx.ModelProto()
                copy.CopyFrom(self._template)
                self._proto = inline_external_data(copy)
            else:
                self._proto = self._template  # shared, never modified
        return self._proto

    @property
    def model(self) -> Model:
        if self._model is None:
            self._model = Model(self._template)
        return self._model


def _aliases(domain: str) -> tuple[str, ...]:
    return ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)


# -- loading -------------------------------------------------------------------------------
def load(source: str | os.PathLike | onnx.ModelProto | Model) -> Model:
    """Read a model from a path or wrap a ModelProto. Raises ModelError on bad input."""
    if isinstance(source, Model):
        return source
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)  # the caller's proto is never modified
        check_proto(proto, "<ModelProto>")
        return Model(proto)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"expected a path or onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    proto, digest = read_proto(path)
    check_proto(proto, str(path))
    return Model(proto, path=path, sha256=digest)


def _sha256_of_proto(proto: onnx.ModelProto) -> str:
    try:
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    except ValueError:  # over 2 GB
        return ""

