"""Remove nodes that pass their input through unchanged.

eliminate-identity
    A node is removed, and its consumers read its data input instead, when it is one of
    (default ONNX domain only):

    - ``Identity``;
    - ``Dropout`` in inference: no ``training_mode`` input or a constant false one (opset
      >= 12), ``is_test=1`` or opset >= 7 before that, and its ``mask`` output unused;
    - ``Cast`` to the input's own element type; ``CastLike`` whose two inputs have the same
      element type;
    - ``Transpose`` with the identity permutation (or no ``perm`` on a tensor of rank <= 1);
    - ``Pad`` whose pads are all zero (any mode);
    - ``Tile`` whose repeats are all one;
    - ``Slice`` with positive steps whose output has the input's shape (it can only be
      the whole range), or from 0 to an end of at least 2**62 (exporters' "to the end")
      with steps of 1;
    - ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Expand`` whose output has the
      input's shape.

    Shapes and types come from the ``symbolic-shapes`` analysis (declared shapes are never
    trusted): two shapes are the same when they are provably equal dim by dim, symbolic
    dims included (a Reshape of [batch, 197, 768] to [0, 197, 768] goes).
    - ``Concat``, ``Sum``, ``Max``, ``Min``, ``Mean`` of a single input.

    Graph output names never change. When the removed node writes an output of its graph,
    the producer of its input is made to write that name instead, provided that input is
    computed by a node of the same graph, has no other reader (in this graph or in a body)
    and is no graph output itself; otherwise the node is kept. Bodies of If/Loop/Scan are
    handled the same way (a tensor from the enclosing scope counts as "not produced here").
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import ShapeFacts, symbolic_shapes
from onnxopt.ir.constants import constant_value, is_default_domain
from onnxopt.ir.surgery import detach_nodes, rewire, topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

SAME_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")
SINGLE_INPUT_OPS = ("Concat", "Sum", "Max", "Min", "Mean")


@register_pass("eliminate-identity")
class EliminateIdentityPass(Pass):
    """Remove Identity, inference Dropout and ops that leave their input unchanged."""

    lossless = True
    preserves = frozenset({"shapes", "symbolic-shapes"})  # every remaining tensor keeps its shape and type

    def run(self, model, ctx) -> PassResult:
        # the shapes are computed only if a rule asks (an Identity or a Dropout needs none)
        rules = _Rules(model, lambda: ctx.analysis("symbolic-shapes", model) if ctx is not None
                       else symbolic_shapes(model))
        removed: Counter = Counter()
        kept_for_output = 0
        output_ids = {id(t) for g in model.graphs() for t in g.outputs}
        for graph in list(model.graphs()):
            own = {id(n) for n in graph.nodes}
            gone, gone_nodes = set(), []
            for node in topological_order(graph):
                rule = rules.match(node)
                if rule is None:
                    continue
                src, dst = node.inputs[0], node.outputs[0]
                if id(dst) in output_ids:
                    if not _can_take_over(src, node, own, output_ids, gone):
                        kept_for_output += 1
                        continue
                    producer = src.inputs[0]
                    detach_nodes([node])  # src and dst have no other links
                    slot = next(i for i, t in enumerate(producer.outputs) if t is src)
                    producer.outputs[slot] = dst
                else:
                    rewire(dst, src)
                    gone_nodes.append(node)
                gone.add(id(node))
                removed[rule] += 1
            detach_nodes(gone_nodes)
            if gone:
                graph.nodes[:] = [n for n in graph.nodes if id(n) not in gone]
        stats = dict(sorted(removed.items()))
        stats["removed"] = sum(removed.values())
        if kept_for_output:
            stats["kept_graph_output"] = kept_for_output
        return PassResult(changed=stats["removed"] > 0, stats=stats)


def _can_take_over(src: gs.Tensor, node: gs.Node, own: set, output_ids: set, gone: set) -> bool:
    """May the producer of ``src`` write ``node``'s output name instead (so ``node`` goes)?"""
    if isinstance(src, gs.Constant) or not src.inputs or id(src.inputs[0]) not in own:
        return False  # graph input, initializer or a tensor of an enclosing graph
    if id(src) in output_ids:
        return False
    readers = [u for u in src.outputs if id(u) not in gone]  # removed nodes unlink at the end
    return len(readers) == 1 and readers[0] is node


