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


def test_image_crop_is_reference_random_resized_crop():
    """docs/REFERENCE.md §1.10 D5: RandomResizedCrop with scale (0.2, 1.0) and bicubic resampling."""
    from PIL import Image

    from d2v2_scale.config import load_preset
    from d2v2_scale.data import augment, rng

    for name in ("image-base", "image-tiny"):
        d = load_preset(name).data
        assert (d.crop_scale_min, d.crop_scale_max) == (0.2, 1.0)
    # the box area over the image area covers [0.2, 1.0] and nothing below
    u = rng.uniform(rng.make_keys(1, 0, np.arange(4000)), 40, rng.STREAM_CROP)
    frac = np.array([(b[2] - b[0]) * (b[3] - b[1]) / 200 ** 2
                     for b in (augment.crop_box(x, 200, 200, (0.2, 1.0)) for x in u)])
    assert frac.min() > 0.19 and frac.min() < 0.22 and frac.max() > 0.95
    # the crop is resized bicubically: one image through augment_images == PIL bicubic of the box
    img = (np.arange(48 * 40 * 3) * 37 % 251).astype(np.uint8).reshape(48, 40, 3)
    keys = rng.make_keys(5, 0, np.arange(1))
    x = augment.augment_images([{"pixels": img.reshape(-1), "pix_height": 48, "pix_width": 40, "pix_channels": 3}],
                               keys, 16, 3, (0.2, 1.0), hflip=False)
    box = augment.crop_box(rng.uniform(keys, 40, rng.STREAM_CROP)[0], 40, 48, (0.2, 1.0))
    ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BICUBIC, box=box)).astype(np.float32)
    ref = (ref / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
    np.testing.assert_allclose(x[0], ref.transpose(2, 0, 1), atol=1e-5)


def test_audio_batch_contract():
    """docs/REFERENCE.md §1.10 D6 (data.audio_crop="batch_min", the default): no padding, every clip cut to the
    batch's shortest clip (at most data.max_seconds) at its own offset, out of the whole file
    normalized to zero mean / unit variance; clips under data.min_seconds never appear."""
    from d2v2_scale.data import augment

    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), num_workers=0, min_seconds=1.0, max_seconds=2.0)
    assert cfg.data.audio_crop == "batch_min"
    loader = build_loader(cfg, 0, 1)
    shards = ShardSet(fx.prepared("audio"))
    lengths = shards.lengths()
    assert (lengths < 16000).sum() > 0 and len(loader) == (lengths >= 16000).sum() // cfg.data.batch_size
    m = cfg.model
    crops = []
    for b in _take(iter(loader), 8):
        src, pad = b["source"].numpy(), b["padding_mask"].numpy()
        B, S = src.shape
        assert B == cfg.data.batch_size and pad.shape == (B, S) and src.dtype == np.float32 and not pad.any()
        n = lengths[b["index"].numpy()]
        assert n.min() >= 16000 and S == min(n.min(), 2 * 16000)
        mask = _check_common(b, cfg)
        assert mask.shape[1] == m.audio_frames(S)
        for r, i in enumerate(b["index"].tolist()):
            whole = augment.normalize_wave(shards.get(i)["audio"].astype(np.float32) / 32768.0)
            cand = np.flatnonzero(whole[:len(whole) - S + 1] == src[r, 0])
            offs = [o for o in cand if np.array_equal(whole[o:o + S], src[r])]
            assert offs, (r, i)
            crops.append((len(whole) - S, offs[0]))
    assert any(o > 0 for _, o in crops) and any(room > 0 for room, _ in crops)  # random starts, not all 0
    # the padded mode (one random length per batch) is still there
    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), num_workers=0, audio_crop="random_length")
    for b in _take(iter(build_loader(cfg, 0, 1)), 6):
        src, pad = b["source"].numpy(), b["padding_mask"].numpy()
        assert src.shape[1] <= cfg.data.max_seconds * cfg.data.sample_rate and (src[pad] == 0).all()
        mask = _check_common(b, cfg)
        valid = (~pad).sum(1)
        for r in range(src.shape[0]):
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
            # docs/REFERENCE.md §1.10 D10: <s> + a window of max_tokens - 1 = 63 stream tokens of the (64-token) block
            row, got = np.asarray(s.get(i)["tokens"]), src[r, ~pad[r]]
            assert got[0] == s.manifest["bos_id"] == 0 and len(got) == min(len(row) + 1, cfg.data.max_tokens)
            assert any((row[o:o + len(got) - 1] == got[1:]).all() for o in range(len(row) - len(got) + 2))


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


# ---- corrupt rows: per-row checksums ------------------------------------------------------------

def _corrupt_row(d, shard, row):
    """Flip 64 bytes in the middle of row `row`'s encoded image inside `shard`; -> (index, path)."""
    s = ShardSet(d)
    k = [x["file"] for x in s.manifest["shards"]].index(shard)
    i = int(s.row_offsets[k]) + row
    r = s.get(i, ["image", "path"])
    payload = bytes(r["image"])
    p = d / shard
    data = bytearray(p.read_bytes())
    at = data.find(payload)
    assert at > 0 and data.find(payload, at + 1) < 0
    mid = at + len(payload) // 2
    for j in range(mid, mid + 64):
        data[j] ^= 0xA5
    p.write_bytes(bytes(data))
    return i, r["path"]


