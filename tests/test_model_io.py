"""Model I/O: load, atomic save, external data (and its path safety), provenance, metadata kept."""

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import ExternalDataError, ModelError, OutputError
from onnxopt.ir.model import load, save
from onnxopt.testing import assert_equivalent

from tests.graphs import const_chain, dead_branch, make_model, tensor


def test_load_proto_does_not_modify_callers_proto():
    proto = const_chain()
    before = proto.SerializeToString()
    onnxopt.optimize(proto, pipeline="lossless")
    assert proto.SerializeToString() == before


def test_optimize_leaves_a_loaded_model_as_it_was():
    """The search builds several candidates from one loaded Model: none may see another's passes."""
    m = load(const_chain())
    before = m.to_proto().SerializeToString()
    first = onnxopt.optimize(m, pipeline="lossless")
    assert m.to_proto().SerializeToString() == before
    assert onnxopt.optimize(m, pipeline="lossless").model.SerializeToString() == first.model.SerializeToString()


def test_unchanged_model_is_kept_and_provenance_added(tmp_path):
    proto = dead_branch()
    proto.doc_string = "doc"
    proto.metadata_props.add(key="author", value="me")
    path = tmp_path / "in.onnx"
    onnx.save(proto, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = onnxopt.optimize(path, pipeline="lift-constants")  # nothing to lift
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["author"] == "me" and meta["onnxopt.source_sha256"] == digest
    assert meta["onnxopt.pipeline"] == "lift-constants" and meta["onnxopt.version"] == onnxopt.__version__
    assert result.model.doc_string == "doc"
    assert result.model.graph == proto.graph


def test_changed_model_keeps_opsets_metadata_and_functions(tmp_path):
    func = helper.make_function("my.domain", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["x"], ["dead"]),
             helper.make_node("Twice", ["i"], ["y"], domain="my.domain")]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2])], [tensor("y", [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)],
                              functions=[func], producer_name="me")
    proto.metadata_props.add(key="k", value="v")
    result = onnxopt.optimize(proto, pipeline="eliminate-dead-code")
    out = result.model
    assert len(out.graph.node) == 2
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("my.domain", 1)}
    assert [f.name for f in out.functions] == ["Twice"] and out.producer_name == "me"
    assert {p.key: p.value for p in out.metadata_props}["k"] == "v"
    onnx.checker.check_model(out)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    out = tmp_path / "out.onnx"
    save(const_chain(), out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    onnx.checker.check_model(onnx.load(out))


def test_save_refuses_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save(const_chain(), tmp_path / "no" / "out.onnx")


def _external_model(tmp_path, location="weights.bin"):
    w = np.arange(1024, dtype=np.float32)
    proto = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x", [1024])], [tensor("y", [1024])],
                       [numpy_helper.from_array(w, "w")])
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    if location != "weights.bin":  # rewrite the location after saving
        m = onnx.load(tmp_path / "m.onnx", load_external_data=False)
        for e in m.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = location
        onnx.save(m, tmp_path / "m.onnx")
    return tmp_path / "m.onnx", w


def test_external_data_loads_and_saves(tmp_path):
    path, w = _external_model(tmp_path)
    model = load(path)
    assert np.array_equal(numpy_helper.to_array(model.to_proto().graph.initializer[0]), w)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    save(model.to_proto(), out, external_data=True)
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]
    again = onnx.load(out)
    assert np.array_equal(numpy_helper.to_array(again.graph.initializer[0]), w)


@pytest.mark.parametrize("location, message", [
    ("/etc/passwd", "absolute external-data path"),
    ("../weights.bin", "with '..'"),
    ("missing.bin", "is missing"),
])
def test_unsafe_or_missing_external_data_is_refused(tmp_path, location, message):
    path, _ = _external_model(tmp_path, location)
    with pytest.raises(ExternalDataError, match=message):
        load(path)


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "inside"
    inside.mkdir()
    path, _ = _external_model(inside)
    os.replace(inside / "weights.bin", outside / "weights.bin")
    os.symlink(outside / "weights.bin", inside / "weights.bin")
    with pytest.raises(ExternalDataError, match="outside"):
        load(path)


def test_cli_external_data_escape_exit_2_no_output(tmp_path, capsys):
    path, _ = _external_model(tmp_path, "../x.bin")
    before = path.read_bytes()
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxopt: error:" in err and "'..'" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists() and path.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"hello, I am text\n", "not an ONNX model"), (b"\x08\x07\x12\x03abc\xff\xff", "not an ONNX model")])
def test_unreadable_models(tmp_path, content, message):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load(p)


def test_output_must_not_overwrite_input(tmp_path, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(const_chain(), p)
    assert main(["optimize", str(p), "-o", str(p)]) == 2
    assert "overwrite the input" in capsys.readouterr().err


# -- weights left on disk, models written weight by weight -----------------------------------
def test_external_weights_stay_on_disk_until_read(tmp_path):
    from onnxopt.ir.constants import constant_value

    path, w = _external_model(tmp_path)
    model = load(path)
    tensor = model.template.graph.initializer[0]
    assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data  # not read in
    location = {e.key: e.value for e in tensor.external_data}["location"]
    assert os.path.isabs(location)  # checked and made absolute at load
    const = next(t for n in model.graph.nodes for t in n.inputs if t.name == "w")
    value = constant_value(const)
    assert isinstance(value, np.memmap) and not value.flags.writeable  # a read-only map of the file
    assert np.array_equal(value, w)


def test_a_fusion_reads_external_weights_and_the_output_carries_its_own_data(tmp_path):
    from onnxopt.optimize import optimize
    from tests.graphs import conv_bn_relu

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(conv_bn_relu(), src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    result = optimize(str(src / "m.onnx"), pipeline="lossless")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result.save(out, external_data=True)
    assert sorted(os.listdir(out.parent)) == ["o.onnx", "o.onnx.data"]
    raw = onnx.load(out, load_external_data=False)
    assert all(e.value == "o.onnx.data" for t in raw.graph.initializer for e in t.external_data
               if e.key == "location")
    assert [n.op_type for n in raw.graph.node] == ["Conv", "Relu"]  # the BatchNorm was folded
    assert_equivalent(conv_bn_relu(), onnx.load(out))
    (src / "m.data").unlink()  # the output does not need the input's data file
    assert_equivalent(conv_bn_relu(), onnx.load(out))


@pytest.mark.parametrize("modified", [False, True])
def test_streamed_save_is_byte_identical_to_serializing_the_model(tmp_path, modified):
    from onnxopt.ir.model import Model

    model = Model(const_chain())
    if modified:
        model.graph.nodes[-1].name = "renamed"
        model.modified = True
    out = model.save(tmp_path / "m.onnx", version="x")
    expected = model.to_proto()
    from onnxopt.ir.storage import add_provenance

    add_provenance(expected, version="x")
    assert out.read_bytes() == expected.SerializeToString(deterministic=True)


def test_optimize_result_saves_without_building_the_proto(tmp_path):
    from onnxopt.optimize import optimize

    result = optimize(const_chain(), pipeline="lossless")
    result.save(tmp_path / "a.onnx")
    assert result._proto is None  # written straight from the graph
    result.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() == result.model.SerializeToString(deterministic=True)
