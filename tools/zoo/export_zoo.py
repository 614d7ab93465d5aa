"""Export the onnxopt test-model zoo: torchvision architectures and hand-built models in the
styles of other exporters, each with a calibration and an evaluation set.

    .models/tv-venv/bin/python tools/zoo/export_zoo.py                 # everything -> .models/zoo/
    .models/tv-venv/bin/python tools/zoo/export_zoo.py --only resnet18,detector_dynhw
    .models/tv-venv/bin/python tools/zoo/export_zoo.py --force         # re-export existing files
    .models/tv-venv/bin/python tools/zoo/export_zoo.py --list

Needs torch (and torchvision for the torchvision models) in the Python that runs it; never
the main environment. Weights are random (seeded, so a re-export gives the same files), with
BatchNorm made non-trivial: affine parameters randomized, running statistics estimated on
generated data, so activations stay in realistic ranges. All exports use the legacy
TorchScript exporter (``dynamo=False``) with ``training=PRESERVE`` on a model in eval mode
and constant folding on: that keeps BatchNormalization nodes (``TrainingMode.EVAL`` fuses
them into the Convs). Each export is checked: onnx.checker, BatchNormalization count, and,
if onnxruntime is importable, onnxruntime against torch on a calibration batch.

For every NAME: NAME.onnx, NAME.calib.npz (8 batches) and NAME.eval.npz (8 other batches),
arrays keyed by input name with one leading axis for the stack of batches. See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import zoo_data as D

N_BATCHES = 8


@dataclass
class Spec:
    name: str
    build: Callable  # () -> torch.nn.Module (random weights; torch seeded before the call)
    opset: int
    inputs: list  # [(name, [dim, ...])]; a str dim is a dynamic axis
    outputs: list  # [(name, [dim, ...])]
    data: Callable  # (rng, batch) -> {input name: array}, one batch at the data size
    check_sizes: dict = field(default_factory=dict)  # dynamic axis -> two sizes for check_zoo
    post: Callable | None = None  # onnx.ModelProto -> None, after export
    optional: bool = False  # a failure is a note, not an error
    doc: str = ""


SPECS: dict[str, Spec] = {}


def spec(**kw):
    def register(build):
        s = Spec(build=build, **kw)
        SPECS[s.name] = s
        return build
    return register


# --- data ------------------------------------------------------------------------------------
def images(h, w, name="images"):
    return lambda rng, b: {name: D.imagenet_images(rng, b, h, w)}


# --- torchvision classifiers -----------------------------------------------------------------
def torchvision_model(arch):
    try:
        import torchvision
    except Exception as e:  # PyPI's torchvision 0.28 fails to import beside torch 2.13.0
        raise RuntimeError(f"torchvision not importable ({e}); run with .models/tv-venv/bin/python") from e

    return torchvision.models.get_model(arch, weights=None)


def _tune_torchvision(arch, model):
    import torch

    if arch == "vit_b_16":  # torchvision zero-initializes the head: outputs would be all zero
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    if arch.startswith("convnext"):  # layer_scale starts at 1e-6, making every block ~identity
        for blk in model.modules():
            if hasattr(blk, "layer_scale"):
                blk.layer_scale.data.uniform_(0.05, 0.3)
    if arch.startswith("efficientnet"):
        # Small last-BN scales on the residual branches (as trained EfficientNets have): with the
        # random [0.5, 1.5] scales the residual stream grew ~1.2x a block on high-contrast images,
        # and the logits of two inputs differed 50x in scale.
        from torchvision.models.efficientnet import MBConv

        with torch.no_grad():
            for blk in model.modules():
                if isinstance(blk, MBConv) and blk.use_res_connect:
                    bn = blk.block[-1][1]
                    bn.weight.uniform_(0.1, 0.4)
                    bn.bias.normal_(0.0, 0.05)
                    bn.zoo_keep_affine = True
    if arch == "swin_t":
        torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def _register_classifier(arch, name, opset, dynamic_batch, optional=False, doc=""):
    b = "batch" if dynamic_batch else 1
    spec(name=name, opset=opset, inputs=[("images", [b, 3, 224, 224])], outputs=[("logits", [b, 1000])],
         data=images(224, 224), check_sizes={"batch": [1, 3]} if dynamic_batch else {},
         optional=optional, doc=doc)(lambda: _tune_torchvision(arch, torchvision_model(arch)))


CLASSIFIERS = {
    "resnet18": "ResNet-18: basic residual blocks, 3x3 convs, BatchNorm",
    "resnet50": "ResNet-50: bottleneck blocks (1x1-3x3-1x1), 25.6M params",
    "mobilenet_v2": "MobileNetV2: inverted residuals, depthwise 3x3, ReLU6 (Clip)",
    "mobilenet_v3_small": "MobileNetV3-Small: hard-swish, squeeze-excitation with hard-sigmoid",
    "efficientnet_b0": "EfficientNet-B0: MBConv with SiLU (Sigmoid*Mul) and squeeze-excitation",
    "densenet121": "DenseNet-121: dense concatenation, BN-ReLU-Conv order (BN not after a Conv)",
    "regnet_y_400mf": "RegNetY-400MF: grouped 3x3 convs, squeeze-excitation",
    "convnext_tiny": "ConvNeXt-T: depthwise 7x7, channels-last LayerNorm via Permute, Linear MLP, layer scale",
    "vgg11_bn": "VGG-11-BN: plain heavy 3x3 convs and a 123M-param Linear classifier",
}
for _arch, _doc in CLASSIFIERS.items():
    _register_classifier(_arch, _arch, 17, False, doc=_doc)
_register_classifier("vit_b_16", "vit_b_16_dynbatch", 14, True,
                     doc="ViT-B/16: patch-embedding Conv, 12 encoder layers with MultiheadAttention, dynamic batch")
_register_classifier("convnext_tiny", "convnext_tiny_dynbatch", 14, True,
                     doc="ConvNeXt-T at opset 14 (LayerNorm decomposed), dynamic batch")
_register_classifier("swin_t", "swin_t_dynbatch", 14, True, optional=True,
                     doc="Swin-T: shifted-window attention (roll as Slice+Concat, Pad, window Reshape/Transpose, masks built with ScatterND), dynamic batch")


# --- hand-built models ------------------------------------------------------------------------
@spec(name="detector_dynhw", opset=17, inputs=[("images", ["batch", 3, "height", "width"])],
      outputs=[("detections", ["batch", "anchors", 84])], data=images(480, 640),
      check_sizes={"batch": [1, 2], "height": [640, 384], "width": [640, 512]},
      doc="YOLOv8n-style detector, 80 classes, anchors from the feature-map shapes, dynamic batch/H/W")
def _detector():
    from zoo_models import Detector

    return Detector()


def _initializers_to_constants(model):
    """Move every initializer into a Constant node, as Paddle2ONNX-exported models have them."""
    from onnx import helper

    g = model.graph
    names = {t.name for t in g.initializer}
    consts = [helper.make_node("Constant", [], [t.name], name=f"Constant_{i}", value=t)
              for i, t in enumerate(g.initializer)]
    inputs = [i for i in g.input if i.name not in names]
    nodes = list(g.node)
    del g.input[:], g.node[:], g.initializer[:]
    g.input.extend(inputs)
    g.node.extend(consts + nodes)


_PICO_LEVELS = [(8, 40), (16, 20), (32, 10), (64, 5)]


@spec(name="picodet_style", opset=11, inputs=[("image", [1, 3, 320, 320])],
      outputs=[(f"score_s{s}", [1, n * n, 5]) for s, n in _PICO_LEVELS]
      + [(f"box_s{s}", [1, n * n, 32]) for s, n in _PICO_LEVELS],
      data=lambda rng, b: {"image": D.documents(rng, b, 320, 320)}, post=_initializers_to_constants,
      doc="PP-PicoDet-style layout detector (5 classes), weights in Constant nodes")
def _picodet():
    from zoo_models import PicoDetStyle

    return PicoDetStyle()


@spec(name="nhwc_resnet", opset=13, inputs=[("input", [1, 224, 224, 3])], outputs=[("logits", [1, 1000])],
      data=lambda rng, b: {"input": D.imagenet_images_nhwc(rng, b, 224, 224)},
      doc="ResNet-18 written NHWC: Transpose around every Conv/MaxPool, BatchNorm as Sub/Mul/Add")
def _nhwc_resnet():
    from zoo_models import NHWCResNet

    return NHWCResNet()


@spec(name="crnn_lstm", opset=12, inputs=[("image", [1, 3, 32, "width"])],
      outputs=[("log_probs", [1, "steps", 6625])],
      data=lambda rng, b: {"image": D.text_lines(rng, b, 32, 320)}, check_sizes={"width": [320, 160]},
      doc="CRNN text recognizer: conv stack, 2 BiLSTM layers, Linear to 6625 classes, LogSoftmax")
def _crnn():
    from zoo_models import CRNN

    return CRNN()


@spec(name="audio_frontend", opset=13, inputs=[("waveform", [1, 16000])], outputs=[("logits", [1, 35])],
      data=lambda rng, b: {"waveform": D.audio(rng, b, 16000)},
      doc="STFT as strided Conv1d, power, mel MatMul, log, top-dB clip, CNN classifier")
def _audio():
    from zoo_models import AudioFrontend

    return AudioFrontend()


@spec(name="tiny_transformer", opset=14, inputs=[("inputs", ["batch", "seq", 128])],
      outputs=[("hidden", ["batch", "seq", 128])],
      data=lambda rng, b: {"inputs": D.standard_normal(rng, (b, 64, 128))},
      check_sizes={"batch": [1, 4], "seq": [64, 17]},
      doc="2-layer post-norm transformer encoder, decomposed LayerNorm and erf GELU")
def _tiny_transformer():
    from zoo_models import TinyTransformer

    return TinyTransformer()


# --- preparing weights ------------------------------------------------------------------------
def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def batchnorm_modules(model):
    from torch import nn
    from zoo_models import NHWCBatchNorm

    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, NHWCBatchNorm))]


def prepare_weights(model, calib_batch: dict):
    """Non-trivial BatchNorm: random affine parameters, running statistics estimated on data
    (16 generated inputs, variances floored at 5% of the layer's median);
    LayerNorm affine parameters randomized; all-zero Conv/Linear biases made small random
    values (so no two parameters are equal and the exporter dedups none into Identity nodes).
    Returns the model in eval mode."""
    import torch
    from torch import nn
    from zoo_models import NHWCBatchNorm

    with torch.no_grad():
        for m in model.modules():
            conv_or_linear = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
            if conv_or_linear and m.bias is not None and m.bias.requires_grad and not m.bias.any():
                m.bias.normal_(0.0, 0.02)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not getattr(m, "zoo_keep_affine", False):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.25)
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.7, 1.3)
                m.bias.normal_(0.0, 0.1)
        bns = batchnorm_modules(model)
        if bns:
            model.eval()
            for m in bns:
                if isinstance(m, NHWCBatchNorm):
                    m.calibrating = True
                else:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the calibration forward passes
                    m.train()
            n = len(next(iter(calib_batch.values())))
            for i in range(0, n, 8):  # NHWCBatchNorm keeps the last chunk's statistics
                model(*[torch.from_numpy(v[i:i + 8]) for v in calib_batch.values()])
            for m in bns:
                var = m.var if isinstance(m, NHWCBatchNorm) else m.running_var
                # A channel nearly constant on the calibration images would amplify any other
                # image by 1/sqrt(var + eps) (EfficientNet's depthwise BNs blew up 100x without this)
                var.clamp_(min=0.05 * float(var.median()))
                if isinstance(m, NHWCBatchNorm):
                    m.calibrating = False
                else:
                    m.momentum = 0.1
    return model.eval()


# --- export -----------------------------------------------------------------------------------
def _dims(shape):
    return {i: d for i, d in enumerate(shape) if isinstance(d, str)}


def _set_io_shapes(proto, s: Spec) -> None:
    """Name every dynamic axis as the spec does and fix the static ones (the exporter invents
    names such as 'Transposedetections_dim_2' for output axes it cannot infer)."""
    for vis, specs in ((proto.graph.input, s.inputs), (proto.graph.output, s.outputs)):
        by_name = {vi.name: vi for vi in vis}
        for name, shape in specs:
            dims = by_name[name].type.tensor_type.shape.dim
            if len(dims) != len(shape):
                raise RuntimeError(f"{s.name}: {name} has rank {len(dims)}, the spec says {shape}")
            for d, want in zip(dims, shape):
                if isinstance(want, str):
                    d.dim_param = want
                else:
                    if d.HasField("dim_value") and d.dim_value != want:
                        raise RuntimeError(f"{s.name}: {name} has shape {dims}, the spec says {shape}")
                    d.dim_value = want


def export_onnx(s: Spec, path: Path) -> dict:
    import onnx
    import torch

    if hasattr(torch.backends, "mha"):
        torch.backends.mha.set_fastpath_enabled(False)  # keep MultiheadAttention exportable
    torch.manual_seed(_seed(s.name))
    model = s.build()
    bn_rng = np.random.default_rng([_seed(s.name), 0])
    prepare_weights(model, s.data(bn_rng, 16))
    example = s.data(np.random.default_rng([_seed(s.name), 3]), 1)
    args = tuple(torch.from_numpy(v) for v in example.values())
    dynamic_axes = {n: _dims(sh) for n, sh in s.inputs + s.outputs if _dims(sh)}
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(tmp), dynamo=False, opset_version=s.opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
            input_names=[n for n, _ in s.inputs], output_names=[n for n, _ in s.outputs],
            dynamic_axes=dynamic_axes or None)
    proto = onnx.load(str(tmp))
    _set_io_shapes(proto, s)
    if s.post:
        s.post(proto)
    proto.doc_string = s.doc
    meta = {"zoo.name": s.name, "zoo.exporter": f"torch {torch.__version__} TorchScript (dynamo=False)",
            "zoo.check_sizes": json.dumps(s.check_sizes), "zoo.seed": str(_seed(s.name))}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)

    info = {"bn_modules": len(batchnorm_modules(model)),
            "bn_nodes": sum(n.op_type == "BatchNormalization" for n in proto.graph.node)}
    from torch import nn
    torch_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if info["bn_nodes"] != torch_bn:
        raise RuntimeError(f"{s.name}: {torch_bn} BatchNorm modules but {info['bn_nodes']} BatchNormalization nodes")
    try:
        import onnxruntime as ort
    except ImportError:
        info["ort_vs_torch"] = "onnxruntime not installed here: not compared"
        return info
    with torch.no_grad():
        ref = model(*args)
    ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, example)
    err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(ref, got))
    info["ort_vs_torch"] = err
    if not err < 1e-3:
        raise RuntimeError(f"{s.name}: onnxruntime differs from torch: max relative error {err:.3g}")
    return info


def write_npz(s: Spec, path: Path, split: int) -> None:
    rng = np.random.default_rng([_seed(s.name), split])
    batches = [s.data(rng, 1) for _ in range(N_BATCHES)]
    arrays = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    size = path.stat().st_size
    if size > 40e6:
        raise RuntimeError(f"{path.name} is {size / 1e6:.1f} MB, over 40 MB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".models" / "zoo", help="output folder (default .models/zoo)")
    p.add_argument("--only", default="", help="comma-separated model names (default: all)")
    p.add_argument("--force", action="store_true", help="re-export and regenerate existing files")
    p.add_argument("--list", action="store_true", help="list the models and exit")
    a = p.parse_args(argv)
    if a.list:
        for s in SPECS.values():
            print(f"{s.name:24s} opset {s.opset:2d}  {s.doc}")
        return 0
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        s = SPECS[name]
        onnx_path = a.out / f"{name}.onnx"
        t0 = time.perf_counter()
        try:
            if a.force or not onnx_path.exists():
                info = export_onnx(s, onnx_path)
                err = info["ort_vs_torch"]
                err = f"onnxruntime vs torch max rel err {err:.2e}" if isinstance(err, float) else err
                status = f"exported ({info['bn_nodes']} BatchNormalization nodes; {err})"
            else:
                status = "exists, kept"
            for split, suffix in ((1, "calib"), (2, "eval")):
                npz = a.out / f"{name}.{suffix}.npz"
                if a.force or not npz.exists():
                    write_npz(s, npz, split)
            print(f"{name:24s} {status} [{time.perf_counter() - t0:.1f}s]", flush=True)
        except Exception as e:  # noqa: BLE001  (a failed model is reported, the others still run)
            kind = "SKIPPED (optional)" if s.optional else "FAILED"
            print(f"{name:24s} {kind}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            if os.environ.get("ZOO_DEBUG"):
                traceback.print_exc()
            for tmp in a.out.glob(f"{name}.*tmp*"):
                tmp.unlink()
            if not s.optional:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
