"""Per-sample augmentations; every random draw comes from a counter-based key (see rng.py).

image: (data2vec 1.0 vision only, `data.color_jitter` > 0) colour jitter as torchvision's
       ColorJitter(b, c, s) on PIL images: brightness, contrast and saturation factors uniform in
       [1 - s, 1 + s], applied in a random order through PIL's ImageEnhance (BEiT's pipeline:
       jitter, flip, crop); then
       random-resized-crop (torchvision's algorithm: 10 tries at scale x aspect in
       [3/4, 4/3], else a centre crop) straight to the model size with bicubic resampling
       (the reference's `RandomResizedCrop(scale=(0.2, 1.0), interpolation=BICUBIC)`, docs/REFERENCE.md §1.10
       D5), horizontal flip, then
       ImageNet mean/std normalization of the whole batch.
audio: a random window of at most `crop_len` samples, then zero mean / unit variance.
text:  a random window of at most `max_tokens` tokens.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

from . import image_modes, rng

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# (x / 255 - mean) / std for every uint8 value, per channel; 1 channel uses the mean statistics
_NORM_LUT = {3: ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None]),
             1: ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - IMAGENET_MEAN.mean()) / IMAGENET_STD.mean())}
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_RESAMPLE = Image.Resampling.BICUBIC  # docs/REFERENCE.md §1.10 D5


def decode_image(row: dict, channels: int) -> Image.Image:
    """A PIL image in mode RGB (channels=3) or L (channels=1) from a shard row."""
    if "pixels" in row and row["pixels"] is not None:
        h, w, c = int(row["pix_height"]), int(row["pix_width"]), int(row["pix_channels"])
        arr = np.asarray(row["pixels"]).reshape((h, w) if c == 1 else (h, w, c))
        im = Image.fromarray(arr)
    else:
        im = Image.open(io.BytesIO(row["image"]))
        # d2v2-prep stores only 8-bit RGB/L; a shard of an older one may hold 16-bit or alpha images,
        # which a plain convert clips to white / blackens (image_modes)
        im = image_modes.to_8bit(im)
    want = "RGB" if channels == 3 else "L"
    return im if im.mode == want else im.convert(want)  # greyscale -> 3 channels when the model wants RGB


def crop_box(u: np.ndarray, width: int, height: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """Random-resized-crop box (left, top, right, bottom) from 42 uniforms `u`."""
    area = width * height
    for t in range(10):
        a, r, x, y = u[4 * t:4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        ratio = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * r)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(x * (width - w + 1))
            top = int(y * (height - h + 1))
            return left, top, left + w, top + h
    # fallback: centre crop with the aspect ratio clamped to [3/4, 4/3]
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(im: Image.Image, u: np.ndarray, strength: float) -> Image.Image:
    """torchvision's ColorJitter(strength, strength, strength, hue=0) on a PIL image, from 6
    uniforms `u`: u[0:3] order the three transforms (argsort: a random permutation), u[3:6] draw
    the brightness, contrast and saturation factors in [max(0, 1 - s), 1 + s]."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    for i in np.argsort(u[:3], kind="stable"):
        im = _ENHANCERS[i](im).enhance(lo + (hi - lo) * float(u[3 + i]))
    return im


def augment_images(rows: list[dict], keys: np.ndarray, size: int, channels: int, scale: tuple[float, float],
                   hflip: bool, jitter: float = 0.0) -> np.ndarray:
    """float32 [B, C, size, size], normalized; keys [B] are the samples' augmentation keys."""
    u_crop = rng.uniform(keys, 40, rng.STREAM_CROP)
    u_flip = rng.uniform(keys, 1, rng.STREAM_FLIP)[:, 0]
    u_jit = rng.uniform(keys, 6, rng.STREAM_JITTER) if jitter > 0 else None
    out = np.empty((len(rows), size, size, channels), dtype=np.uint8)
    for b, row in enumerate(rows):
        im = decode_image(row, channels)
        if u_jit is not None:
            im = color_jitter(im, u_jit[b], jitter)
        box = crop_box(u_crop[b], im.width, im.height, scale)
        im = im.resize((size, size), CROP_RESAMPLE, box=box)
        if hflip and u_flip[b] < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(im)
        out[b] = a[..., None] if a.ndim == 2 else a
    # Normalize through a 256-entry table per channel: one gather instead of several float passes.
    x = np.empty((len(rows), channels, size, size), dtype=np.float32)
    lut = _NORM_LUT[channels]
    for c in range(channels):
        np.take(lut[c], out[..., c], out=x[:, c])
    return x


def crop_window(n: int, length: int, u: float) -> tuple[int, int]:
    """(start, end) of a window of min(n, length) items, start = floor(u * (n - length + 1))."""
    if n <= length:
        return 0, n
    s = int(u * (n - length + 1))
    return s, s + length


def normalize_wave(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (float32); silent clips stay zero."""
    x = x.astype(np.float32)
    m = x.mean()
    sd = x.std()
    return (x - m) / (sd + 1e-5) if sd > 0 else x - m
