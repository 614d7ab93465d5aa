"""What each built-in target's default pipeline makes of the digits CNN and of a transformer-like
tiny graph: a model that `onnxopt check` accepts for that target and that runs in onnxruntime on
CPU; the choices the descriptors make (float16 without data on the gpu, 7-bit weights on
cpu-avx2, per-tensor uint8 MatMul weights on the npu); --validate-ep; a user's own target."""

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt.analysis.target_check import check_model
from onnxopt.cli import main
from onnxopt.target import builtin_target_names, load_target

from tests.graphs import tiny_transformer

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "examples" / "digits_calib.npz"
def builtin(name):
    return load_target(name)


def outputs(proto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def transformer_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tt")
    r = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=r.standard_normal((4, 1, 8, 32)).astype(np.float32))
    return folder / "calib.npz", {"x": r.standard_normal((1, 8, 32)).astype(np.float32)}


def test_every_descriptor_loads_and_is_listed():
    assert {"cpu", "cpu-avx2", "gpu", "npu"} <= set(builtin_target_names())
    for name in builtin_target_names():
        t = load_target(name)
        assert t.name == name and {"lossless", "default"} <= set(t.pipelines)


@pytest.mark.parametrize("name", ["cpu", "cpu-avx2", "gpu", "npu"])
def test_default_pipeline_on_the_digits_cnn_passes_check_and_runs(name):
    t = builtin(name)
    shapes = {"image": [8, 1, 8, 8]} if t.capabilities.static_shapes else None
    result = onnxopt.optimize(str(DIGITS), target=t, calibration=str(DIGITS_CALIB), input_shapes=shapes)
    check = check_model(result.model, t)
    assert check.conforms, check.format()
    assert result.report["check"]["conforms"]
    images = np.load(REPO / "examples" / "digits_test.npz")["image"][:8]
    ref = outputs(onnx.load(DIGITS), {"image": images})
    got = outputs(result.model, {"image": images})
    assert (np.argmax(got, 1) == np.argmax(ref, 1)).mean() >= 0.85
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


@pytest.mark.parametrize("name", ["cpu", "cpu-avx2", "gpu", "npu"])
def test_default_pipeline_on_a_transformer_passes_check_and_runs(name, transformer_data):
    calib, feeds = transformer_data
    t = builtin(name)
    model = tiny_transformer()
    result = onnxopt.optimize(model, target=t, calibration=str(calib))
    check = check_model(result.model, t)
    assert check.conforms, check.format()
    assert cosine(outputs(model, feeds), outputs(result.model, feeds)) > 0.99


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_without_data_the_default_still_passes_check(name, transformer_data):
    _, feeds = transformer_data
    model = tiny_transformer()
    result = onnxopt.optimize(model, target=builtin(name))
    assert result.report["check"]["conforms"]
    assert cosine(outputs(model, feeds), outputs(result.model, feeds)) > 0.999


def test_gpu_without_data_no_longer_leaves_a_float32_model():
    result = onnxopt.optimize(str(DIGITS), target="gpu")
    assert "convert-float16" in result.report["pipeline"]
    assert any("default-without-data" in n for n in result.report["notes"])
    types = {i.data_type for i in result.model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    with_data = onnxopt.optimize(str(DIGITS), target="gpu", calibration=str(DIGITS_CALIB))
    assert "quantize-static" in with_data.report["pipeline"] and "convert-float16" not in with_data.report["pipeline"]


def test_cpu_avx2_reduces_the_weights_range_and_cpu_does_not():
    def weight_max(target):
        proto = onnxopt.optimize(str(DIGITS), target=target, calibration=str(DIGITS_CALIB)).model
        ints = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        return max(int(np.abs(a).max()) for a in ints)

    assert weight_max("cpu-avx2") == 63 and weight_max("cpu") == 127


def test_npu_quantizes_matmul_weights_per_tensor_in_uint8(transformer_data):
    calib, _ = transformer_data
    proto = onnxopt.optimize(tiny_transformer(), target="npu", calibration=str(calib)).model
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    matmul_weights = [producers[n.input[1]] for n in proto.graph.node
                      if n.op_type == "MatMul" and n.input[1] in producers
                      and producers[n.input[1]].input[0] in inits]
    assert len(matmul_weights) == 6
    for dq in matmul_weights:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.UINT8
        assert int(np.prod(inits[dq.input[1]].dims)) == 1  # one scale
    stats = next(p["stats"] for p in onnxopt.optimize(tiny_transformer(), target="npu", calibration=str(calib))
                 .report["passes"] if p["name"] == "quantize-static")
    assert stats["weight_schemes"] == {"MatMul": "uint8 per_tensor"}


# -- --validate-ep -----------------------------------------------------------------------------
def test_validate_ep_runs_on_installed_providers_and_falls_back_to_cpu_with_a_note(tmp_path, capsys):
    """AzureExecutionProvider is installed in every onnxruntime wheel but runs none of these ops:
    a real non-CPU provider on which not every node runs; CUDA is missing here."""
    target = tmp_path / "box.toml"
    target.write_text('schema = 1\nname = "box"\nextends = "cpu"\n[runtime]\nexecution_providers = '
                      '["AzureExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]\n')
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(DIGITS), "-o", str(out), "--target", str(target), "--pipeline", "lossless",
                 "--validate-ep", "--report", str(tmp_path / "r.json")]) == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    runs = {r["provider"]: r for r in report["validate_ep"]}
    assert set(runs) == {"AzureExecutionProvider", "CPUExecutionProvider"}
    assert runs["AzureExecutionProvider"]["all_nodes_on_provider"] is False
    assert runs["AzureExecutionProvider"]["providers"][0] == "AzureExecutionProvider"
    assert all(r["status"] == "ran" and r["metric"]["drop"] < 1e-6 for r in runs.values())
    assert any("CUDAExecutionProvider is not installed" in n and "validated on CPUExecutionProvider" in n
               for n in report["notes"])
    assert "validated on AzureExecutionProvider (some nodes on CPU)" in capsys.readouterr().out


