"""`d2v2-prep text`: raw UTF-8 text -> sentencepiece token ids in Arrow shards.

Documents are lines (--doc-per line) or blank-line separated paragraphs (--doc-per paragraph).
A sentencepiece model is trained on the documents (ids follow the fairseq convention the
models use: <s>=0, <pad>=1, </s>=2, <unk>=3) unless --spm-model gives an existing one.
Documents that are not valid UTF-8 are skipped and reported; the run goes on.

--mode pack (default): documents (each followed by </s>) are concatenated and cut into blocks
of --block-size tokens (the last block may be shorter); `doc_offsets` lists where documents
start inside each block.  --mode doc: one row per document, `doc_offsets` = [0].

Labelled documents (for the linear probe; training ignores labels): --format tsv reads one
`label<TAB>text` document per line (an empty label = unlabelled), --format jsonl one JSON
object per line with a "text" string and an optional "label" (string, integer or null).
Labels that are all integers are kept as class ids; otherwise the sorted distinct names become
ids 0..C-1 (manifest `classes`).  A label belongs to one document, so the label column is
stored with --mode doc only (--mode pack drops the labels and keeps the text).

Columns: tokens (list<uint16> when the vocabulary fits, else list<int32>), doc_offsets
(list<int32>), n_tokens, source (file@byte-offset of the first document), and with labels
label (int64, -1 = unlabelled).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from d2v2_scale.data.manifest import MANIFEST_NAME, sha256_file

from . import pipeline
from .pipeline import ItemResult, Packer, Skip

CHUNK_BYTES = 1 << 20  # parallel work unit; boundaries are moved to the next document break


def schema(wide: bool, labels: bool = False) -> pa.Schema:
    fields = [("tokens", pa.list_(pa.int32() if wide else pa.uint16())), ("doc_offsets", pa.list_(pa.int32())),
              ("n_tokens", pa.int32()), ("source", pa.string())]
    # only when labelled: unlabelled corpora keep the schema (and fingerprint) they always had
    return pa.schema(fields + ([pipeline.LABEL_FIELD] if labels else []))


def list_files(srcs: list[str]) -> tuple[list[tuple[str, str]], list[Skip]]:
    """Sorted (path, display path) of the input files, each real file once (symlinked aliases
    are reported, not read twice), and the report entries for what was left out."""
    out, ignored = [], []
    for s in srcs:
        p = Path(s)
        if not p.exists():
            raise SystemExit(f"error: text source {p} does not exist")
        if p.is_dir():
            for dirpath, files in pipeline.walk(p):
                for f in files:
                    fp = Path(dirpath) / f
                    disp = str(fp.relative_to(p.parent))
                    if f.startswith("."):
                        ignored.append(Skip(disp, "hidden file"))
                    else:  # any other file; bad bytes are reported per document
                        out.append((str(fp), disp))
        else:
            out.append((str(p), p.name))
    files, aliases = pipeline.real_files_once(sorted(set(out), key=lambda t: t[1]))
    return files, sorted(ignored + aliases, key=lambda k: k.source)


def chunk_file(path: str, disp: str, sep: bytes) -> list[tuple[str, str, int, int]]:
    """Split a file into (path, disp, start, end) byte ranges of about CHUNK_BYTES, cut right
    after a document separator so no document spans two chunks."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return [(path, disp, 0, -1)]  # reported as unreadable by `process`
    if size == 0:
        return [(path, disp, 0, 0)]
    bounds = [0]
    with open(path, "rb") as f:
        pos = CHUNK_BYTES
        while pos < size:
            f.seek(pos)
            # scan each 64 KiB piece once (with the last len(sep) - 1 bytes before it, for a separator
            # across two pieces): a document of many MB costs one pass, not one per piece read
            scanned, tail, i = pos, b"", -1
            while True:
                more = f.read(1 << 16)
                if not more:
                    break
                i = (tail + more).find(sep)
                if i >= 0:
                    i += scanned - len(tail) - pos
                    break
                scanned += len(more)
                tail = (tail + more)[-(len(sep) - 1):] if len(sep) > 1 else b""
            if i < 0:
                break
            cut = pos + i + len(sep)
            if cut >= size:
                break
            bounds.append(cut)
            pos = cut + CHUNK_BYTES
    bounds.append(size)
    return [(path, disp, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def parse_labelled(text: str, fmt: str) -> tuple[str, str | None]:
    """One --format tsv|jsonl line -> (document text, label string or None); ValueError if malformed."""
    if fmt == "tsv":
        if "\t" not in text:
            raise ValueError("malformed tsv line: no TAB between label and text")
        label, doc = text.split("\t", 1)
        return doc.strip(), label.strip() or None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed jsonl line: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError('malformed jsonl line: no "text" string')
    label = obj.get("label")
    if label is not None and not isinstance(label, (str, int)) or isinstance(label, bool):
        raise ValueError(f'malformed jsonl line: "label" must be a string, integer or null, not {label!r}')
    return obj["text"].strip(), (None if label is None or label == "" else str(label))


def read_docs(item, doc_per: str, fmt: str = "text") -> tuple[list[tuple[str, str, str | None]], list[Skip]]:
    """(source, text, label or None) documents of one chunk, and skips for undecodable or
    malformed documents.  fmt "text": the whole document is text, no label."""
    path, disp, start, end = item
    if end == 0:
        return [], [Skip(disp, "empty file")]
    try:
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start) if end > 0 else f.read()
    except OSError as e:
        return [], [Skip(disp, f"unreadable: {e.strerror or e}")]
    sep = b"\n\n" if doc_per == "paragraph" else b"\n"
    docs, skips, off = [], [], start
    for piece in raw.split(sep):
        src = f"{disp}@{off}"
        off += len(piece) + len(sep)
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.append(Skip(src, f"not UTF-8: {e.reason} at byte {e.start}"))
            continue
        label = None
        if fmt != "text" and text.strip():
            try:  # before any strip: a TSV line with an empty label starts with its TAB
                text, label = parse_labelled(text.rstrip("\r\n"), fmt)
            except ValueError as e:
                skips.append(Skip(src, str(e)))
                continue
        text = " ".join(text.split()) if doc_per == "paragraph" else text.strip()
        if text:
            docs.append((src, text, label))
    return docs, skips


_SPM = {}


def _spm(path: str):
    """The processor of the model file at `path`, once per process and file version (a run with
    --overwrite in the same process, e.g. a test, may replace spm.model)."""
    import sentencepiece as spm

    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    if key not in _SPM:
        _SPM[key] = spm.SentencePieceProcessor(model_file=path)
    return _SPM[key]


def process(item, doc_per: str, spm_path: str, add_eos: bool, wide: bool, fmt: str = "text",
            label_index: dict[str, int] | None = None) -> ItemResult:
    """label_index: label string -> class id when the label column is stored (--mode doc), else None."""
    docs, skips = read_docs(item, doc_per, fmt)
    sp = _spm(spm_path)
    eos = [sp.eos_id()] if add_eos and sp.eos_id() >= 0 else []
    dt = np.int32 if wide else np.uint16
    rows = []
    for (src, _, label), ids in zip(docs, sp.encode([t for _, t, _ in docs])):
        toks = np.asarray(ids + eos, dtype=dt)
        row = {"tokens": toks, "doc_offsets": np.zeros(1, np.int32), "n_tokens": len(toks), "source": src}
        if label_index is not None:
            row["label"] = -1 if label is None else label_index[label]
        rows.append(row)
    return ItemResult(rows=rows, skips=skips)


class BlockPacker(Packer):
    """Concatenate documents and cut blocks of exactly `block` tokens (the last may be shorter).

    `carry` holds the tokens not yet in a block (fewer than `block` between calls) and `docs` the
    [start, source] of the documents in it, start relative to the carry; a negative start means
    the document began in an earlier block, so a block's `source` reads "file@offset+tokens".

    Linear in the tokens: each `add` copies the carry and the new documents once into one
    buffer and cuts every full block out of it as a view (the packer kept a Python list and
    re-sliced the rest after each block, so one document of n tokens cost n^2 / block copies:
    a 5 MB line took minutes, docs/BENCHMARKS.md).  `copied` counts the tokens copied, for
    tests/test_prep_safety.py.
    """

    def __init__(self, block: int, wide: bool):
        self.block, self.dt = block, (np.int32 if wide else np.uint16)
        self.carry = np.zeros(0, self.dt)
        self.docs: list[list] = []
        self.copied = 0

    def add(self, rows):
        if not rows:
            return []
        parts = [self.carry] + [np.asarray(r["tokens"], dtype=self.dt) for r in rows]
        sizes = np.fromiter((len(a) for a in parts), dtype=np.int64, count=len(parts))
        starts = [d[0] for d in self.docs] + np.cumsum(sizes)[:-1].tolist()
        sources = [d[1] for d in self.docs] + [r["source"] for r in rows]
        buf = np.concatenate(parts)
        self.copied += len(buf)
        cut = len(buf) - len(buf) % self.block
        out = [self._row(buf, starts, sources, a, self.block) for a in range(0, cut, self.block)]
        self.carry = buf[cut:].copy()  # < block tokens; a view would keep the whole buffer alive
        self.copied += len(self.carry)
        first = max(bisect.bisect_right(starts, cut) - 1, 0)  # the document running at the cut, then later ones
        self.docs = [[st - cut, src] for st, src in zip(starts[first:], sources[first:])]
        return out

    def _row(self, buf: np.ndarray, starts: list[int], sources: list[str], a: int, n: int) -> dict:
        """The block buf[a:a+n]: documents starting inside it, source = the document running at a."""
        k = bisect.bisect_right(starts, a) - 1
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, a + n)
        return {"tokens": buf[a:a + n], "doc_offsets": np.asarray(starts[lo:hi], dtype=np.int32) - a,
                "n_tokens": n, "source": sources[k] if starts[k] == a else f"{sources[k]}+{a - starts[k]}"}

    def finish(self):
        out = [self._row(self.carry, [d[0] for d in self.docs], [d[1] for d in self.docs], 0, len(self.carry))] \
            if len(self.carry) else []
        self.carry, self.docs = np.zeros(0, self.dt), []
        return out

    def state(self):
        return {"tokens": self.carry.tolist(), "docs": self.docs}

    def load(self, state):
        """`state` comes from a progress file on disk: checked, ValueError if it is not a packer's."""
        if not state:
            return
        if not isinstance(state, dict):
            raise ValueError("not a text packer state")
        toks, docs = state.get("tokens"), state.get("docs")
        if not (isinstance(toks, list) and len(toks) < self.block and all(type(t) is int for t in toks)
                and isinstance(docs, list) and all(isinstance(d, list) and len(d) == 2 and type(d[0]) is int
                                                   and isinstance(d[1], str) for d in docs)
                and [d[0] for d in docs] == sorted(d[0] for d in docs)):
            raise ValueError("not a text packer state")
        self.carry, self.docs = np.asarray(toks, dtype=self.dt), docs


