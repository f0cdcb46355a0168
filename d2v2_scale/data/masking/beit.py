"""BEiT blockwise image masks for data2vec 1.0 vision (docs/REFERENCE.md §2.4), vectorized numpy.

BEiT's `MaskingGenerator` (ViT-B/16 at 224: a 14 x 14 grid, 120 masked patches, blocks of at
least 16, aspect ratio log-uniform in [0.3, 1/0.3]):

    count = 0
    while count < num_mask:                                  # one "round" adds one block
        remaining = min(num_mask - count, max_patches)
        for attempt in range(10):
            area   = Uniform(min_patches, remaining)         # (random.uniform: a + (b - a) u,
            aspect = exp(Uniform(log min_aspect, log max_aspect)) #  also when b < a)
            h, w   = round(sqrt(area * aspect)), round(sqrt(area / aspect))   # half to even
            if w < W and h < H:
                top, left = randint(0, H - h), randint(0, W - w)              # inclusive
                new = cells of the h x w rectangle not yet masked
                if 0 < new <= remaining: mask the rectangle; count += new; next round
        if no attempt of the round succeeded: stop
    -> at most num_mask masked patches, nearly always exactly num_mask (not an exact-count mask)

The reference draws with Python's `random` in the loader.  Here all rows run in lockstep, one
attempt per row per step, and a row's attempt number c (counted over its whole draw) takes its four
uniforms (area, aspect, top, left) at counters 4c..4c+3 of its key (`rng.uniform_at`), so a
row's mask is a pure function of its key: the same sample (seed, epoch, index) gets the same mask
in whichever worker, batch or resumed run draws it (keys as in masking/data2vec2.py, `rng.make_keys`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import rng

DRAWS_PER_ATTEMPT = 4  # area, aspect, top, left


def beit_block_mask(keys: np.ndarray, grid: int | tuple[int, int] = 14, num_mask: int = 120,
                    min_patches: int = 16, max_patches: int | None = None, min_aspect: float = 0.3,
                    max_aspect: float | None = None, max_attempts: int = 10,
                    return_blocks: bool = False):
    """BEiT blockwise masks, bool [N, H*W] (row-major patches, True = masked), one row per key.

    grid: H = W, or (H, W) patches.  max_patches: largest block (None: num_mask, BEiT's default).
    return_blocks: also return the accepted blocks as int64 [K, 7] rows of
    (row, top, left, h, w, newly masked cells, remaining before the block), in acceptance order.
    """
    hh, ww = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if not 0 <= num_mask <= hh * ww:
        raise ValueError(f"num_mask={num_mask} must be between 0 and the {hh * ww} patches of the grid")
    if min_aspect <= 0:
        raise ValueError(f"min_aspect={min_aspect} must be > 0")
    max_patches = num_mask if max_patches is None else int(max_patches)
    log_lo = math.log(min_aspect)
    log_hi = math.log(max_aspect if max_aspect else 1.0 / min_aspect)
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    n = len(keys)
    mask = np.zeros((n, hh, ww), dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    attempt = np.zeros(n, dtype=np.int64)  # failed attempts in the current round
    used = np.zeros(n, dtype=np.int64)  # attempts consumed so far (the draw counter)
    active = np.full(n, num_mask > 0)
    ys, xs = np.arange(hh), np.arange(ww)
    offs = np.arange(DRAWS_PER_ATTEMPT, dtype=np.int64)[None, :]
    blocks = []
    while active.any():
        r = np.flatnonzero(active)
        u = rng.uniform_at(keys[r], used[r, None] * DRAWS_PER_ATTEMPT + offs, rng.STREAM_MASK_BEIT)
        used[r] += 1
        remaining = np.minimum(num_mask - count[r], max_patches)
        area = min_patches + (remaining - min_patches) * u[:, 0]
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        bh = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint: round half to even, as round()
        bw = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (bw < ww) & (bh < hh)
        top = np.floor(u[:, 2] * np.maximum(hh - bh + 1, 0)).astype(np.int64)
        left = np.floor(u[:, 3] * np.maximum(ww - bw + 1, 0)).astype(np.int64)
        rect = (((ys[None, :] >= top[:, None]) & (ys[None, :] < (top + bh)[:, None]))[:, :, None]
                & ((xs[None, :] >= left[:, None]) & (xs[None, :] < (left + bw)[:, None]))[:, None, :])
        new = (rect & ~mask[r]).sum((1, 2))
        ok = fits & (new > 0) & (new <= remaining)
        acc, fail = r[ok], r[~ok]
        mask[acc] |= rect[ok]
        count[acc] += new[ok]
        attempt[acc] = 0
        attempt[fail] += 1
        active[acc] = count[acc] < num_mask
        active[fail] = attempt[fail] < max_attempts  # a round of max_attempts failures ends the mask
        if return_blocks and len(acc):
            blocks.append(np.stack([acc, top[ok], left[ok], bh[ok], bw[ok], new[ok], remaining[ok]], 1))
    out = mask.reshape(n, hh * ww)
    if return_blocks:
        return out, (np.concatenate(blocks) if blocks else np.zeros((0, 7), dtype=np.int64))
    return out
