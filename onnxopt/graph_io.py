"""PLACEHOLDER by the lead so the core can run; helper-2 owns and replaces this file."""
import onnx
import onnx_graphsurgeon as gs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = template.ir_version
    del out.opset_import[:]
    out.opset_import.extend(template.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(template.metadata_props)
    out.producer_name, out.producer_version = template.producer_name, template.producer_version
    return out
