"""Hand-built torch models of the zoo, written in the styles of other exporters and model families.

- ``Detector``: YOLO-style (ultralytics v8 layout): C2f backbone, SPPF, FPN/PAN neck with
  Upsample + Concat, decoupled heads at strides 8/16/32 with DFL box regression, anchor
  points computed from the feature maps' shapes inside the graph.
- ``PicoDetStyle``: PP-PicoDet-like layout detector: depthwise-separable convs with
  hard-swish, SE, channel shuffle, 4 levels (strides 8..64), 8 outputs.
- ``NHWCResNet``: ResNet-18 written NHWC like a TensorFlow/Caffe conversion: every Conv and
  MaxPool between Transposes, BatchNorm as Sub/Mul/Add on the NHWC tensor.
- ``CRNN``: conv stack to height 1, BiLSTM x2, Linear to 6625 classes, log_softmax.
- ``AudioFrontend``: STFT as two strided Conv1d, power, mel MatMul, log, top-dB clip, CNN.
- ``TinyTransformer``: 2 encoder layers, hand-written attention, LayerNorm and erf GELU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --- YOLO-style detector -----------------------------------------------------------------------
class ConvBnAct(nn.Sequential):
    def __init__(self, c1, c2, k=3, s=1, groups=1, act=nn.SiLU):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c2), act())


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnAct(c, c, 3), ConvBnAct(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with 2 convs (ultralytics): split in two, n bottlenecks, concat all."""

    def __init__(self, c1, c2, n=1, shortcut=True):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBnAct(c1, 2 * self.c, 1)
        self.cv2 = ConvBnAct((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = ConvBnAct(c1, c_, 1), ConvBnAct(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over reg_max bins, expectation as a fixed 1x1 conv."""

    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats, strides, offset=0.5):
    """Anchor points and stride per point from the feature maps' shapes (Shape -> Range -> meshgrid)."""
    points, stride_t = [], []
    for feat, stride in zip(feats, strides):
        _, _, h, w = feat.shape
        sx = torch.arange(end=w, dtype=feat.dtype) + offset
        sy = torch.arange(end=h, dtype=feat.dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_t.append(torch.full((h * w, 1), stride, dtype=feat.dtype))
    return torch.cat(points), torch.cat(stride_t)


class Detector(nn.Module):
    """YOLOv8n-like detector; output [batch, N, 4 + nc] with boxes as (cx, cy, w, h) in pixels."""

    def __init__(self, nc=80, reg_max=16, w=(16, 32, 64, 128, 256)):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, (8, 16, 32)
        self.b0 = nn.Sequential(ConvBnAct(3, w[0], 3, 2), ConvBnAct(w[0], w[1], 3, 2), C2f(w[1], w[1], 1))
        self.b1 = nn.Sequential(ConvBnAct(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))  # P3, stride 8
        self.b2 = nn.Sequential(ConvBnAct(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))  # P4, stride 16
        self.b3 = nn.Sequential(ConvBnAct(w[3], w[4], 3, 2), C2f(w[4], w[4], 1), SPPF(w[4], w[4]))  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(w[4] + w[3], w[3], 1, shortcut=False)
        self.td3 = C2f(w[3] + w[2], w[2], 1, shortcut=False)
        self.down3 = ConvBnAct(w[2], w[2], 3, 2)
        self.bu4 = C2f(w[2] + w[3], w[3], 1, shortcut=False)
        self.down4 = ConvBnAct(w[3], w[3], 3, 2)
        self.bu5 = C2f(w[3] + w[4], w[4], 1, shortcut=False)
        chs = (w[2], w[3], w[4])
        c2, c3 = max(16, chs[0] // 4, 4 * reg_max), max(chs[0], min(nc, 100))
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, c2, 3), ConvBnAct(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in chs)
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, c3, 3), ConvBnAct(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in chs)
        self.dfl = DFL(reg_max)
        for seq, s in zip(self.cls, self.strides):  # ultralytics' class-score prior: few objects
            nn.init.constant_(seq[-1].bias, math.log(5 / nc / (640 / s) ** 2))

    def forward(self, x):
        p3 = self.b1(self.b0(x))
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        n4 = self.td4(torch.cat([self.up(p5), p4], 1))
        o3 = self.td3(torch.cat([self.up(n4), p3], 1))
        o4 = self.bu4(torch.cat([self.down3(o3), n4], 1))
        o5 = self.bu5(torch.cat([self.down4(o4), p5], 1))
        feats = [o3, o4, o5]
        b = x.shape[0]
        outs = [torch.cat((self.box[i](f), self.cls[i](f)), 1) for i, f in enumerate(feats)]
        x_cat = torch.cat([o.view(b, 4 * self.reg_max + self.nc, -1) for o in outs], 2)
        box, cls = x_cat.split((4 * self.reg_max, self.nc), 1)
        anchors, strides = (t.transpose(0, 1) for t in make_anchors(feats, self.strides))
        lt, rb = self.dfl(box).chunk(2, 1)
        anchors = anchors.unsqueeze(0)
        x1y1, x2y2 = anchors - lt, anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1).transpose(1, 2)


# --- PP-PicoDet-style layout detector ----------------------------------------------------------
class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


def channel_shuffle(x, groups=2):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ESBlock(nn.Module):
    """ESNet-like block: stride 1 splits channels, transforms half (PW-DW-SE-PW), concat, shuffle;
    stride 2 runs a depthwise-separable downsampling on both branches."""

    def __init__(self, c1, c2, stride):
        super().__init__()
        self.stride = stride
        if stride == 1:
            c = c1 // 2
            self.branch = nn.Sequential(
                ConvBnAct(c, c, 1, act=nn.Hardswish), ConvBnAct(c, c, 3, 1, groups=c, act=nn.Identity),
                SE(c), ConvBnAct(c, c, 1, act=nn.Hardswish))
        else:
            c = c2 // 2
            self.left = nn.Sequential(ConvBnAct(c1, c1, 3, 2, groups=c1, act=nn.Identity),
                                      ConvBnAct(c1, c, 1, act=nn.Hardswish))
            self.branch = nn.Sequential(
                ConvBnAct(c1, c, 1, act=nn.Hardswish), ConvBnAct(c, c, 3, 2, groups=c, act=nn.Identity),
                SE(c), ConvBnAct(c, c, 1, act=nn.Hardswish))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, 1)
            return channel_shuffle(torch.cat([a, self.branch(b)], 1))
        return channel_shuffle(torch.cat([self.left(x), self.branch(x)], 1))


class DWSep(nn.Sequential):
    def __init__(self, c1, c2, k=5, s=1):
        super().__init__(ConvBnAct(c1, c1, k, s, groups=c1, act=nn.Hardswish), ConvBnAct(c1, c2, 1, act=nn.Hardswish))


class PicoDetStyle(nn.Module):
    """Outputs: score_s8..score_s64 [1, N_l, nc] (Sigmoid) and box_s8..box_s64 [1, N_l, 4*(reg_max+1)]."""

    def __init__(self, nc=5, reg_max=7, width=96):
        super().__init__()
        self.nc, self.nreg = nc, 4 * (reg_max + 1)
        self.stem = nn.Sequential(ConvBnAct(3, 24, 3, 2, act=nn.Hardswish), nn.MaxPool2d(3, 2, 1))  # stride 4

        def stage(c1, c2, n):
            return nn.Sequential(ESBlock(c1, c2, 2), *[ESBlock(c2, c2, 1) for _ in range(n)])

        self.s3, self.s4, self.s5 = stage(24, 96, 2), stage(96, 192, 5), stage(192, 384, 2)
        self.lat = nn.ModuleList(ConvBnAct(c, width, 1, act=nn.Hardswish) for c in (96, 192, 384))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td = nn.ModuleList(DWSep(2 * width, width) for _ in range(2))
        self.down = nn.ModuleList(DWSep(width, width, 5, 2) for _ in range(3))
        self.bu = nn.ModuleList(DWSep(2 * width, width) for _ in range(2))
        self.tower = nn.ModuleList(nn.Sequential(DWSep(width, width), DWSep(width, width)) for _ in range(4))
        self.head_cls = nn.ModuleList(nn.Conv2d(width, nc, 1) for _ in range(4))
        self.head_reg = nn.ModuleList(nn.Conv2d(width, self.nreg, 1) for _ in range(4))
        for conv in self.head_cls:  # focal-loss prior: scores start low, as in trained detectors
            nn.init.constant_(conv.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x):
        c3 = self.s3(self.stem(x))
        c4 = self.s4(c3)
        c5 = self.s5(c4)
        l3, l4, l5 = (lat(c) for lat, c in zip(self.lat, (c3, c4, c5)))
        t4 = self.td[0](torch.cat([self.up(l5), l4], 1))
        t3 = self.td[1](torch.cat([self.up(t4), l3], 1))
        o4 = self.bu[0](torch.cat([self.down[0](t3), t4], 1))
        o5 = self.bu[1](torch.cat([self.down[1](o4), l5], 1))
        o6 = self.down[2](o5)
        scores, boxes = [], []
        for i, f in enumerate((t3, o4, o5, o6)):
            f = self.tower[i](f)
            scores.append(torch.sigmoid(self.head_cls[i](f)).flatten(2).transpose(1, 2))
            boxes.append(self.head_reg[i](f).flatten(2).transpose(1, 2))
        return (*scores, *boxes)


# --- NHWC ResNet-18 (TensorFlow/Caffe converter style) ----------------------------------------
class NHWCConv(nn.Module):
    """Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1), as converters wrap every NCHW-only op."""

    def __init__(self, c1, c2, k, s=1, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=bias)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class NHWCBatchNorm(nn.Module):
    """BatchNorm as (x - mean) * (gamma / sqrt(var + eps)) + beta on the last axis: Sub, Mul, Add.

    With ``calibrating`` set, forward uses the batch's statistics and stores them (run once on
    data to give the random network realistic statistics)."""

    def __init__(self, c, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))
        self.gamma = nn.Parameter(torch.empty(c).uniform_(0.5, 1.5))
        self.beta = nn.Parameter(torch.empty(c).normal_(0.0, 0.25))
        self.calibrating = False

    def forward(self, x):
        if self.calibrating:
            self.mean.copy_(x.mean(dim=(0, 1, 2)))
            self.var.copy_(x.var(dim=(0, 1, 2), unbiased=False))
        scale = self.gamma * torch.rsqrt(self.var + self.eps)  # folded to one constant on export
        return (x - self.mean) * scale + self.beta


