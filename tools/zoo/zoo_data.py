"""Seeded generators of plausible inputs for the zoo models (numpy only).

Each generator takes a ``numpy.random.Generator`` and returns one batch as float32. They
are not real data sets; they are meant to put activations in realistic ranges, unlike
white noise: images are smooth multi-scale random fields with a few hard-edged shapes,
normalized the way the model family expects; text lines and documents have dark strokes
on light backgrounds; audio is a mixture of harmonic tones and noise.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def _resize_bilinear(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a [C, gh, gw] grid to [C, h, w] (separable, corner-aligned)."""
    _, gh, gw = grid.shape
    ys = np.linspace(0.0, gh - 1.0, h)
    xs = np.linspace(0.0, gw - 1.0, w)
    y0 = np.clip(np.floor(ys).astype(int), 0, gh - 2) if gh > 1 else np.zeros(h, int)
    x0 = np.clip(np.floor(xs).astype(int), 0, gw - 2) if gw > 1 else np.zeros(w, int)
    fy = (ys - y0)[None, :, None]
    fx = (xs - x0)[None, None, :]
    y1 = np.minimum(y0 + 1, gh - 1)
    x1 = np.minimum(x0 + 1, gw - 1)
    rows = grid[:, y0, :] * (1 - fy) + grid[:, y1, :] * fy
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def smooth_field(rng: np.random.Generator, channels: int, h: int, w: int, octaves=(2, 4, 8, 16, 32, 64)) -> np.ndarray:
    """Zero-mean, unit-std multi-octave random field with a 1/f-like spectrum, [C, h, w]."""
    out = np.zeros((channels, h, w), dtype=np.float64)
    for i, cells in enumerate(octaves):
        grid = rng.standard_normal((channels, cells + 1, int(cells * w / h) + 1 if h else cells + 1))
        out += _resize_bilinear(grid, h, w) / (1.0 + i) ** 1.2
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-8
    return out