def _epoch_indices(loader, n):
    it = iter(loader)
    return [b["index"].numpy() for b in _take(it, n)]


def _small_corpus(tmp_path, fmt):
    """20 digit images as PNG or JPEG files, prepared (encoded bytes only, no --pixels: the
    loader decodes them) into one shard."""
    from PIL import Image

    from data_prep.cli import main as prep

    src = tmp_path / fmt
    for p in sorted(fx.raw("image").rglob("*.png"))[::10]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            (src / p.parent.name / p.name).write_bytes(p.read_bytes())
        else:
            Image.open(p).convert("RGB").save(src / p.parent.name / (p.stem + ".jpg"), quality=90)
    prep(["image", str(src), "--out", str(tmp_path / (fmt + "-shards")), "--workers", "1"])
    return tmp_path / (fmt + "-shards")


def _strip_row_crc(d):
    """Rewrite corpus d as a version-1 corpus (no row_crc32 column), as an older d2v2-prep made it."""
    import pyarrow as pa

    from d2v2_scale.data.manifest import ROW_CRC, footer_sha256, sha256_file

    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        p = d / s["file"]
        t = pa.ipc.open_file(pa.BufferReader(p.read_bytes())).read_all().drop_columns([ROW_CRC])  # not mapped
        with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
        s.update(bytes=p.stat().st_size, sha256=sha256_file(p), footer_sha256=footer_sha256(p))
    m["version"] = 1
    del m["schema"][ROW_CRC], m["row_checksum"]
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_corrupt_row_is_skipped_and_named_under_default_verify(fmt, tmp_path, capfd):
    d, shard, row = _small_corpus(tmp_path, fmt), "shard-00000.arrow", 5
    bad, path = _corrupt_row(d, shard, row)
    assert path.endswith("." + ("png" if fmt == "png" else "jpg"))
    cfg = fx.tiny_cfg("image", d, num_workers=1 if fmt == "jpeg" else 0)  # jpeg: through a worker process
    assert cfg.data.verify == "fast"  # the default
    cfg.data.batch_size = 4
    loader = build_loader(cfg, 0, 1)
    n = len(loader)
    seen = np.concatenate(_epoch_indices(loader, n))
    assert bad not in seen and len(seen) == n * 4  # replaced, the batches stay dense
    assert loader.bad_rows == {(shard, row): {"shard": shard, "row": row, "source": path, "index": bad,
                                              "reason": "row checksum mismatch", "used": bad + 1}}
    err = capfd.readouterr().err
    assert f"bad row skipped: {shard} row {row} (source {path})" in err and err.count("bad row skipped") == 1
    # resume keeps the list; past data.max_bad_rows the run stops naming shard, row and path
    loader.close()
    cfg.data.max_bad_rows = 0
    loader = build_loader(cfg, 0, 1)
    with pytest.raises(DataError, match=rf"1 bad rows .* more than data.max_bad_rows=0: {shard} row {row} "
                                        rf"\({path}\).*d2v2-prep verify"):
        _epoch_indices(loader, n)
    loader.close()
    # offline: d2v2-prep verify names it and fails; the intact fixture passes
    import subprocess

    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(d / "manifest.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{shard} row {row} ({path}): row checksum mismatch" in r.stdout, r.stdout
    assert "sha256 does not match" in r.stdout  # the whole-file hash sees it too
    if fmt == "png":
        r = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(fx.prepared("image"))],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "0 problems" in r.stdout, r.stdout


def test_manifest_without_row_checksums_still_loads(tmp_path, capfd):
    """A version-1 corpus (no row_crc32 column) loads, with one note, and gives the same batches."""
    d = _copy(fx.prepared("image"), tmp_path / "v1")
    _strip_row_crc(d)
    cfg = fx.tiny_cfg("image", d, num_workers=0)
    a = _take(iter(build_loader(cfg, 0, 1)), 2)
    a2 = _take(iter(build_loader(cfg, 0, 1)), 2)
    err = capfd.readouterr().err
    assert err.count("has no per-row checksums") == 1, err  # said once per process
    ref = _take(iter(build_loader(fx.tiny_cfg("image", fx.prepared("image"), num_workers=0), 0, 1)), 2)
    for x, y, z in zip(a, a2, ref):
        _same(x, z)
        _same(x, y)
    # without checksums a corrupt PNG row cannot be skipped, but the decode error names it
    d = _small_corpus(tmp_path, "png")
    _strip_row_crc(d)
    _, path = _corrupt_row(d, "shard-00000.arrow", 5)
    cfg = fx.tiny_cfg("image", d, num_workers=1)  # raised in a worker: still one line, no worker traceback
    cfg.data.batch_size = 4
    with pytest.raises(DataError, match=rf"^cannot decode shard-00000\.arrow row 5 \(source {path}\)") as e:
        _epoch_indices(build_loader(cfg, 0, 1), 5)
    assert "\n" not in str(e.value), str(e.value)


def test_audio_too_few_clips_above_min_seconds():
    """Clips under data.min_seconds are dropped (docs/REFERENCE.md §1.10 D6); when too few are left the error
    names the field before any worker starts."""
    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), num_workers=0, min_seconds=5.0, max_seconds=20.0)
    with pytest.raises(DataError, match=r"only 0 of 78 clips are at least data.min_seconds=5.0 s long"):
        build_loader(cfg, 0, 1)
