"""push-transposes: move Transposes down through the ops that commute with them, until they cancel.

Models converted from TensorFlow or Caffe (and PyTorch code written channels-last) wrap
every Conv in a pair of layout Transposes: NHWC -> Transpose(0,3,1,2) -> Conv ->
Transpose(0,2,3,1) -> per-channel Sub/Mul/Add, Relu, residual Add -> Transpose(0,3,1,2)
-> next Conv. Pushing each Transpose after the ops in between (which then work in the
other layout) brings it next to its inverse, and the pair cancels; the per-channel
constants end up as [1, C, 1, 1], where fuse-conv-bn folds them into the Conv. This is
onnxruntime's transpose optimizer, written for onnxopt's graph.

How. One forward walk in graph order. For a node with a handler whose data input comes
from a Transpose with permutation ``p``, the node is rewritten to read the Transpose's
input instead (its other data inputs get the inverse permutation: constants are
transposed as data, reshaped to full rank first when they broadcast; a Transpose with
``p`` is skipped; anything else gets a new Transpose), its axis attributes are mapped
through ``p``, and its outputs are written through a new Transpose (``p``, or the
permutation left after a reduction drops axes), so the tensors keep their names, shapes
and readers. That new Transpose meets the next node later in the walk. A Transpose that
reads the inverse Transpose's output becomes nothing.

When. Only when it pays, with onnxruntime's cost rule: each data input costs 0 if it is
a constant or a single element, -r if it comes from a Transpose with ``p`` whose readers
all have handlers (it will disappear), 0 if from another Transpose (the two compose), +r
otherwise (a new Transpose), where r is the number of dims that are not 1 (5 when the
shape is unknown); if that is negative, the output adds its largest r unless a chain of
handled ops leads from it to a Transpose (it will cancel there). Push iff the total is
negative: repeated runs cannot move a Transpose back and forth.

Handlers (default domain): elementwise unary ops (activations, Cast, Clip, Erf, ...),
broadcasting ops (Add ... Where, PRelu, Max/Min/Sum/Mean; a non-constant input of lower
rank refuses), Reduce* and ArgMax/ArgMin (axes and keepdims, attribute or input),
Concat, Split, Softmax/LogSoftmax/Hardmax from opset 13, Pad from opset 11 (without
``axes``), Slice from opset 10, Quantize/DequantizeLinear (per-tensor, or per-axis with
the axis mapped). Never: Conv, pools, BatchNormalization, Resize and the other ops that
care about the layout. Graph outputs keep their names and layout (the last Transpose
stays). Runs in every graph; If/Loop/Scan bodies too.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_op
from onnxopt.ir.constants import constant_tensor, constant_value
from onnxopt.ir.names import NameTable
from onnxopt.ir.surgery import detach_nodes, topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil", "Celu",
    "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round",
    "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan",
    "Tanh", "ThresholdedRelu", "Clip", "CastLike",
})
BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
AXIS_OPS = frozenset({"Concat", "Split", "Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin"})
HANDLED = UNARY | BROADCAST | REDUCE | AXIS_OPS | {"Pad", "Slice", "QuantizeLinear", "DequantizeLinear"}


def invert(p: list[int]) -> list[int]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return inv


@dataclass
class Plan:
    """What a push through one node changes, decided before anything is edited."""

    data: list[int]  # inputs that carry the permuted layout
    out_perms: list[list[int] | None]  # per output: the Transpose to write it through
    attrs: dict = field(default_factory=dict)  # attribute -> new value
    constants: dict = field(default_factory=dict)  # input index -> new constant array


def _perm_of(node: gs.Node, rank: int | None) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is None:
        return None if rank is None else list(range(rank))[::-1]
    perm = [int(a) for a in perm]
    return perm if sorted(perm) == list(range(len(perm))) else None


class _Pusher:
    def __init__(self, model, facts, names: NameTable, stats: Counter):
        self.model, self.facts, self.names, self.stats = model, facts, names, stats
        self.opset = model.opset
        self.ranks: dict[int, int] = {}  # id(tensor) -> rank, for tensors made here

    # -- facts ---------------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        return self.facts.shape(t.name) if t.name else None

    def rank(self, t: gs.Tensor) -> int | None:
        if id(t) in self.ranks:
            return self.ranks[id(t)]
        s = self.shape(t)
        return None if s is None else len(s)

    def weight(self, t: gs.Tensor) -> int:
        """r: dims that are not 1 (5 when unknown), the cost of transposing ``t``."""
        s = self.shape(t)
        if s is None:
            return 5
        return sum(1 for d in s if d != 1)

    def single_element(self, t: gs.Tensor) -> bool:
        s = self.shape(t)
        return s is not None and all(d == 1 for d in s)

    # -- plans ---------------------------------------------------------------------------
    def plan(self, node: gs.Node, p: list[int]) -> Plan | None:
        r = len(p)
        op = node.op
        live = [o for o in node.outputs if o.name]
        if op in UNARY:
            return Plan([0], [p])
        if op in BROADCAST:
            data, constants = [], {}
            for i, t in enumerate(node.inputs):
                if not t.name:
                    continue
                tr = self.rank(t)
                value = constant_value(t) if constant_tensor(t) is not None else None
                if value is not None:
                    if value.size == 1 and value.ndim <= r:
                        continue  # broadcasts the same in any layout
                    if value.ndim > r:
                        return None
                    full = value.reshape((1,) * (r - value.ndim) + value.shape)
                    constants[i] = np.ascontiguousarray(np.transpose(full, invert(p)))
                    continue
                if tr is None or tr != r:
                    if self.single_element(t):
                        continue
                    return None
                data.append(i)
            if op == "PRelu" and 0 not in data:
                return None
            return Plan(data, [p], constants=constants)
        if op in REDUCE:
            return self.plan_reduce(node, p)
        if op in ("ArgMax", "ArgMin"):
            axis = int(node.attrs.get("axis", 0)) % r
            keep = int(node.attrs.get("keepdims", 1))
            return Plan([0], [p if keep else _squeezed(p, [axis])], attrs={"axis": p[axis]})
        if op == "Concat":
            if any(self.rank(t) != r for t in node.inputs if t.name):
                return None
            axis = int(node.attrs.get("axis", 0)) % r
            return Plan([i for i, t in enumerate(node.inputs) if t.name], [p], attrs={"axis": p[axis]})
        if op == "Split":
            axis = int(node.attrs.get("axis", 0)) % r
            return Plan([0], [p] * len(node.outputs), attrs={"axis": p[axis]})
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            if self.opset < 13:
                return None
            axis = int(node.attrs.get("axis", -1)) % r
            return Plan([0], [p], attrs={"axis": p[axis]})
        if op == "Pad":
            return self.plan_pad(node, p)
        if op == "Slice":
            return self.plan_slice(node, p)
        if op in ("QuantizeLinear", "DequantizeLinear"):
            scale = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if scale is None or len(live) != 1:
                return None
            if scale.size == 1 and scale.ndim <= 1:
                return Plan([0], [p])
            if scale.ndim != 1 or node.attrs.get("block_size", 0):
                return None
            axis = int(node.attrs.get("axis", 1)) % r
            return Plan([0], [p], attrs={"axis": p[axis]})
        return None

    def plan_reduce(self, node: gs.Node, p: list[int]) -> Plan | None:
        r = len(p)
        attr_axes = self.opset < (13 if node.op == "ReduceSum" else 18)
        constants = {}
        if attr_axes:
            axes = node.attrs.get("axes")
        elif len(node.inputs) > 1 and node.inputs[1].name:
            value = constant_value(node.inputs[1])
            if value is None:
                return None
            axes = [int(a) for a in value.reshape(-1)]
        else:
            axes = None
        keep = int(node.attrs.get("keepdims", 1))
        if not axes:
            if not attr_axes and node.attrs.get("noop_with_empty_axes", 0):
                return Plan([0], [p])
            return Plan([0], [p if keep else None])  # every axis: any layout
        axes = [int(a) % r for a in axes]
        new_axes = sorted(p[a] for a in axes)
        attrs = {}
        if attr_axes:
            attrs["axes"] = new_axes
        else:
            constants[1] = np.array(new_axes, dtype=np.int64)
        return Plan([0], [p if keep else _squeezed(p, axes)], attrs=attrs, constants=constants)

    def plan_pad(self, node: gs.Node, p: list[int]) -> Plan | None:
        r = len(p)
        if self.opset < 11 or (len(node.inputs) > 3 and node.inputs[3].name):
            return None
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or pads.size != 2 * r:
            return None
        pads = [int(v) for v in pads.reshape(-1)]
        new = [0] * (2 * r)
        for k in range(r):
            new[p[k]], new[p[k] + r] = pads[k], pads[k + r]
        return Plan([0], [p], constants={1: np.array(new, dtype=np.int64)})

    def plan_slice(self, node: gs.Node, p: list[int]) -> Plan | None:
        r = len(p)
        if self.opset < 10 or len(node.inputs) < 3:
            return None
        starts = constant_value(node.inputs[1])
        if starts is None:
            return None
        if len(node.inputs) > 3 and node.inputs[3].name:
            axes = constant_value(node.inputs[3])
            if axes is None:
                return None
            axes = [int(a) for a in axes.reshape(-1)]
            dtype = constant_value(node.inputs[3]).dtype
        else:
            axes = list(range(starts.size))
            dtype = np.int64
        return Plan([0], [p], constants={3: np.array([p[a % r] for a in axes], dtype=dtype)})

    # -- the walk ------------------------------------------------------------------------
    def run(self, graph: gs.Graph) -> None:
        outputs = {id(t) for t in graph.outputs}
        leads = self.leads_to_transpose(graph)
        placed: dict[int, tuple] = {}  # id(node) -> (Transposes before it, Transposes after it)
        for node in topological_order(graph):
            if is_op(node, "Transpose"):
                self.cancel(node, outputs)
                continue
            if node.op not in HANDLED or node.domain not in (None, "", "ai.onnx"):
                continue
            for t in node.inputs:
                prod = t.inputs[0] if t.inputs else None
                if prod is None or not is_op(prod, "Transpose"):
                    continue
                p = _perm_of(prod, self.rank(prod.inputs[0]))
                if p is None:
                    continue
                plan = self.plan(node, p)
                if plan is None or not any(node.inputs[i] is t for i in plan.data):
                    continue
                if self.cost(node, p, plan, leads, outputs) >= 0:
                    self.stats["not_worth_it"] += 1
                    continue
                placed[id(node)] = self.rewrite(node, p, plan)
                self.stats[f"pushed_through_{node.op}"] += 1
                break
        if placed or self.stats["cancelled_pairs"]:
            order = []
            for node in graph.nodes:
                before, after = placed.get(id(node), ((), ()))
                order.extend(before)
                order.append(node)
                order.extend(after)
            graph.nodes = self.without_dead_transposes(order, outputs)

    @staticmethod
    def without_dead_transposes(nodes: list[gs.Node], outputs: set[int]) -> list[gs.Node]:
        """``nodes`` less the Transposes nothing reads any more (the ones pushing bypassed),
        so the ops that needed a single reader (fuse-conv-bn) see one at once."""
        dead: set[int] = set()
        for node in reversed(nodes):
            if is_op(node, "Transpose") and not any(
                    id(t) in outputs or any(id(r) not in dead for r in t.outputs) for t in node.outputs):
                dead.add(id(node))
        gone = [n for n in nodes if id(n) in dead]
        detach_nodes(gone)
        return [n for n in nodes if id(n) not in dead]

    def leads_to_transpose(self, graph: gs.Graph) -> set[int]:
        """ids of tensors from which a chain of handled ops reaches a Transpose, or a
        reduction that drops axes (it usually absorbs the permutation: NHWC -> mean over
        H, W -> [N, C] is the same in either layout)."""
        leads: set[int] = set()
        for node in reversed(topological_order(graph)):
            for out in node.outputs:
                for reader in out.outputs:
                    sink = is_op(reader, "Transpose") or (
                        reader.op in REDUCE and not int(reader.attrs.get("keepdims", 1)))
                    if sink or (reader.op in HANDLED and any(id(o) in leads for o in reader.outputs)):
                        leads.add(id(out))
                        break
        return leads

    def cost(self, node: gs.Node, p: list[int], plan: Plan, leads: set[int], outputs: set[int]) -> int:
        total = 0
        for i in plan.data:
            t = node.inputs[i]
            prod = t.inputs[0] if t.inputs else None
            if constant_tensor(t) is not None or self.single_element(t):
                continue
            if prod is not None and is_op(prod, "Transpose"):
                q = _perm_of(prod, self.rank(prod.inputs[0]))
                if q == p and id(t) not in outputs and all(
                        (r.op in HANDLED or r.op == "Transpose") and r.domain in (None, "", "ai.onnx")
                        for r in t.outputs):
                    total -= self.weight(t)
                continue
            total += self.weight(t)
        if total < 0:
            extra = [self.weight(o) for o, q in zip(node.outputs, plan.out_perms)
                     if o.name and q is not None and q != list(range(len(q))) and id(o) not in leads]
            total += max(extra, default=0)
        return total

    def rewrite(self, node: gs.Node, p: list[int], plan: Plan) -> tuple[list[gs.Node], list[gs.Node]]:
        """Rewrite ``node`` per ``plan``; returns the Transposes to place before and after it."""
        inv = invert(p)
        before: list[gs.Node] = []
        for i in plan.data:
            t = node.inputs[i]
            prod = t.inputs[0] if t.inputs else None
            if prod is not None and is_op(prod, "Transpose") and _perm_of(prod, self.rank(prod.inputs[0])) == p:
                node.inputs[i] = prod.inputs[0]
                continue
            moved = gs.Variable(self.names(f"{t.name}_layout"))
            self.ranks[id(moved)] = len(p)
            before.append(gs.Node("Transpose", name=self.names(f"{node.name or t.name}_in{i}_transpose"),
                                  attrs={"perm": inv}, inputs=[t], outputs=[moved]))
            node.inputs[i] = moved
        for i, array in plan.constants.items():
            const = gs.Constant(self.names(f"{node.name or node.op}_c{i}_layout"), array)
            if i < len(node.inputs):
                node.inputs[i] = const
            else:
                while len(node.inputs) < i:
                    node.inputs.append(gs.Variable.empty())
                node.inputs.append(const)
        node.attrs.update(plan.attrs)
        after = []
        for k, (out, q) in enumerate(zip(list(node.outputs), plan.out_perms)):
            if not out.name or q is None or q == list(range(len(q))):
                continue  # q None: a full reduction, the same in any layout
            inner = gs.Variable(self.names(f"{out.name}_layout"), dtype=getattr(out, "dtype", None))
            self.ranks[id(inner)] = len(q)
            node.outputs[k] = inner
            after.append(gs.Node("Transpose", name=self.names(f"{node.name or out.name}_out{k}_transpose"),
                                 attrs={"perm": list(q)}, inputs=[inner], outputs=[out]))
        return before, after

    def cancel(self, node: gs.Node, outputs: set[int]) -> None:
        """Transpose(Transpose(x, p), p^-1): readers of the second read x."""
        src = node.inputs[0] if node.inputs else None
        prod = src.inputs[0] if src is not None and src.inputs else None
        if prod is None or not is_op(prod, "Transpose"):
            return
        rank = self.rank(prod.inputs[0])
        p, q = _perm_of(prod, rank), _perm_of(node, rank)
        if p is None or q is None or len(p) != len(q) or [p[i] for i in q] != list(range(len(p))):
            return
        out = node.outputs[0]
        if id(out) in outputs:
            return  # a graph output keeps its producer (fuse-transposes leaves an Identity)
        x = prod.inputs[0]
        for reader in list(out.outputs):
            for i, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[i] = x
        self.stats["cancelled_pairs"] += 1


def _squeezed(p: list[int], axes: list[int]) -> list[int]:
    """The permutation left after reducing ``axes`` (in y's coordinates) with keepdims=0."""
    removed = {p[a] for a in axes}
    kept_x = [a for a in range(len(p)) if a not in removed]
    position = {a: i for i, a in enumerate(kept_x)}
    return [position[p[k]] for k in range(len(p)) if k not in axes]


@register_pass("push-transposes")
class PushTransposesPass(Pass):
    """Push Transposes down through ops that commute with them until inverse pairs cancel."""

    lossless = True
    requires_ops = frozenset({"Transpose"})

    def run(self, model, ctx) -> PassResult:
        facts = ctx.analysis("symbolic-shapes", model)
        stats: Counter = Counter()
        names = NameTable.of(model.graph)
        for graph in model.graphs():
            _Pusher(model, facts, names, stats).run(graph)
        changed = any(k.startswith("pushed_through") or k == "cancelled_pairs" for k in stats)
        return PassResult(changed=changed, stats=dict(sorted(stats.items())))
