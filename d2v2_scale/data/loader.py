"""The training data loader: shards -> augmented, masked batches, resumable mid-epoch.

`build_loader(cfg, dp_rank, dp_size)` returns a `Loader`: iterate it forever (epochs roll
over); `state_dict()` says how many batches the trainer has CONSUMED (batches that workers
prefetched but the trainer never saw are not counted), `load_state_dict()` resumes exactly.

Batch contract (B = data.batch_size per data-parallel rank, M = model.clone_batch; mask rows
are sample-major: row b*M + m is copy m of sample b, as `repeat_interleave` lines them up):
  image: source float32 [B, C, H, W]; mask bool [B*M, L] (L = model.num_patches,
         True = masked); label int64 [B] (when the corpus has labels); index int64 [B].
  audio: source float32 [B, S] (each file normalized to zero mean / unit variance as a whole,
         then cropped; zeros at padding); padding_mask bool [B, S] (True = padding; all False
         with data.audio_crop="batch_min", the default: every clip is cut to the batch's
         shortest, at most data.max_seconds, at a random start, docs/REFERENCE.md §1.10 D6); mask bool [B*M, T],
         T = model.audio_frames(S), frames >= audio_frames(valid samples) are padding (True).
         With data.views="aqc" (data2vec-aqc) also source_aug float32 [B, S]: an augmented copy of
         each whole utterance (augment_speech.py), normalized on its own, cropped at the same offset.
  text:  source int64 [B, T] (pad = model.pad_token_id, T <= data.max_tokens); with
         data.prepend_bos each row is <s> + a random window of max_tokens - 1 stream tokens
         (the reference's 511 + 1, docs/REFERENCE.md §1.10 D10);
         padding_mask bool [B, T]; mask bool [B*M, T].
Every mask row of a batch keeps exactly the same number of positions, and kept positions are
never padding: each row first gets the exact count of docs/REFERENCE.md §1.7 over its own unpadded length,
then longer rows get extra random positions masked down to the batch minimum.
data2vec 1.0 and aqc (objectives.py: gathers_kept False; data/masking/data2vec1.py, beit.py): M = 1; mask [B, T] is
True at masked positions only (padding is never masked); text batches add student_source int64
[B, T] (the tokens with <mask> / random ids in place) and mask = (student_source == <mask>).
Every batch also carries the index tensors the student forward derives from the mask
(data/layout.py, computed here in the workers so the forward reads nothing back to the host):
  token_padding bool [B, T], only when some token is padded (audio: frame padding, text: padding_mask);
  kept int64 [B*M, T_keep] (data2vec 2.0: each row's ascending kept positions);
  loss_rows, loss_cols int64 [n]: the masked, non-padded positions, row-major (image 2.0:
  n = B*M*(L - T_keep), a constant of the config).

Bad rows: a row whose bytes do not match its checksum (shards.py) is replaced by
`ShardSet.substitute` (the next good sample; a rule of the index alone, so the batch stays
dense and a resumed run builds the same batches) and the worker adds a `bad_rows` list to the
batch; the Loader removes that key in the main process, logs each bad row once (shard, row,
source path), keeps the list in its state, and raises DataError once there are more than
`data.max_bad_rows` (counted per data-parallel rank).

Randomness: all draws (crop, flip, audio/text windows, masks) are keyed on (data.seed,
epoch, global sample index, clone index), so results do not depend on the worker count,
prefetching or resuming.  A mix of corpora (data.manifests, mixture.py) reads its corpora as one
index space and keys on the draw id (pass x total + global index), which `index` then holds.  Audio clips shorter than data.min_seconds are never sampled; the
crop length is the batch's shortest clip (capped at data.max_seconds), or with
data.audio_crop="random_length" drawn once per batch (keyed on the batch's first sample).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..objectives import objective_of
from . import augment, augment_speech, mixture, rng
from .mixture import check_data_mixture
from .layout import add_layout
from .manifest import DataError, load_manifest
from .masking import beit as beit_masks, data2vec1 as d2v1_masks, data2vec2 as d2v2_masks
from .sampler import ShardedBatchSampler
from .shards import ShardSet, check_compatible

_BATCH_CLONE = 1 << 31  # clone id used for per-batch draws (never a real clone index)
BAD_ROWS_KEY = "bad_rows"  # batch key (worker -> main process only): the bad rows this batch replaced
ERROR_KEY = "data_error"  # batch key (worker -> main process only): a DataError's message, raised there


class BatchBuilder:
    """Builds one batch from (epoch, indices); runs inside DataLoader workers (picklable)."""

    def __init__(self, cfg, shards: ShardSet):
        self.cfg, self.shards = cfg, shards
        self.objective = objective_of(cfg.model)  # which masks: the objective's (d2v2_scale/objectives.py)
        self.modality = shards.modality
        self.has_labels = self.modality == "image" and "label" in shards.manifest["schema"] and \
            shards.manifest.get("num_classes", 0) > 0
        self.audio_dtype_scale = shards.audio_scale
        self.bos_id = int(shards.manifest.get("bos_id", -1))
        self.aug_params = self.noise_bank = None
        if self.modality == "audio" and cfg.data.views == "aqc":
            self.aug_params = augment_speech.SpeechAugParams.from_data_config(cfg.data)
            if self.aug_params.background_p > 0:
                self.noise_bank = augment_speech.NoiseBank(cfg.data.noise_dir, cfg.data.sample_rate)
        if self.modality == "text" and cfg.data.prepend_bos and self.bos_id < 0:
            raise DataError(f"{shards.manifest_path} names no <s> token (bos_id) but data.prepend_bos is set: "
                            "prepare with d2v2-prep text (its vocabulary has <s>=0) or set data.prepend_bos=false")

    def __call__(self, epoch: int, indices: np.ndarray) -> dict:
        indices = np.array(indices, dtype=np.int64)  # a copy: bad rows are replaced in place
        bad = []
        if self.shards.check_rows:
            for b, i in enumerate(indices.tolist()):
                if not self.shards.row_ok(i):
                    indices[b] = self.shards.substitute(i)
                    bad.append(dict(self.shards.describe(i), reason="row checksum mismatch",
                                    used=int(indices[b])))
        out = getattr(self, "_" + self.modality)(epoch, indices)
        add_layout(out, self.cfg.model)  # the index tensors the forward would otherwise read back
        if bad:
            out[BAD_ROWS_KEY] = bad
        return out

    def _mask_keys(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        m = self.cfg.model.clone_batch
        return rng.make_keys(self.cfg.data.seed, epoch, indices[:, None], np.arange(m)[None, :])

    # ---- image --------------------------------------------------------------------------
    def _image(self, epoch, indices):
        cfg = self.cfg
        cols = ["image", "label"] + (["pixels", "pix_height", "pix_width", "pix_channels"]
                                     if "pixels" in self.shards.manifest["schema"] else [])
        rows = [self.shards.get(int(i), cols) for i in indices]
        keys = rng.make_keys(cfg.data.seed, epoch, indices, 0)
        try:
            src = augment.augment_images(rows, keys, cfg.model.image_size, cfg.model.in_chans,
                                         (cfg.data.crop_scale_min, cfg.data.crop_scale_max), cfg.data.hflip,
                                         cfg.data.color_jitter)
        except Exception as e:  # PIL raises many types for corrupt bytes
            raise self._undecodable(rows, indices, e) from None
        grid = d2v2_masks.grid_side(cfg.model.num_patches)
        if not self.objective.gathers_kept:  # data2vec 1.0: BEiT blocks, ratio x P patches (120 / 196)
            mask = beit_masks.beit_block_mask(self._mask_keys(epoch, indices), grid,
                                                num_mask=int(round(cfg.masking.ratio * cfg.model.num_patches)),
                                                min_patches=cfg.masking.length)
        else:
            mask = d2v2_masks.inverse_block_mask(self._mask_keys(epoch, indices), grid, cfg.masking.ratio,
                                              cfg.masking.adjust, cfg.masking.length)
        out = {"source": torch.from_numpy(src), "mask": torch.from_numpy(mask),
               "index": torch.from_numpy(indices)}
        if self.has_labels:
            out["label"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)
        return out

    def _undecodable(self, rows: list[dict], indices: np.ndarray, err: Exception) -> Exception:
        """A DataError naming the row that does not decode (only reachable without row
        checksums: a manifest of version 1 or data.verify=none), else `err` itself."""
        for row, i in zip(rows, indices.tolist()):
            try:
                augment.decode_image(row, self.cfg.model.in_chans).load()
            except Exception as e:
                d = self.shards.describe(i)
                return DataError(f"cannot decode {d['shard']} row {d['row']} (source {d['source']}) of "
                                 f"{self.shards.manifest_path}: {type(e).__name__}: {e}. The row is corrupt; "
                                 f"`d2v2-prep verify` checks a corpus, and re-running d2v2-prep adds the per-row "
                                 "checksums that let training skip such rows")
        return err

    # ---- audio --------------------------------------------------------------------------
    def _audio(self, epoch, indices):
        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        sr = d.sample_rate
        raws = [self.shards.get(int(i), ["audio"])["audio"].astype(np.float32) * self.audio_dtype_scale
                for i in indices]
        views = None
        if d.views == "aqc":  # data2vec-aqc: + an augmented copy of each whole utterance, same crop below
            waves, views = augment_speech.aqc_views(raws, rng.make_keys(d.seed, epoch, indices, 0),
                                                    self.aug_params, self.noise_bank)
        else:  # each file is normalized whole (zero mean, unit variance), then cropped (docs/REFERENCE.md §1.10 D6)
            waves = [augment.normalize_wave(w) for w in raws]
        cap = int(round(d.max_seconds * sr))
        if d.audio_crop == "batch_min":
            # the reference: every clip cut to the batch's shortest (at most max_seconds), so the
            # batch has no padding; the sampler's length buckets keep the waste small
            crop_len = min(min(len(w) for w in waves), cap)
        else:  # "random_length": one length per batch in [min, max] s, shorter clips padded
            u_len = rng.uniform(rng.make_keys(d.seed, epoch, indices[:1], _BATCH_CLONE), 1, rng.STREAM_AUDIO_CROP)[0, 0]
            crop_len = int(round((d.min_seconds + (d.max_seconds - d.min_seconds) * u_len) * sr))
        # a random start per clip, keyed on (seed, epoch, sample): the same after a resume
        u_off = rng.uniform(rng.make_keys(d.seed, epoch, indices, 0), 1, rng.STREAM_AUDIO_CROP)[:, 0]
        for b, w in enumerate(waves):
            s, e = augment.crop_window(len(w), crop_len, u_off[b])
            waves[b] = w[s:e]
            if views is not None:
                views[b] = views[b][s:e]  # the same offset: the two views stay sample-aligned
        valid = np.array([len(w) for w in waves], dtype=np.int64)
        S = int(valid.max())
        src = _pad_rows(waves, S)
        padding = np.arange(S)[None, :] >= valid[:, None]
        T = m.audio_frames(S)
        frames = np.array([m.audio_frames(v) for v in valid], dtype=np.int64)
        if frames.min() <= 0:
            raise DataError(f"an audio crop of {valid.min()} samples gives no frames: raise data.min_seconds or "
                            "re-run d2v2-prep audio with a larger --min-seconds")
        keys = self._mask_keys(epoch, indices)
        if not self.objective.gathers_kept:  # data2vec 1.0 / aqc: speech spans, one row per sample, padding unmasked
            mask = d2v1_masks.speech_span_mask(keys, frames, T, cfg.masking.ratio, cfg.masking.length)
        else:
            rows_frames = np.repeat(frames, m.clone_batch)
            mask = d2v2_masks.span_mask(keys, rows_frames, T, cfg.masking.ratio, cfg.masking.adjust,
                                     cfg.masking.length)
            mask = d2v2_masks.equalize_kept(mask, keys)
        out = {"source": torch.from_numpy(src), "padding_mask": torch.from_numpy(padding),
               "mask": torch.from_numpy(mask), "index": torch.from_numpy(indices)}
        if views is not None:
            out["source_aug"] = torch.from_numpy(_pad_rows(views, S))
        return out

    # ---- text ---------------------------------------------------------------------------
    def _text(self, epoch, indices):
        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        u_off = rng.uniform(rng.make_keys(d.seed, epoch, indices, 0), 1, rng.STREAM_TEXT_CROP)[:, 0]
        bos = [self.bos_id] if d.prepend_bos else []
        toks = []
        for b, i in enumerate(indices):
            t = self.shards.get(int(i), ["tokens"])["tokens"]
            s, e = augment.crop_window(len(t), d.max_tokens - len(bos), u_off[b])
            toks.append(np.concatenate([np.asarray(bos, dtype=np.int64), np.asarray(t[s:e], dtype=np.int64)]))
        valid = np.array([len(t) for t in toks], dtype=np.int64)
        T = int(valid.max())
        src = np.full((len(toks), T), m.pad_token_id, dtype=np.int64)
        for b, t in enumerate(toks):
            src[b, :len(t)] = t
        padding = np.arange(T)[None, :] >= valid[:, None]
        keys = self._mask_keys(epoch, indices)
        out = {"source": torch.from_numpy(src), "padding_mask": torch.from_numpy(padding),
               "index": torch.from_numpy(indices)}
        if not self.objective.gathers_kept:
            # data2vec 1.0 (masking.generator text_spans or bert): the student reads `student_source` (<mask> ids in place), the teacher
            # `source` (the full original sequence); the loss covers the <mask> positions
            student, mask = d2v1_masks.text_inputs(keys, src, valid, cfg.masking, d2v1_masks.text_mask_id(m),
                                                     int(self.shards.manifest.get("vocab_size", m.vocab_size - 1)))
            out.update(student_source=torch.from_numpy(student), mask=torch.from_numpy(mask))
            return out
        mask = d2v2_masks.token_mask(keys, np.repeat(valid, m.clone_batch), T, cfg.masking.ratio)
        out["mask"] = torch.from_numpy(d2v2_masks.equalize_kept(mask, keys))
        return out


def _pad_rows(waves: list[np.ndarray], S: int) -> np.ndarray:
    """float32 [B, S]: row b = waves[b], zeros after it."""
    src = np.zeros((len(waves), S), dtype=np.float32)
    for b, w in enumerate(waves):
        src[b, :len(w)] = w
    return src


class _BatchDataset(Dataset):
    """Map-style dataset whose 'index' is a (epoch, indices) key: one item = one full batch,
    so reading, augmentation and masking all happen in the worker."""

    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def __getitem__(self, key):
        epoch, indices = key
        try:
            return self.builder(epoch, indices)
        except DataError as e:  # the Loader raises it again in the main process: raised in a worker,
            return {ERROR_KEY: str(e)}  # torch would put the worker's traceback inside its message


class _EpochKeys(Sampler):
    """Yields (epoch, indices) for the batches of `run["epoch"]` from `run["start"]` on.

    Holds no reference to the Loader (a reference cycle would leave worker shutdown to the
    garbage collector, which then waits on worker time-outs).
    """

    def __init__(self, sampler: ShardedBatchSampler):
        self.sampler = sampler
        self.run = {"epoch": 0, "start": 0}

    def __iter__(self):
        ep, start = self.run["epoch"], self.run["start"]
        batches = self.sampler.epoch_batches(ep)
        for pos in range(start, len(batches)):
            yield ep, batches[pos]

    def __len__(self):
        return len(self.sampler) - self.run["start"]


def _worker_init(_):
    torch.set_num_threads(1)  # PIL/numpy work is single-threaded; avoid oversubscription


def check_data(cfg) -> None:
    """The manifest-level checks (exists, modality, vocabulary, sample rate) on their own: cheap
    (one JSON read), so `d2v2-train` runs them before any process group or model exists."""
    if cfg.data.manifests:  # a mix of corpora (data/mixture.py)
        return check_data_mixture(cfg)
    if not cfg.data.manifest:
        raise DataError("data.manifest is not set: prepare data with `d2v2-prep image|audio|text ... --out DIR` "
                        "and set data.manifest=DIR/manifest.json")
    manifest, root = load_manifest(cfg.data.manifest)
    check_compatible(manifest, root / "manifest.json", cfg)


class Loader:
    """Iterable over batch dicts forever; exact resume via state_dict()/load_state_dict()."""

    def __init__(self, cfg, dp_rank: int, dp_size: int):
        if not cfg.data.manifest and not cfg.data.manifests:
            raise DataError("data.manifest is not set: prepare data with `d2v2-prep image|audio|text ... --out DIR` "
                            "and set data.manifest=DIR/manifest.json")
        self.cfg = cfg
        self.shards = mixture.open_corpus(cfg)  # a ShardSet, or a MixedShardSet for data.manifests
        self.manifest = self.shards.manifest
        check_compatible(self.manifest, self.shards.manifest_path, cfg)
        lengths = self.shards.lengths()
        eligible = None
        if self.manifest["modality"] == "audio":  # clips under data.min_seconds are dropped (docs/REFERENCE.md §1.10 D6)
            eligible = np.flatnonzero(lengths >= cfg.data.min_seconds * cfg.data.sample_rate)
            if len(eligible) < cfg.data.batch_size * dp_size:
                raise DataError(f"{self.shards.manifest_path}: only {len(eligible)} of {len(lengths)} clips are at "
                                f"least data.min_seconds={cfg.data.min_seconds} s long, fewer than data.batch_size x "
                                f"data-parallel ranks = {cfg.data.batch_size * dp_size}: lower data.min_seconds or "
                                "prepare longer clips")
        if self.manifest["modality"] == "text" and not objective_of(cfg.model).gathers_kept and \
                int(self.manifest.get("vocab_size", 0)) > d2v1_masks.text_mask_id(cfg.model):
            raise DataError(f"{self.shards.manifest_path} has a vocabulary of {self.manifest['vocab_size']} tokens but "
                            f"data2vec 1.0 uses id model.vocab_size - 1 = {d2v1_masks.text_mask_id(cfg.model)} as "
                            f"<mask>: set model.vocab_size={int(self.manifest['vocab_size']) + 1} (or larger)")
        self.sampler = mixture.make_sampler(self.shards, cfg, dp_rank, dp_size, lengths, eligible)
        # a mix: samples consumed per corpus on this rank (resumed with the position)
        self.corpus_samples = np.zeros(len(self.shards.sets), dtype=np.int64) \
            if isinstance(self.shards, mixture.MixedShardSet) else None
        self.builder = BatchBuilder(cfg, self.shards)
        if self.builder.aug_params is not None and objective_of(cfg.model).student_local_views < 2:
            print(f"warning: data.views='aqc': audio batches carry the augmented view source_aug, but only "
                  f"model.variant=data2vec_aqc reads it (this run: {cfg.model.variant}); it costs worker time only",
                  file=sys.stderr, flush=True)
        self.epoch, self.position = 0, 0
        self.bad_rows: dict[tuple[str, int], dict] = {}  # (shard file, row) -> describe() + reason
        self._keys = _EpochKeys(self.sampler)
        self._generation = 0
        nw = cfg.data.num_workers
        self._dl = DataLoader(_BatchDataset(self.builder), batch_size=None, sampler=self._keys,
                              num_workers=nw, persistent_workers=nw > 0, prefetch_factor=2 if nw > 0 else None,
                              worker_init_fn=_worker_init if nw > 0 else None,
                              # its own generator: starting an iterator draws worker seeds, and from
                              # the global RNG that draw would shift the trainer's random stream
                              # (decoder noise) whenever an iterator starts, e.g. after a resume
                              generator=torch.Generator().manual_seed(cfg.data.seed),
                              pin_memory=torch.cuda.is_available())

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.cfg.data.seed,
                "num_samples": len(self.shards), "batches_per_epoch": len(self.sampler),
                "bad_rows": list(self.bad_rows.values()),
                **({} if self.corpus_samples is None else
                   {"corpus_samples": self.corpus_samples.tolist(), "mixture": self.shards.paths,
                    "corpus_rows": [len(s) for s in self.shards.sets], "draws_per_epoch": self.sampler.draws.tolist()})}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed batch; an iterator in progress restarts from here."""
        if state.get("num_samples", len(self.shards)) != len(self.shards):
            raise DataError(f"the loader state is for {state['num_samples']} samples but {self.shards.manifest_path} "
                            f"holds {len(self.shards)}: resume with the same data")
        if self.corpus_samples is not None:
            # the corpora's sizes and shares, not their paths: the data may have moved since
            here = {"corpus_rows": [len(s) for s in self.shards.sets], "draws_per_epoch": self.sampler.draws.tolist()}
            if any(state.get(k) != v for k, v in here.items()):
                raise DataError(f"the loader state is for the mix {state.get('mixture')} of {state.get('corpus_rows')} "
                                f"rows drawing {state.get('draws_per_epoch')} samples per epoch, this run mixes "
                                f"{self.shards.paths} of {here['corpus_rows']} rows drawing {here['draws_per_epoch']}: "
                                "resume with the same data.manifests and data.manifest_weights")
            self.corpus_samples[:] = state["corpus_samples"]
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad_rows = {(b["shard"], b["row"]): b for b in state.get("bad_rows", [])}
        self._generation += 1

    def _record_bad(self, bad: list[dict]) -> None:
        """Log bad rows seen for the first time; stop past data.max_bad_rows."""
        limit = self.cfg.data.max_bad_rows
        for b in bad:
            key = (b["shard"], b["row"])
            if key in self.bad_rows:
                continue
            self.bad_rows[key] = b
            print(f"warning: bad row skipped: {b['shard']} row {b['row']} (source {b['source']}) in "
                  f"{self.shards.manifest_path}: {b['reason']}; sample {b['used']} used instead "
                  f"[{len(self.bad_rows)} bad rows, data.max_bad_rows={limit}]", file=sys.stderr, flush=True)
        if len(self.bad_rows) > limit:
            rows = "; ".join(f"{b['shard']} row {b['row']} ({b['source']})" for b in self.bad_rows.values())
            raise DataError(f"{len(self.bad_rows)} bad rows in {self.shards.manifest_path}, more than "
                            f"data.max_bad_rows={limit}: {rows}. List them all with `d2v2-prep verify "
                            f"{self.shards.manifest_path}`, rebuild the corpus (re-run d2v2-prep with "
                            "--overwrite) or restore the shards, or raise data.max_bad_rows")

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the Loader is garbage collected)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None

    def __iter__(self):
        while True:
            gen = self._generation
            if self.position >= len(self.sampler):
                self.epoch, self.position = self.epoch + 1, 0
            self._keys.run.update(epoch=self.epoch, start=self.position)
            stale = False
            for batch in self._dl:
                if self._generation != gen:
                    stale = True
                    break
                if ERROR_KEY in batch:
                    raise DataError(batch[ERROR_KEY])
                bad = batch.pop(BAD_ROWS_KEY, None)
                if bad:
                    self._record_bad(bad)
                self.position += 1  # consumed by the trainer from here on
                if self.corpus_samples is not None:
                    self.corpus_samples += np.bincount(self.shards.corpus_of(batch["index"].numpy()),
                                                       minlength=len(self.corpus_samples))
                yield batch
                if self._generation != gen:
                    stale = True
                    break
            if not stale:
                self.epoch, self.position = self.epoch + 1, 0


def build_loader(cfg, dp_rank: int, dp_size: int) -> Loader:
    """The data loader of one data-parallel rank (TP/PP ranks of that DP rank pass the same dp_rank)."""
    return Loader(cfg, dp_rank, dp_size)
