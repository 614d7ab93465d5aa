"""Channel groups: which channels of a model must be removed together, and what that touches.

Removing output channel c of a layer is only correct if every tensor that carries c loses
it too: the bias and BatchNorm entries of c, the columns of every consumer's weight that
read c, the channel of a residual Add's other operand (and that operand's producer), the
slice of a Concat output where c lands, the block of columns a Flatten makes of it, the
head it belongs to after a Reshape to heads, the group count of a depthwise conv, the
entries of Reshape/Split/Slice constants. This analysis finds all of that once, for any
pass that removes channels (pruning, low rank, search).

How: every channel dimension of a tensor gets a *layout*, one atom id per position along
that axis. A layer with a constant weight (Conv, ConvTranspose, Gemm, MatMul) makes new
atoms for its output channels; each op rule maps its inputs' layouts to its outputs' (an
activation copies them, Concat concatenates them, Flatten repeats each atom over the block
it becomes, Transpose moves them, Split/Slice cut them) and ops that force two channels to
stay aligned (residual Add/Mul/Sub, the head axis of attention MatMuls) unite their atoms
(union-find). A reshape of C channels into (heads, head_dim) unites each head's atoms, so a
head is removed whole. Ops that mix channels (normalizing over them, reducing them, an
op without a rule, a graph output) *freeze* the atoms they read, with the reason: unknown
means stop, never "assume elementwise".

The result is a networkx graph with a node per layer output dimension and per atom class,
an edge per "is aligned with"; its connected components are the groups. Each group has its
classes (channels, or heads), which are removable, the block constraints of grouped convs
(each group of a conv keeps as many channels as the others), and the members to rewrite:
``ChannelGraph.apply(removed)`` rewrites them all for a set of removed classes.

Shapes come from the ``shapes`` analysis: rules that need a dim (broadcasts, Reshape)
freeze what they cannot prove.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.surgery import topological_order, replace_input
from onnxopt.ir.weights import weight_axes

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Identity",
    "Dropout", "Cast", "Floor", "Ceil", "Round", "Sin", "Cos", "Mish", "ThresholdedRelu", "Sign", "Not",
    "IsNaN", "IsInf", "Shrink",
    "com.microsoft:Gelu", "com.microsoft:FastGelu", "com.microsoft:QuickGelu",
})
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Mod",
})
SAME_SHAPE = frozenset({"LayerNormalization", "BatchNormalization", "InstanceNormalization", "Softmax",
                        "LogSoftmax", "com.microsoft:SkipLayerNormalization"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"})
# Kinds of members, in the order ``apply`` rewrites them (a grouped conv's input slicing
# needs its rows already cut).
KINDS = ("out", "depthwise", "param", "in", "grouped-in", "shape", "split", "slice")


@dataclass
class Member:
    """One thing to rewrite when channels go: input ``index`` of ``node`` along ``axis``,
    whose positions carry the atoms ``layout``. Kinds: ``out`` (a producer's weight rows),
    ``in`` (a consumer's weight columns), ``grouped-in`` (a grouped conv's per-group
    columns), ``depthwise`` (a depthwise conv passed through: weight rows and ``group``),
    ``param`` (a per-channel constant: bias, BatchNorm, affine), ``shape`` (entry ``axis``
    of a Reshape/Resize/Expand constant), ``split`` and ``slice`` (Split sizes, Slice
    bounds)."""

    kind: str
    node: gs.Node
    index: int
    axis: int
    layout: np.ndarray
    extra: dict = field(default_factory=dict)


@dataclass
class Group:
    """Channels that go together: ``classes`` (atom class ids; a head is one class) and
    how many positions each spans in the producers' outputs (``width``)."""

    id: int
    producers: list[str]
    classes: np.ndarray
    width: np.ndarray  # positions per class in the first producer's output (1, or head_dim)
    frozen: np.ndarray  # bool per class: cannot be removed
    reasons: list[str]
    blocks: list[np.ndarray] | None = None  # grouped conv: each block keeps the same count
    members: list[Member] = field(default_factory=list)

    @property
    def removable(self) -> np.ndarray:
        return self.classes[~self.frozen]

    @property
    def prunable(self) -> bool:
        return bool((~self.frozen).any())


class _Atoms:
    """Union-find over atom ids, with the reason an atom's class is frozen."""

    def __init__(self):
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, n: int, frozen: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = np.arange(start, start + n, dtype=np.int64)
        if frozen:
            self.freeze(ids, frozen)
        return ids

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen and ra not in self.frozen:
            self.frozen[ra] = self.frozen[rb]

    def freeze(self, ids, reason: str) -> None:
        for a in np.unique(np.asarray(ids)):
            self.frozen.setdefault(self.find(int(a)), reason)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(a)) for a in ids), dtype=np.int64, count=len(ids))

    def reason(self, root: int) -> str | None:
        return self.frozen.get(self.find(root))


def _dim_key(d):
    return d if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None


def _product(dims) -> tuple | None:
    """A product of dims as (int part, sorted symbols), or None when a dim is unknown."""
    value, symbols = 1, []
    for d in dims:
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            value *= int(d)
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            symbols.append(f"#{d}")  # a dim declared -1: unknown, but the same one on both sides
        elif isinstance(d, str) and d:  # a named dim (unk__N too: one unknown, same name)
            symbols.append(d)
        else:
            return None
    return value, tuple(sorted(symbols))


def _resolve_target(shape_in, target: list) -> tuple | None:
    """The output shape of a Reshape of ``shape_in`` to ``target`` (0 copies the input dim,
    -1 takes what is left; dims may be symbols), or None when it cannot be told."""
    if any(isinstance(e, int) and e < -1 for e in target) or sum(e == -1 for e in target) > 1:
        return None
    out = [shape_in[i] if (isinstance(e, int) and e == 0 and i < len(shape_in)) else e
           for i, e in enumerate(target)]
    if -1 in out:
        total = _product(shape_in)
        rest = _product([e for e in out if e != -1])
        if total is None or rest is None or rest[0] == 0 or total[0] % rest[0]:
            return None
        symbols = list(total[1])
        for sym in rest[1]:
            if sym not in symbols:
                return None
            symbols.remove(sym)
        if symbols:
            return None
        out[out.index(-1)] = total[0] // rest[0]
    return tuple(out)


