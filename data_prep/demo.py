"""A small real image corpus that installs with a registry package: scikit-learn's bundled
handwritten digits (1797 grey 8x8 images, 10 classes, from the UCI optical digits set), written
out as an ImageFolder tree of PNGs so it goes through `d2v2-prep image` like any corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_digit_folder(root: str | Path, n_per_class: int | None = None, size: int = 32) -> Path:
    """root/<digit>/<NNN>.png, grey, upscaled to size x size (nearest: keeps the strokes sharp).

    Deterministic (same files, same bytes on every run); returns root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    counts: dict[int, int] = {}
    for img, lab in zip(d.images, d.target):
        lab = int(lab)
        if n_per_class is not None and counts.get(lab, 0) >= n_per_class:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        (root / str(lab)).mkdir(parents=True, exist_ok=True)
        arr = (img * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(arr, "L").resize((size, size), Image.Resampling.NEAREST).save(
            root / str(lab) / f"{counts[lab]:03d}.png")
    return root
