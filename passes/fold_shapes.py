"""fold-shapes: shape computations on symbolic dims, rewritten from the symbolic shape analysis.

Exporters compute Reshape targets, Expand shapes and the like from ``Shape`` of a tensor
with a dynamic batch (or height, or sequence) axis: Shape -> Gather -> Unsqueeze -> Concat
chains, often with arithmetic (``batch * 12``). ``fold-constants`` folds what is fully
known; this pass handles what stays symbolic, reading the ``symbolic-shapes`` analysis
(which never trusts declared shapes):

reshape-target
    A Reshape whose target is computed (not constant) and whose value the analysis knows
    element by element gets a constant target: a known number stays; an element equal to
    the data input's dim at the same position becomes 0 ("copy that dim"; only with
    ``allowzero`` = 0); at most one other element becomes -1 ("infer it"). [batch, 197,
    3, 12, 64] for data of shape [batch, 197, 2304] becomes [0, 197, 3, 12, 64];
    [12*batch, 197, 64] becomes [-1, 197, 64]. The chain that computed the target dies.
    Assumed, as every peer does: where a -1 replaces a symbolic element, the product of the
    other dims is not 0 at run time (an empty batch would make the -1 ambiguous).

reshape-chain
    Two reshape-like nodes in a row (Reshape, Flatten, Squeeze, Unsqueeze, and a Transpose
    that only moves dims of size 1, which keeps the elements in order), the first read only
    by the second, become one Reshape of the first one's input, to a constant target built
    as above from the second one's output shape (LSTM's [T, 2, 1, H] -> Transpose(0,2,1,3)
    -> Reshape [0, 0, -1] is Reshape [0, 1, 256] when the batch is 1).

same-value
    Integer tensors of rank <= 1 computed by nodes whose values the analysis knows to be
    equal (``Shape(x)`` and ``Shape(y)`` of tensors of provably equal shape, a Concat that
    rebuilds a shape piece by piece, the same Gather of two Shapes) are computed once: the
    later one's readers read the first one (in graph order). Graph outputs keep their own.

Both run in the main graph and in every If/Loop/Scan body.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis import dims as D
from onnxopt.analysis.use_def import is_op
from onnxopt.ir.constants import constant_tensor, is_constant
from onnxopt.ir.names import NameTable
from onnxopt.ir.surgery import rewire, topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


def reshape_target(data_shape: tuple | None, value: tuple, allowzero: int) -> list[int] | None:
    """A constant Reshape target with the meaning of the symbolic ``value``, else None."""
    out: list[int] = []
    infer = 0
    for i, e in enumerate(value):
        if type(e) is int:
            if e == -1:
                infer += 1
            out.append(e)
        elif data_shape is not None and i < len(data_shape) and not allowzero and data_shape[i] == e:
            out.append(0)
        elif D.nonneg(e):
            out.append(-1)
            infer += 1
        else:
            return None  # an element that may be 0 or -1 at run time
    return out if infer <= 1 else None


@register_pass("fold-shapes")
class FoldShapesPass(Pass):
    """Turn symbolic Reshape targets into constants (0 copies, -1 infers) and compute equal shape values once."""

    lossless = True
    # symbolic int values start at Shape/Size; the rewrites act on reshape-like ops
    requires_ops = frozenset({"Shape", "Size", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
    # every tensor keeps its shape (a Reshape's output is what its target said it was)
    preserves = frozenset({"shapes", "symbolic-shapes"})

    def run(self, model, ctx) -> PassResult:
        facts = ctx.analysis("symbolic-shapes", model)
        stats: Counter = Counter()
        names = NameTable.of(model.graph)
        for graph in model.graphs():
            outputs = {id(t) for t in graph.outputs}
            order = topological_order(graph)
            for node in order:
                if is_op(node, "Reshape") and len(node.inputs) == 2 and not is_constant(node.inputs[1]):
                    self.fold_reshape(node, facts, names, stats)
            for node in order:
                if node.outputs and self.reshape_like(node, facts):
                    self.merge_chain(node, graph, outputs, facts, names, stats)
            first: dict[tuple, gs.Tensor] = {}
            for node in order:
                if not node.outputs or node.op == "Constant":
                    continue
                for out in node.outputs:
                    key = self.value_key(out, facts)
                    if key is None:
                        continue
                    keep = first.setdefault(key, out)
                    if keep is out or id(out) in outputs or not out.outputs:
                        continue
                    rewire(out, keep)
                    stats["same_value"] += 1
        stats = dict(sorted(stats.items()))
        return PassResult(changed=bool(stats), stats=stats)

    @staticmethod
    def fold_reshape(node: gs.Node, facts, names: NameTable, stats: Counter) -> None:
        target = node.inputs[1]
        value = facts.value(target.name)
        if value is None or all(type(e) is int for e in value):
            return  # unknown, or fold-constants' business
        data_shape = facts.shape(node.inputs[0].name)
        allowzero = int(node.attrs.get("allowzero", 0))
        folded = reshape_target(data_shape, value, allowzero)
        if folded is None:
            stats["reshape_target_kept"] += 1
            return
        const = gs.Constant(names(f"{target.name}_folded"), np.array(folded, dtype=np.int64))
        node.inputs[1] = const
        stats["reshape_target"] += 1

    @staticmethod
    def reshape_like(node: gs.Node, facts) -> bool:
        """Reorders no element: Reshape, Flatten, Squeeze, Unsqueeze, or a Transpose moving
        only dims of size 1."""
        if not node.inputs or len([o for o in node.outputs if o.name]) != 1:
            return False
        if is_op(node, "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            return True
        if not is_op(node, "Transpose"):
            return False
        shape = facts.shape(node.inputs[0].name)
        perm = node.attrs.get("perm")
        if shape is None:
            return False
        perm = list(perm) if perm is not None else list(range(len(shape)))[::-1]
        moved = [a for a in perm if shape[a] != 1]
        return moved == sorted(moved)

    def merge_chain(self, node: gs.Node, graph: gs.Graph, outputs: set, facts, names: NameTable,
                    stats: Counter) -> None:
        """``node`` after another reshape-like node read by nothing else: one Reshape."""
        src = node.inputs[0]
        first = src.inputs[0] if src.inputs else None
        if first is None or not self.reshape_like(first, facts) or len(src.outputs) != 1 or id(src) in outputs:
            return
        if not any(n is first for n in graph.nodes):
            return  # from an enclosing graph
        x, out = first.inputs[0], node.outputs[0]
        in_shape, out_shape = facts.shape(x.name), facts.shape(out.name)
        if in_shape is None or out_shape is None or any(d == 0 for d in out_shape):
            return  # a static 0 would read as "copy" in a Reshape target
        target = reshape_target(in_shape, tuple(out_shape), 0)
        if target is None:
            return
        const = gs.Constant(names(f"{out.name}_shape"), np.array(target, dtype=np.int64))
        # the second node becomes the Reshape (it keeps its output tensor and its place)
        node.op, node.domain = "Reshape", None
        node.attrs.clear()
        node.inputs[0] = x
        if len(node.inputs) > 1:
            node.inputs[1] = const
        else:
            node.inputs.append(const)
        stats["reshape_chain"] += 1

    @staticmethod
    def value_key(t: gs.Tensor, facts) -> tuple | None:
        if not t.name or constant_tensor(t) is not None:
            return None
        value, shape, dtype = facts.value(t.name), facts.shape(t.name), facts.dtype(t.name)
        if value is None or shape is None or dtype is None or dtype.kind not in "iub":
            return None
        return (dtype.str, len(shape), value)