def _conv_spatial(node: gs.Node, spatial, kernel) -> tuple:
    """Spatial output dims of a Conv (None where not computable)."""
    n = len(spatial)
    pads = list(node.attrs.get("pads", [0] * (2 * n)))
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    auto = str(node.attrs.get("auto_pad", "NOTSET"))
    out = []
    for i, (d, k) in enumerate(zip(spatial, kernel)):
        if not isinstance(d, (int, np.integer)) or d < 0 or not isinstance(k, (int, np.integer)):
            out.append(None)
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-int(d) // strides[i]))
        else:
            span = dilations[i] * (int(k) - 1) + 1
            out.append((int(d) + pads[i] + pads[i + n] - span) // strides[i] + 1)
    return tuple(out)


class ChannelGraph:
    """The channel-dependency analysis of one graph (see the module docstring)."""

    def __init__(self, graph: gs.Graph, shapes: dict):
        self.graph = graph
        self.shapes = shapes
        self.atoms = _Atoms()
        self.layouts: dict[str, dict[int, np.ndarray]] = {}  # tensor name -> axis -> atoms
        self.tensors: dict[str, gs.Tensor] = {}
        self.members: list[Member] = []
        self.producers: dict[str, tuple[gs.Node, np.ndarray]] = {}  # node name -> (node, atoms)
        self.blocks: list[list[np.ndarray]] = []
        self.skipped: list[tuple[str, str]] = []  # (node, reason) of layers left alone
        self.derived: dict[str, tuple] = {}  # shapes of tensors shape inference left unknown
        uses: dict[int, int] = defaultdict(int)
        for node in graph.nodes:
            for t in node.inputs:
                uses[id(t)] += 1
        self._uses = uses
        for node in topological_order(graph):
            self._visit(node)
        for out in graph.outputs:
            for axis, layout in self.layouts.get(out.name, {}).items():
                self.atoms.freeze(layout, f"graph output '{out.name}'")
        self.groups = self._groups()

    # -- facts ---------------------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        info = self.shapes.get(t.name)
        if info is not None and info.shape is not None:
            return tuple(info.shape)
        if t.shape is not None:
            return tuple(t.shape)
        return self.derived.get(t.name)

    def _derive(self, node: gs.Node) -> None:
        """Shape inference stops at ops it has no schema for (contrib ops such as Gelu) and
        leaves everything after them unknown: derive the output shape of the ops whose rule
        needs one from their inputs' shapes (same shape, broadcast, x @ W, a permutation)."""
        if not node.outputs or not node.outputs[0].name or self.shape(node.outputs[0]) is not None:
            return
        op = node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}:{node.op}"
        shapes = [self.shape(t) for t in node.inputs if t.name]
        if not shapes or shapes[0] is None:
            return
        out = None
        if op in UNARY or op in SAME_SHAPE:
            out = shapes[0]
        elif op in ELEMENTWISE and all(s is not None for s in shapes):
            r = max(len(s) for s in shapes)
            out = []
            for o in range(r):
                dims = [s[o - (r - len(s))] for s in shapes if o - (r - len(s)) >= 0]
                known = {d for d in dims if isinstance(d, (int, np.integer))} - {1}
                if len(known) > 1:
                    return
                # a fixed size wins; else the first named dim (they must agree at run time)
                named = [d for d in dims if d != 1 and d is not None]
                out.append(known.pop() if known else (named[0] if named else (1 if 1 in dims else None)))
        elif op == "MatMul" and len(shapes) == 2 and shapes[1] is not None and min(len(shapes[0]), len(shapes[1])) >= 2:
            a, b = shapes
            out = (a[:-1] if len(a) >= len(b) else b[:-2] + a[-2:-1]) + (b[-1],)
        elif op == "Transpose" and node.attrs.get("perm") is not None:
            out = tuple(shapes[0][p] for p in node.attrs["perm"])
        elif op == "Conv" and len(shapes) > 1 and shapes[1] is not None:
            out = shapes[0][:1] + (shapes[1][0],) + _conv_spatial(node, shapes[0][2:], shapes[1][2:])
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            out = shapes[0][:2] + (1,) * (len(shapes[0]) - 2)
        elif op == "Reshape" and len(node.inputs) > 1:
            target = self._target_entries(node, node.inputs[1])
            out = _resolve_target(shapes[0], [e[0] for e in target]) if target else None
        if out is not None:
            self.derived[node.outputs[0].name] = tuple(out)

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return len(s) if s is not None else None

    def layout(self, t: gs.Tensor) -> dict[int, np.ndarray]:
        return self.layouts.get(t.name, {})

    def _set(self, t: gs.Tensor, axis: int, layout: np.ndarray) -> None:
        if isinstance(t, gs.Constant) or not t.name:
            return
        self.layouts.setdefault(t.name, {})[axis] = layout
        self.tensors[t.name] = t

    def _freeze_inputs(self, node: gs.Node, reason: str, axes_of=None) -> None:
        for t in node.inputs:
            for axis, layout in self.layout(t).items():
                if axes_of is None or axis in axes_of:
                    self.atoms.freeze(layout, reason)

    def _add(self, kind: str, node: gs.Node, index: int, axis: int, layout: np.ndarray, **extra) -> None:
        self.members.append(Member(kind, node, index, axis, layout, extra))

    # -- op rules ------------------------------------------------------------------------------
    def _visit(self, node: gs.Node) -> None:
        self._derive(node)
        op = node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}:{node.op}"
        handler = getattr(self, f"_op_{op}", None)
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and self._weight(node) is not None:
            handler = self._layer
        elif op in UNARY:
            handler = self._unary
        elif op in ELEMENTWISE:
            handler = self._elementwise
        elif op in POOLS:
            handler = self._pool
        elif op in REDUCES:
            handler = self._reduce
        if handler is None:
            if any(self.layout(t) for t in node.inputs):
                self._freeze_inputs(node, f"{node.op} '{node.name}' has no channel rule")
            return
        handler(node)

    def _weight(self, node: gs.Node) -> gs.Tensor | None:
        """The constant weight operand of a layer (input 1), when the data input is not constant."""
        if len(node.inputs) < 2 or isinstance(node.inputs[0], gs.Constant):
            return None
        w = node.inputs[1]
        if isinstance(w, gs.Constant) or (w.inputs and w.inputs[0].op == "Constant"):
            return w
        return None

    def _layer(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        y = node.outputs[0]
        op = node.op
        why = None
        if not isinstance(w, gs.Constant):
            why = "weight is a Constant node (run lift-constants first)"
        elif self._uses[id(w)] > 1:
            why = f"weight '{w.name}' is shared by {self._uses[id(w)]} nodes"
        elif constant_value(w) is None or constant_value(w).dtype.kind != "f":
            why = f"weight '{w.name}' is not a float array"
        wshape = tuple(w.shape) if w.shape is not None else None
        axes = weight_axes(node, 1, len(wshape)) if wshape else None
        if axes is None or (op == "MatMul" and len(wshape) != 2):
            why = why or f"weight '{w.name}' has no channel axes"
        if op == "Gemm" and int(node.attrs.get("transA", 0)):
            why = why or "transA=1"
        xl = self.layout(x)
        if why is not None:
            for axis, layout in xl.items():
                self.atoms.freeze(layout, f"{op} '{node.name}': {why}")
            self.skipped.append((node.name, why))
            out_rank = self.rank(y)
            if out_rank is not None:
                n = self._out_channels(node, wshape, axes)
                if n:
                    self._set(y, 1 if op in ("Conv", "ConvTranspose", "Gemm") else out_rank - 1,
                              self.atoms.new(n, f"{op} '{node.name}': {why}"))
            return
        x_rank = self.rank(x)
        if x_rank is None:
            x_rank = len(x.shape) if x.shape is not None else (2 if op == "Gemm" else None)
        in_axis = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1}.get(op)
        if op == "MatMul":
            in_axis = x_rank - 1 if x_rank else None
        groups = axes.groups
        depthwise = op == "Conv" and axes.is_depthwise(wshape)
        multiplier = wshape[0] // groups if depthwise else None
        # the input side: consumer (or pass through a depthwise conv)
        x_in = xl.get(in_axis) if in_axis is not None else None
        for axis, layout in xl.items():
            if axis == in_axis:
                continue
            if op in ("MatMul", "Gemm"):
                self._set(y, axis, layout)  # batch / row axes pass through x @ W
            else:
                self.atoms.freeze(layout, f"{op} '{node.name}' mixes axis {axis}")
        if depthwise and multiplier == 1:
            if x_in is not None:
                self._add("depthwise", node, 1, 0, x_in)
                if len(node.inputs) > 2 and node.inputs[2].name:
                    self._add("param", node, 2, 0, x_in)
                self._set(y, 1, x_in)
                return
            self._set(y, 1, self.atoms.new(wshape[0], f"depthwise Conv '{node.name}' reads channels "
                                           "that cannot be pruned"))
            return
        if x_in is not None:
            if depthwise or (groups > 1 and op == "ConvTranspose"):
                self.atoms.freeze(x_in, f"{op} '{node.name}': grouped layout not supported (groups {groups})")
            elif groups > 1:
                per = len(x_in) // groups
                self.blocks.append([x_in[i * per:(i + 1) * per] for i in range(groups)])
                self._add("grouped-in", node, 1, axes.in_axis, x_in, groups=groups)
            else:
                self._add("in", node, 1, axes.in_axis, x_in)
        self._new_producer(node, y, wshape, axes)

    def _out_channels(self, node, wshape, axes) -> int | None:
        if not wshape or axes is None:
            return None
        return axes.out_channels(wshape)

    def _new_producer(self, node: gs.Node, y: gs.Tensor, wshape, axes) -> None:
        op = node.op
        n = axes.out_channels(wshape)
        y_rank = self.rank(y)
        frozen = None
        if op == "ConvTranspose" and axes.groups > 1:
            frozen = f"ConvTranspose '{node.name}': grouped output channels are shared by groups"
        atoms = self.atoms.new(n, frozen)
        out_axis = 1 if op in ("Conv", "ConvTranspose", "Gemm") else (y_rank - 1 if y_rank else None)
        if out_axis is None:
            self.atoms.freeze(atoms, f"{op} '{node.name}': output rank unknown")
            return
        self._set(y, out_axis, atoms)
        if frozen:
            return
        self.producers[node.name] = (node, atoms)
        self._add("out", node, 1, axes.out_axis, atoms)
        if op in ("Conv", "ConvTranspose") and axes.groups > 1:
            per = n // axes.groups
            self.blocks.append([atoms[i * per:(i + 1) * per] for i in range(axes.groups)])
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = node.inputs[2]
            bshape = self.shape(bias)
            if op in ("Conv", "ConvTranspose"):
                self._add("param", node, 2, 0, atoms)
            elif bshape and bshape[-1] == n and isinstance(bias, gs.Constant):
                self._add("param", node, 2, len(bshape) - 1, atoms)
            elif bshape and bshape[-1] == n:
                self.atoms.freeze(atoms, f"Gemm '{node.name}': bias is not constant")

    def _unary(self, node: gs.Node) -> None:
        if not node.inputs or not node.outputs:
            return
        for axis, layout in self.layout(node.inputs[0]).items():
            self._set(node.outputs[0], axis, layout)

    def _broadcast(self, node: gs.Node, inputs: list[gs.Tensor], out: gs.Tensor | None,
                   skip_axes=()) -> None:
        """Unite the layouts of ``inputs`` axis by axis (numpy broadcasting); constants with the
        full dim become ``param`` members; an untracked full-size variable freezes the axis."""
        ranks = [self.rank(t) for t in inputs]
        if any(r is None for r in ranks):
            if any(self.layout(t) for t in inputs):
                self._freeze_inputs(node, f"{node.op} '{node.name}': operand rank unknown")
            return
        r = max(ranks) if ranks else 0
        tracked = defaultdict(list)  # output axis -> [(input index, axis, layout)]
        for i, t in enumerate(inputs):
            for axis, layout in self.layout(t).items():
                tracked[axis + r - ranks[i]].append((i, axis, layout))
        for o, entries in tracked.items():
            if o in skip_axes:
                continue
            size = len(entries[0][2])
            ok = all(len(lay) == size for _, _, lay in entries)
            reason = f"{node.op} '{node.name}' ties axis {o} to a tensor that cannot be pruned"
            for i, t in enumerate(inputs):
                a = o - (r - ranks[i])
                if a < 0 or any(e[0] == i for e in entries):
                    continue
                shp = self.shape(t)
                d = shp[a] if shp is not None else None
                if d == 1:
                    continue  # broadcast along the channel axis
                if isinstance(t, gs.Constant) and d == size:
                    index = next(k for k, u in enumerate(node.inputs) if u is t)
                    self._add("param", node, index, a, entries[0][2])
                    continue
                if isinstance(t, gs.Constant) and d is not None and d != size:
                    ok = False
                elif d is None or d == size:
                    reason = (f"{node.op} '{node.name}' ties axis {o} to '{t.name}', whose channels "
                              "no analysed layer produces")
                    ok = False
                else:
                    reason = (f"{node.op} '{node.name}' ties axis {o} to '{t.name}', whose size there "
                              f"({d}) is neither {size} nor 1")
                    ok = False
            if not ok:
                for _, _, lay in entries:
                    self.atoms.freeze(lay, reason)
                continue
            first = entries[0][2]
            for _, _, lay in entries[1:]:
                for a, b in zip(first, lay):
                    self.atoms.union(a, b)
            if out is not None:
                self._set(out, o, first)

    def _elementwise(self, node: gs.Node) -> None:
        if not node.outputs:
            return
        inputs = [t for t in node.inputs if t.name]
        self._broadcast(node, inputs, node.outputs[0])

    def _op_Shape(self, node: gs.Node) -> None:
        """Reads only the shape: whatever is computed from it follows the pruned tensor at
        run time, so nothing to freeze and nothing to track."""

    _op_Size = _op_Shape

    def _op_BatchNormalization(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        for axis, layout in self.layout(x).items():
            if axis == 1:
                for i in range(1, min(5, len(node.inputs))):
                    self._add("param", node, i, 0, layout)
            self._set(y, axis, layout)
        for extra in node.outputs[1:]:
            if extra.outputs:
                self._freeze_inputs(node, f"BatchNormalization '{node.name}' in training mode")

    def _op_InstanceNormalization(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        for axis, layout in self.layout(x).items():
            if axis == 1:
                for i in (1, 2):
                    self._add("param", node, i, 0, layout)
                self._set(y, axis, layout)
            else:
                self.atoms.freeze(layout, f"InstanceNormalization '{node.name}' normalizes over axis {axis}")

    def _op_LayerNormalization(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        r = self.rank(x)
        start = int(node.attrs.get("axis", -1))
        start = start + r if (r is not None and start < 0) else start
        for axis, layout in self.layout(x).items():
            if r is None or axis >= start:
                self.atoms.freeze(layout, f"LayerNormalization '{node.name}' normalizes over these channels")
            else:
                self._set(y, axis, layout)

    def _pool(self, node: gs.Node) -> None:
        for axis, layout in self.layout(node.inputs[0]).items():
            if axis in (0, 1):
                self._set(node.outputs[0], axis, layout)
            else:
                self.atoms.freeze(layout, f"{node.op} '{node.name}' pools over axis {axis}")

    def _op_Softmax(self, node: gs.Node) -> None:
        self._normalizing(node, int(node.attrs.get("axis", -1)))

    _op_LogSoftmax = _op_Softmax

    def _normalizing(self, node: gs.Node, axis_attr: int) -> None:
        x = node.inputs[0]
        r = self.rank(x)
        for axis, layout in self.layout(x).items():
            if r is None or axis == (axis_attr + r if axis_attr < 0 else axis_attr):
                self.atoms.freeze(layout, f"{node.op} '{node.name}' normalizes over these channels")
            else:
                self._set(node.outputs[0], axis, layout)

    def _int_list(self, node: gs.Node, attr: str, index: int) -> list[int] | None:
        if attr in node.attrs:
            return [int(v) for v in np.atleast_1d(node.attrs[attr])]
        if index < len(node.inputs) and node.inputs[index].name:
            v = constant_value(node.inputs[index])
            return None if v is None else [int(a) for a in np.atleast_1d(v)]
        return []

    def _reduce(self, node: gs.Node) -> None:
        x = node.inputs[0]
        r = self.rank(x)
        lay = self.layout(x)
        if not lay:
            return
        if node.op in ("ArgMax", "ArgMin"):
            axes = [int(node.attrs.get("axis", 0))]
        else:
            axes = self._int_list(node, "axes", 1)
        if axes is None or r is None:
            self._freeze_inputs(node, f"{node.op} '{node.name}': axes unknown")
            return
        if not axes and not int(node.attrs.get("noop_with_empty_axes", 0)):
            axes = list(range(r))
        axes = [a + r if a < 0 else a for a in axes]
        keep = int(node.attrs.get("keepdims", 1))
        for axis, layout in lay.items():
            if axis in axes:
                self.atoms.freeze(layout, f"{node.op} '{node.name}' reduces over these channels")
            else:
                self._set(node.outputs[0], axis if keep else axis - sum(a < axis for a in axes), layout)

    def _op_Transpose(self, node: gs.Node) -> None:
        x = node.inputs[0]
        r = self.rank(x)
        perm = node.attrs.get("perm")
        lay = self.layout(x)
        if not lay:
            return
        if perm is None:
            if r is None:
                self._freeze_inputs(node, f"Transpose '{node.name}': rank unknown")
                return
            perm = list(reversed(range(r)))
        for o, a in enumerate(perm):
            if a in lay:
                self._set(node.outputs[0], o, lay[a])

    def _op_Unsqueeze(self, node: gs.Node) -> None:
        lay = self.layout(node.inputs[0])
        if not lay:
            return
        axes, r = self._int_list(node, "axes", 1), self.rank(node.outputs[0])
        if axes is None or r is None:
            self._freeze_inputs(node, f"Unsqueeze '{node.name}': axes unknown")
            return
        axes = sorted(a + r if a < 0 else a for a in axes)
        kept = [o for o in range(r) if o not in axes]
        for axis, layout in lay.items():
            self._set(node.outputs[0], kept[axis], layout)

    def _op_Squeeze(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        axes, r = self._int_list(node, "axes", 1), self.rank(x)
        if axes is None or r is None or not axes:
            self._freeze_inputs(node, f"Squeeze '{node.name}': axes unknown")
            return
        axes = [a + r if a < 0 else a for a in axes]
        for axis, layout in lay.items():
            if axis not in axes:
                self._set(node.outputs[0], axis - sum(a < axis for a in axes), layout)

    def _op_Concat(self, node: gs.Node) -> None:
        out = node.outputs[0]
        inputs = list(node.inputs)
        if not any(self.layout(t) for t in inputs):
            return
        r = self.rank(out)
        axis = int(node.attrs.get("axis", 0))
        if r is None:
            self._freeze_inputs(node, f"Concat '{node.name}': rank unknown")
            return
        axis = axis + r if axis < 0 else axis
        parts = []
        for t in inputs:
            lay = self.layout(t).get(axis)
            if lay is None:
                shp = self.shape(t)
                d = _dim_key(shp[axis]) if shp is not None and len(shp) == r else None
                if d is None:
                    self._freeze_inputs(node, f"Concat '{node.name}': size of '{t.name}' unknown", {axis})
                    parts = None
                    break
                lay = self.atoms.new(d, f"Concat '{node.name}': '{t.name}' comes from no analysed layer")
            parts.append(lay)
        if parts is not None:
            self._set(out, axis, np.concatenate(parts))
        self._broadcast(node, inputs, out, skip_axes=(axis,))

    def _op_Split(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        r = self.rank(x)
        axis = int(node.attrs.get("axis", 0))
        axis = axis + r if (r is not None and axis < 0) else axis
        for a, layout in lay.items():
            if a != axis:
                for out in node.outputs:
                    self._set(out, a, layout)
                continue
            sizes = self._int_list(node, "split", 1)
            if sizes is None or not sizes:
                n = len(node.outputs)
                if sizes is None or len(layout) % n:
                    self.atoms.freeze(layout, f"Split '{node.name}': split sizes unknown")
                    continue
                sizes = [len(layout) // n] * n
            if sum(sizes) != len(layout):
                self.atoms.freeze(layout, f"Split '{node.name}': sizes do not match the channels")
                continue
            offsets = np.cumsum([0] + sizes)
            for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
                self._set(out, a, layout[lo:hi])
            self._add("split", node, 1, axis, layout, sizes=list(sizes))

    def _op_Slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        r = self.rank(x)
        values = [constant_value(t) if t.name else None for t in node.inputs[1:5]]
        if r is None or len(node.inputs) < 3 or any(v is None for v in values[:2]) or \
                (len(values) > 2 and node.inputs[3].name and values[2] is None) or \
                (len(values) > 3 and node.inputs[4].name and values[3] is None):
            self._freeze_inputs(node, f"Slice '{node.name}': bounds are not constant")
            return
        starts, ends = [int(v) for v in values[0]], [int(v) for v in values[1]]
        axes = [int(v) for v in values[2]] if len(values) > 2 and values[2] is not None else list(range(len(starts)))
        steps = [int(v) for v in values[3]] if len(values) > 3 and values[3] is not None else [1] * len(starts)
        axes = [a + r if a < 0 else a for a in axes]
        for axis, layout in lay.items():
            if axis not in axes:
                self._set(node.outputs[0], axis, layout)
                continue
            k = axes.index(axis)
            if steps[k] != 1:
                self.atoms.freeze(layout, f"Slice '{node.name}' steps over the channels")
                continue
            n = len(layout)
            lo, hi = starts[k], ends[k]
            lo = min(max(lo + n if lo < 0 else lo, 0), n)
            hi = min(max(hi + n if hi < 0 else hi, 0), n)
            self._set(node.outputs[0], axis, layout[lo:max(lo, hi)])
            self._add("slice", node, 0, axis, layout, position=k, start=lo, end=max(lo, hi))

    def _op_Pad(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        r = self.rank(x)
        pads = self._int_list(node, "pads", 1)
        axes = self._int_list(node, "", 3) if len(node.inputs) > 3 and node.inputs[3].name else None
        if pads is None or r is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
            self._freeze_inputs(node, f"Pad '{node.name}': pads are not constant")
            return
        axes = [a + r if a < 0 else a for a in axes] if axes else list(range(r))
        half = len(pads) // 2
        for axis, layout in lay.items():
            padded = axis in axes and (pads[axes.index(axis)] or pads[half + axes.index(axis)])
            if padded:
                self.atoms.freeze(layout, f"Pad '{node.name}' pads the channel axis")
            else:
                self._set(node.outputs[0], axis, layout)

    def _op_Resize(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        sizes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        for axis, layout in lay.items():
            if scales is not None and scales.size > axis and scales.reshape(-1)[axis] != 1:
                self.atoms.freeze(layout, f"Resize '{node.name}' scales the channel axis")
                continue
            if len(node.inputs) > 3 and node.inputs[3].name:
                if sizes is None:
                    self.atoms.freeze(layout, f"Resize '{node.name}': sizes are not constant")
                    continue
                self._add("shape", node, 3, axis, layout)
            self._set(node.outputs[0], axis, layout)

    _op_Upsample = _op_Resize

    def _op_Expand(self, node: gs.Node) -> None:
        x = node.inputs[0]
        lay = self.layout(x)
        if not lay:
            return
        shape = constant_value(node.inputs[1])
        r_out, r_in = self.rank(node.outputs[0]), self.rank(x)
        if shape is None or r_out is None or r_in is None:
            self._freeze_inputs(node, f"Expand '{node.name}': shape is not constant")
            return
        for axis, layout in lay.items():
            o = axis + r_out - r_in
            entry = o - (r_out - len(shape))
            if entry >= 0 and shape[entry] not in (1, len(layout)):
                self.atoms.freeze(layout, f"Expand '{node.name}' changes the channel axis")
                continue
            if entry >= 0 and shape[entry] == len(layout) and len(layout) != 1:
                self._add("shape", node, 1, entry, layout)
            self._set(node.outputs[0], o, layout)

    def _op_Tile(self, node: gs.Node) -> None:
        lay = self.layout(node.inputs[0])
        repeats = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        for axis, layout in lay.items():
            if repeats is None or repeats[axis] != 1:
                self.atoms.freeze(layout, f"Tile '{node.name}' repeats the channel axis")
            else:
                self._set(node.outputs[0], axis, layout)

    def _op_Gather(self, node: gs.Node) -> None:
        x, idx = node.inputs[0], node.inputs[1]
        lay = self.layout(x)
        if not lay:
            return
        r, ri = self.rank(x), self.rank(idx)
        axis = int(node.attrs.get("axis", 0))
        if r is None or ri is None:
            self._freeze_inputs(node, f"Gather '{node.name}': rank unknown")
            return
        axis = axis + r if axis < 0 else axis
        for a, layout in lay.items():
            if a == axis:
                self.atoms.freeze(layout, f"Gather '{node.name}' picks channels")
            else:
                self._set(node.outputs[0], a if a < axis else a + ri - 1, layout)

    def _op_Flatten(self, node: gs.Node) -> None:
        x = node.inputs[0]
        if not self.layout(x):
            return
        shp = self.shape(x)
        if shp is None:
            self._freeze_inputs(node, f"Flatten '{node.name}': shape unknown")
            return
        k = int(node.attrs.get("axis", 1))
        k = k + len(shp) if k < 0 else k
        out_shape = self.shape(node.outputs[0])
        if out_shape is None or len(out_shape) != 2:
            inner = _product(shp[k:])
            out_shape = [shp[0] if k == 1 else None, inner[0] if inner and not inner[1] else None]
        self._reshape(node, shp, out_shape, None)

    def _op_Reshape(self, node: gs.Node) -> None:
        x = node.inputs[0]
        if not self.layout(x):
            return
        shape_in = self.shape(x)
        target = self._target_entries(node, node.inputs[1])
        if target is None:
            self._freeze_inputs(node, f"Reshape '{node.name}': target shape is computed at run time")
            return
        shape_out = _resolve_target(shape_in, [e[0] for e in target]) if shape_in is not None else None
        if shape_out is None:
            shape_out = self.shape(node.outputs[0])
        if shape_in is None or shape_out is None:
            self._freeze_inputs(node, f"Reshape '{node.name}': shapes unknown")
            return
        self._reshape(node, shape_in, shape_out, target)

    def _target_entries(self, reshape: gs.Node, t: gs.Tensor) -> list[tuple] | None:
        """A Reshape target as entries (value, where): value an int, or a dim of another
        tensor (``Unsqueeze(Gather(Shape(s), k))``, as exporters build dynamic targets);
        where = (node, input index, position) of the constant that holds an int entry."""
        value = constant_value(t)
        if value is not None:  # rewritten in a copy for this Reshape when shared
            return [(int(v), (reshape, 1, i)) for i, v in enumerate(value.reshape(-1))]
        node = t.inputs[0] if t.inputs else None
        if node is None or node.op != "Concat":
            return None
        entries = []
        for j, part in enumerate(node.inputs):
            v = constant_value(part)
            if v is not None:
                # a Concat read by other nodes too cannot change for this Reshape alone
                where = (node, j, None) if len(t.outputs) > 1 else (node, j, 0)
                entries.extend((int(x), (node, j, i) if where[2] is not None else None)
                               for i, x in enumerate(v.reshape(-1)))
                continue
            dim = self._dim_of(part)
            if dim is None:
                return None
            entries.append((dim, None))
        return entries

    def _dim_of(self, t: gs.Tensor):
        """The dim ``Unsqueeze(Gather(Shape(s), k))`` (or without the Unsqueeze) reads."""
        node = t.inputs[0] if t.inputs else None
        if node is not None and node.op == "Unsqueeze":
            t = node.inputs[0]
            node = t.inputs[0] if t.inputs else None
        if node is None or node.op != "Gather" or not node.inputs[0].inputs:
            return None
        shape_node = node.inputs[0].inputs[0]
        k = constant_value(node.inputs[1])
        if shape_node.op != "Shape" or k is None or k.size != 1 or len(shape_node.attrs):
            return None
        shp = self.shape(shape_node.inputs[0])
        if shp is None or not -len(shp) <= int(k) < len(shp):
            return None
        d = shp[int(k)]
        return d if isinstance(d, str) or (isinstance(d, (int, np.integer)) and d >= 0) else None

    def _reshape(self, node: gs.Node, shape_in, shape_out, target) -> None:
        """Map each tracked axis of a reshape: kept whole, merged with inner axes (each atom
        repeated over its block), or split into (heads, inner) (each head's atoms united)."""
        x, y = node.inputs[0], node.outputs[0]
        lay = self.layout(x)
        busy: dict[int, int] = {}
        for axis, layout in sorted(lay.items()):
            why = f"{node.op} '{node.name}' regroups the channel axis"
            pre = _product(shape_in[:axis])
            done = False
            c = len(layout)
            candidates = [b for b in range(len(shape_out))
                          if pre is not None and _product(shape_out[:b]) == pre]
            exact = [b for b in candidates if shape_out[b] == c]
            # leading axes of size 1 share the prefix: the channel axis is the one that fits
            candidates = exact[:1] or [b for b in candidates if shape_out[b] != 1][:1]
            for b in candidates:
                d = shape_out[b]
                if d == c:
                    new, ok = layout, True
                elif isinstance(d, int) and d > c and d % c == 0:
                    inner = d // c  # merged with the axes after it
                    span = None
                    for a2 in range(axis + 1, len(shape_in) + 1):
                        if _product(shape_in[axis + 1:a2]) == (inner, ()):
                            span = a2
                            break
                    ok = span is not None and not any(a in lay for a in range(axis + 1, span))
                    new = np.repeat(layout, inner) if ok else None
                elif isinstance(d, int) and 0 < d < c and c % d == 0:
                    inner = c // d  # split into (d, inner...)
                    span = None
                    for b2 in range(b + 2, len(shape_out) + 1):
                        if _product(shape_out[b + 1:b2]) == (inner, ()):
                            span = b2
                            break
                    ok = span is not None
                    if ok:
                        blocks = layout.reshape(d, inner)
                        for row in blocks:
                            for a in row[1:]:
                                self.atoms.union(row[0], a)
                        new = blocks[:, 0].copy()
                else:
                    ok = False
                if ok and b not in busy:
                    if target is not None:
                        entry, where = target[b] if b < len(target) else (None, None)
                        if isinstance(entry, int) and entry == 0 and not (d == c and b == axis):
                            ok = False
                        elif isinstance(entry, int) and entry > 0 and where is not None:
                            self._add("shape", where[0], where[1], where[2], new)
                        elif isinstance(entry, int) and entry > 0:
                            ok = False  # held by a target other nodes read too
                        elif not isinstance(entry, int):
                            ok = False  # a dim read at run time cannot follow the pruning
                    if ok:
                        busy[b] = axis
                        self._set(y, b, new)
                        done = True
                break
            if not done:
                self.atoms.freeze(layout, why)

    def _op_MatMul(self, node: gs.Node) -> None:
        """x @ y with both operands computed: the contraction axes must stay aligned, batch
        axes broadcast, rows of x and columns of y pass to the output."""
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.layout(a), self.layout(b)
        if not la and not lb:
            return
        ra, rb, ro = self.rank(a), self.rank(b), self.rank(node.outputs[0])
        if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
            self._freeze_inputs(node, f"MatMul '{node.name}': ranks unknown")
            return
        ka, kb = la.get(ra - 1), lb.get(rb - 2)
        if ka is not None and kb is not None and len(ka) == len(kb):
            for p, q in zip(ka, kb):
                self.atoms.union(p, q)
        elif ka is not None or kb is not None:
            for k in (ka, kb):
                if k is not None:
                    self.atoms.freeze(k, f"MatMul '{node.name}' contracts these channels with untracked ones")
        if ra - 2 in la:
            self._set(node.outputs[0], ro - 2, la[ra - 2])
        if rb - 1 in lb:
            self._set(node.outputs[0], ro - 1, lb[rb - 1])
        batch_a = {axis: lay for axis, lay in la.items() if axis < ra - 2}
        batch_b = {axis: lay for axis, lay in lb.items() if axis < rb - 2}
        if batch_a or batch_b:
            self._batch_axes(node, a, b, ra, rb, ro, batch_a, batch_b)

    def _batch_axes(self, node, a, b, ra, rb, ro, batch_a, batch_b) -> None:
        sa, sb = self.shape(a), self.shape(b)
        for o in range(ro - 2):
            ea = batch_a.get(o - (ro - ra))
            eb = batch_b.get(o - (ro - rb))
            if ea is not None and eb is not None and len(ea) == len(eb):
                for p, q in zip(ea, eb):
                    self.atoms.union(p, q)
                self._set(node.outputs[0], o, ea)
            elif ea is not None or eb is not None:
                other, shp, r = (b, sb, rb) if ea is not None else (a, sa, ra)
                k = o - (ro - r)
                if k < 0 or (shp is not None and shp[k] == 1):
                    self._set(node.outputs[0], o, ea if ea is not None else eb)
                else:
                    self.atoms.freeze(ea if ea is not None else eb,
                                      f"MatMul '{node.name}' ties a batch axis to untracked channels")

    # -- groups --------------------------------------------------------------------------------
    def _groups(self) -> list[Group]:
        """Connected components of the graph of layer outputs and atom classes."""
        g = nx.Graph()
        classes_of = {}
        for name, (node, atoms) in self.producers.items():
            roots = self.atoms.roots(atoms)
            classes_of[name] = roots
            g.add_node(("layer", name))
            for c in np.unique(roots):
                g.add_edge(("layer", name), ("class", int(c)))
        self.dependency_graph = g
        groups = []
        member_index = defaultdict(list)
        for m in self.members:
            for c in np.unique(self.atoms.roots(m.layout)):
                member_index[int(c)].append(m)
        block_index = defaultdict(list)
        for bi, blocks in enumerate(self.blocks):
            for c in np.unique(self.atoms.roots(np.concatenate(blocks))):
                block_index[int(c)].append(bi)
        for comp in nx.connected_components(g):
            layers = sorted(n[1] for n in comp if n[0] == "layer")
            classes = np.array(sorted(n[1] for n in comp if n[0] == "class"), dtype=np.int64)
            if not len(classes):
                continue
            first = classes_of[layers[0]]
            width = np.array([(first == c).sum() for c in classes], dtype=np.int64)
            frozen = np.array([self.atoms.reason(int(c)) is not None for c in classes])
            reasons = sorted({self.atoms.reason(int(c)) for c in classes[frozen]})
            members, seen = [], set()
            for c in classes:
                for m in member_index[int(c)]:
                    if id(m) not in seen:
                        seen.add(id(m))
                        members.append(m)
            blocks = None
            bis = sorted({bi for c in classes for bi in block_index[int(c)]})
            if bis:
                blocks, why = self._block_constraint(bis, set(int(c) for c in classes))
                if why:
                    frozen[:] = True
                    reasons.append(why)
            groups.append(Group(len(groups), layers, classes, width, frozen, reasons, blocks, members))
        return groups

    def _block_constraint(self, indices: list[int], classes: set[int]) -> tuple[list[np.ndarray] | None, str | None]:
        """One partition of the group's classes into equal blocks that every grouped conv of
        the group agrees on, or the reason there is none."""
        partitions = []
        for bi in indices:
            blocks = [np.unique(self.atoms.roots(b)) for b in self.blocks[bi]]
            partitions.append(blocks)
        first = partitions[0]
        key = sorted(tuple(b) for b in first)
        for other in partitions[1:]:
            if sorted(tuple(b) for b in other) != key:
                return None, "grouped convolutions of this group split its channels differently"
        union = set(int(c) for b in first for c in b)
        if union != classes or len({len(b) for b in first}) != 1:
            return None, "grouped convolution blocks do not cover the group evenly"
        return first, None

    # -- rewriting -----------------------------------------------------------------------------
    def apply(self, removed) -> dict:
        """Rewrite every member for the removed atom classes; update tensor shapes.

        Returns counts of what was rewritten. The caller checked the choice is legal
        (no frozen class, blocks kept even)."""
        removed = set(int(c) for c in removed)
        if not removed:
            return {"members": 0}
        names = NameTable.of(self.graph)
        root_cache: dict[int, np.ndarray] = {}

        def keep(layout: np.ndarray) -> np.ndarray:
            key = id(layout)
            if key not in root_cache:
                root_cache[key] = self.atoms.roots(layout)
            return np.array([c not in removed for c in root_cache[key]], dtype=bool)

        touched = 0
        for kind in KINDS:
            for m in self.members:
                if m.kind != kind:
                    continue
                mask = keep(m.layout)
                if mask.all():
                    continue
                touched += 1
                getattr(self, "_apply_" + kind.replace("-", "_"))(m, mask, names)
        for name, axes in self.layouts.items():
            t = self.tensors.get(name)
            if t is None or t.shape is None:
                continue
            shape = list(t.shape)
            for axis, layout in axes.items():
                if axis < len(shape) and isinstance(shape[axis], (int, np.integer)):
                    shape[axis] = int(keep(layout).sum())
            t.shape = shape
        return {"members": touched}

    def _replace(self, m: Member, values: np.ndarray, names: NameTable) -> None:
        t = m.node.inputs[m.index]
        if isinstance(t, gs.Constant) and len(t.outputs) == 1:
            t.values = np.ascontiguousarray(values)
        else:
            replace_input(m.node, t, new_constant(names, t.name, values))

    def _value(self, m: Member) -> np.ndarray:
        return constant_value(m.node.inputs[m.index])

    def _apply_out(self, m, mask, names):
        self._replace(m, np.compress(mask, self._value(m), axis=m.axis), names)

    _apply_param = _apply_out
    _apply_in = _apply_out

    def _apply_depthwise(self, m, mask, names):
        self._apply_out(m, mask, names)
        m.node.attrs["group"] = int(mask.sum())

    def _apply_grouped_in(self, m, mask, names):
        w = self._value(m)
        g = m.extra["groups"]
        per_in = len(mask) // g
        rows = w.shape[0] // g
        parts = []
        for j in range(g):
            cols = np.flatnonzero(mask[j * per_in:(j + 1) * per_in])
            parts.append(np.take(w[j * rows:(j + 1) * rows], cols, axis=1))
        self._replace(m, np.concatenate(parts, axis=0), names)

    def _apply_shape(self, m, mask, names):
        v = self._value(m).copy()
        v.reshape(-1)[m.axis] = int(mask.sum())
        self._replace(m, v, names)

    def _apply_split(self, m, mask, names):
        offsets = np.cumsum([0] + m.extra["sizes"])
        new = [int(mask[lo:hi].sum()) for lo, hi in zip(offsets[:-1], offsets[1:])]
        if "split" in m.node.attrs or (self.graph.opset or 13) < 13:  # an attribute before opset 13
            m.node.attrs["split"] = new
        elif len(m.node.inputs) > 1 and m.node.inputs[1].name:
            replace_input(m.node, m.node.inputs[1], new_constant(names, m.node.inputs[1].name,
                                                                 np.array(new, dtype=np.int64)))
        else:  # equal split made explicit
            m.node.inputs.append(new_constant(names, f"{m.node.name}_split", np.array(new, dtype=np.int64)))
            m.node.attrs.pop("num_outputs", None)

    def _apply_slice(self, m, mask, names):
        k, lo, hi = m.extra["position"], m.extra["start"], m.extra["end"]
        start = int(mask[:lo].sum())
        end = start + int(mask[lo:hi].sum())
        for index, value in ((1, start), (2, end)):
            old = constant_value(m.node.inputs[index]).copy()
            old = old.astype(np.int64)
            old.reshape(-1)[k] = value
            replace_input(m.node, m.node.inputs[index], new_constant(names, m.node.inputs[index].name, old))


def channel_graph(model, ctx=None) -> ChannelGraph:
    """The channel-dependency analysis of ``model``'s main graph (shapes from ``ctx`` when
    given, else inferred here)."""
    if ctx is not None:
        shapes = ctx.analysis("shapes", model)
    else:
        from onnxopt.analysis.shapes import infer_shapes

        shapes = infer_shapes(model, None)
    return ChannelGraph(model.graph, shapes)


def kept_count(n: int, ratio: float, multiple: int = 1, min_keep: int = 1) -> int:
    """How many of ``n`` channels to keep when removing ``ratio`` of them: rounded to the
    nearest ``multiple`` (at least one multiple and ``min_keep``), never more than n."""
    want = n * (1.0 - ratio)
    keep = max(multiple, int(math.floor(want / multiple + 0.5)) * multiple)
    keep = max(keep, min_keep)
    return min(n, keep)
