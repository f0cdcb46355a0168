"""Decoding a sound file to float mono samples: shared by `d2v2-prep audio` (data_prep/audio.py)
and the background-noise bank of the speech augmentations (augment_speech.py)."""

from __future__ import annotations

import math

import numpy as np
import soundfile as sf


def load_mono(path: str, target_sr: int | None, channel: int | None = None) -> tuple[np.ndarray, int, int]:
    """float64 mono samples (resampled to target_sr when given), source rate, source frames.
    Channels are averaged, or with `channel` only that one is kept (sox `remix`)."""
    x, sr = sf.read(path, dtype="float64", always_2d=True)
    n_src = x.shape[0]
    if channel is not None:
        x = x[:, min(channel, x.shape[1] - 1)]
    else:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if target_sr and sr != target_sr:
        from scipy.signal import resample_poly  # imported here: scipy.signal takes seconds to import

        g = math.gcd(int(sr), int(target_sr))
        x = resample_poly(x, target_sr // g, sr // g)
    return x, sr, n_src
