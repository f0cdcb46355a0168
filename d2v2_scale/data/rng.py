"""Counter-based random numbers: every draw is a pure function of its key.

The loader must give the same masks and augmentations whichever worker builds a batch and
whether or not the run was resumed mid-epoch.  Instead of carrying a stateful generator
around, each row gets a 64-bit key derived from (seed, epoch, global sample index, clone
index) and its random numbers are `splitmix64(key, stream, counter)`.  That is vectorized
over rows (no per-row Generator objects) and needs no state to resume.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Streams keep different uses of one key independent (e.g. crop box vs flip vs mask centres).
STREAM_MASK = 1
STREAM_MASK_FIX = 2
STREAM_MASK_BATCH = 3
STREAM_MASK_BEIT = 4  # data2vec 1.0 BEiT blockwise image masks (data/masking/beit.py)
STREAM_CROP = 10
STREAM_FLIP = 11
STREAM_JITTER = 17  # data2vec 1.0 vision: colour jitter factors and order (augment.color_jitter)
STREAM_AUDIO_CROP = 12
STREAM_TEXT_CROP = 13
STREAM_AUG_APPLY = 14  # data2vec-aqc second view: which augmentations apply (augment_speech.py)
STREAM_AUG_PARAMS = 15  # ... and their scalar parameters
STREAM_AUG_BULK = 16  # ... and their sample-wise draws (Gaussian noise), through `generator`


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrap-around arithmetic is intended)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def make_keys(seed: int, epoch: int, index, clone=0) -> np.ndarray:
    """uint64 keys [N] for rows identified by (seed, epoch, global sample index, clone index).

    `index` and `clone` broadcast against each other (arrays or ints).
    """
    index, clone = np.broadcast_arrays(np.asarray(index, dtype=np.uint64), np.asarray(clone, dtype=np.uint64))
    with np.errstate(over="ignore"):
        k = _mix(np.asarray([seed], dtype=np.uint64) * _GOLDEN + np.uint64(1))
        k = _mix(k ^ (np.uint64(epoch) * _GOLDEN + np.uint64(2)))
        k = _mix(k ^ (index.reshape(-1) * _GOLDEN + np.uint64(3)))
        k = _mix(k ^ (clone.reshape(-1) * _GOLDEN + np.uint64(4)))
    return k


def uniform(keys: np.ndarray, n: int, stream: int) -> np.ndarray:
    """float64 uniforms in [0, 1), shape [N, n]: draw j of row r is f(keys[r], stream, j)."""
    return uniform_at(keys, np.arange(n, dtype=np.uint64)[None, :], stream)


def uniform_at(keys: np.ndarray, counters: np.ndarray, stream: int) -> np.ndarray:
    """The draws of `uniform` at explicit counters: counters [N, n] (or broadcastable, < 2^32)
    -> float64 [N, n], element (r, j) = draw number counters[r, j] of row r.  For loops in which
    rows consume draws at different rates (rejection sampling) without giving up the keying."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    ctr = (np.uint64(stream) << np.uint64(32)) + np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(keys + (ctr + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def randint(keys: np.ndarray, n: int, high, stream: int) -> np.ndarray:
    """int64 in [0, high) of shape [N, n]; `high` is a scalar or per-row array [N]."""
    high = np.asarray(high, dtype=np.float64).reshape(-1, 1) if np.ndim(high) else float(high)
    return np.floor(uniform(keys, n, stream) * high).astype(np.int64)


def generator(key, stream: int) -> np.random.Generator:
    """A numpy Generator on Philox (itself counter-based) keyed on (key, stream): for bulk draws,
    e.g. one Gaussian per audio sample, that would be slow through `uniform`.  Like every draw
    here it is a pure function of the key, so a resumed run draws the same numbers."""
    return np.random.Generator(np.random.Philox(key=int(np.uint64(key)) | (int(stream) << 64)))
