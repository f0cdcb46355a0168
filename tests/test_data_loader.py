"""Reader, sampler and loader: batch contract, rank slices, exact resume, clear errors."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import data_fixtures as fx  # noqa: E402

from d2v2_scale.data import DataError, build_loader  # noqa: E402
from d2v2_scale.data.sampler import ShardedBatchSampler  # noqa: E402
from d2v2_scale.data.shards import ShardSet  # noqa: E402


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] == b[k]).all(), k


# ---- sampler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [None, np.arange(1000) % 97])
def test_rank_slices_are_disjoint_and_cover(lengths):
    n, bs, world = 1000, 5, 4
    seen = []
    for r in range(world):
        s = ShardedBatchSampler(n, bs, r, world, seed=3, lengths=lengths, bucket_batches=8)
        b = s.epoch_batches(0)
        assert b.shape == (50, 5)
        seen.append(b.reshape(-1))
    allidx = np.concatenate(seen)
    assert len(np.unique(allidx)) == len(allidx) == 1000  # disjoint and (n divisible) complete
    s0 = ShardedBatchSampler(n, bs, 0, world, seed=3, lengths=lengths)
    assert not (s0.epoch_batches(0) == s0.epoch_batches(1)).all()  # reshuffled per epoch
    if lengths is not None:  # bucketing: batches hold similar lengths
        spread = np.ptp(lengths[s0.epoch_batches(0)], axis=1).mean()
        assert spread < np.ptp(lengths) / 4


# ---- batch contract ----------------------------------------------------------------------------

def _check_common(b, cfg):
    M, B = cfg.model.clone_batch, cfg.data.batch_size
    mask = b["mask"].numpy()
    assert mask.dtype == bool and mask.shape[0] == B * M
    kept = (~mask).sum(1)
    assert (kept == kept[0]).all() and kept[0] > 0  # dense student batch
    return mask


def test_image_batch_contract():
    cfg = fx.tiny_cfg("image", fx.prepared("image"), num_workers=0)
    loader = build_loader(cfg, 0, 1)
    assert loader.manifest["modality"] == "image"
    b = next(iter(loader))
    B, S = cfg.data.batch_size, cfg.model.image_size
    assert b["source"].dtype.is_floating_point and tuple(b["source"].shape) == (B, 3, S, S)
    mask = _check_common(b, cfg)
    assert mask.shape[1] == cfg.model.num_patches
    assert (~mask).sum(1)[0] == int(cfg.model.num_patches * (1 - cfg.masking.ratio))
    assert b["label"].dtype == b["index"].dtype and tuple(b["label"].shape) == (B,)
    s = ShardSet(fx.prepared("image"))
    assert [s.get(int(i))["label"] for i in b["index"]] == b["label"].tolist()
    # normalized grey digits expanded to 3 equal channels
    x = b["source"].numpy()
    assert abs(x.mean()) < 3 and x.std() > 0.3
    assert np.allclose(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456, atol=1e-5)


def test_audio_batch_contract():
    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), num_workers=0)
    loader = build_loader(cfg, 0, 1)
    m = cfg.model
    for b in _take(iter(loader), 6):
        src, pad = b["source"].numpy(), b["padding_mask"].numpy()
        B, S = src.shape
        assert B == cfg.data.batch_size and pad.shape == (B, S) and src.dtype == np.float32
        assert S <= cfg.data.max_seconds * cfg.data.sample_rate
        mask = _check_common(b, cfg)
        assert mask.shape[1] == m.audio_frames(S)
        valid = (~pad).sum(1)
        assert (src[pad] == 0).all()
        for r in range(B):
            v = src[r, :valid[r]]
            assert abs(v.mean()) < 1e-3 and abs(v.std() - 1) < 1e-2
            rows = mask[r * m.clone_batch:(r + 1) * m.clone_batch]
            assert rows[:, m.audio_frames(valid[r]):].all()  # frame padding is masked, never kept


def test_text_batch_contract():
    cfg = fx.tiny_cfg("text", fx.prepared("text"), num_workers=0)
    loader = build_loader(cfg, 0, 1)
    m = cfg.model
    for b in _take(iter(loader), 5):
        src, pad = b["source"].numpy(), b["padding_mask"].numpy()
        assert src.dtype == np.int64 and src.shape[1] <= cfg.data.max_tokens
        assert (src[pad] == m.pad_token_id).all() and (src[~pad] != m.pad_token_id).all()
        assert src.max() < m.vocab_size
        mask = _check_common(b, cfg)
        assert mask.shape[1] == src.shape[1]
        for r in range(src.shape[0]):
            assert mask[r * m.clone_batch:(r + 1) * m.clone_batch][:, pad[r]].all()
        s = ShardSet(fx.prepared("text"))
        for r, i in enumerate(b["index"].tolist()):
            assert (src[r, ~pad[r]] == np.asarray(s.get(i)["tokens"])).all()  # blocks of 64 = max_tokens


# ---- exact resume, worker independence ---------------------------------------------------------

@pytest.mark.parametrize("kind,prefix", [("image", ""), ("audio", ""), ("text", ""),
                                         ("image", "d2v1-"), ("audio", "d2v1-"), ("text", "d2v1-")])
def test_resume_mid_epoch_reproduces_batches(kind, prefix):
    """... also with the data2vec 1.0 masks (d2v1-* presets: BEiT blocks, speech spans trimmed to
    the batch minimum, text spans with <mask> ids in student_source)."""
    man = fx.prepared(kind)
    cfg = fx.tiny_cfg(kind, man, prefix, num_workers=2)
    ref_loader = build_loader(cfg, 0, 1)
    n_epoch = len(ref_loader)
    k = min(3, n_epoch - 2)
    total = n_epoch + 3  # runs past an epoch boundary
    ref = _take(iter(ref_loader), total)

    loader = build_loader(cfg, 0, 1)
    it = iter(loader)
    _take(it, k)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint would hold
    assert state["epoch"] == 0 and state["position"] == k  # prefetched batches not counted
    del it, loader

    resumed = build_loader(fx.tiny_cfg(kind, man, prefix, num_workers=1), 0, 1)  # other worker count
    resumed.load_state_dict(state)
    for a, b in zip(ref[k:], _take(iter(resumed), total - k)):
        _same(a, b)
    assert resumed.state_dict()["epoch"] == 1
    # epochs differ (new shuffle, new masks)
    assert not (ref[0]["index"] == ref[n_epoch]["index"]).all()


def test_load_state_dict_restarts_a_running_iterator():
    cfg = fx.tiny_cfg("image", fx.prepared("image"), num_workers=2)
    loader = build_loader(cfg, 0, 1)
    it = iter(loader)
    first = _take(it, 4)
    loader.load_state_dict({"epoch": 0, "position": 1})
    _same(next(it), first[1])


def test_dp_ranks_get_disjoint_data():
    cfg = fx.tiny_cfg("image", fx.prepared("image"), num_workers=0)
    a = [b["index"] for b in _take(iter(build_loader(cfg, 0, 2)), 5)]
    b = [b["index"] for b in _take(iter(build_loader(cfg, 1, 2)), 5)]
    ia = set(np.concatenate([x.numpy() for x in a]).tolist())
    ib = set(np.concatenate([x.numpy() for x in b]).tolist())
    assert not ia & ib


# ---- errors ------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_missing_shard_is_named(tmp_path):
    d = _copy(fx.prepared("image"), tmp_path / "c")
    shard = d / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # inside the footer
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.arrow.*corrupt.*d2v2-prep image"):
        ShardSet(d)
    # truncation
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(DataError, match=r"shard-00001\.arrow.*corrupt"):
        ShardSet(d)
    # corruption in the data (not the footer): caught by full verification
    d2 = _copy(fx.prepared("image"), tmp_path / "c2")
    s2 = d2 / "shard-00002.arrow"
    data = bytearray(s2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    s2.write_bytes(bytes(data))
    ShardSet(d2, verify="fast")
    with pytest.raises(DataError, match=r"shard-00002\.arrow.*sha256"):
        ShardSet(d2, verify="full")
    (d2 / "shard-00000.arrow").unlink()
    with pytest.raises(DataError, match=r"shard-00000\.arrow.*missing.*d2v2-prep"):
        ShardSet(d2, verify="fast")
    cfg = fx.tiny_cfg("image", tmp_path / "nowhere" / "manifest.json")
    with pytest.raises(DataError, match="no manifest.*d2v2-prep"):
        build_loader(cfg, 0, 1)


def test_modality_and_vocab_mismatch(tmp_path):
    cfg = fx.tiny_cfg("image", fx.prepared("audio") / "manifest.json")
    with pytest.raises(DataError, match="holds audio data.*model.modality is 'image'"):
        build_loader(cfg, 0, 1)
    cfg = fx.tiny_cfg("text", fx.prepared("text"))
    cfg.model.vocab_size = 500
    with pytest.raises(DataError, match="vocabulary of 1000.*model.vocab_size=1000"):
        build_loader(cfg, 0, 1)
