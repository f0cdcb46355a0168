"""Every PIL image mode to the 8-bit RGB or L image a viewer shows (docs/DATA.md, "Image modes").

PIL's own `convert("RGB")` (what torchvision's loader calls) clips 16-bit greyscale (modes
I;16*, and I as PIL opens 16-bit PGM) to 255 instead of scaling it, so a mid-grey 16-bit PNG
trains as white; it also drops alpha, so transparent pixels train as whatever colour the file
happens to store under them (often black).  `to_8bit` fixes both:

* I;16, I;16B, I;16L, I;16N and I with values in 0..65535: round(v * 255 / 65535) -> L;
* LA, PA, RGBA, La, RGBa, P or L or RGB with a `transparency` entry: composited over white
  (ALPHA_BACKGROUND, the choice of img2dataset, which built LAION) -> RGB, or L for LA/La;
* 1 -> L (0 / 255); P, CMYK, YCbCr, LAB, HSV, RGBX -> PIL's convert("RGB");
* F (32-bit float), I with values outside 0..65535 or from a 32-bit TIFF, and any other mode:
  UnsupportedImage (their range is not defined: 0..1? 0..255? 0..2^32-1?).

EXIF orientation is applied by the caller (`d2v2-prep image`), with `ImageOps.exif_transpose`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA_BACKGROUND = 255  # white, in every channel
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_TO_RGB = {"P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
TIFF_BITS_PER_SAMPLE = 258


class UnsupportedImage(ValueError):
    """An image whose pixels have no defined 8-bit meaning; the message says what to do."""


def is_8bit(im: Image.Image) -> bool:
    """Whether `im` already is what to_8bit returns (RGB or L, no transparency)."""
    return im.mode in ("RGB", "L") and "transparency" not in im.info


def to_8bit(im: Image.Image) -> Image.Image:
    """`im` as an 8-bit RGB or L image (`im` itself when is_8bit), by the rules above."""
    if is_8bit(im):
        return im
    mode = im.mode
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(im)
        if mode == "I":
            bits = getattr(im, "tag_v2", {}).get(TIFF_BITS_PER_SAMPLE)
            lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
            if bits not in (None, 16) or lo < 0 or hi > 65535:
                raise UnsupportedImage(f"32-bit integer pixels (mode I, values {lo}..{hi}) have no defined 8-bit "
                                       "range: convert the file to 8 or 16 bits per sample")
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(a, "L")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")  # P/L/RGB + transparency, premultiplied La/RGBa: PIL un-does them
        out = Image.alpha_composite(Image.new("RGBA", im.size, (ALPHA_BACKGROUND,) * 3 + (255,)), rgba)
        return out.convert("L" if mode in ("LA", "La", "L") else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode in _TO_RGB:
        return im.convert("RGB")
    if mode == "F":
        raise UnsupportedImage("32-bit float pixels (mode F) have no defined 8-bit range (0..1? 0..255?): "
                               "convert the file to 8 or 16 bits per sample")
    raise UnsupportedImage(f"pixel mode {mode} has no defined 8-bit meaning: convert the file to 8-bit RGB or "
                           "greyscale")
