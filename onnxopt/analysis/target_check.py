"""Will this model run on the target as it is? Every node the target cannot run, with why.

The target is data: ``check_model`` reads its capabilities and knows no target by name.

    unsupported-op         the op (``domain:Op`` outside the default domain) is not in
                           ``capabilities.allowed_ops`` (when that list is not empty)
    unsupported-attribute  an attribute value outside ``capabilities.ops.OP.attributes`` (the
                           ONNX default counts when the node does not set it), an input of
                           ``constant_inputs`` computed at run time, negative values in an
                           input of ``nonnegative_inputs``, per-channel weights where
                           ``per_channel_weights = false``
    float-compute          with ``integer_only``: a node that computes on float data. In a QDQ
                           model a node computes in integer when each of its float data
                           inputs comes from a DequantizeLinear and each float output goes only
                           to QuantizeLinear nodes (the node groups integer runtimes such as
                           onnxruntime's QNN EP run as one integer op)
    dynamic-shape          with ``static_shapes``: a graph input whose shape is not fixed (the
                           finding names the ``--input-shape`` flag), or a node whose inputs have
                           fixed shapes but whose output shape is not fixed or not known
    unaligned-channels     with ``aligned_channels`` (the hardware needs it, not only runs
                           faster with it) and ``channel_multiple`` > 1: a Conv/ConvTranspose/Gemm/MatMul whose
                           weight gives a number of output channels that is not a multiple of
                           it. Counts the graph's interface fixes are left alone: a layer whose
                           output reaches a graph output without another weight layer between
    unsupported-type       a data type outside ``capabilities.tensor_types`` (as the node
                           computes it: the integer type behind a DequantizeLinear, the type a
                           QuantizeLinear makes of the output) or, for one op, outside
                           ``capabilities.ops.OP.input_types``

Data inputs are those ``onnxopt.ir.ops.DATA_INPUTS`` lists, plus the weight and bias of
Conv/ConvTranspose/Gemm; the others (shapes, scales, bounds) are parameters. Shapes come from
ONNX shape inference (``onnxopt.analysis.shapes``). `onnxopt check` prints the result and
exits 0 when the model conforms, 3 when it does not; `optimize` runs it at the end.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import is_static
from onnxopt.ir.constants import constant_value, is_constant
from onnxopt.ir.graphs import iter_graphs
from onnxopt.ir.ops import data_input_indices
from onnxopt.ir.weights import WEIGHT_OPS, weight_axes

REASONS = ("unsupported-op", "unsupported-attribute", "float-compute", "dynamic-shape",
           "unaligned-channels", "unsupported-type")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops that read only their inputs' shapes or make constants: they compute on no data.
NO_COMPUTE = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})
FLOAT_TYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


@dataclass
class Finding:
    """One thing the target cannot run as it is."""

    reason: str  # one of REASONS
    node: str  # the node's name (or "op writing 'tensor'"), or "input 'NAME'"
    op: str  # "Op", "domain:Op", or "" for a graph input
    detail: str
    graph: str = ""  # the subgraph's name when not the main graph

    def line(self) -> str:
        where = f"{self.node} ({self.op})" if self.op else self.node
        inside = f" in subgraph '{self.graph}'" if self.graph else ""
        return f"{self.reason:<22} {where}{inside}: {self.detail}"


@dataclass
class CheckResult:
    target: str
    nodes: int
    findings: list[Finding] = field(default_factory=list)
    model: str | None = None

    @property
    def conforms(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.reason] = out.get(f.reason, 0) + 1
        return {r: out[r] for r in REASONS if r in out}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "conforms": self.conforms, "nodes": self.nodes,
                "counts": self.counts(), "findings": [asdict(f) for f in self.findings]}

    def summary(self) -> str:
        """One line: the verdict and the count of each reason (with the ops, for unsupported-op)."""
        if self.conforms:
            return f"conforms to target '{self.target}' ({self.nodes} nodes)"
        parts = []
        for reason, n in self.counts().items():
            ops = sorted({f.op for f in self.findings if f.reason == reason and f.op})
            shown = f" ({', '.join(ops[:6])}{', …' if len(ops) > 6 else ''})" if reason == "unsupported-op" else ""
            parts.append(f"{n} {reason}{shown}")
        return f"{len(self.findings)} finding(s) for target '{self.target}': " + ", ".join(parts)

    def format(self, limit: int = 20) -> str:
        """The text `onnxopt check` prints: the verdict, then up to ``limit`` findings per reason."""
        head = f"{self.model}: " if self.model else ""
        lines = [head + self.summary()]
        for reason in self.counts():
            mine = [f for f in self.findings if f.reason == reason]
            lines += [f"  {f.line()}" for f in mine[:limit]]
            if len(mine) > limit:
                lines.append(f"  {reason:<22} … and {len(mine) - limit} more (--json lists every one)")
        return "\n".join(lines)


# -- helpers -----------------------------------------------------------------------------------
def _op_key(node: gs.Node) -> str:
    return node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}:{node.op}"


def _describe(node: gs.Node) -> str:
    if node.name:
        return f"'{node.name}'"
    out = node.outputs[0].name if node.outputs else "?"
    return f"node writing '{out}'"


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


@functools.lru_cache(maxsize=None)
def _attribute_default(op: str, opset: int, name: str):
    try:
        schema = onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return None
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name:
        return None
    return onnx.helper.get_attribute_value(attr.default_value)


def _norm(value, rank: int | None, is_axis: bool):
    if isinstance(value, bytes):
        value = value.decode()
    if is_axis and isinstance(value, int) and not isinstance(value, bool) and value < 0 and rank:
        value += rank
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


class _Checker:
    def __init__(self, target, infos: dict | None, opset: int):
        self.caps = target.capabilities
        self.infos = infos or {}
        self.opset = opset
        self.allowed = set(self.caps.get("allowed_ops", []))
        self.rules = self.caps.get("ops", {}) or {}
        self.integer_only = bool(self.caps.get("integer_only", False))
        self.types = set(self.caps.get("tensor_types", []))
        # channel_multiple alone is where kernels run fastest (pruning rounds to it); only a
        # target that needs aligned channels has unaligned ones reported
        self.multiple = int(self.caps.get("channel_multiple", 1) or 1) if self.caps.get("aligned_channels") else 1
        # float types are reported once, as float-compute, on an integer-only target
        self.skip_types = FLOAT_TYPES if self.integer_only else frozenset()
        self.findings: list[Finding] = []
        self.graph_outputs: set[str] = set()

    def add(self, reason: str, node: gs.Node | None, detail: str, where: str = "", label: str | None = None):
        """A finding on ``node`` (or on what ``label`` names) in the subgraph ``where`` ("" = main)."""
        self.findings.append(Finding(reason, label or _describe(node), _op_key(node) if node is not None else "",
                                     detail, where))

    # -- types ------------------------------------------------------------------------------------
    def dtype(self, t: gs.Tensor) -> str | None:
        if isinstance(t, gs.Constant) or getattr(t, "dtype", None) is not None:
            name = _dtype_name(t.dtype)
            if name:
                return name
        info = self.infos.get(t.name)
        return _dtype_name(info.dtype) if info is not None else None

    def input_type(self, t: gs.Tensor) -> str | None:
        """The type a consumer computes on: a DequantizeLinear's integer input, else the tensor's."""
        p = _producer(t)
        if p is not None and p.op == "DequantizeLinear" and p.inputs:
            return self.dtype(p.inputs[0])
        return self.dtype(t)

    def output_type(self, t: gs.Tensor) -> str | None:
        """The type a node's output is kept in: what the QuantizeLinear nodes reading it make."""
        readers = list(t.outputs)
        if readers and t.name not in self.graph_outputs and all(r.op == "QuantizeLinear" for r in readers):
            return self.dtype(readers[0].outputs[0]) or self._zero_point_type(readers[0])
        return self.dtype(t)

    def _zero_point_type(self, q: gs.Node) -> str:
        if len(q.inputs) > 2 and q.inputs[2].name:
            return self.dtype(q.inputs[2]) or "uint8"
        return "uint8"

    def data_indices(self, node: gs.Node) -> list[int]:
        indices = set(data_input_indices(node.op, len(node.inputs)))
        if node.op in ("Conv", "ConvTranspose", "Gemm"):
            indices |= {1, 2}
        return sorted(i for i in indices if i < len(node.inputs) and node.inputs[i].name)

    # -- one node ---------------------------------------------------------------------------------
    def node(self, node: gs.Node, where: str) -> None:
        key = _op_key(node)
        if self.allowed and key not in self.allowed and node.op not in self.allowed:
            self.add("unsupported-op", node, f"{key} is not among the ops the target runs "
                     "(capabilities.allowed_ops)", where)
            return
        rules = self.rules.get(key) or self.rules.get(node.op) or {}
        if rules:
            self.constraints(node, rules, where)
        if node.op in QDQ_OPS:
            self.qdq_types(node, where)
            return
        if node.op in NO_COMPUTE:
            return
        ins = {i: self.input_type(node.inputs[i]) for i in self.data_indices(node)}
        outs = {t.name: self.output_type(t) for t in node.outputs if t.name}
        floats = [f"input {i} '{node.inputs[i].name}' is {ty}" for i, ty in ins.items() if ty in FLOAT_TYPES] + \
                 [f"output '{n}' is {ty}" for n, ty in outs.items() if ty in FLOAT_TYPES]
        if self.integer_only and floats:
            self.add("float-compute", node, "; ".join(floats[:3]) + (" …" if len(floats) > 3 else "")
                     + " (not behind DequantizeLinear / QuantizeLinear): the target computes in integer only",
                     where)
        if self.types:
            bad = sorted({ty for ty in list(ins.values()) + list(outs.values())
                          if ty and ty not in self.types and ty not in self.skip_types})
            if bad:
                self.add("unsupported-type", node, f"computes on {', '.join(bad)}; the target's types are "
                         f"{', '.join(sorted(self.types))} (capabilities.tensor_types)", where)
        wanted = rules.get("input_types")
        if wanted:
            bad_inputs = [f"input {i} '{node.inputs[i].name}' is {ty}" for i, ty in ins.items()
                          if ty and ty not in wanted and ty not in self.skip_types]
            if bad_inputs:
                self.add("unsupported-type", node, "; ".join(bad_inputs) + f"; {key} takes {', '.join(wanted)} "
                         f"(capabilities.ops.{key}.input_types)", where)

    def qdq_types(self, node: gs.Node, where: str) -> None:
        if not self.types:
            return
        t = node.outputs[0] if node.op == "QuantizeLinear" else node.inputs[0]
        ty = self.dtype(t) or (self._zero_point_type(node) if node.op == "QuantizeLinear" else None)
        if ty and ty not in self.types:
            self.add("unsupported-type", node, f"{'makes' if node.op == 'QuantizeLinear' else 'reads'} {ty}; the "
                     f"target's types are {', '.join(sorted(self.types))} (capabilities.tensor_types)", where)

    def rank(self, node: gs.Node) -> int | None:
        if not node.inputs:
            return None
        shape = node.inputs[0].shape if node.inputs[0].shape is not None else None
        if shape is None and node.inputs[0].name in self.infos:
            shape = self.infos[node.inputs[0].name].shape
        return len(shape) if shape is not None else None

    def constraints(self, node: gs.Node, rules: dict, where: str) -> None:
        key = _op_key(node)
        for name, allowed in (rules.get("attributes") or {}).items():
            value = node.attrs[name] if name in node.attrs else _attribute_default(node.op, self.opset, name)
            if value is None:
                continue
            rank = self.rank(node)
            is_axis = name == "axis"
            got = _norm(value, rank, is_axis)
            if got not in [_norm(v, rank, is_axis) for v in allowed]:
                self.add("unsupported-attribute", node, f"{name} = {value!r}; the target takes "
                         f"{', '.join(map(repr, allowed))} (capabilities.ops.{key}.attributes)", where)
        for i in rules.get("constant_inputs", []):
            if i < len(node.inputs) and node.inputs[i].name and not is_constant(node.inputs[i]):
                self.add("unsupported-attribute", node, f"input {i} '{node.inputs[i].name}' is computed at run "
                         f"time; the target needs it constant (capabilities.ops.{key}.constant_inputs)", where)
        for i in rules.get("nonnegative_inputs", []):
            if i < len(node.inputs) and node.inputs[i].name:
                values = constant_value(node.inputs[i])
                if values is not None and np.size(values) and np.min(values) < 0:
                    self.add("unsupported-attribute", node, f"input {i} '{node.inputs[i].name}' holds negative "
                             f"values (capabilities.ops.{key}.nonnegative_inputs)", where)
        if rules.get("per_channel_weights", True) is False:
            for i, t in enumerate(node.inputs):
                p = _producer(t)
                if p is not None and p.op == "DequantizeLinear" and len(p.inputs) > 1:
                    scale = p.inputs[1]
                    size = int(np.prod(scale.shape)) if scale.shape is not None and \
                        all(isinstance(d, int) for d in scale.shape) else 1
                    if size > 1:
                        self.add("unsupported-attribute", node, f"input {i} '{t.name}' has per-channel scales "
                                 f"({size}); the target takes per-tensor ones "
                                 f"(capabilities.ops.{key}.per_channel_weights)", where)

    # -- channels ---------------------------------------------------------------------------------
    def channels(self, graph: gs.Graph, where: str) -> None:
        if self.multiple <= 1:
            return
        for node in graph.nodes:
            if node.op not in WEIGHT_OPS or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            p = _producer(w)
            source = p.inputs[0] if p is not None and p.op == "DequantizeLinear" and p.inputs else w
            if not is_constant(source):
                continue  # activation x activation (attention): no channels of the model's choosing
            shape = w.shape if w.shape is not None else getattr(self.infos.get(w.name), "shape", None)
            if shape is None or not all(isinstance(d, int) for d in shape):
                shape = source.shape
            if shape is None or not all(isinstance(d, int) for d in shape):
                continue
            axes = weight_axes(node, 1, len(shape))
            if axes is None:
                continue
            out = axes.out_channels(shape)
            if out % self.multiple and not self._reaches_output(node):
                self.add("unaligned-channels", node, f"{out} output channels, not a multiple of "
                         f"{self.multiple} (capabilities.channel_multiple)", where)

    def _reaches_output(self, node: gs.Node) -> bool:
        """Whether the node's output reaches a graph output without passing another weight layer."""
        seen, todo = set(), list(node.outputs)
        while todo:
            t = todo.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.name in self.graph_outputs:
                return True
            for reader in t.outputs:
                if reader.op not in WEIGHT_OPS:
                    todo.extend(reader.outputs)
        return False

    # -- shapes -----------------------------------------------------------------------------------
    def shapes(self, graph: gs.Graph) -> None:
        for t in graph.inputs:
            shape = self.infos[t.name].shape if t.name in self.infos else t.shape
            if not is_static(shape):
                self.add("dynamic-shape", None, f"{dynamic_input(t.name, shape)}; the target needs static shapes",
                         label=f"input '{t.name}'")
        for node in graph.nodes:
            if node.op in NO_COMPUTE:
                continue
            if not all(self._static(t) for t in node.inputs if t.name):
                continue  # dynamic because of its inputs: reported where it starts
            dynamic = [t for t in node.outputs if t.name and not self._static(t)]
            if dynamic:
                t = dynamic[0]
                shape = self._shape(t)
                what = f"shape {list(shape)} is not fixed" if shape is not None else "shape is not known to inference"
                self.add("dynamic-shape", node, f"output '{t.name}': {what}, although its inputs' shapes are")

    def _shape(self, t: gs.Tensor):
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        info = self.infos.get(t.name)
        if info is not None and info.shape is not None:
            return info.shape
        return tuple(t.shape) if t.shape is not None else None

    def _static(self, t: gs.Tensor) -> bool:
        return is_static(self._shape(t))


