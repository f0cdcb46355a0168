"""data2vec-aqc's second view of an utterance: Gaussian noise, sox reverb, background noise.

The reference (docs/REFERENCE.md §3.2) builds, in the data worker, an augmented copy of the
WHOLE utterance (float in [-1, 1], before normalization and cropping) with three RandomApply's
in this order, each applied iff u <= p:
  1. Gaussian noise, p 0.6: sigma_n ~ U(0.001, 0.7) x std(audio) (unbiased); audio + N(0, sigma_n^2);
  2. reverb, p 0.7: sox's `reverb r d s` (freeverb), r, d, s each uniform in 0..99, then
     `channels 1` (the two output channels averaged);
  3. background noise, p 0.8: a uniformly chosen `**/*.wav` under data.noise_dir (channel 1),
     a random window of the utterance's length (zero-padded at the end when shorter), an integer
     snr_db in 0..15, k = exp(snr_db / 10) (natural exp: the reference's quirk),
     out = (k * |noise| / |audio| * audio + noise) / 2.
Both views are then normalized separately (zero mean, unit variance over the utterance) and the
loader crops them at the same offset (loader.py), so they stay sample-aligned.

Randomness: every draw is keyed on the utterance's key (rng.py): decisions and scalars through
`rng.uniform` (streams STREAM_AUG_APPLY / STREAM_AUG_PARAMS), the per-sample Gaussian noise through
a Philox generator keyed on (key, STREAM_AUG_BULK).  So the same (seed, epoch, sample) always
gets the same augmented view, whichever worker builds it and whether or not the run resumed.

Shapes: one utterance is a float array [S]; nothing here changes its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import augment, rng
from .audio_files import load_mono
from ..config.validation import noise_dir_problem
from .manifest import DataError

# sox reverb.c (freeverb): delay lengths in samples at 44.1 kHz, and the stereo spread
COMB_LENGTHS = (1116, 1188, 1277, 1356, 1422, 1491, 1557, 1617)
ALLPASS_LENGTHS = (225, 341, 441, 556)
STEREO_ADJUST = 12
# comb blocks up to this many samples run the damping low-pass as a matrix product (fewer calls)
_LOWPASS_MATRIX_MAX = 96

# rng.uniform draw numbers in STREAM_AUG_PARAMS
_P_NOISE_STD, _P_REVERB, _P_FILE, _P_WINDOW, _P_SNR = 0, 1, 4, 5, 6  # _P_REVERB..+2: r, d, s


@dataclass(frozen=True)
class SpeechAugParams:
    """The second view's settings (DataConfig's aug_* fields; defaults: the reference's)."""

    noise_p: float = 0.6
    noise_std: tuple = (0.001, 0.7)  # noise std as a fraction of the utterance's std ("min/max_snr")
    reverb_p: float = 0.7
    background_p: float = 0.8
    background_snr_db: tuple = (0, 15)  # integers, both ends included
    sample_rate: int = 16000

    @classmethod
    def from_data_config(cls, d) -> "SpeechAugParams":
        return cls(noise_p=d.aug_noise_p, noise_std=tuple(d.aug_noise_std), reverb_p=d.aug_reverb_p,
                   background_p=d.aug_background_p, background_snr_db=tuple(d.aug_background_snr_db),
                   sample_rate=d.sample_rate)


# ---- Gaussian noise ---------------------------------------------------------------------------
def gaussian_noise(x: np.ndarray, u: float, gen: np.random.Generator, std_range=(0.001, 0.7)) -> np.ndarray:
    """x [S] + N(0, sigma_n^2), sigma_n = (lo + (hi - lo) * u) * std(x) (unbiased std, as torch.std)."""
    sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    sigma = (std_range[0] + (std_range[1] - std_range[0]) * u) * sd
    return x + sigma * gen.standard_normal(x.size)


