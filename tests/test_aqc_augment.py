"""data2vec-aqc's augmented second view (docs/REFERENCE.md §3.2: augmentations, view alignment and
the noise_dir config guard): formulas, frequencies, sox reverb (against a literal transcription
of sox reverb.c and against the real `sox` program), view alignment and determinism per key."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from d2v2_scale.config import ConfigError, load_preset
from d2v2_scale.data import DataError, augment, augment_speech as A, rng
from tests import data_fixtures as fx

SR = 16000


# ---- frequencies and formulas ------------------------------------------------------------------
def test_apply_frequencies():
    """RandomApply p 0.6 / 0.7 / 0.8 (noise, reverb, background), within +-0.01 over 100k keys,
    drawn independently of each other."""
    keys = rng.make_keys(7, 0, np.arange(100_000))
    on = A.apply_flags(keys, A.SpeechAugParams())
    freq = on.mean(axis=0)
    assert np.all(np.abs(freq - [0.6, 0.7, 0.8]) < 0.01), freq
    assert abs((on[:, 0] & on[:, 2]).mean() - 0.48) < 0.01  # independent decisions
    off = A.apply_flags(keys, A.SpeechAugParams(noise_p=0, reverb_p=0, background_p=0))
    assert not off.any()


def test_gaussian_noise_formula():
    """sigma_n = (0.001 + 0.699 u) * std(x, unbiased); the added noise is sigma_n * N(0, 1) from the
    keyed generator; over many keys the noise std stays within [0.001, 0.7] x std(x)."""
    x = np.sin(np.arange(4000) * 0.01) * 0.3
    sd = np.std(x, ddof=1)
    u = 0.25
    y = A.gaussian_noise(x, u, rng.generator(123, rng.STREAM_AUG_BULK))
    expect = x + (0.001 + 0.699 * u) * sd * rng.generator(123, rng.STREAM_AUG_BULK).standard_normal(x.size)
    np.testing.assert_allclose(y, expect, rtol=0, atol=1e-15)
    ratios = []
    for k in rng.make_keys(3, 0, np.arange(300)):
        uk = rng.uniform(np.array([k]), 1, rng.STREAM_AUG_PARAMS)[0, 0]
        ratios.append(np.std(A.gaussian_noise(x, uk, rng.generator(k, rng.STREAM_AUG_BULK)) - x) / sd)
    ratios = np.array(ratios)
    assert ratios.min() > 0.001 * 0.9 and ratios.max() < 0.7 * 1.1
    assert abs(ratios.mean() - (0.001 + 0.7) / 2) < 0.05  # uniform in between


def test_background_noise_formula():
    """out = (e^{d/10} |n| / |a| a + n) / 2 exactly; shorter noise is zero-padded at the end; longer
    noise contributes a contiguous window starting at floor(u (len(n) - len(a) + 1))."""
    g = np.random.default_rng(0)
    a = g.standard_normal(1000) * 0.2
    n_same = g.standard_normal(1000) * 0.05
    for d in (0, 7, 15):
        k = math.exp(d / 10)
        want = (k * np.linalg.norm(n_same) / np.linalg.norm(a) * a + n_same) / 2
        np.testing.assert_allclose(A.background_noise(a, n_same, 0.5, d), want, rtol=1e-14, atol=0)
    short = g.standard_normal(600)
    padded = np.concatenate([short, np.zeros(400)])
    want = (math.exp(0.3) * np.linalg.norm(short) / np.linalg.norm(a) * a + padded) / 2
    np.testing.assert_allclose(A.background_noise(a, short, 0.9, 3), want, rtol=1e-14, atol=0)
    long = g.standard_normal(5000)
    u = 0.37
    s = int(u * (5000 - 1000 + 1))
    win = long[s:s + 1000]
    want = (math.exp(1.2) * np.linalg.norm(win) / np.linalg.norm(a) * a + win) / 2
    np.testing.assert_allclose(A.background_noise(a, long, u, 12), want, rtol=1e-14, atol=0)


# ---- reverb ------------------------------------------------------------------------------------
def _freeverb_literal(x: np.ndarray, design: A.ReverbDesign) -> np.ndarray:
    """sox reverb.c transcribed sample by sample (the independent reference): [C, S]."""
    out = np.zeros((design.comb.shape[0], x.size))
    for c in range(design.comb.shape[0]):
        combs = [[np.zeros(n), 0, 0.0] for n in design.comb[c]]
        aps = [[np.zeros(n), 0] for n in design.allpass[c]]
        for t, xi in enumerate(x):
            o = 0.0
            for f in reversed(combs):
                buf, p, store = f
                y = buf[p]
                store = y + (store - y) * design.damping
                buf[p] = xi + store * design.feedback
                f[1], f[2] = (p - 1) % len(buf), store  # sox moves its pointer downwards
                o += y
            for f in reversed(aps):
                buf, p = f
                y = buf[p]
                buf[p] = o + y * .5
                f[1] = (p - 1) % len(buf)
                o = y - o
            out[c, t] = xi + o * design.gain
    return np.clip(out, -1, 1)


def test_reverb_constants():
    """r = d = s = 0: feedback 0.3, damping 0.2, comb lengths round(0.1 * 16000/44100 * (L + 12 o));
    feedback 0.882 at r = 50 and 0.979 at r = 99; wet gain 0.015."""
    d = A.reverb_design(SR, 0, 0, 0)
    assert d.feedback == pytest.approx(0.3, abs=1e-6) and d.damping == pytest.approx(0.2, abs=1e-7)
    assert d.gain == pytest.approx(0.015, abs=1e-9) and d.delay == 0
    r = SR / 44100
    o = [0, 0, 0, 0, 0, 0, 0, 0], [1, -1, 1, -1, 1, -1, 1, -1]
    for c in (0, 1):
        assert d.comb[c].tolist() == [int(0.1 * r * (L + 12 * oi) + .5) for L, oi in zip(A.COMB_LENGTHS, o[c])]
        assert d.allpass[c].tolist() == [int(r * (L + 12 * oi) + .5) for L, oi in zip(A.ALLPASS_LENGTHS, o[c][:4])]
    assert d.comb[0].tolist() == [40, 43, 46, 49, 52, 54, 56, 59]
    assert A.reverb_design(SR, 50, 0, 0).feedback == pytest.approx(0.882, abs=5e-4)
    assert A.reverb_design(SR, 99, 0, 0).feedback == pytest.approx(0.979, abs=5e-4)
    assert A.reverb_design(SR, 0, 0, 0, stereo_depth=0).comb.shape == (1, 8)


@pytest.mark.parametrize("rds", [(50, 50, 100), (0, 0, 0), (99, 99, 99), (37, 80, 12)])
def test_reverb_matches_literal_freeverb(rds):
    """The block-vectorized filters equal the per-sample transcription of reverb.c (float64) on an
    impulse plus noise, to 1e-12; the length is kept; loud input is clipped to [-1, 1]."""
    g = np.random.default_rng(1)
    x = g.standard_normal(2500) * 0.05
    x[10] = 0.9
    d = A.reverb_design(SR, *rds)
    got = A.reverb_channels(x, d)
    assert got.shape == (2, x.size)
    np.testing.assert_allclose(got, _freeverb_literal(x, d), rtol=0, atol=1e-12)
    loud = A.sox_reverb(np.full(3000, 0.99), 99, 0, 100)
    assert loud.shape == (3000,) and np.abs(loud).max() <= 1.0 and (loud == 1.0).any()


def _sox() -> str:
    if shutil.which("sox") is None:
        fx.apt_install("sox")
    return shutil.which("sox")


def test_reverb_matches_sox_program(tmp_path):
    """Against the real `sox` (Debian package sox, 14.4.2) on the same float32 input:
    `reverb r d s` with a stereo output (-c 2) per channel, and `reverb r d s channels 1` (what
    WavAugment runs) after our channel average.  Reached (2026-12-02): max abs error <= 8.6e-8
    per channel and after the mix, SNR >= 131.9 dB, on a 0.5 s signal of peak 0.9 (sox filters
    in float32, we in float64); the test's bounds are 3e-7 and 120 dB.  Stereo depth 50 / 0,
    pre-delay 20 / 100 ms and wet gain -3 / +5 dB: <= 8.9e-8."""
    sox = _sox()
    g = np.random.default_rng(0)
    x = (g.standard_normal(8000) * 0.1).astype(np.float32)
    x[100] = 0.9
    src = tmp_path / "in.wav"
    sf.write(src, x, SR, subtype="FLOAT")
    for rds in [(50, 50, 100), (0, 0, 0), (99, 99, 99), (37, 80, 12)]:
        args = [str(v) for v in rds]
        o2, o1 = tmp_path / "o2.wav", tmp_path / "o1.wav"
        subprocess.run([sox, "-D", "-V1", str(src), "-e", "floating-point", "-b", "32", "-c", "2", str(o2),
                        "reverb", *args], check=True)
        subprocess.run([sox, "-D", "-V1", str(src), "-e", "floating-point", "-b", "32", str(o1),
                        "reverb", *args, "channels", "1"], check=True)
        stereo, sr2 = sf.read(o2, always_2d=True)
        mono, sr1 = sf.read(o1)
        assert sr1 == sr2 == SR and stereo.shape == (x.size, 2) and mono.shape == (x.size,)  # no tail
        ours = A.reverb_channels(x.astype(np.float64), A.reverb_design(SR, *rds))
        assert np.abs(ours - stereo.T).max() < 3e-7, rds
        err = A.sox_reverb(x.astype(np.float64), *rds) - mono
        assert np.abs(err).max() < 3e-7, rds
        assert 10 * np.log10((mono ** 2).sum() / (err ** 2).sum()) > 120
    # the other knobs: stereo depth (fractional, and 0 = mono out), pre-delay (ms), wet gain (dB)
    for extra in [(40, 60, 70, 50, 20, -3), (80, 10, 30, 0, 0, 0), (20, 20, 20, 100, 100, 5)]:
        o1 = tmp_path / "o1.wav"
        subprocess.run([sox, "-D", "-V1", str(src), "-e", "floating-point", "-b", "32", str(o1),
                        "reverb", *[str(v) for v in extra], "channels", "1"], check=True)
        err = A.sox_reverb(x.astype(np.float64), *extra[:3], SR, *extra[3:]) - sf.read(o1)[0]
        assert np.abs(err).max() < 3e-7, extra


# ---- views through the loader ------------------------------------------------------------------
def _noise_dir(root):
    d = root / "noise" / "sub"
    d.mkdir(parents=True)
    g = np.random.default_rng(5)
    sf.write(d / "hum.wav", (0.1 * np.sin(np.arange(4000) * 0.3)).astype(np.float32), SR, subtype="FLOAT")
    sf.write(d / "hiss.wav", (0.05 * g.standard_normal(40000)).astype(np.float32), SR, subtype="FLOAT")
    return root / "noise"


def _builder(**data):
    from d2v2_scale.data.loader import BatchBuilder
    from d2v2_scale.data.shards import ShardSet

    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), prefix="d2v1-", num_workers=0, min_seconds=1.0,
                      max_seconds=2.0, **data)
    return BatchBuilder(cfg, ShardSet(cfg.data.manifest)), cfg


def test_views_aligned_and_deterministic(tmp_path):
    """source is bitwise the single-view batch; source_aug has its shape, equals the whole
    augmented utterance (normalized on its own) cropped at source's offset; all augmentations off
    gives aug == orig; the same (epoch, indices) redraws the same view (a resumed run), another
    epoch draws another."""
    noise = _noise_dir(tmp_path)
    single, _ = _builder()
    aqc, cfg = _builder(views="aqc", noise_dir=str(noise))
    idx = np.arange(6)
    one, two = single(0, idx), aqc(0, idx)
    assert "source_aug" not in one
    for k in ("source", "padding_mask", "mask", "index"):
        assert np.array_equal(one[k].numpy(), two[k].numpy()), k
    src, aug = two["source"].numpy(), two["source_aug"].numpy()
    assert aug.shape == src.shape and aug.dtype == np.float32
    keys = rng.make_keys(cfg.data.seed, 0, idx, 0)
    params = A.SpeechAugParams.from_data_config(cfg.data)
    bank = A.NoiseBank(noise, SR)
    changed = 0
    for b, i in enumerate(idx):
        raw = aqc.shards.get(int(i), ["audio"])["audio"].astype(np.float32) / 32768.0
        orig = augment.normalize_wave(raw)
        s, e = augment.crop_window(len(orig), src.shape[1], rng.uniform(keys[b:b + 1], 1, rng.STREAM_AUDIO_CROP)[0, 0])
        assert np.array_equal(orig[s:e], src[b])  # the original's offset ...
        whole = augment.normalize_wave(A.augment_utterance(raw, keys[b], params, bank))
        assert np.array_equal(whole[s:e], aug[b])  # ... is the augmented view's
        assert abs(whole.mean()) < 1e-4 and abs(whole.std() - 1) < 1e-3  # normalized over the whole utterance
        changed += not np.array_equal(aug[b], src[b])
    assert changed >= 4  # P(no augmentation) = 0.4 * 0.3 * 0.2 = 0.024 per utterance
    x = np.random.default_rng(2).standard_normal(9000)
    for f in range(len(bank.files)):  # the windowed read takes the samples a whole-file read would
        for u in (0.0, 0.61, 0.999):
            np.testing.assert_array_equal(A.background_noise(x, bank.load(f, x.size, u), u, 4),
                                          A.background_noise(x, bank.load(f), u, 4))
    assert np.array_equal(aqc(0, idx)["source_aug"].numpy(), aug)  # resume: same draws
    assert not np.array_equal(aqc(1, idx)["source_aug"].numpy(), aug)
    off, _ = _builder(views="aqc", aug_noise_p=0.0, aug_reverb_p=0.0, aug_background_p=0.0)
    three = off(0, idx)
    assert np.array_equal(three["source_aug"].numpy(), three["source"].numpy())


def test_noise_dir_config_errors(tmp_path):
    """views=aqc with background noise on needs data.noise_dir: unset, missing, or without .wav
    files is a ConfigError that names data.noise_dir and how to turn the augmentation off."""
    def cfg(**data):
        c = load_preset("d2v1-audio-tiny")
        c.data.views = "aqc"
        for k, v in data.items():
            setattr(c.data, k, v)
        return c

    (tmp_path / "empty" / "deep").mkdir(parents=True)
    (tmp_path / "empty" / "deep" / "notes.txt").write_text("no audio")
    for nd, why in [(None, "is not set"), (str(tmp_path / "nope"), "does not exist"),
                    (str(tmp_path / "empty"), "holds no .wav files")]:
        with pytest.raises(ConfigError) as e:
            cfg(noise_dir=nd).validate()
        msg = str(e.value)
        assert f"data.noise_dir={nd!r} {why}" in msg and "data.aug_background_p=0" in msg
        assert len(msg.splitlines()) == 2  # "invalid config:" + this one line
    cfg(noise_dir=None, aug_background_p=0.0).validate()  # explicitly off: fine without a folder
    cfg(noise_dir=str(_noise_dir(tmp_path))).validate()
    load_preset("d2v1-audio-tiny").validate()  # views=single (the default) needs none
    with pytest.raises(ConfigError, match="data.views='bogus'"):
        cfg(views="bogus").validate()
    with pytest.raises(ConfigError, match="data.aug_reverb_p=1.5 must be in"):
        cfg(aug_reverb_p=1.5, aug_background_p=0.0).validate()
    with pytest.raises(DataError, match="data.noise_dir=None is not set.*data.aug_background_p=0"):
        _builder(views="aqc")  # the loader checks too, for callers that skip validate()


def test_loader_resume_redraws_views(tmp_path):
    """Through the Loader: resuming from the state after batch 1 gives batch 2 with the same
    source and source_aug as the uninterrupted run."""
    from d2v2_scale.data import build_loader

    cfg = fx.tiny_cfg("audio", fx.prepared("audio"), prefix="d2v1-", num_workers=0, min_seconds=1.0,
                      max_seconds=2.0, batch_size=4, views="aqc", noise_dir=str(_noise_dir(tmp_path)))
    ld = build_loader(cfg, 0, 1)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    want = next(it)
    ld.close()
    ld2 = build_loader(cfg, 0, 1)
    ld2.load_state_dict(state)
    got = next(iter(ld2))
    ld2.close()
    for k in ("index", "source", "source_aug"):
        assert np.array_equal(got[k].numpy(), want[k].numpy()), k
