"""Data loader benchmark: samples/s per CPU core, shards vs original files vs HF datasets.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--repeats 5] [--batches 20]

For each modality (base-preset shapes: image 224 px, M=16, R=0.8; audio crops 2-20 s, M=8;
text 512-token blocks, M=8) it times building batches in ONE process (so samples/s is per
core; the DataLoader multiplies it by data.num_workers):
  shards    d2v2 shards (memory-mapped Arrow) -> decode -> augment -> mask   (what training runs;
            "image-pixels" reads the --pixels uint8 arrays instead of decoding JPEG)
  files     the same samples from the original files (PIL / soundfile + resample /
            sentencepiece encode) -> the same augment + mask
  hf        the same rows through HuggingFace `datasets` (Arrow, memory-mapped) if installed
  masks     mask generation alone (masks/s = mask rows per second) and its share of `shards`
  row checks  `shards` with the per-row crc32 checks off and on (on is the default,
            data.verify=fast), interleaved passes, and the checksum alone in us per row
            (--row-checks-only: just this table)
Corpora: sklearn digits written as 256x256 JPEGs, the asterisk 8 kHz prompts, WordNet glosses
(see tests/data_fixtures.py); prepared once under --work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("D2V2_PREP_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import data_fixtures as fx  # noqa: E402

from d2v2_scale.config import load_preset  # noqa: E402
from d2v2_scale.data import rng  # noqa: E402
from d2v2_scale.data.loader import BatchBuilder  # noqa: E402
from d2v2_scale.data.masking import data2vec2 as d2v2_masks
from d2v2_scale.data.shards import ShardSet  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402


def make_corpora(work: Path) -> dict[str, tuple[Path, Path]]:
    """{modality: (raw input, prepared dir)}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = {}
    img = work / "raw-image"
    if not img.exists():
        d = load_digits()
        for k, (a, lab) in enumerate(zip(d.images[:400], d.target[:400])):
            (img / str(lab)).mkdir(parents=True, exist_ok=True)
            im = Image.fromarray((a * 255 / 16).astype(np.uint8)).resize((256, 256), Image.Resampling.BICUBIC)
            im.convert("RGB").save(img / str(lab) / f"{k:04d}.jpg", quality=90)
    wav = work / "raw-audio"
    if not wav.exists():
        fx.make_speech_folder(wav, n=200)
    txt = work / "raw-text"
    if not txt.exists():
        fx.make_text_folder(txt, n=40000, files=4)
    for kind, raw, extra in (("image", img, []), ("image-pixels", img, ["--pixels", "256"]), ("audio", wav, ["--min-seconds", "1", "--max-seconds", "20"]),
                             ("text", txt, ["--vocab-size", "8000", "--block-size", "512"])):
        o = work / f"prep-{kind}"
        if not (o / "manifest.json").exists():
            prep([kind.split("-")[0], str(raw), "--out", str(o), "--shard-size-mb", "64", "--workers", "2", *extra])
        out[kind] = (raw, o)
    return out


class FileRows:
    """Looks like a ShardSet to BatchBuilder but reads every sample from its original file."""

    def __init__(self, shards: ShardSet, raw: Path):
        self.shards, self.raw, self.modality = shards, raw, shards.modality
        self.manifest = shards.manifest
        self.meta = [shards.get(i, [c for c in ("path", "segment", "source") if c in shards.manifest["schema"]])
                     for i in range(len(shards))]
        if self.modality == "text":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(shards.root / "spm.model"))
            # a packed block = these documents; re-read and re-encode them from the text files
            self.docs = self._doc_index()

    def _doc_index(self):
        out = []
        for i in range(len(self.shards)):
            srcs = self.shards.get(i, ["source", "doc_offsets"])
            out.append(srcs["source"])
        return out

    def get(self, i, columns=None):
        m = self.meta[i]
        if self.modality == "image":
            return {"image": (self.raw / m["path"]).read_bytes(), "label": 0}
        if self.modality == "audio":
            from d2v2_scale.data.audio_files import load_mono
            from data_prep.audio import to_int16

            x, _, _ = load_mono(str(self.raw / m["path"]), 16000)
            n = 20 * 16000
            return {"audio": to_int16(x[m["segment"] * n:(m["segment"] + 1) * n])}
        # text: read ~512 tokens of text starting at the block's first document and encode it
        src = self.docs[i].split("+")[0]
        f, off = src.rsplit("@", 1)
        with open(self.raw.parent / f, "rb") as fh:
            fh.seek(int(off))
            text = fh.read(4096).decode("utf-8", "ignore").split("\n")
        ids = [t for line in text for t in self.sp.encode(line) + [2]][:512]
        return {"tokens": np.asarray(ids, dtype=np.int64)}