# ---- reverb (sox `reverb`, freeverb) ----------------------------------------------------------
@dataclass(frozen=True)
class ReverbDesign:
    """sox reverb.c's derived constants (float32 where sox stores floats)."""

    feedback: float
    damping: float
    gain: float
    delay: int  # pre-delay, samples
    comb: np.ndarray  # int [C, 8] comb delay lengths per output channel
    allpass: np.ndarray  # int [C, 4]


def reverb_design(sample_rate: float, reverberance=50.0, hf_damping=50.0, room_scale=100.0, stereo_depth=100.0,
                  pre_delay_ms=0.0, wet_gain_db=0.0) -> ReverbDesign:
    """reverb_create + filter_array_create of sox reverb.c, for a mono input (C = 2 output
    channels when stereo_depth > 0, else 1)."""
    scale = room_scale / 100 * .9 + .1
    depth = stereo_depth / 100
    a = -1 / math.log(1 - .3)  # feedback 0.3 at reverberance 0 ...
    b = 100 / (math.log(1 - .98) * a + 1)  # ... and 0.98 at reverberance 100
    r = sample_rate / 44100.
    comb, allpass = [], []
    for c in range(int(math.ceil(depth)) + 1):
        offset = c * depth  # alternates sign filter by filter, combs then all-passes
        cs, ap = [], []
        for L in COMB_LENGTHS:
            cs.append(int(scale * r * (L + STEREO_ADJUST * offset) + .5))
            offset = -offset
        for L in ALLPASS_LENGTHS:
            ap.append(int(r * (L + STEREO_ADJUST * offset) + .5))
            offset = -offset
        comb.append(cs)
        allpass.append(ap)
    return ReverbDesign(feedback=float(np.float32(1 - math.exp((reverberance - b) / (a * b)))),
                        damping=float(np.float32(hf_damping / 100 * .3 + .2)),
                        gain=float(np.float32(10 ** (wet_gain_db / 20) * .015)),
                        delay=int(pre_delay_ms / 1000 * sample_rate + .5),
                        comb=np.array(comb, dtype=np.int64), allpass=np.array(allpass, dtype=np.int64))


def _comb_bank(x: np.ndarray, sizes: np.ndarray, feedback: float, damping: float) -> np.ndarray:
    """Per-row outputs [R, S] of R damped comb filters (delay sizes[r]) on one input x [S].

    sox's comb step, per sample: out = buf[p]; store = out + (store - out) * damping;
    buf[p] = in + store * feedback.  The output at t is the line value written at t - N, so in a
    block of at most min(sizes) samples every output is already known: a block reads the delay
    lines (one gather for all rows), runs the damping low-pass store[t] = (1 - damping) out[t] +
    damping store[t - 1] over the block carrying its state (one small matrix product when the
    block is short, else one lfilter call), and writes the block's new line values.  The Python
    loop is over blocks, never over samples."""
    from scipy.signal import lfilter  # imported here: scipy.signal takes seconds to import

    n, R = x.size, sizes.size
    off = int(sizes.max())
    width = off + n
    line = np.zeros((R, width))  # value written at time t sits at column off + t
    flat = line.reshape(-1)
    step = int(sizes.min())
    gather = (np.arange(R) * width + off - sizes)[:, None] + np.arange(step)[None, :]  # block at t0 = 0
    store = np.zeros((R, 1))
    matrix = step <= _LOWPASS_MATRIX_MAX
    if matrix:  # store_block = out_block @ lp + store_prev * carry
        i = np.arange(step)
        lag = i[None, :] - i[:, None]
        lp = np.where(lag >= 0, (1.0 - damping) * damping ** np.maximum(lag, 0), 0.0)
        carry = damping ** (i + 1.0)
    for t0 in range(0, n, step):
        b = min(step, n - t0)
        y = flat.take(gather[:, :b] + t0)
        if matrix:
            s = y @ lp[:b, :b] + store * carry[:b]
        else:
            s, _ = lfilter([1.0 - damping], [1.0, -damping], y, axis=1, zi=damping * store)
        store = s[:, -1:]
        seg = line[:, off + t0:off + t0 + b]
        np.multiply(s, feedback, out=seg)
        seg += x[t0:t0 + b]
    return np.stack([line[r, off - sizes[r]:off - sizes[r] + n] for r in range(R)])


