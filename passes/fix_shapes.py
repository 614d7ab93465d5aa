"""fix-shapes: give graph inputs fixed shapes and write the shapes that follow through the graph.

``shapes=['image:1,3,224,224', …]`` (what ``optimize --input-shape`` passes) sets the shape
of each named graph input; a dim the model already fixes must agree, and the rank must match.
Then ONNX shape inference runs on the graph and every tensor whose shape it now knows to be
static gets that shape (graph outputs included, where the model left a dim symbolic or
unknown): the Shape/Size nodes that read them become constant for `fold-constants` (and the
symbolic-shape folding of the lossless passes) to remove, and targets that need static
shapes (``capabilities.static_shapes``) can run the model. Shapes are only ever written from
inference, never trusted from the exporter's declarations: a declared shape that inference
cannot confirm is left as it was.

Without ``shapes`` the pass only propagates the shapes the inputs already fix. Counted as
lossy (``lossless = False``) because the model then refuses inputs of other shapes, so
``--verify`` cannot compare it on the original's sample inputs; on inputs of the fixed shapes
its outputs are those of the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import is_static
from onnxopt.errors import UsageError
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass


@register_pass("fix-shapes")
class FixShapesPass(Pass):
    """Fix graph input shapes (NAME:D1,D2,…) and write the static shapes that follow."""

    lossless = False  # the model refuses other input shapes afterwards (see the module doc)

    @dataclass
    class Options:
        shapes: list[str] = option([], "input shapes as NAME:D1,D2,… (or NAME:D1xD2x…), one per input")

    def run(self, model, ctx) -> PassResult:
        from onnxopt.analysis.cost import parse_input_shapes

        wanted = parse_input_shapes(self.options.shapes)
        graph = model.graph
        fixed = self._fix_inputs(graph, wanted)
        propagated = self._propagate(model, graph)
        dynamic = sorted(t.name for t in graph.tensors().values()
                         if isinstance(t, gs.Variable) and t.name and not is_static(t.shape))
        stats = {"inputs_fixed": fixed, "shapes_written": propagated, "still_dynamic": len(dynamic)}
        if dynamic:
            stats["still_dynamic_examples"] = dynamic[:5]
        return PassResult(changed=fixed + propagated > 0, stats=stats)

    @staticmethod
    def _fix_inputs(graph: gs.Graph, wanted: dict[str, list[int]]) -> int:
        inputs = {t.name: t for t in graph.inputs}
        unknown = sorted(set(wanted) - set(inputs))
        if unknown:
            raise UsageError(f"fix-shapes: no graph input named {', '.join(map(repr, unknown))} "
                             f"(inputs: {', '.join(inputs)})")
        fixed = 0
        for name, dims in wanted.items():
            t = inputs[name]
            declared = list(t.shape) if t.shape is not None else None
            if declared is not None and len(declared) != len(dims):
                raise UsageError(f"fix-shapes: input '{name}' has rank {len(declared)} ({declared}), the shape "
                                 f"given has {len(dims)} dims ({dims})")
            for axis, (old, new) in enumerate(zip(declared or [], dims)):
                if isinstance(old, int) and old > 0 and old != new:
                    raise UsageError(f"fix-shapes: input '{name}' has {old} at dim {axis} in the model; "
                                     f"the shape given says {new} ({dims})")
            if declared != dims:
                t.shape = list(dims)
                fixed += 1
        return fixed

    @staticmethod
    def _propagate(model, graph: gs.Graph) -> int:
        """Write inferred static shapes on tensors whose shape is not static yet. Their declared
        shapes are hidden from inference meanwhile: a stale or wrong declaration (an exporter's
        -1) would otherwise be merged into what inference finds."""
        from onnxopt.analysis.shapes import tensor_infos

        inputs = {id(t) for t in graph.inputs}
        open_ = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and t.name
                 and id(t) not in inputs and not is_static(t.shape)]
        declared = {id(t): t.shape for t in open_}
        for t in open_:
            t.shape = None
        try:
            infos = tensor_infos(model.export())
        finally:
            for t in open_:
                t.shape = declared[id(t)]
        written = 0
        for t in open_:
            info = infos.get(t.name)
            if info is None or not is_static(info.shape):
                continue
            if t.shape is not None and len(t.shape) != len(info.shape):
                continue  # inference disagrees with the declared rank: leave it for a human
            t.shape = list(info.shape)
            if t.dtype is None and info.dtype is not None:
                t.dtype = info.dtype
            written += 1
        return written