def _collect_docs(item, doc_per, fmt="text"):
    docs, _ = read_docs(item, doc_per, fmt)
    return [t for _, t, _ in docs]


def _collect_labels(item, doc_per, fmt):
    docs, _ = read_docs(item, doc_per, fmt)
    return sorted({lab for _, _, lab in docs if lab is not None})


def _map_items(fn, items, workers: int) -> list:

    if workers > 1 and len(items) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, items)
    return list(map(fn, items))


def label_index(items, doc_per: str, fmt: str, workers: int) -> tuple[dict[str, int], list[str]]:
    """A pass over all documents before any shard is written: class ids must not depend on
    which documents a (resumed) run has seen.  -> ({label string: id}, class names)."""
    found = sorted({lab for part in _map_items(functools.partial(_collect_labels, doc_per=doc_per, fmt=fmt),
                                               items, workers) for lab in part})
    ids, classes = pipeline.label_ids(found)
    return dict(zip(found, ids)), classes


def train_spm(items, doc_per: str, vocab_size: int, model_type: str, max_sentences: int,
              workers: int, fmt: str = "text") -> bytes:
    """Train sentencepiece on the documents (deterministic: fixed order, even subsample, 1 thread);
    the model file's bytes (written into --out only once the run may change it)."""
    import sentencepiece as spm

    parts = _map_items(functools.partial(_collect_docs, doc_per=doc_per, fmt=fmt), items, workers)
    docs = [d for p in parts for d in p]
    if not docs:
        raise SystemExit("error: no valid UTF-8 documents to train sentencepiece on")
    if max_sentences and len(docs) > max_sentences:  # even subsample, not random: reproducible
        docs = [docs[i] for i in np.linspace(0, len(docs) - 1, max_sentences).astype(int)]
    # In-memory input and output: the model file then holds no temp paths and is byte-identical
    # across runs and output folders (needed for resumable, reproducible shards).
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2, unk_id=3, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2, hard_vocab_limit=False)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="+", help="text files or folders (UTF-8)")
    p.add_argument("--format", choices=["text", "tsv", "jsonl"], default="text", dest="fmt",
                   help="text: plain documents; tsv: 'label<TAB>text' lines; jsonl: {\"text\": ..., "
                        "\"label\": ...} lines (labels stored with --mode doc)")
    p.add_argument("--doc-per", choices=["line", "paragraph"], default="line",
                   help="a document is a line, or a blank-line separated paragraph")
    p.add_argument("--spm-model", default=None, help="existing sentencepiece .model; None: train one")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size of the trained model")
    p.add_argument("--spm-type", choices=["unigram", "bpe"], default="unigram",
                   help="sentencepiece model type of the trained model")
    p.add_argument("--spm-max-sentences", type=int, default=2_000_000,
                   help="train sentencepiece on at most this many documents (even subsample)")
    p.add_argument("--mode", choices=["pack", "doc"], default="pack",
                   help="pack: blocks of --block-size tokens; doc: one row per document")
    p.add_argument("--block-size", type=int, default=511,
                   help="tokens per packed block (511: the loader prepends <s> for 512, docs/REFERENCE.md §1.10 D10)")
    p.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not append </s> to documents (default: append, add_eos=%(default)s)")