def test_validate_ep_failure_exits_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from onnxopt.measure import validate_ep

    real = validate_ep.compare

    def broken_on_the_provider(original, optimized, **kw):
        from onnxopt.errors import ModelError

        if isinstance(optimized, onnx.ModelProto):
            raise ModelError("onnxruntime cannot load the model: a kernel is missing")
        return real(original, optimized, **kw)

    monkeypatch.setattr(validate_ep, "compare", broken_on_the_provider)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(DIGITS), "-o", str(out), "--pipeline", "lossless", "--validate-ep"]) == 3
    assert "validate-ep: the optimized model fails on CPUExecutionProvider" in capsys.readouterr().err
    assert not out.exists()


# -- a user's own target (README) -------------------------------------------------------------------
def readme_target() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Your own target", 1)[1]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def test_readme_microcontroller_target_loads_and_the_digits_cnn_conforms(tmp_path):

    path = tmp_path / "mcu.toml"
    path.write_text(readme_target())
    t = load_target(path)
    assert t.name == "mcu" and t.capabilities.static_shapes and t.capabilities.integer_only
    assert t.capabilities.channel_multiple == 4
    with pytest.raises(onnxopt.OnnxoptError, match="--input-shape image:1,1,8,8"):
        onnxopt.optimize(str(DIGITS), target=t, calibration=str(DIGITS_CALIB))
    result = onnxopt.optimize(str(DIGITS), target=t, calibration=str(DIGITS_CALIB),
                              input_shapes={"image": [8, 1, 8, 8]})
    check = check_model(result.model, t)
    assert check.conforms, check.format()
    kinds = {n.op_type for n in result.model.graph.node}
    assert kinds <= set(t.capabilities.allowed_ops)
    inits = {i.name: i for i in result.model.graph.initializer}
    q_types = {inits[n.input[2]].data_type for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {onnx.TensorProto.INT8}
    images = np.load(REPO / "examples" / "digits_test.npz")["image"][:8]
    assert outputs(result.model, {"image": images}).shape == (8, 10)


def test_targets_name_prints_the_effective_descriptor_as_toml(capsys):
    import tomllib

    assert main(["targets", "cpu-avx2"]) == 0
    text = capsys.readouterr().out
    data = tomllib.loads(text)
    assert data["quantization"]["schemes"]["w_s8"]["reduce_range"] is True  # its own
    assert data["quantization"]["quantized_ops"] == load_target("cpu").quantization.quantized_ops  # inherited
    assert "extends" not in data and text.startswith("# target 'cpu-avx2' from targets/cpu-avx2.toml")


def test_npu_quantizes_an_embedding_table_read_by_gather(tmp_path):
    """Full integer graph: a constant under a data-movement op (Gather of an embedding table) is
    quantized too; before, the Gather computed on the float table and check said float-compute."""
    from onnx import TensorProto, helper

    from tests.graphs import init, make_model, tensor

    r = np.random.default_rng(3)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    model = make_model(nodes, [tensor("ids", [1, 4], TensorProto.INT64)], [tensor("y", [1, 4, 8])],
                       [init("table", r.standard_normal((50, 16)).astype(np.float32)),
                        init("w", r.standard_normal((16, 8)).astype(np.float32))])
    np.savez(tmp_path / "c.npz", ids=r.integers(0, 50, (4, 1, 4)).astype(np.int64))
    result = onnxopt.optimize(model, target="npu", calibration=str(tmp_path / "c.npz"))
    check = check_model(result.model, "npu")
    assert check.conforms, check.format()
    ids = {"ids": r.integers(0, 50, (1, 4)).astype(np.int64)}
    assert cosine(outputs(model, ids), outputs(result.model, ids)) > 0.99


@pytest.mark.parametrize("name", ["cpu", "cpu-avx2", "gpu", "npu"])
def test_the_printed_descriptor_loads_back_to_the_same_target(name, tmp_path):
    t = load_target(name)
    path = tmp_path / f"{name}.toml"
    path.write_text(t.to_toml())
    again = load_target(path)
    assert again.raw == t.raw and again.capabilities.ops == t.capabilities.ops