def time_batches(builder, batches, repeats, clock=time.perf_counter):
    """Median seconds per sample over `repeats` passes."""
    times = []
    n = sum(len(b) for b in batches)
    for _ in range(repeats):
        t = clock()
        for b in batches:
            builder(0, b)
        times.append((clock() - t) / n)
    return statistics.median(times)


def read_time(source, batches, kind, repeats):
    """Median seconds per sample to read + decode only (no augmentation, no masks)."""
    from d2v2_scale.data.augment import decode_image

    times = []
    idx = [int(i) for b in batches for i in b]
    for _ in range(repeats):
        t = time.perf_counter()
        for i in idx:
            r = source.get(i)
            if kind.startswith("image"):
                decode_image(r, 3).load()
            elif kind == "audio":
                np.asarray(r["audio"], dtype=np.float32)
            else:
                np.asarray(r["tokens"], dtype=np.int64)
        times.append((time.perf_counter() - t) / len(idx))
    return statistics.median(times)


def hf_rows(prep_dir: Path):
    """A HuggingFace datasets Dataset over the same Arrow data, or None if not installed."""
    try:
        import datasets
    except ImportError:
        return None
    import pyarrow as pa

    tables = [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in sorted(prep_dir.glob("shard-*.arrow"))]
    cache = prep_dir / "hf"
    if not cache.exists():
        datasets.Dataset(pa.concat_tables(tables)).save_to_disk(str(cache))
    ds = datasets.load_from_disk(str(cache))
    # numpy format for list columns; binary stays Python bytes (numpy's S dtype drops trailing NULs)
    list_cols = [f.name for f in tables[0].schema if pa.types.is_list(f.type)]
    if list_cols:
        ds = ds.with_format("numpy", columns=list_cols, output_all_columns=True)

    class HF:
        modality = None
        manifest = None

        def get(self, i, columns=None):
            r = ds[int(i)]
            out = {}
            for k, v in r.items():
                if columns is not None and k not in columns:
                    continue
                if isinstance(v, np.ndarray) and v.dtype == object:
                    v = v.item()
                if isinstance(v, bytes) and k == "pixels":
                    v = np.frombuffer(v, np.uint8)
                out[k] = v
            return out

    return HF()


def row_check_cost(shards, builder, batches, repeats):
    """(samp/s checks off, samp/s checks on, us per row for the checksum alone), in process CPU
    time (one thread: the work itself, steady on a loaded shared machine, unlike wall time);
    off/on passes interleave so that drifts affect both alike."""
    off, on = [], []
    for _ in range(repeats):
        for flag, acc in ((False, off), (True, on)):
            shards.check_rows = flag
            acc.append(time_batches(builder, batches, 1, clock=time.process_time))
    shards.check_rows = True
    idx = [int(i) for b in batches for i in b]
    times = []
    for _ in range(repeats):
        t = time.process_time()
        for i in idx:
            shards.row_ok(i)
        times.append((time.process_time() - t) / len(idx))
    return 1 / statistics.median(off), 1 / statistics.median(on), statistics.median(times) * 1e6