def dynamic_input(name: str, shape) -> str:
    """What to tell about a graph input whose shape is not fixed: its shape and the flag that
    fixes it (symbolic dims shown as 1, the size to replace)."""
    example = ",".join(str(d) if isinstance(d, int) and d >= 0 else "1" for d in (shape or []))
    return (f"shape {list(shape) if shape is not None else 'unknown'} is not fixed: give --input-shape "
            f"{name}:{example or 'D1,D2,…'}")


def check_model(model, target, input_shapes: dict[str, list[int]] | None = None,
                proto: onnx.ModelProto | None = None) -> CheckResult:
    """The nodes of ``model`` (a path, ModelProto or onnxopt Model) that ``target`` (a name,
    file or Target) cannot run as they are. ``input_shapes`` fixes input shapes first;
    ``proto``: ``model`` (an onnxopt Model) as a proto, when the caller has exported it."""
    from onnxopt.analysis.cost import with_input_shapes
    from onnxopt.analysis.shapes import tensor_infos
    from onnxopt.ir.model import Model, load
    from onnxopt.target import load_target

    target = load_target(target)
    label = str(model) if not isinstance(model, (onnx.ModelProto, Model)) else None
    m = load(model)
    if input_shapes:
        proto = with_input_shapes(proto or m.to_proto(), input_shapes)
        m = load(proto)
    caps = target.capabilities
    needs_shapes = bool(caps.get("static_shapes") or caps.get("integer_only") or caps.get("tensor_types")
                        or caps.get("ops") or (caps.get("aligned_channels")
                                               and int(caps.get("channel_multiple", 1) or 1) > 1))
    infos = tensor_infos(proto or m.to_proto()) if needs_shapes else {}
    checker = _Checker(target, infos, m.opset or 1)
    nodes = 0
    for graph in iter_graphs(m.graph):
        main = graph is m.graph
        checker.graph_outputs = {t.name for t in graph.outputs}
        name = "" if main else (graph.name or "subgraph")
        for node in graph.nodes:
            nodes += 1
            checker.node(node, name)
        checker.channels(graph, name)
        if main and caps.get("static_shapes"):
            checker.shapes(graph)
    return CheckResult(target=target.name, nodes=nodes, findings=checker.findings, model=label)
