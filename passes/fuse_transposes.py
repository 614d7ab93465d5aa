"""fuse-transposes: a Transpose of a Transpose becomes one Transpose, or none.

``Transpose(Transpose(x, p1), p2)`` reads dim ``p1[p2[i]]`` of x into dim i, so the pair is
``Transpose(x, p)`` with ``p[i] = p1[p2[i]]``. A missing ``perm`` means reversed dims; two
reversals compose to the identity at any rank, and one reversal takes its rank from the
other perm.

When ``p`` is the identity the pair disappears: readers of the second Transpose read x
directly. If the second Transpose writes a graph output, an Identity keeps that output's
name (graph output names never change).

When the first Transpose has other readers it stays. Rewriting the second one then saves
work only if the composition is the identity, or if every reader of the first Transpose
is itself a Transpose (all of them get rewritten and the first one dies); otherwise the
rewrite would swap one Transpose for another, so it is refused with a reason.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from onnxopt.analysis.use_def import is_op, producer_op
from onnxopt.ir.names import fresh_name
from onnxopt.ir.rewrite import RewritePass, RewriteRule
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


def compose(p1: list[int] | None, p2: list[int] | None) -> list[int] | None:
    """perm of Transpose(Transpose(x, p1), p2); None means "reverse" (only when both are None)."""
    if p1 is None and p2 is None:
        return None  # reverse twice: identity at any rank, handled by the caller
    rank = len(p1 if p1 is not None else p2)
    p1 = list(p1) if p1 is not None else list(range(rank - 1, -1, -1))
    p2 = list(p2) if p2 is not None else list(range(rank - 1, -1, -1))
    return [p1[i] for i in p2]


def _perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    return [int(i) for i in perm] if perm is not None else None


class FoldTransposePair(RewriteRule):
    """Transpose(Transpose(x, p1), p2) -> Transpose(x, p1∘p2), or x when that is the identity."""

    name = "transpose-pair"
    root_ops = ("Transpose",)

    def match(self, node, graph):
        if not is_op(node, "Transpose"):
            return None
        first = producer_op(node, 0, "Transpose")
        if first is None:
            return None
        return {"first": first, "second": node}

    def check(self, match, model, ctx):
        first, second, graph = match["first"], match["second"], match["graph"]
        p1, p2 = _perm(first), _perm(second)
        if p1 is not None and p2 is not None and len(p1) != len(p2):
            return "perm ranks differ"
        perm = compose(p1, p2)
        identity = perm is None or perm == list(range(len(perm)))
        match["perm"], match["identity"] = perm, identity
        mid = first.outputs[0]
        shared = len(mid.outputs) > 1 or any(t is mid for t in graph.outputs)
        if shared and not identity:
            if any(t is mid for t in graph.outputs) or not all(is_op(r, "Transpose") for r in mid.outputs):
                return "first Transpose has other readers and the pair is not the identity"
        return None

    def rewrite(self, match, graph):
        first, second = match["first"], match["second"]
        x, out = first.inputs[0], second.outputs[0]
        if not match["identity"]:
            fused = gs.Node("Transpose", name=fresh_name(graph, second.name or "transpose"),
                            attrs={"perm": match["perm"]}, inputs=[x])
            take_outputs(second, fused)
            return [fused]
        if any(t is out for t in graph.outputs):
            keep = gs.Node("Identity", name=fresh_name(graph, second.name or "identity"), inputs=[x])
            take_outputs(second, keep)
            return [keep]
        for reader in list(out.outputs):
            for i, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[i] = x
        return None


@register_pass("fuse-transposes")
class FuseTransposesPass(RewritePass):
    """Merge consecutive Transposes into one, and drop pairs that cancel."""

    lossless = True
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the fused Transpose writes the same tensor
    requires_ops = frozenset({"Transpose"})
    rules = (FoldTransposePair(),)