class _Rules:
    """Which rule (if any) says a node is a no-op."""

    def __init__(self, model, facts: Callable[[], ShapeFacts]):
        self.opset = model.opset
        self._facts = facts
        self._cached: ShapeFacts | None = None

    @property
    def facts(self) -> ShapeFacts:
        if self._cached is None:
            self._cached = self._facts()
        return self._cached

    def match(self, node: gs.Node) -> str | None:
        if not is_default_domain(node) or not node.inputs or not node.outputs:
            return None
        src = node.inputs[0]
        if not src.name:
            return None
        live_outputs = [o for o in node.outputs if o.name]
        op = node.op
        if op == "Dropout":
            return "dropout" if self.inference_dropout(node) else None
        if len(live_outputs) != 1 or node.outputs[0] is not live_outputs[0]:
            return None
        if op == "Identity":
            return "identity"
        if op in SINGLE_INPUT_OPS:
            return f"single_input_{op.lower()}" if len(node.inputs) == 1 else None
        if op == "Cast":
            dtype = self.dtype(src)
            to = node.attrs.get("to")
            if dtype is not None and to is not None and _np_type(to) == dtype:
                return "cast_same_type"
            return None
        if op == "CastLike":
            a, b = self.dtype(src), self.dtype(node.inputs[1])
            return "cast_same_type" if a is not None and a == b else None
        if op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is not None:
                return "transpose_identity" if list(perm) == list(range(len(perm))) else None
            shape = self.shape(src)
            return "transpose_identity" if shape is not None and len(shape) <= 1 else None
        if op == "Pad":
            pads = self.ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
            return "pad_zero" if pads is not None and all(p == 0 for p in pads) else None
        if op == "Tile":
            repeats = self.ints(node.inputs[1]) if len(node.inputs) > 1 else None
            return "tile_ones" if repeats is not None and all(r == 1 for r in repeats) else None
        if op == "Slice":
            if len(node.inputs) > 4 and node.inputs[4].name:
                steps = self.ints(node.inputs[4])
                if steps is None or any(s <= 0 for s in steps):
                    return None
            elif self.opset >= 10 and len(node.inputs) < 3:
                return None
            if self.same_shape(src, node.outputs[0]) or self.slices_everything(node):
                return "slice_whole"
            return None
        if op in SAME_SHAPE_OPS:
            return f"{op.lower()}_same_shape" if self.same_shape(src, node.outputs[0]) else None
        return None

    def slices_everything(self, node: gs.Node) -> bool:
        """Slice from 0 to "the end" (an end of at least 2**62, as exporters write) in steps of 1."""
        if self.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        else:
            starts, ends = self.ints(node.inputs[1]), self.ints(node.inputs[2])
        if len(node.inputs) > 4 and node.inputs[4].name:
            steps = self.ints(node.inputs[4])
            if steps is None or any(s != 1 for s in steps):
                return False
        return (starts is not None and ends is not None and len(starts) == len(ends)
                and all(s == 0 for s in starts) and all(e >= 2**62 for e in ends))

    def inference_dropout(self, node: gs.Node) -> bool:
        if len(node.outputs) > 1:
            mask = node.outputs[1]
            if mask.name and mask.outputs:
                return False
        if len(node.outputs) > 2:
            return False
        if self.opset >= 12:
            if len(node.inputs) > 2 and node.inputs[2].name:
                flag = self.value(node.inputs[2])
                return flag is not None and flag.size == 1 and not bool(flag.reshape(-1)[0])
            return True
        return self.opset >= 7 or node.attrs.get("is_test", 0) == 1

    # -- facts about tensors -------------------------------------------------------------
    def value(self, t: gs.Tensor) -> np.ndarray | None:
        return constant_value(t)

    def ints(self, t: gs.Tensor) -> list[int] | None:
        if not t.name:
            return None
        v = self.value(t)
        return None if v is None or v.dtype.kind not in "iu" else [int(x) for x in v.reshape(-1)]

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        v = self.value(t)
        return v.dtype if v is not None else self.facts.dtype(t.name)

    def shape(self, t: gs.Tensor) -> tuple | None:
        v = self.value(t)
        return tuple(v.shape) if v is not None else self.facts.shape(t.name)

    def same_shape(self, a: gs.Tensor, b: gs.Tensor) -> bool:
        sa, sb = self.shape(a), self.shape(b)
        return sa is not None and sb is not None and tuple(sa) == tuple(sb)


def _np_type(onnx_type: int) -> np.dtype | None:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
    except (KeyError, TypeError, ValueError):
        return None