def _allpass(x: np.ndarray, size: int) -> np.ndarray:
    """sox's all-pass: out = buf[p]; buf[p] = in + 0.5 * out; return out - in.  The line value
    u[t] = x[t] + 0.5 u[t - N] only looks N samples back, so with x laid out as rows of N samples
    it is a first-order recursion down each column: one lfilter along axis 0."""
    from scipy.signal import lfilter

    n = x.size
    k = -(-n // size)
    xs = np.zeros(k * size)
    xs[:n] = x
    u = lfilter([1.0], [1.0, -0.5], xs.reshape(k, size), axis=0).reshape(-1)[:n]
    y = -x.copy()
    y[size:] += u[:n - size]
    return y


def reverb_channels(x: np.ndarray, design: ReverbDesign, wet_only: bool = False) -> np.ndarray:
    """sox `reverb` on a mono x [S] (float, [-1, 1]): float64 [C, S], each channel
    dry + gain * allpass_chain(sum of combs) clipped to [-1, 1] as sox's float -> integer sample
    conversion does.  No tail: the effect has no drain stage, so the length stays S."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)  # sox's input samples are integers in range
    n, C = x.size, design.comb.shape[0]
    wet_in = np.concatenate([np.zeros(design.delay), x])[:n] if design.delay else x
    combs = _comb_bank(wet_in, design.comb.reshape(-1), design.feedback, design.damping)
    out = np.empty((C, n))
    for c in range(C):
        v = combs[c * len(COMB_LENGTHS):(c + 1) * len(COMB_LENGTHS)].sum(axis=0)
        for size in design.allpass[c][::-1]:  # sox runs the all-passes from the last one down
            v = _allpass(v, int(size))
        out[c] = design.gain * v + (0.0 if wet_only else x)
    return np.clip(out, -1.0, 1.0)


def sox_reverb(x: np.ndarray, reverberance, hf_damping, room_scale, sample_rate: int = 16000,
               stereo_depth=100.0, pre_delay_ms=0.0, wet_gain_db=0.0) -> np.ndarray:
    """`sox ... reverb r d s [depth pre-delay wet-gain] channels 1` on a mono x [S]: float64 [S]
    (sox's `channels 1` averages the output channels: remix.c, multiplier 1 / channels)."""
    d = reverb_design(sample_rate, reverberance, hf_damping, room_scale, stereo_depth, pre_delay_ms, wet_gain_db)
    return reverb_channels(x, d).mean(axis=0)


# ---- background noise -------------------------------------------------------------------------
def list_noise_files(noise_dir) -> list[Path]:
    """Every **/*.wav under noise_dir, sorted (the reference globs `**/*.wav`)."""
    return sorted(p for p in Path(noise_dir).rglob("*") if p.suffix.lower() == ".wav" and p.is_file())


class NoiseBank:
    """The background-noise recordings of data.noise_dir, listed once (picklable: paths only)."""

    def __init__(self, noise_dir, sample_rate: int):
        why = noise_dir_problem(noise_dir)
        if why:
            raise DataError(f"data.noise_dir={noise_dir!r} {why}: name a folder of .wav noise recordings (the "
                            "paper used MUSAN noise/), or turn background noise off with data.aug_background_p=0")
        self.files = list_noise_files(noise_dir)
        self.sample_rate = sample_rate

    def load(self, i: int, length: int | None = None, u_window: float = 0.0) -> np.ndarray:
        """File i as float64 [N]: channel 1 (sox `remix 1`), resampled to the sample rate when needed.
        With `length`, a file at the sample rate that is longer is read only where
        `background_noise(x, ., u_window, .)` for len(x) = length would take its window from (the
        same samples, without decoding minutes of noise per utterance)."""
        import soundfile as sf

        path = str(self.files[i])
        if length is not None:
            info = sf.info(path)
            if info.samplerate == self.sample_rate and info.frames >= length:
                s = int(u_window * (info.frames - length + 1))
                return sf.read(path, start=s, frames=length, dtype="float64", always_2d=True)[0][:, 0]

        return load_mono(path, self.sample_rate, channel=0)[0]


def background_noise(x: np.ndarray, noise: np.ndarray, u_window: float, snr_db: int) -> np.ndarray:
    """(k * |n| / |x| * x + n) / 2 with k = exp(snr_db / 10) and n the noise fitted to len(x):
    a window starting at floor(u_window * (len(noise) - len(x) + 1)) when longer, zero-padded at
    the end when shorter.  A silent x is left to the noise alone (the reference divides by 0)."""
    n = x.size
    if noise.size >= n:
        s = int(u_window * (noise.size - n + 1))
        noise = noise[s:s + n]
    else:
        noise = np.concatenate([noise, np.zeros(n - noise.size)])
    ax = float(np.linalg.norm(x))
    scale = math.exp(snr_db / 10) * float(np.linalg.norm(noise)) / ax if ax > 0 else 0.0
    return (scale * x + noise) / 2


# ---- the composed view ------------------------------------------------------------------------
def apply_flags(keys: np.ndarray, params: SpeechAugParams) -> np.ndarray:
    """bool [N, 3]: whether (Gaussian noise, reverb, background noise) apply to each key's
    utterance (u <= p, the reference's RandomApply)."""
    u = rng.uniform(keys, 3, rng.STREAM_AUG_APPLY)
    return u <= np.array([params.noise_p, params.reverb_p, params.background_p])[None, :]


def augment_utterance(x: np.ndarray, key, params: SpeechAugParams, bank: NoiseBank | None) -> np.ndarray:
    """The augmented copy of one whole utterance x [S] (float in [-1, 1], not normalized):
    float64 [S].  `key` is the utterance's uint64 key (rng.make_keys)."""
    keys = np.asarray([key], dtype=np.uint64)
    on = apply_flags(keys, params)[0]
    u = rng.uniform(keys, 7, rng.STREAM_AUG_PARAMS)[0]
    y = np.asarray(x, dtype=np.float64)
    if on[0]:
        y = gaussian_noise(y, u[_P_NOISE_STD], rng.generator(key, rng.STREAM_AUG_BULK), params.noise_std)
    if on[1]:
        r, d, s = (int(v * 100) for v in u[_P_REVERB:_P_REVERB + 3])  # torch.randint(0, 100): 0..99
        y = sox_reverb(y, r, d, s, params.sample_rate)
    if on[2]:
        if bank is None:
            raise DataError("background noise is on (data.aug_background_p > 0) but no data.noise_dir was given: "
                            "set data.noise_dir or data.aug_background_p=0")
        lo, hi = params.background_snr_db
        noise = bank.load(int(u[_P_FILE] * len(bank.files)), y.size, u[_P_WINDOW])
        y = background_noise(y, noise, u[_P_WINDOW], lo + int(u[_P_SNR] * (hi - lo + 1)))
    return y


def aqc_views(raws: list[np.ndarray], keys: np.ndarray, params: SpeechAugParams,
              bank: NoiseBank | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(original views, augmented views) of whole utterances raws[b] [S_b] (float in [-1, 1]),
    each normalized separately over the whole utterance (float32 [S_b]); keys [B] uint64."""
    orig = [augment.normalize_wave(x) for x in raws]
    aug = [augment.normalize_wave(augment_utterance(x, k, params, bank)) for x, k in zip(raws, keys)]
    return orig, aug
