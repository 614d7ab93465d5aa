"""graph_io: the ModelProto <-> graphsurgeon Graph round trip keeps everything.

Each test builds a tiny model holding one kind of thing graphsurgeon's own importer or
exporter loses, and checks it survives import + export unchanged (byte-identical when
the graph was not touched), survives ``Graph.copy()`` (the pass manager's snapshot), and
that edits made through the graph are written out correctly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir.graph_io import OnnxGraph, export_model, import_graph
from onnxopt.ir.graphs import iter_graphs

OPSET = 21


def make_model(nodes, inputs, outputs, initializers=(), value_info=(), opset=OPSET, **kwargs):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs),
                              initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = 10
    return model


def roundtrip(model: onnx.ModelProto, edit=None) -> onnx.ModelProto:
    graph = import_graph(model)
    if edit is not None:
        edit(graph)
    return export_model(graph, model)


def rebuilt(model: onnx.ModelProto) -> onnx.ModelProto:
    """Round trip that writes every node afresh instead of reusing its source proto."""
    def forget_snapshots(graph):
        for g in iter_graphs(graph):
            for node in g.nodes:
                node.snapshot = None
    return roundtrip(model, forget_snapshots)


def assert_lossless(model: onnx.ModelProto) -> None:
    """Byte-identical through: plain round trip, fresh node writing, and Graph.copy()."""
    data = model.SerializeToString()
    assert roundtrip(model).SerializeToString() == data
    assert rebuilt(model).SerializeToString() == data
    copied = export_model(import_graph(model).copy(), model)
    assert copied.SerializeToString() == data
    assert model.SerializeToString() == data, "the template was modified"


def run(model: onnx.ModelProto, feeds: dict) -> list:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])


# --------------------------------------------------------------------------- model fields


def test_model_fields_come_from_the_template():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y],
                       producer_name="prod", producer_version="9", doc_string="model doc")
    model.domain = "ai.example"
    model.model_version = 7
    helper.set_model_props(model, {"author": "me", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    func = helper.make_function("com.example", "Twice", ["a"], ["b"],
                                [helper.make_node("Add", ["a", "a"], ["b"])],
                                [helper.make_opsetid("", OPSET)], doc_string="fn doc")
    model.functions.append(func)
    training = model.training_info.add()
    training.algorithm.name = "algo"
    training.update_binding.add(key="w", value="w_new")
    assert_lossless(model)
    out = roundtrip(model)
    assert out.functions[0] == func and out.training_info[0] == training
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "MIT"}
    assert (out.domain, out.model_version, out.ir_version) == ("ai.example", 7, 10)


def test_graph_opset_raise_and_new_domain_are_imported():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], opset=17)

    def edit(graph):
        graph.opset = 19
        graph.nodes[0].domain = "com.microsoft"
    out = roundtrip(model, edit)
    versions = {imp.domain: imp.version for imp in out.opset_import}
    assert versions == {"": 19, "com.microsoft": 1}
    assert model.opset_import[0].version == 17


# --------------------------------------------------------------------------- doc strings, value_info


def test_doc_strings_value_info_and_metadata_are_kept():
    node = helper.make_node("Relu", ["x"], ["h"], name="relu", doc_string="node doc")
    helper.set_metadata_props(node, {"origin": "layer1"})
    node2 = helper.make_node("LeakyRelu", ["h"], ["y"], alpha=0.25)
    node2.attribute[0].doc_string = "attr doc"
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 3], doc_string="hidden")
    h.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    helper.set_metadata_props(h, {"k": "v"})
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None], doc_string="input doc")
    model = make_model([node, node2], [x], [Y], value_info=[h])
    model.graph.doc_string = "graph doc"
    helper.set_metadata_props(model.graph, {"g": "1"})
    assert_lossless(model)

    # A changed shape is written from the graph; the doc string and metadata stay.
    def edit(graph):
        hidden = graph.nodes[0].outputs[0]
        hidden.shape = [2, 3]
    out = roundtrip(model, edit)
    info = {vi.name: vi for vi in out.graph.value_info}["h"]
    assert [d.dim_value for d in info.type.tensor_type.shape.dim] == [2, 3]
    assert info.doc_string == "hidden" and info.metadata_props[0].key == "k"


def test_value_info_for_new_typed_tensors_is_written():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y])

    def edit(graph):
        mid = gs.Variable("mid", dtype=np.float32, shape=[2, 3])
        relu = graph.nodes[0]
        graph.nodes.append(gs.Node("Neg", inputs=[relu.inputs[0]], outputs=[mid]))
        relu.inputs[0] = mid
        graph.toposort()
    out = roundtrip(model, edit)
    onnx.checker.check_model(out, full_check=True)
    assert [vi.name for vi in out.graph.value_info] == ["mid"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run(out, {"x": x})[0], np.maximum(-x, 0))


# --------------------------------------------------------------------------- types


def test_non_tensor_inputs_and_outputs_keep_their_types():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [5]))))
    opt_out = helper.make_value_info("o2", opt.type)
    map_type = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    m_in = helper.make_value_info("m", map_type)
    m_out = helper.make_value_info("m2", map_type)
    n_out = helper.make_tensor_value_info("n", TensorProto.INT64, [])
    model = make_model(
        [helper.make_node("SequenceLength", ["s"], ["n"]),
         helper.make_node("Identity", ["o"], ["o2"]),
         helper.make_node("Identity", ["m"], ["m2"])],
        [seq, opt, m_in], [n_out, opt_out, m_out])
    assert_lossless(model)
    # graphsurgeon's Variable.copy() would reset these to tensor_type.
    graph = import_graph(model).copy()
    assert [t.type for t in graph.inputs] == ["sequence_type", "optional_type", "map_type"]


def test_optional_model_runs_after_round_trip():
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [3])))
    out_info = helper.make_tensor_value_info("has", TensorProto.BOOL, [])
    model = make_model([helper.make_node("OptionalHasElement", ["o"], ["has"])], [opt], [out_info])
    out = rebuilt(model)
    assert run(out, {"o": np.ones(3, np.float32)})[0]


def test_empty_optional_inputs_and_outputs():
    # Clip with no min, max given; Dropout's optional mask output omitted ("").
    nodes = [helper.make_node("Clip", ["x", "", "hi"], ["c"]),
             helper.make_node("Dropout", ["c"], ["y", ""])]
    hi = numpy_helper.from_array(np.array(0.5, np.float32), "hi")
    model = make_model(nodes, [X], [Y], initializers=[hi])
    assert_lossless(model)
    out = rebuilt(model)
    assert list(out.graph.node[0].input) == ["x", "", "hi"]
    assert list(out.graph.node[1].output) == ["y", ""]
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run(out, {"x": x})[0], np.minimum(x, 0.5))


# --------------------------------------------------------------------------- attributes


def all_attribute_kinds_node():
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "v"),
                                       numpy_helper.from_array(np.array([2], np.int64), "i"), [4])
    node = helper.make_node("Custom", ["x"], ["y"], domain="com.example",
                            f=1.5, i=3, s="text", t=numpy_helper.from_array(np.ones(2, np.float32)),
                            floats=[1.0, 2.5], ints=[1, 2], strings=["a", "b"],
                            sparse=sparse, tp=helper.make_tensor_type_proto(TensorProto.INT8, [1]),
                            tensors=[numpy_helper.from_array(np.zeros(1, np.int32))],
                            tps=[helper.make_tensor_type_proto(TensorProto.INT8, [1])])
    node.attribute.extend([
        helper.make_attribute("empty_ints", [], attr_type=onnx.AttributeProto.INTS),
        helper.make_attribute("empty_floats", [], attr_type=onnx.AttributeProto.FLOATS),
        helper.make_attribute("raw", b"\xff\xfe"),  # not UTF-8
    ])
    return node


def test_every_attribute_type_is_kept():
    model = make_model([all_attribute_kinds_node()], [X], [Y])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert_lossless(model)
    node = import_graph(model).nodes[0]
    assert node.attrs["raw"] == b"\xff\xfe" and node.attrs["empty_ints"] == []
    assert isinstance(node.attrs["tp"], onnx.TypeProto)


def test_edited_attributes_get_their_schema_or_source_type():
    model = make_model([helper.make_node("LeakyRelu", ["x"], ["h"], alpha=0.5),
                        helper.make_node("Transpose", ["h"], ["y"], perm=[0, 1])], [X], [Y])

    def edit(graph):
        graph.nodes[0].attrs["alpha"] = 1          # an int for a FLOAT attribute
        graph.nodes[1].attrs["perm"] = np.array([0, 1])
        graph.nodes.append(gs.Node("Cast", inputs=[graph.outputs[0]], outputs=[gs.Variable("z", np.float16, [2, 3])],
                                   attrs={"to": np.float16}))
        graph.outputs.append(graph.nodes[-1].outputs[0])
    out = roundtrip(model, edit)
    onnx.checker.check_model(out, full_check=True)
    alpha, perm, to = out.graph.node[0].attribute[0], out.graph.node[1].attribute[0], out.graph.node[2].attribute[0]
    assert (alpha.type, alpha.f) == (onnx.AttributeProto.FLOAT, 1.0)
    assert (perm.type, list(perm.ints)) == (onnx.AttributeProto.INTS, [0, 1])
    assert (to.type, to.i) == (onnx.AttributeProto.INT, TensorProto.FLOAT16)


def test_new_empty_list_attribute_of_unknown_type_is_an_error_naming_it():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [X], [Y])

    def edit(graph):
        graph.nodes[0].op = "Mystery"
        graph.nodes[0].domain = "com.example"
        graph.nodes[0].attrs["things"] = []
    with pytest.raises(ValueError, match=r"'r'.*'things'"):
        roundtrip(model, edit)


# --------------------------------------------------------------------------- tensors


SPECIAL_ARRAYS = {
    "bf16": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16),
    "f8e4m3fn": np.array([1.0, -0.5, 448.0], dtype=ml_dtypes.float8_e4m3fn),
    "f8e4m3fnuz": np.array([1.0, -0.5, 2.0], dtype=ml_dtypes.float8_e4m3fnuz),
    "f8e5m2": np.array([1.0, -0.5, 2.0], dtype=ml_dtypes.float8_e5m2),
    "i4": np.array([-8, -1, 0, 7, 3], dtype=ml_dtypes.int4),  # odd length: packing matters
    "u4": np.array([0, 15, 3], dtype=ml_dtypes.uint4),
    "str": np.array(["a", "héllo", ""], dtype=object),
    "f16": np.array([1.0, 2.0], dtype=np.float16),
}


def special_tensors_model():
    inits = [numpy_helper.from_array(arr, name) for name, arr in SPECIAL_ARRAYS.items()]
    nodes = [helper.make_node("Identity", [name], [name + "_out"]) for name in SPECIAL_ARRAYS]
    outputs = [helper.make_tensor_value_info(name + "_out", t.data_type, [len(SPECIAL_ARRAYS[name])])
               for name, t in zip(SPECIAL_ARRAYS, inits)]
    return make_model(nodes, [], outputs, initializers=inits)


def test_special_dtype_initializers_are_kept_without_decoding():
    model = special_tensors_model()
    assert_lossless(model)
    graph = import_graph(model)
    export_model(graph, model)
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    assert len(constants) == len(SPECIAL_ARRAYS)
    # Export wrote the original protos: nothing was decoded into numpy.
    assert all(isinstance(c._values, gs.ir.tensor.LazyValues) for c in constants)


def test_special_dtype_initializers_survive_being_read_by_a_pass():
    model = special_tensors_model()

    def read_values(graph):
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant):
                t.values  # noqa: B018 - loads numpy, as a pass reading weights would
    out = roundtrip(model, read_values)
    for init in out.graph.initializer:
        original = {t.name: t for t in model.graph.initializer}[init.name]
        assert init.data_type == original.data_type, init.name
        got, want = numpy_helper.to_array(init), numpy_helper.to_array(original)
        assert got.dtype == want.dtype and np.array_equal(got.astype(object), want.astype(object)), init.name


def test_sparse_initializer_is_kept():
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "w"),
                                       numpy_helper.from_array(np.array([1, 4], np.int64), "w_idx"), [2, 3])
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y])
    model.graph.sparse_initializer.append(sparse)
    assert_lossless(model)
    assert roundtrip(model).graph.sparse_initializer[0] == sparse


def test_initializer_that_is_also_an_input_stays_an_overridable_input():
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3])
    w = numpy_helper.from_array(np.full((2, 3), 10, np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [X, w_info], [Y], initializers=[w])
    assert_lossless(model)
    graph = import_graph(model)
    # A Variable (not a Constant): no pass may fold a value the caller can feed.
    assert [t.name for t in graph.inputs] == ["x", "w"]
    assert isinstance(graph.inputs[1], gs.Variable)
    out = rebuilt(model)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], x + 10)
    np.testing.assert_array_equal(run(out, {"x": x, "w": x})[0], x + x)


def test_unused_initializers_are_kept_until_removed():
    unused = numpy_helper.from_array(np.zeros(3, np.float32), "unused")
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], initializers=[unused])
    assert_lossless(model)

    def drop(graph):
        graph.unused_initializers.clear()
    assert not roundtrip(model, drop).graph.initializer


def test_weights_are_shared_with_the_model_not_copied():
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], initializers=[w])
    graph = import_graph(model)
    const = graph.nodes[0].inputs[1]
    assert isinstance(const, gs.Constant)
    assert const._values.tensor is model.graph.initializer[0]


def test_renamed_constant_is_written_renamed_and_the_template_untouched():
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], initializers=[w])
    before = model.SerializeToString()

    def rename(graph):
        graph.nodes[0].inputs[1].name = "weight"
    out = roundtrip(model, rename)
    assert [t.name for t in out.graph.initializer] == ["weight"]
    assert list(out.graph.node[0].input) == ["x", "weight"]
    assert model.SerializeToString() == before


def test_new_numpy_constants_are_encoded_with_their_exact_type():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y])
    arrays = {"new_i4": SPECIAL_ARRAYS["i4"], "new_fnuz": SPECIAL_ARRAYS["f8e4m3fnuz"], "new_str": SPECIAL_ARRAYS["str"]}

    def add(graph):
        for name, arr in arrays.items():
            out = gs.Variable(name + "_out")
            graph.nodes.append(gs.Node("Identity", inputs=[gs.Constant(name, arr)], outputs=[out]))
            graph.outputs.append(out)
    out = roundtrip(model, add)
    for init in out.graph.initializer:
        want = arrays[init.name]
        assert init.data_type == helper.np_dtype_to_tensor_dtype(want.dtype)
        assert np.array_equal(numpy_helper.to_array(init).astype(object), want.astype(object))


# --------------------------------------------------------------------------- subgraphs


def subgraph_model():
    """If (branches read an outer weight used only inside), Loop and Scan bodies."""
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    w = numpy_helper.from_array(np.full((2, 3), 2, np.float32), "w")  # only read inside If
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], doc_string="inner doc")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    body_in = [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
               helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
               helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2, 3])]
    one = numpy_helper.from_array(np.ones((2, 3), np.float32), "one")  # a body initializer
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Add", ["acc", "one"], ["acc_out"])], "body", body_in,
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3])],
                             initializer=[one])
    scan_body = helper.make_graph([helper.make_node("Add", ["s_in", "row"], ["s_out"]),
                                   helper.make_node("Identity", ["s_out"], ["row_out"])], "scan",
                                  [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]),
                                   helper.make_tensor_value_info("row", TensorProto.FLOAT, [3])],
                                  [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
                                   helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [3])])
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    zero = numpy_helper.from_array(np.zeros(3, np.float32), "zero")
    nodes = [
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "cond", "branch"], ["looped"], body=body),
        helper.make_node("Scan", ["zero", "looped"], ["final", "y"], body=scan_body, num_scan_inputs=1),
    ]
    final = helper.make_tensor_value_info("final", TensorProto.FLOAT, [3])
    return make_model(nodes, [X, cond], [Y, final], initializers=[w, trip, zero])


def test_if_loop_scan_subgraphs_round_trip_and_run():
    model = subgraph_model()
    assert_lossless(model)
    onnx.checker.check_model(rebuilt(model), full_check=True)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        want = run(model, feeds)
        for got, ref in zip(run(rebuilt(model), feeds), want):
            np.testing.assert_array_equal(got, ref)
    # The outer weight read only inside the If stays an outer initializer, once.
    out = rebuilt(model)
    assert [t.name for t in out.graph.initializer] == ["w", "trip", "zero"]
    assert not any(a.g.initializer for a in out.graph.node[0].attribute)
    assert [t.name for t in out.graph.node[1].attribute[0].g.initializer] == ["one"]


def test_subgraph_edit_is_written():
    model = subgraph_model()

    def edit(graph):
        else_branch = graph.nodes[0].attrs["else_branch"]
        else_branch.nodes[0].op = "Abs"
    out = roundtrip(model, edit)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert branches["else_branch"].node[0].op_type == "Abs"
    assert branches["else_branch"].node[0].doc_string == "inner doc"
    assert branches["then_branch"].node[0].op_type == "Mul"
    x = -np.ones((2, 3), np.float32)
    # cond=False: the else branch (now Abs), a Loop that does not iterate, Scan's running sum.
    np.testing.assert_array_equal(run(out, {"x": x, "cond": np.array(False)})[0], np.cumsum(np.abs(x), axis=0))


# --------------------------------------------------------------------------- graphsurgeon passes


def test_graphsurgeon_cleanup_result_is_valid_and_correct():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"])]
    model = make_model(nodes, [X], [Y])
    out = roundtrip(model, lambda g: g.cleanup().toposort())
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    onnx.checker.check_model(out, full_check=True)


def test_import_gives_onnx_graph_with_opset_and_producer():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], producer_name="p")
    graph = import_graph(model)
    assert isinstance(graph, OnnxGraph)
    assert (graph.opset, graph.producer_name, graph.ir_version) == (OPSET, "p", 10)
    assert graph.functions == []  # local functions travel in the template


def test_renamed_tensors_keep_their_type_structure_and_doc():
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [3])), doc_string="maybe")
    out_info = helper.make_tensor_value_info("has", TensorProto.BOOL, [])
    model = make_model([helper.make_node("OptionalHasElement", ["o"], ["has"])], [opt], [out_info])

    def rename(graph):
        graph.inputs[0].name = "maybe_input"
    out = roundtrip(model, rename)
    assert out.graph.input[0].name == "maybe_input"
    assert out.graph.input[0].type == opt.type and out.graph.input[0].doc_string == "maybe"
    assert run(out, {"maybe_input": np.ones(3, np.float32)})[0]


def test_function_added_by_a_pass_is_exported_next_to_the_templates():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y])
    model.opset_import.append(helper.make_opsetid("com.example", 1))

    def add_function(graph):
        a, b = gs.Variable("a", np.float32), gs.Variable("b", np.float32)
        func = gs.Function("Double", domain="com.example", inputs=[a], outputs=[b],
                           nodes=[gs.Node("Add", inputs=[a, a], outputs=[b])])
        graph.functions.append(func)
        relu_out = graph.outputs[0]
        doubled = gs.Variable("doubled", np.float32, [2, 3])
        graph.nodes.append(gs.Node("Double", domain="com.example", inputs=[relu_out], outputs=[doubled]))
        graph.outputs = [doubled]
    out = roundtrip(model, add_function)
    assert [f.name for f in out.functions] == ["Double"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    np.testing.assert_array_equal(run(out, {"x": x})[0], 2 * np.maximum(x, 0))


def test_copy_is_independent_and_shares_weight_arrays():
    """The pass manager snapshots with graph.copy(): editing the live graph must not leak
    into the snapshot. Weight arrays are shared (passes replace values, never edit an array
    in place), so a snapshot costs no weight bytes."""
    model = subgraph_model()
    graph = import_graph(model)
    w = next(t for t in graph.tensors().values() if t.name == "zero")
    w.values = np.array([1.0, 2.0, 3.0], np.float32)  # a pass decoded / replaced a weight
    snapshot = graph.copy()
    assert snapshot.onnx_source is not graph.onnx_source
    snapshot_zero = next(t for t in snapshot.tensors().values() if t.name == "zero")
    assert snapshot_zero is not w and snapshot_zero.values is w.values  # shared, not copied
    w.values = np.array([100.0, 2.0, 3.0], np.float32)  # ... then replaces it again
    assert snapshot_zero.values[0] == 1.0
    for g in iter_graphs(graph):  # rename everything in the original
        for node in g.nodes:
            for t in node.outputs:
                if t.name:
                    t.name += "_renamed"
    else_branch = snapshot.nodes[0].attrs["else_branch"]
    assert else_branch.nodes[0].outputs[0].name == "e"
    # The snapshot still exports as the model did (bar the one replaced weight).
    out = export_model(snapshot, model)
    assert [n.output[0] for n in out.graph.node] == [n.output[0] for n in model.graph.node]
    assert numpy_helper.to_array(out.graph.initializer[2]).tolist() == [1.0, 2.0, 3.0]


def test_copy_does_not_share_constant_node_values():
    value = numpy_helper.from_array(np.ones((2, 3), np.float32))
    model = make_model([helper.make_node("Constant", [], ["c"], value=value),
                        helper.make_node("Add", ["x", "c"], ["y"])], [X], [Y])
    graph = import_graph(model)
    snapshot = graph.copy()
    graph.nodes[0].attrs["value"].values[...] = 7.0  # a pass editing the live graph in place
    assert snapshot.nodes[0].attrs["value"].values.tolist() == [[1.0] * 3] * 2
    assert export_model(snapshot, model).SerializeToString() == model.SerializeToString()
