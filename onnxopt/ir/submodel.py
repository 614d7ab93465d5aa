"""A small model of a few nodes of a graph, to run them alone in onnxruntime.

Constant folding evaluates batches of nodes this way, and the fidelity floor re-runs one
layer in float on the inputs it saw in a quantized model. Each input the nodes read (and
do not compute themselves) is either an initializer (``constants``) or a typed graph input
(``inputs``: name -> an example array, for its type and shape); every output they write is
an output of the small model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def submodel(nodes: list[gs.Node], constants: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
             opset_import, ir_version: int) -> onnx.ModelProto:
    """The model of ``nodes`` (producers first) with ``constants`` as initializers and
    ``inputs`` as graph inputs (typed from their example arrays)."""
    from onnxopt.ir.graph_io import export_node

    initializers = [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()]
    graph_inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                       value.shape) for name, value in inputs.items()]
    outputs = []
    for node in nodes:
        for o in node.outputs:
            if o.name:
                vi = onnx.ValueInfoProto()
                vi.name = o.name  # no type: onnxruntime returns it as computed
                outputs.append(vi)
    graph = onnx.helper.make_graph([export_node(n) for n in nodes], "submodel", graph_inputs, outputs,
                                   initializer=initializers)
    proto = onnx.helper.make_model(graph, opset_imports=list(opset_import))
    proto.ir_version = ir_version
    return proto