def main(args: argparse.Namespace) -> dict:
    if args.spm_model:  # before any work: one line, not sentencepiece's traceback
        if not Path(args.spm_model).is_file():
            raise SystemExit(f"error: --spm-model {args.spm_model} does not exist or is not a file: give a "
                             f"sentencepiece .model, or leave --spm-model out to train one")
        try:
            _spm(str(Path(args.spm_model).resolve()))
        except RuntimeError as e:
            raise SystemExit(f"error: --spm-model {args.spm_model} is not a sentencepiece model ({e}): give the "
                             f".model file sentencepiece wrote, or leave --spm-model out to train one") from None
    files, ignored = list_files(args.src)
    if not files:
        raise SystemExit(f"error: no text files under {' '.join(args.src)}")
    fmt = getattr(args, "fmt", "text")
    if fmt != "text" and args.doc_per != "line":
        raise SystemExit(f"error: --format {fmt} holds one document per line: use --doc-per line")
    sep = b"\n\n" if args.doc_per == "paragraph" else b"\n"
    items = [c for path, disp in files for c in chunk_file(path, disp, sep)]
    out = Path(args.out)
    pipeline.lock_out(out)  # before the first write (the model below); held until the run ends
    fp_base = {"modality": "text", "files": [(d, os.path.getsize(p) if os.path.exists(p) else -1)
                                             for p, d in files],
               "doc_per": args.doc_per, "mode": args.mode, "block": args.block_size, "eos": args.add_eos,
               "shard_size_mb": args.shard_size_mb}
    if fmt != "text":  # only then: plain-text runs keep their old fingerprint
        fp_base["format"] = fmt
    spm_path = out / "spm.model"  # the corpus folder holds its model (a manifest names files inside it only)
    if args.spm_model:
        given = Path(args.spm_model).resolve()
        spm_bytes = given.read_bytes()
        fp_base["spm"] = hashlib.sha256(spm_bytes).hexdigest()
    else:
        fp_base["spm_train"] = [args.vocab_size, args.spm_type, args.spm_max_sentences]
        spm_bytes = None
        if spm_path.is_file() and not spm_path.is_symlink() and not args.overwrite:
            # the model of an interrupted run, or of this finished job, with these args: no retraining
            prog = out / pipeline.PROGRESS_NAME
            old = pipeline.read_progress(prog) if prog.exists() else None
            extra = old.get("extra") if old is not None else None
            try:
                man = json.loads((out / MANIFEST_NAME).read_text()) if (out / MANIFEST_NAME).exists() else {}
            except (OSError, ValueError):
                man = {}  # check_finished names it
            # the recorded hash too: a model damaged or replaced since is trained again, not trusted
            recorded = (extra.get("spm_hash") if isinstance(extra, dict) and
                        extra.get("spm_args") == json.loads(json.dumps(fp_base)) else None) or \
                ((man.get("spm_model") or {}).get("sha256") if isinstance(man, dict) and
                 man.get("spm_args") == pipeline.fingerprint(fp_base) else None)
            if recorded and sha256_file(spm_path) == recorded:
                spm_bytes = spm_path.read_bytes()
        if spm_bytes is None:
            spm_bytes = train_spm(items, args.doc_per, args.vocab_size, args.spm_type, args.spm_max_sentences,
                                  args.workers, fmt)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    spm_hash = hashlib.sha256(spm_bytes).hexdigest()
    vocab = sp.get_piece_size()
    wide = vocab > 65535
    labelled = fmt != "text" and args.mode == "doc"
    if fmt != "text" and not labelled:
        print(f"note: --mode pack mixes documents in a block, so the --format {fmt} labels are not stored "
              "(use --mode doc to keep them)", file=sys.stderr)
    index, classes = label_index(items, args.doc_per, fmt, args.workers) if labelled else (None, [])
    fp = dict(fp_base, spm_hash=spm_hash)
    if args.mode == "pack":  # 2: the linear packer, whose `source` names the document a block starts with
        fp["packer"] = 2  # where the old one named the document before it: no resume across the two
    if labelled:
        fp["classes"] = classes
    # Only now may the folder change: not at all when it holds another job's finished corpus.
    pipeline.check_finished(out, pipeline.run_fingerprint(fp, len(items), schema(wide, labelled)), args.overwrite)
    if not (spm_path.is_file() and not spm_path.is_symlink() and sha256_file(spm_path) == spm_hash):
        write_atomic(spm_path, spm_bytes)  # done: this job's corpus, whose model was damaged since
    proc = functools.partial(process, doc_per=args.doc_per, spm_path=str(spm_path), add_eos=args.add_eos,
                             wide=wide, fmt=fmt, label_index=index)
    packer = BlockPacker(args.block_size, wide) if args.mode == "pack" else None
    extra = {"vocab_size": vocab, "pad_id": sp.pad_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
             "unk_id": sp.unk_id(), "spm_model": {"path": spm_path.name, "sha256": spm_hash},
             "spm_args": pipeline.fingerprint(fp_base),
             "mode": args.mode, "block_size": args.block_size, "doc_per": args.doc_per,
             "source": [d for _, d in files]}
    if labelled:
        extra.update(input_format=fmt, classes=classes, num_classes=len(classes))
    return pipeline.run(out, modality="text", items=items, process=proc, schema=schema(wide, labelled),
                        shard_size_mb=args.shard_size_mb, workers=args.workers, args_fingerprint=fp,
                        manifest_extra=extra,
                        packer=packer, desc="text", overwrite=args.overwrite,
                        progress_extra={"spm_args": fp_base, "spm_hash": spm_hash}, ignored=ignored)
