"""`d2v2-prep audio`: folder or tsv manifest of sound files -> Arrow shards of 16 kHz mono samples.

Any format libsndfile reads (wav, flac, ogg, ...).  Multi-channel audio is averaged to mono.
Other sample rates are resampled to --sample-rate with `scipy.signal.resample_poly(x, up, down)`
(up/down = target/source reduced by their gcd; a polyphase FIR with a Kaiser window, which
band-limits before decimation), unless --no-resample, which skips them instead.  Samples are
stored as int16 (round(x * 32768), clipped; an int16 source at the target rate round-trips
exactly) or float16.  Files shorter than --min-seconds are skipped; files longer than
--max-seconds are split into consecutive --max-seconds segments (--long split, the default;
a final piece shorter than --min-seconds is dropped and noted) or skipped (--long skip).

Labels (optional, for the linear probe; training ignores them): --label-from parent (the
file's folder name; files directly in SRC are unlabelled), stem (the file name without its
extension, e.g. digits/7.wav -> "7") or filelist (--label-list FILE of `path<TAB>label` lines,
path as found under SRC; files not listed are unlabelled).  Labels that are all integers are
kept as class ids; otherwise the sorted distinct names become ids 0..C-1 (manifest `classes`).
Segments of a split file share its label.

Columns: audio (list<int16|halffloat>), n_samples, duration (seconds), path, segment, and with
--label-from also label (int64, -1 = unlabelled).
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf

from d2v2_scale.data.audio_files import load_mono  # the decoder d2v2-prep and the loader share

from . import pipeline
from .pipeline import ItemResult, Skip

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".snd", ".w64", ".caf"}


def schema(dtype: str, labels: bool = False) -> pa.Schema:
    vt = pa.int16() if dtype == "int16" else pa.float16()
    fields = [("audio", pa.list_(vt)), ("n_samples", pa.int64()), ("duration", pa.float64()),
              ("path", pa.string()), ("segment", pa.int32())]
    # only when asked for: unlabelled corpora keep the schema (and fingerprint) they always had
    return pa.schema(fields + ([pipeline.LABEL_FIELD] if labels else []))


def list_inputs(src: str) -> list[tuple[str, str, int]]:
    """Sorted (absolute path, display path, expected n_samples or -1) items.

    `src` is a folder (searched recursively) or a wav2vec-style tsv: first line the root
    folder, then `relative/path<TAB>n_samples` lines.
    """
    p = Path(src)
    if p.is_dir():
        out = []
        for dirpath, files in pipeline.walk(p):
            for f in files:
                if Path(f).suffix.lower() in AUDIO_EXTS:
                    fp = Path(dirpath) / f
                    out.append((str(fp), str(fp.relative_to(p)), -1))
        return sorted(out, key=lambda t: t[1])
    if p.is_file():
        lines = p.read_text().splitlines()
        root = Path(lines[0].strip()) if lines else p.parent
        out = []
        for line in lines[1:]:
            if not line.strip():
                continue
            parts = line.split("\t")
            n = int(parts[1]) if len(parts) > 1 and parts[1].strip().isdigit() else -1
            out.append((str(root / parts[0]), parts[0], n))
        return sorted(out, key=lambda t: t[1])
    if not p.exists():
        raise SystemExit(f"error: audio input {src} does not exist")
    raise SystemExit(f"error: audio input {src} is neither a folder nor a tsv manifest")


def read_label_list(path: str) -> dict[str, str]:
    """`path<TAB>label` lines (blank lines and # comments skipped) -> {path: label}."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
            raise SystemExit(f"error: {path}:{n}: expected 'path<TAB>label', got {line!r}")
        out[os.path.normpath(parts[0])] = parts[1]
    return out


def item_labels(items: list[tuple[str, str, int]], label_from: str | None,
                label_list: str | None = None) -> tuple[list[int] | None, list[str]]:
    """Per-item class ids (-1 = unlabelled) and class names, or (None, []) without --label-from.

    items: list_inputs' (absolute path, display path, n_samples); the display path (relative
    to SRC) names the parent folder / stem and is what a --label-list line is matched against
    (an absolute path in the list matches too)."""
    if not label_from:
        return None, []
    if label_from == "parent":
        raw = [Path(d).parent.name or None for _, d, _ in items]  # loose files in SRC: unlabelled
    elif label_from == "stem":
        raw = [Path(d).stem for _, d, _ in items]
    elif label_from == "filelist":
        if not label_list:
            raise SystemExit("error: --label-from filelist needs --label-list FILE (path<TAB>label lines)")
        table = read_label_list(label_list)
        raw = [table.get(os.path.normpath(d), table.get(os.path.normpath(a))) for a, d, _ in items]
    else:
        raise SystemExit(f"error: unknown --label-from {label_from!r}")
    return pipeline.label_ids(raw)


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def process(item, sample_rate: int, resample: bool, min_s: float, max_s: float, long: str,
            dtype: str) -> ItemResult:
    """item: (path, display path, expected n_samples or -1, class id or None when unlabelled corpus)."""
    path, disp, expected, label = item
    try:
        if os.path.getsize(path) == 0:
            return ItemResult(skips=[Skip(disp, "empty file")])
        info = sf.info(path)
    except Exception as e:
        return ItemResult(skips=[Skip(disp, f"unreadable: {type(e).__name__}: {e}")])
    if info.samplerate <= 0:
        return ItemResult(skips=[Skip(disp, f"wrong sample rate: {info.samplerate}")])
    if info.samplerate != sample_rate and not resample:
        return ItemResult(skips=[Skip(disp, f"wrong sample rate: {info.samplerate} Hz != {sample_rate} Hz "
                                            "(--no-resample)")])
    if expected >= 0 and info.frames != expected:
        return ItemResult(skips=[Skip(disp, f"length mismatch: tsv says {expected} samples, file has "
                                            f"{info.frames}")])
    try:
        x, _, _ = load_mono(path, sample_rate)
    except Exception as e:
        return ItemResult(skips=[Skip(disp, f"unreadable: {type(e).__name__}: {e}")])
    if x.size == 0:
        return ItemResult(skips=[Skip(disp, "empty audio (0 samples)")])
    if not np.isfinite(x).all():
        return ItemResult(skips=[Skip(disp, "corrupt: non-finite samples")])
    dur = x.size / sample_rate
    if dur < min_s:
        return ItemResult(skips=[Skip(disp, f"too short: {dur:.2f} s < --min-seconds {min_s}")])
    max_n = int(round(max_s * sample_rate))
    notes = []
    if x.size > max_n:
        if long == "skip":
            return ItemResult(skips=[Skip(disp, f"too long: {dur:.2f} s > --max-seconds {max_s}")])
        pieces = [x[i:i + max_n] for i in range(0, x.size, max_n)]
        if pieces[-1].size < min_s * sample_rate:
            notes.append(f"{disp}: dropped a {pieces[-1].size / sample_rate:.2f} s tail after splitting")
            pieces = pieces[:-1]
    else:
        pieces = [x]
    rows = []
    for k, piece in enumerate(pieces):
        a = to_int16(piece) if dtype == "int16" else piece.astype(np.float16)
        row = {"audio": a, "n_samples": int(a.size), "duration": a.size / sample_rate, "path": disp,
               "segment": k}
        if label is not None:
            row["label"] = label
        rows.append(row)
    return ItemResult(rows=rows, notes=notes)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of audio files (recursive) or a tsv manifest (root line, then path<TAB>n)")
    p.add_argument("--sample-rate", type=int, default=16000, help="target rate (Hz)")
    p.add_argument("--no-resample", dest="resample", action="store_false",
                   help="skip files at other rates instead of resampling them")
    p.add_argument("--min-seconds", type=float, default=1.0, help="skip shorter files")
    p.add_argument("--max-seconds", type=float, default=30.0, help="split (or skip) longer files")
    p.add_argument("--long", choices=["split", "skip"], default="split",
                   help="files longer than --max-seconds: split into pieces or skip")
    p.add_argument("--dtype", choices=["int16", "float16"], default="int16", help="stored sample type")
    p.add_argument("--label-from", choices=["parent", "stem", "filelist"], default=None,
                   help="store a label column: the parent folder name, the file stem, or --label-list")
    p.add_argument("--label-list", metavar="FILE", default=None,
                   help="path<TAB>label lines (names or integers; paths relative to SRC); "
                        "implies --label-from filelist")


def main(args: argparse.Namespace) -> dict:
    items = list_inputs(args.src)
    items, ignored = pipeline.real_files_once(items)
    if Path(args.src).is_dir():
        ignored = sorted(ignored + pipeline.unsupported_files(args.src, AUDIO_EXTS), key=lambda s: s.source)
    if not items:
        raise SystemExit(f"error: no audio files found under {args.src}"
                         + (f" ({len(ignored)} files with other extensions)" if ignored else ""))
    label_from = args.label_from or ("filelist" if args.label_list else None)
    if args.label_list and label_from != "filelist":
        raise SystemExit(f"error: --label-list goes with --label-from filelist, not {label_from}")
    labels, classes = item_labels(items, label_from, args.label_list)
    items = [(a, d, n, None if labels is None else labels[i]) for i, (a, d, n) in enumerate(items)]
    proc = functools.partial(process, sample_rate=args.sample_rate, resample=args.resample,
                             min_s=args.min_seconds, max_s=args.max_seconds, long=args.long, dtype=args.dtype)
    fp = {"modality": "audio", "items": [(d, n) for _, d, n, _ in items], "sr": args.sample_rate,
          "resample": args.resample, "min": args.min_seconds, "max": args.max_seconds, "long": args.long,
          "dtype": args.dtype, "shard_size_mb": args.shard_size_mb}
    extra = {"sample_rate": args.sample_rate, "dtype": args.dtype, "resampler": "scipy.signal.resample_poly",
             "min_seconds": args.min_seconds, "max_seconds": args.max_seconds, "source": str(args.src)}
    if labels is not None:  # added only when labelled, so unlabelled runs keep their old fingerprint
        fp["labels"] = [labels, classes, label_from]
        extra.update(classes=classes, num_classes=len(classes), label_from=label_from)
    return pipeline.run(args.out, modality="audio", items=items, process=proc,
                        schema=schema(args.dtype, labels is not None),
                        shard_size_mb=args.shard_size_mb, workers=args.workers, args_fingerprint=fp,
                        manifest_extra=extra,
                        desc="audio", overwrite=args.overwrite, ignored=ignored)