def mask_rate(cfg, batch_rows, lengths=None, repeats=20):
    """mask rows per second for one batch shape."""
    M = cfg.model.clone_batch
    idx = np.arange(batch_rows)
    keys = rng.make_keys(1, 0, idx[:, None], np.arange(M)[None, :])
    m = cfg.masking
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        if cfg.model.modality == "image":
            d2v2_masks.inverse_block_mask(keys, d2v2_masks.grid_side(cfg.model.num_patches), m.ratio, m.adjust, m.length)
        elif cfg.model.modality == "audio":
            lens = np.repeat(lengths, M)
            d2v2_masks.equalize_kept(d2v2_masks.span_mask(keys, lens, int(lens.max()), m.ratio, m.adjust, m.length), keys)
        else:
            lens = np.repeat(lengths, M)
            d2v2_masks.equalize_kept(d2v2_masks.token_mask(keys, lens, int(lens.max()), m.ratio), keys)
        times.append(time.perf_counter() - t)
    return len(keys) / statistics.median(times), statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "d2v2-bench-loader"))
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--row-checks-only", action="store_true", help="only the row checksum table")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpora = make_corpora(work)
    rows, checks = [], []
    for kind, preset in (("image", "image-base"), ("image-pixels", "image-base"), ("audio", "audio-base"),
                         ("text", "text-base")):
        raw, pdir = corpora[kind]
        cfg = load_preset(preset)
        cfg.data.manifest = str(pdir)
        shards = ShardSet(pdir)
        from d2v2_scale.data.sampler import ShardedBatchSampler

        sampler = ShardedBatchSampler(len(shards), cfg.data.batch_size, 0, 1, 1, lengths=shards.lengths())
        batches = list(sampler.epoch_batches(0)[:args.batches])
        # warm the page cache / decoders once, then time
        b_shard = BatchBuilder(cfg, shards)
        b_shard(0, batches[0])
        checks.append((kind, *row_check_cost(shards, b_shard, batches, args.repeats)))
        if args.row_checks_only:
            continue
        t_shard = time_batches(b_shard, batches, args.repeats)
        files = FileRows(shards, raw)
        b_files = BatchBuilder(cfg, shards)
        b_files.shards = files
        t_files = time_batches(b_files, batches, max(1, args.repeats // 2))
        r_shard = read_time(shards, batches, kind, args.repeats)
        r_files = read_time(files, batches, kind, max(1, args.repeats // 2))
        hf = hf_rows(pdir)
        t_hf = None
        if hf is not None:
            hf.modality, hf.manifest = shards.modality, shards.manifest
            b_hf = BatchBuilder(cfg, shards)
            b_hf.shards = hf
            t_hf = time_batches(b_hf, batches, max(1, args.repeats // 2))
        # masks alone, for the same batches (lengths as the loader computes them)
        lens = None
        if kind == "audio":
            ex = b_shard(0, batches[0])
            lens = np.array([cfg.model.audio_frames(v) for v in (~ex["padding_mask"]).sum(1).numpy()])
        elif kind == "text":
            ex = b_shard(0, batches[0])
            lens = (~ex["padding_mask"]).sum(1).numpy()
        mps, t_mask = mask_rate(cfg, cfg.data.batch_size, lens)
        share = t_mask / (t_shard * cfg.data.batch_size)
        rows.append((kind, cfg.data.batch_size, cfg.model.clone_batch, 1 / t_shard, 1 / t_files,
                     None if t_hf is None else 1 / t_hf, mps, share, 1 / r_shard, 1 / r_files))
    hdr = ("modality", "B", "M", "shards samp/s", "files samp/s", "shards/files", "HF datasets samp/s",
           "shards/HF", "read+decode only: shards / files samp/s", "masks/s", "mask share")
    if rows:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
    for kind, B, M, s, f, h, mps, share, rs, rf in rows:
        print(f"| {kind} | {B} | {M} | {s:,.0f} | {f:,.0f} | {s / f:.1f}x | "
              f"{'-' if h is None else f'{h:,.0f}'} | {'-' if h is None else f'{s / h:.1f}x'} | "
              f"{rs:,.0f} / {rf:,.0f} ({rs / rf:.1f}x) | {mps:,.0f} | {share:.1%} |")
    print("\n| modality | row checks off samp/s (CPU time) | on samp/s | cost | crc32 alone us/row |")
    print("|---|---|---|---|---|")
    for kind, off, on, us in checks:
        print(f"| {kind} | {off:,.0f} | {on:,.0f} | {off / on - 1:+.1%} | {us:.1f} |")


if __name__ == "__main__":
    main()
