"""Masks for data2vec 2.0 (docs/REFERENCE.md §1.7), vectorized numpy, computed in loader workers.

Convention everywhere: a mask is bool with True = masked (or padding), False = kept (the
student sees it).  Every function takes per-row uint64 `keys` (see `rng.make_keys`: one key
per (sample, clone) pair), so each of the M copies of a sample gets an independent mask and
a row's mask never depends on which other rows share its batch.

Exact counts:
  * image  `inverse_block_mask`: exactly int(L*(1-R)) kept per row (ViT-B/16, R=0.8: 39/196).
  * audio  `span_mask`:          exactly int(T_i*R) masked over row i's unpadded length T_i.
  * text   `token_mask`:         exactly int(T_i*R) masked over row i's unpadded length T_i.
Batches with padding must still be dense for the student, so `equalize_kept` then masks extra
random kept positions in the longer rows until every row keeps min_i(T_i - int(T_i*R)).
"""

from __future__ import annotations

import math

import numpy as np

from .. import rng


def _top_k_rows(scores: np.ndarray, k) -> np.ndarray:
    """bool [N, L]: True at the k (scalar or per-row [N]) highest-scoring positions of each row.

    Scores are random floats (ties have probability ~0); positions scored -inf are only
    selected if k exceeds the number of finite scores, which callers rule out.
    """
    n, length = scores.shape
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,))
    out = np.zeros((n, length), dtype=bool)
    if n == 0:
        return out
    if (k == k[0]).all():  # one k for all rows: partial sort is cheapest
        kk = int(k[0])
        if kk >= length:
            out[:] = True
        elif kk > 0:
            idx = np.argpartition(scores, length - kk, axis=1)[:, length - kk:]
            np.put_along_axis(out, idx, True, axis=1)
        return out
    # Per-row k: the k-th largest score of each row is that row's threshold.
    thr = np.sort(scores, axis=1)[np.arange(n), np.clip(length - k, 0, length - 1)]
    out = scores >= thr[:, None]
    out[k <= 0] = False
    return out


def inverse_block_mask(keys: np.ndarray, grid: int, ratio: float, adjust: float, block: int) -> np.ndarray:
    """Image inverse block mask, bool [N, grid*grid], True = masked.

    Draws int(L*(1-R+A)/B^2) block centres per row (with replacement), grows each into a BxB
    block of KEPT patches (coordinates clamped at the edges), then randomly adds or removes
    kept patches until exactly int(L*(1-R)) are kept.
    """
    n = len(keys)
    length = grid * grid
    n_keep = int(length * (1 - ratio))
    n_centres = int(length * (1 - ratio + adjust) / block**2)
    kept = np.zeros((n, length), dtype=bool)
    if n_centres > 0:
        centres = rng.randint(keys, n_centres, length, rng.STREAM_MASK)  # [N, C]
        cy, cx = centres // grid, centres % grid
        off = np.arange(block) - block // 2  # 3 -> [-1, 0, 1]; 4 -> [-2, -1, 0, 1]
        ys = np.clip(cy[:, :, None, None] + off[None, None, :, None], 0, grid - 1)
        xs = np.clip(cx[:, :, None, None] + off[None, None, None, :], 0, grid - 1)
        flat = (ys * grid + xs).reshape(n, -1) + (np.arange(n) * length)[:, None]
        kept.reshape(-1)[flat.reshape(-1)] = True
    # Equalize: kept patches score in [1, 2), masked in [0, 1); the top n_keep are kept. Too many
    # kept -> a random subset of them survives; too few -> random masked patches are added.
    scores = rng.uniform(keys, length, rng.STREAM_MASK_FIX) + kept
    return ~_top_k_rows(scores, n_keep)


def span_mask(keys: np.ndarray, lengths, total: int, ratio: float, adjust: float, span: int) -> np.ndarray:
    """Audio span mask, bool [N, total], True = masked or padding.

    Row i has lengths[i] valid frames: int(T_i*(R+A)/B) span starts uniform in [0, T_i-B],
    spans of width B, then randomly equalized to exactly int(T_i*R) masked valid frames.
    Frames >= lengths[i] are padding (True).
    """
    n = len(keys)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(n), total)
    valid = np.arange(total)[None, :] < lengths[:, None]
    masked = np.zeros((n, total), dtype=bool)
    n_starts = (lengths * (ratio + adjust) / span).astype(np.int64)
    c = int(n_starts.max(initial=0))
    if c > 0:
        starts = rng.randint(keys, c, np.maximum(lengths - span + 1, 1), rng.STREAM_MASK)  # [N, C]
        pos = starts[:, :, None] + np.arange(span)[None, None, :]  # [N, C, B]
        use = (np.arange(c)[None, :, None] < n_starts[:, None, None]) & (pos < lengths[:, None, None])
        rows = np.broadcast_to(np.arange(n)[:, None, None], pos.shape)
        masked[rows[use], pos[use]] = True
    n_mask = np.array([int(t * ratio) for t in lengths], dtype=np.int64)  # python float rule (docs/REFERENCE.md §1.7)
    scores = rng.uniform(keys, total, rng.STREAM_MASK_FIX) + masked
    scores[~valid] = -np.inf
    return _top_k_rows(scores, n_mask) | ~valid


def token_mask(keys: np.ndarray, lengths, total: int, ratio: float) -> np.ndarray:
    """Text token mask, bool [N, total]: exactly int(T_i*R) random valid tokens masked per row;
    positions >= lengths[i] are padding (True)."""
    n = len(keys)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64).reshape(n), total)
    valid = np.arange(total)[None, :] < lengths[:, None]
    n_mask = np.array([int(t * ratio) for t in lengths], dtype=np.int64)
    scores = rng.uniform(keys, total, rng.STREAM_MASK)
    scores[~valid] = -np.inf
    return _top_k_rows(scores, n_mask) | ~valid


def equalize_kept(mask: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Mask extra random kept positions so every row keeps min-over-rows kept positions.

    bool [N, T] -> bool [N, T].  Needed when rows have different unpadded lengths: the student
    gathers kept tokens into a dense [N, K] tensor, so K must be the same for every row.
    Length bucketing in the sampler keeps the number of extra masked positions small.
    """
    kept = ~mask
    counts = kept.sum(1)
    k = int(counts.min()) if len(counts) else 0
    if (counts == k).all():
        return mask
    scores = rng.uniform(keys, mask.shape[1], rng.STREAM_MASK_BATCH)
    scores[mask] = -np.inf
    return ~_top_k_rows(scores, k)


def kept_count_image(num_patches: int, ratio: float) -> int:
    """Kept patches per row for the image mask: int(L*(1-R))."""
    return int(num_patches * (1 - ratio))


def grid_side(num_patches: int) -> int:
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"image mask needs a square patch grid, got {num_patches} patches")
    return side
