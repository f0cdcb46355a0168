"""Masks (docs/REFERENCE.md §1.7): exact counts, blockiness, padding, independence, determinism."""

import numpy as np
import pytest

from d2v2_scale.config import load_preset
from d2v2_scale.data.masking import data2vec2 as masking
from d2v2_scale.data import rng


def _keys(n_samples, m, seed=1, epoch=0):
    return rng.make_keys(seed, epoch, np.arange(n_samples)[:, None], np.arange(m)[None, :])


def _kept_neighbour_fraction(kept: np.ndarray, grid: int) -> float:
    g = kept.reshape(-1, grid, grid)
    nb = np.zeros_like(g)
    nb[:, 1:] |= g[:, :-1]
    nb[:, :-1] |= g[:, 1:]
    nb[:, :, 1:] |= g[:, :, :-1]
    nb[:, :, :-1] |= g[:, :, 1:]
    return (nb & g).sum() / g.sum()


def test_image_base_keeps_exactly_39_of_196():
    cfg = load_preset("image-base")
    assert cfg.model.num_patches == 196
    keys = _keys(64, cfg.model.clone_batch)  # 1024 rows
    mask = masking.inverse_block_mask(keys, 14, cfg.masking.ratio, cfg.masking.adjust, cfg.masking.length)
    assert mask.shape == (1024, 196) and mask.dtype == bool
    assert ((~mask).sum(1) == 39).all()


@pytest.mark.parametrize("preset", ["image-large", "image-huge", "image-tiny"])
def test_image_counts_other_presets(preset):
    cfg = load_preset(preset)
    L = cfg.model.num_patches
    mask = masking.inverse_block_mask(_keys(16, 4), masking.grid_side(L), cfg.masking.ratio,
                                      cfg.masking.adjust, cfg.masking.length)
    assert ((~mask).sum(1) == int(L * (1 - cfg.masking.ratio))).all()


def test_image_mask_is_blocky():
    keys = _keys(32, 16)
    kept = ~masking.inverse_block_mask(keys, 14, 0.8, 0.07, 3)
    block_frac = _kept_neighbour_fraction(kept, 14)
    # a random mask with the same count, for comparison
    u = rng.uniform(keys, 196, 99)
    rand_kept = u >= np.sort(u, axis=1)[:, [196 - 39]]
    assert (rand_kept.sum(1) == 39).all()
    rand_frac = _kept_neighbour_fraction(rand_kept, 14)
    assert block_frac > 0.85, block_frac
    assert block_frac > rand_frac + 0.3, (block_frac, rand_frac)


def test_clones_get_independent_masks_and_keys_are_deterministic():
    keys = _keys(4, 8)
    a = masking.inverse_block_mask(keys, 14, 0.8, 0.07, 3)
    b = masking.inverse_block_mask(keys, 14, 0.8, 0.07, 3)
    assert (a == b).all()
    assert len({r.tobytes() for r in a}) == len(a)  # all 32 rows differ
    # a row's mask does not depend on the other rows of the batch
    sub = masking.inverse_block_mask(keys[5:6], 14, 0.8, 0.07, 3)
    assert (sub[0] == a[5]).all()
    # the epoch changes the masks
    c = masking.inverse_block_mask(_keys(4, 8, epoch=1), 14, 0.8, 0.07, 3)
    assert (a != c).any()


def test_audio_span_mask_exact_counts_and_padding():
    cfg = load_preset("audio-base")
    R, A, B = cfg.masking.ratio, cfg.masking.adjust, cfg.masking.length
    lengths = np.repeat(np.array([499, 450, 301, 87, 499]), 8)
    keys = _keys(5, 8)
    mask = masking.span_mask(keys, lengths, 499, R, A, B)
    valid = np.arange(499)[None, :] < lengths[:, None]
    assert (mask[~valid]).all()  # padding is always True
    assert ((mask & valid).sum(1) == np.array([int(t * R) for t in lengths])).all()
    # spans: masked frames come in runs (mean run length well above 1)
    edges = [np.flatnonzero(np.diff(np.r_[0, r[:t].astype(int), 0])) for r, t in zip(mask, lengths)]
    runs = [e[1::2] - e[0::2] for e in edges]
    assert np.mean(np.concatenate(runs)) > 3
    eq = masking.equalize_kept(mask, keys)
    kept = (~eq).sum(1)
    assert (kept == kept.min()).all() and kept.min() == min(t - int(t * R) for t in lengths)
    assert not (~eq & ~valid).any()  # kept never padding
    assert (eq >= mask).all()  # equalizing only adds masked positions


def test_text_token_mask_counts():
    lengths = np.array([64, 64, 50, 7, 1])
    keys = rng.make_keys(3, 0, np.arange(5), 0)
    mask = masking.token_mask(keys, lengths, 64, 0.48)
    valid = np.arange(64)[None, :] < lengths[:, None]
    assert ((mask & valid).sum(1) == (lengths * 0.48).astype(int)).all()
    assert mask[~valid].all()
    eq = masking.equalize_kept(mask, keys)
    assert len(set((~eq).sum(1))) == 1 and not (~eq & ~valid).any()


def test_mask_generation_is_fast_enough():
    import time

    keys = _keys(16, 16)
    t = time.perf_counter()
    for _ in range(10):
        masking.inverse_block_mask(keys, 14, 0.8, 0.07, 3)
    per_batch = (time.perf_counter() - t) / 10
    assert per_batch < 0.05, f"{per_batch * 1e3:.1f} ms for 256 image-base rows"
