"""Train the small demo CNN on scikit-learn's digits and export it to ONNX.

This is a tool script, not part of onnxopt: it needs torch, onnx, onnxruntime,
scikit-learn and numpy, and writes the three files in examples/ that the README
quick start uses:

    digits_cnn.onnx     input `image` [batch,1,8,8] float32 -> output `logits` [batch,10]
    digits_calib.npz    `image` (8, 8, 1, 8, 8): a stack of 8 batches of 8 TRAIN images
    digits_test.npz     `image` (N, 1, 8, 8): the whole TEST split as one batch,
                        plus `label` (N,) int64 for accuracy evaluation

The exported graph deliberately keeps its BatchNormalization nodes unfused and an
inference-mode Dropout node, the way many exporters leave them, so that the
optimizer's lossless passes (fuse-conv-bn, eliminate-identity) have real work to do.

Usage:  python tools/train_digits_cnn.py [--out examples/] [--epochs 40]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
OPSET = 17
CALIB_BATCHES = 8
CALIB_BATCH_SIZE = 8
MAX_MODEL_BYTES = 1 << 20
MIN_TEST_ACCURACY = 0.95


class _InferenceDropout(torch.autograd.Function):
    """Identity in torch; exported as an ONNX Dropout in inference mode.

    The TorchScript exporter drops eval-mode dropout entirely. Emitting an
    inference-mode Dropout (no training_mode input, so it is the identity by the
    ONNX spec) keeps the node other exporters leave behind, with the same numbers.
    """

    @staticmethod
    def forward(ctx, x, ratio):
        return x.clone()

    @staticmethod
    def symbolic(g, x, ratio):
        ratio_const = g.op("Constant", value_t=torch.tensor(ratio, dtype=torch.float32))
        return g.op("Dropout", x, ratio_const)


class ExportedDropout(nn.Dropout):
    """nn.Dropout while training; an exportable identity in eval mode."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        return _InferenceDropout.apply(x, float(self.p))


def conv_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    # bias=True on purpose: exporters commonly keep a conv bias before BN, and
    # fuse-conv-bn must fold it too.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.first = conv_bn(channels, channels)
        self.second = conv_bn(channels, channels)

    def forward(self, x):
        y = torch.relu(self.first(x))
        return torch.relu(self.second(y) + x)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16), nn.ReLU(),
            conv_bn(16, 32), nn.ReLU(),
            ResidualBlock(32),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            ExportedDropout(0.25),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, image):
        return self.classifier(self.features(image))


def load_split():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # [0,1], (N,1,8,8)
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.25, random_state=0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # same numbers on every run, and the machine is shared


def train(model, x_train, y_train, epochs: int, batch_size: int = 32):
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    order_rng = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=order_rng)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(x):.4f}")


def export(model, path: str) -> None:
    model.eval()
    with warnings.catch_warnings():
        # PRESERVE on an eval-mode model: the exporter warns about training-mode
        # constant folding, which does not apply here. PRESERVE (not EVAL) is what
        # keeps BatchNormalization from being folded into Conv at export time.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
        )


def check_exported(path: str) -> collections.Counter:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    hist = collections.Counter(n.op_type for n in model.graph.node)
    problems = []
    if hist["BatchNormalization"] == 0:
        problems.append("no BatchNormalization node (BN was fused at export)")
    if hist["Dropout"] + hist["Identity"] == 0:
        problems.append("no Dropout or Identity node")
    if any(n.op_type == "BatchNormalization" and any(
            a.name == "training_mode" and a.i != 0 for a in n.attribute) for n in model.graph.node):
        problems.append("a BatchNormalization node is in training mode")
    size = os.path.getsize(path)
    if size > MAX_MODEL_BYTES:
        problems.append(f"model is {size} bytes, over {MAX_MODEL_BYTES}")
    if problems:
        raise SystemExit(f"export check failed for {path}: " + "; ".join(problems))
    return hist


def onnx_logits(path: str, images: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    # Run the graph exactly as exported, without onnxruntime's own BN fusion.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images})[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples", help="output folder (default: examples/)")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)

    seed_everything(SEED)
    x_train, x_test, y_train, y_test = load_split()
    print(f"train {len(x_train)} images, test {len(x_test)} images")

    model = DigitsCNN()
    train(model, x_train, y_train, args.epochs)
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    print(f"torch test accuracy:       {torch_acc:.4f} ({len(y_test)} images)")

    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "digits_cnn.onnx")
    export(model, model_path)
    hist = check_exported(model_path)
    print("exported op histogram:", dict(sorted(hist.items())))

    ort_logits = onnx_logits(model_path, x_test)
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"onnxruntime test accuracy: {ort_acc:.4f}  (max |logit diff| vs torch {max_diff:.2e})")
    if max_diff > 1e-4 or ort_acc != torch_acc:
        raise SystemExit("exported model disagrees with torch in eval mode")
    if ort_acc < MIN_TEST_ACCURACY:
        raise SystemExit(f"test accuracy {ort_acc:.4f} below {MIN_TEST_ACCURACY}")

    # Calibration comes from the TRAIN split only; evaluation uses the TEST split.
    calib = x_train[:CALIB_BATCHES * CALIB_BATCH_SIZE].reshape(
        CALIB_BATCHES, CALIB_BATCH_SIZE, 1, 8, 8)
    np.savez_compressed(os.path.join(args.out, "digits_calib.npz"), image=calib)
    np.savez_compressed(os.path.join(args.out, "digits_test.npz"), image=x_test, label=y_test)

    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        print(f"wrote {os.path.join(args.out, name)} ({os.path.getsize(os.path.join(args.out, name))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