class NHWCBasicBlock(nn.Module):
    def __init__(self, c1, c2, stride):
        super().__init__()
        self.conv1, self.bn1 = NHWCConv(c1, c2, 3, stride), NHWCBatchNorm(c2)
        self.conv2, self.bn2 = NHWCConv(c2, c2, 3), NHWCBatchNorm(c2)
        self.short = None
        if stride != 1 or c1 != c2:
            self.short = nn.Sequential(NHWCConv(c1, c2, 1, stride), NHWCBatchNorm(c2))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class NHWCResNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = NHWCConv(3, 64, 7, 2), NHWCBatchNorm(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, c = [], 64
        for i, c2 in enumerate((64, 128, 256, 512)):
            layers += [NHWCBasicBlock(c, c2, 1 if i == 0 else 2), NHWCBasicBlock(c2, c2, 1)]
            c = c2
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):  # x: [N, H, W, C]
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.layers(x)
        return self.fc(x.mean(dim=(1, 2)))


# --- CRNN text recognizer ---------------------------------------------------------------------
class CRNN(nn.Module):
    """[B, 3, 32, W] -> log-probabilities [B, W/4, num_classes] (CTC head; blank = class 0)."""

    def __init__(self, num_classes=6625, hidden=128):
        super().__init__()

        def block(c1, c2):
            return [nn.Conv2d(c1, c2, 3, 1, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU()]

        self.cnn = nn.Sequential(
            *block(3, 32), nn.MaxPool2d(2, 2),                      # 16 x W/2
            *block(32, 64), nn.MaxPool2d(2, 2),                     # 8 x W/4
            *block(64, 128), *block(128, 128), nn.MaxPool2d((2, 1), (2, 1)),   # 4 x W/4
            *block(128, 192), *block(192, 192), nn.MaxPool2d((2, 1), (2, 1)),  # 2 x W/4
            nn.Conv2d(192, 192, (2, 1), bias=False), nn.BatchNorm2d(192), nn.ReLU(),  # 1 x W/4
        )
        self.rnn = nn.LSTM(192, hidden, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, num_classes)
        with torch.no_grad():  # peaky, blank-dominated CTC posteriors, as a trained recognizer gives
            self.fc.weight.normal_(0.0, 2.0)
            self.fc.bias.uniform_(-1.0, 1.0)
            self.fc.bias[0] = 10.0

    def forward(self, x):
        f = self.cnn(x).squeeze(2)       # [B, C, T]
        f = f.permute(2, 0, 1)           # [T, B, C]
        y, _ = self.rnn(f)               # [T, B, 2H]
        y = self.fc(y).permute(1, 0, 2)  # [B, T, K]
        return F.log_softmax(y, dim=2)


# --- audio front end --------------------------------------------------------------------------
def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def mel_filterbank(sr=16000, n_fft=400, n_mels=80, fmin=20.0, fmax=None):
    """HTK-scale triangular mel filters, [n_fft // 2 + 1, n_mels], area-normalized (Slaney style)."""
    fmax = fmax or sr / 2
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        up = (freqs - lo) / (c - lo)
        down = (hi - freqs) / (hi - c)
        fb[:, m] = np.maximum(0, np.minimum(up, down)) * 2.0 / (hi - lo)
    return fb.astype(np.float32)


def dft_basis(n_fft=400):
    """Hann-windowed real DFT basis as Conv1d weights: (real, imag), each [n_fft//2+1, 1, n_fft]."""
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann
    ang = 2 * np.pi * k * n / n_fft
    real = (window * np.cos(ang))[:, None, :].astype(np.float32)
    imag = (-window * np.sin(ang))[:, None, :].astype(np.float32)
    return real, imag


class AudioFrontend(nn.Module):
    """waveform [B, 16000] -> log-mel [B, 1, 98, 80] -> CNN -> logits [B, num_classes]."""

    def __init__(self, num_classes=35, n_fft=400, hop=160, n_mels=80, top_db=8.0):
        super().__init__()
        real, imag = dft_basis(n_fft)
        self.stft_re = nn.Conv1d(1, n_fft // 2 + 1, n_fft, hop, bias=False).requires_grad_(False)
        self.stft_im = nn.Conv1d(1, n_fft // 2 + 1, n_fft, hop, bias=False).requires_grad_(False)
        self.stft_re.weight.data = torch.from_numpy(real)
        self.stft_im.weight.data = torch.from_numpy(imag)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(n_fft=n_fft, n_mels=n_mels)))
        self.top_db = top_db

        def block(c1, c2, s):
            return [nn.Conv2d(c1, c2, 3, s, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU()]

        self.cnn = nn.Sequential(*block(1, 32, 2), *block(32, 64, 2), *block(64, 64, 1),
                                 *block(64, 128, 2), *block(128, 128, 1), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, wav):
        x = wav.unsqueeze(1)                                   # [B, 1, S]
        re, im = self.stft_re(x), self.stft_im(x)              # [B, 201, T]
        power = re * re + im * im
        mel = torch.matmul(power.transpose(1, 2), self.mel)    # [B, T, 80]
        logmel = torch.log(mel + 1e-6)
        peak = logmel.amax(dim=(1, 2), keepdim=True)
        logmel = torch.maximum(logmel, peak - self.top_db)     # top-dB clip (natural-log units)
        return self.fc(self.cnn(logmel.unsqueeze(1)).flatten(1))


# --- tiny transformer encoder -----------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, self.h, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        y = torch.matmul(att.softmax(-1), v).transpose(1, 2).reshape(b, s, self.h * self.dh)
        return self.o(y)


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.attn, self.ln1 = SelfAttention(d, heads), nn.LayerNorm(d)
        self.ff1, self.act, self.ff2, self.ln2 = nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d), nn.LayerNorm(d)

    def forward(self, x):  # post-norm, as BERT
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff2(self.act(self.ff1(x))))


class TinyTransformer(nn.Module):
    def __init__(self, d=128, heads=4, ffn=512, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