def natural_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One RGB image in [0, 1], [3, h, w]: correlated colour field plus a few flat shapes."""
    lum = smooth_field(rng, 1, h, w)
    chroma = smooth_field(rng, 2, h, w)
    mix = np.array([[1.0, 0.25, 0.10], [1.0, -0.15, 0.05], [1.0, -0.10, -0.25]])
    img = np.einsum("ck,khw->chw", mix, np.concatenate([lum, chroma]))
    img = 0.45 + 0.2 * rng.uniform(0.6, 1.4) * img + rng.uniform(-0.1, 0.1, size=(3, 1, 1))
    for _ in range(rng.integers(2, 7)):  # occluding shapes give edges
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        y1 = min(h, y0 + rng.integers(8, max(9, h // 2)))
        x1 = min(w, x0 + rng.integers(8, max(9, w // 2)))
        colour = rng.uniform(0.0, 1.0, size=(3, 1, 1))
        if rng.random() < 0.5:
            img[:, y0:y1, x0:x1] = colour + 0.05 * img[:, y0:y1, x0:x1]
        else:  # ellipse
            yy, xx = np.mgrid[y0:y1, x0:x1]
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            img[:, y0:y1, x0:x1] = np.where(mask, colour, img[:, y0:y1, x0:x1])
    return np.clip(img, 0.0, 1.0)


def imagenet_images(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """[batch, 3, h, w] float32, normalized with the ImageNet mean and std."""
    imgs = np.stack([natural_image(rng, h, w) for _ in range(batch)])
    return ((imgs - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def imagenet_images_nhwc(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """[batch, h, w, 3] float32 (the NHWC layout of TensorFlow-converted models)."""
    return np.ascontiguousarray(imagenet_images(rng, batch, h, w).transpose(0, 2, 3, 1))


def text_lines(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """[batch, 3, h, w] float32 text-line crops, normalized to [-1, 1] as OCR recognizers expect."""
    out = []
    for _ in range(batch):
        bg = 0.85 + 0.06 * smooth_field(rng, 1, h, w)[0]
        ink = rng.uniform(0.0, 0.3)
        img = bg.copy()
        x = int(rng.integers(2, 12))
        base = h // 2 + int(rng.integers(-2, 3))
        size = int(rng.integers(h // 2, h - 6))
        while x < w - 6:
            cw = int(rng.integers(size // 3, size))  # one glyph: a few strokes
            for _ in range(rng.integers(1, 4)):
                kind = rng.integers(0, 3)
                sw = int(rng.integers(1, 4))
                if kind == 0:  # vertical stroke
                    sx = x + int(rng.integers(0, max(1, cw - sw)))
                    img[base - size // 2:base + size // 2, sx:sx + sw] = ink
                elif kind == 1:  # horizontal stroke
                    sy = base - size // 2 + int(rng.integers(0, size))
                    img[sy:sy + sw, x:x + cw] = ink
                else:  # dot / blob
                    sy = base - size // 2 + int(rng.integers(0, size - 3))
                    img[sy:sy + 3, x:x + 3] = ink
            x += cw + int(rng.integers(1, 5)) + (int(rng.integers(4, 12)) if rng.random() < 0.15 else 0)
        tint = rng.uniform(0.9, 1.0, size=(3, 1, 1))
        out.append(np.clip(img[None] * tint + 0.02 * rng.standard_normal((3, h, w)), 0, 1))
    return ((np.stack(out) - 0.5) / 0.5).astype(np.float32)


def documents(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """[batch, 3, h, w] float32 page-layout images (text blocks, titles, figures, tables), ImageNet-normalized."""
    out = []
    for _ in range(batch):
        img = np.full((3, h, w), rng.uniform(0.88, 1.0)) + 0.01 * smooth_field(rng, 1, h, w)
        y = int(rng.integers(4, 16))
        while y < h - 20:
            kind = rng.choice(["text", "text", "title", "figure", "table"])
            x0 = int(rng.integers(6, 30))
            x1 = w - int(rng.integers(6, 30))
            if kind == "title":
                hh = int(rng.integers(8, 14))
                img[:, y:y + hh, x0:x0 + int((x1 - x0) * rng.uniform(0.3, 0.8))] = rng.uniform(0.0, 0.3)
                y += hh + int(rng.integers(6, 12))
            elif kind == "text":
                for _ in range(rng.integers(2, 8)):
                    if y > h - 8:
                        break
                    end = x1 if rng.random() < 0.8 else x0 + int((x1 - x0) * rng.uniform(0.2, 0.9))
                    line = np.where(rng.random(end - x0) < 0.8, rng.uniform(0.1, 0.4), 1.0)
                    img[:, y:y + 4, x0:end] = np.minimum(img[:, y:y + 4, x0:end], line)
                    y += 7
                y += int(rng.integers(4, 10))
            elif kind == "figure":
                hh = int(min(h - y - 4, rng.integers(30, 90)))
                img[:, y:y + hh, x0:x1] = natural_image(rng, hh, x1 - x0)
                y += hh + int(rng.integers(6, 12))
            else:  # table: a grid of lines
                hh = int(min(h - y - 4, rng.integers(30, 80)))
                rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
                for r in np.linspace(y, y + hh - 1, rows + 1).astype(int):
                    img[:, r, x0:x1] = 0.2
                for c in np.linspace(x0, x1 - 1, cols + 1).astype(int):
                    img[:, y:y + hh, c] = 0.2
                y += hh + int(rng.integers(6, 12))
        out.append(np.clip(img, 0, 1))
    return ((np.stack(out) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def audio(rng: np.random.Generator, batch: int, samples: int, sr: int = 16000) -> np.ndarray:
    """[batch, samples] float32 waveforms: harmonic tones with envelopes and glides, plus coloured noise."""
    t = np.arange(samples) / sr
    out = []
    for _ in range(batch):
        x = np.zeros(samples)
        for _ in range(rng.integers(1, 5)):
            f0 = rng.uniform(80, 2000)
            glide = rng.uniform(-0.3, 0.3) * f0 * t  # slow pitch change
            start = rng.uniform(0, 0.6)
            dur = rng.uniform(0.1, 1.0)
            env = np.clip((t - start) / 0.02, 0, 1) * np.exp(-np.clip(t - start, 0, None) / dur) * (t >= start)
            phase = 2 * np.pi * np.cumsum(f0 + glide) / sr
            for k in range(1, rng.integers(2, 7)):
                x += env * rng.uniform(0.2, 1.0) / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
        noise = np.cumsum(rng.standard_normal(samples)) * 0.02  # brown-ish
        noise = noise - np.convolve(noise, np.ones(64) / 64, mode="same") + rng.standard_normal(samples)
        x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.1, 0.8)
        x += noise / (noise.std() + 1e-9) * rng.uniform(0.002, 0.05)
        out.append(x)
    return np.stack(out).astype(np.float32)


def standard_normal(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
