"""Deterministic, resumable shard writing shared by the image, audio and text preparers.

The run is a pure function of its inputs and arguments:
  * inputs are a sorted list of "items" (files, or chunks of text files);
  * workers (multiprocessing, `imap` keeps input order) turn each item into rows or skips;
  * a shard is cut after the first item that brings the buffered rows to --shard-size-mb,
    so shard boundaries depend only on the inputs;
  * each shard goes to a temp name, is fsynced and then `os.replace`d to its final name, and
    only then is `.progress.json` (next item, finished shards, skips so far, packer carry)
    replaced, so a killed run restarts from the last finished shard and writes byte-identical
    shards to an uninterrupted run;
  * `report.json` and `manifest.json` are written last, atomically;
  * one d2v2-prep at a time per output folder: `.d2v2-prep.lock` is flock'ed for the whole
    run (lock_out), and a folder holding a finished corpus of another job is refused before
    anything in it changes (check_finished); --overwrite first removes the old manifest, so
    the folder is never a readable mix of two runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from d2v2_scale.data.manifest import (FORMAT, MANIFEST_NAME, REPORT_NAME, ROW_CRC, VERSION, DataError,
                                      footer_sha256, sha256_file, write_json_atomic)
from d2v2_scale.data.shards import row_crc32, table_columns

PROGRESS_NAME = ".progress.json"
LOCK_NAME = ".d2v2-prep.lock"
# Test hook: exit abruptly (no cleanup, like a kill) after this many shards were written.
EXIT_AFTER_ENV = "D2V2_PREP_EXIT_AFTER_SHARDS"


@dataclass
class Skip:
    """An input that was left out, and why (goes to report.json)."""

    source: str
    reason: str

    def __post_init__(self):
        # some library messages embed an object's address ("<_io.BytesIO object at 0x7f..>"):
        # drop it so that report.json is byte-identical between identical runs
        self.reason = re.sub(r" at 0x[0-9a-fA-F]+", "", self.reason)


@dataclass
class ItemResult:
    rows: list[dict] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not errors (e.g. "dropped 0.3 s tail")


class Packer:
    """Optional stateful stage between workers and the writer (text block packing).

    Its state must be JSON-serializable: it is saved in the progress file at shard boundaries.
    """

    def add(self, rows: list[dict]) -> list[dict]:
        return rows

    def finish(self) -> list[dict]:
        return []

    def state(self) -> Any:
        return None

    def load(self, state: Any) -> None:
        pass


def label_ids(raw: list[str | None]) -> tuple[list[int], list[str]]:
    """Label strings (one per item; None or "" = unlabelled) -> (ids int64-able, class names).

    If every given label is an integer, the integers are the class ids (negative = unlabelled)
    and the names are "0".."max"; otherwise every label is a name and the sorted distinct
    names are numbered 0..C-1 (so "2" and "cat" in one corpus are two names, never a clash
    between the name numbering and a literal id).  Deterministic: depends only on the labels."""
    given = [r.strip() for r in raw if r is not None and r.strip()]
    if all(g.lstrip("-").isdigit() for g in given):
        ids = [-1 if r is None or not r.strip() else max(-1, int(r)) for r in raw]
        return ids, [str(i) for i in range(max(ids, default=-1) + 1)]
    names = sorted(set(given))
    index = {n: i for i, n in enumerate(names)}
    return [-1 if r is None or not r.strip() else index[r.strip()] for r in raw], names


LABEL_FIELD = ("label", pa.int64())


OURS = re.compile(r"shard-\d+\.arrow|manifest\.json|report\.json|spm\.model|\.progress\.json|\..*\.tmp|"
                  r"\.d2v2-prep\.lock")


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an --out that is a file, or a folder holding files d2v2-prep did not write
    (unless --overwrite): a typo must not mix shards into an unrelated folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder: give a new or empty folder")
    started = (out / MANIFEST_NAME).exists() or (out / PROGRESS_NAME).exists()  # a d2v2-prep run was let in
    if out.is_dir() and not overwrite and not started:
        foreign = sorted(p.name for p in out.iterdir() if not OURS.fullmatch(p.name))
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise SystemExit(f"error: --out {out} holds files d2v2-prep did not write ({', '.join(foreign[:3])}"
                             f"{more}): give a new or empty folder, or pass --overwrite to write there anyway")


_LOCKS: dict[str, int] = {}  # output folder (resolved) -> fd holding its flock, in this process


def lock_out(out: str | os.PathLike) -> None:
    """Create `out` and hold an exclusive lock on it until release_out (or this process ends),
    or exit with one line naming the d2v2-prep that holds it: two runs into one folder would
    interleave their shards and both report success.  flock: released by the kernel when the
    holder dies, so a killed run never leaves a stale lock.  Idempotent within a process."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    try:  # O_NOFOLLOW: a lock file planted as a symlink must not make us truncate its target
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise SystemExit(f"error: cannot create the lock file {out / LOCK_NAME} ({e.strerror}; a symlink there is "
                         "refused): remove it, or give another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
        holder = "".join(c if c.isprintable() else "?" for c in holder)  # the file is not ours to trust
        os.close(fd)
        raise SystemExit(f"error: --out {out} is being written by another d2v2-prep ({holder}): wait for it to "
                         "finish, or give another --out") from None
    # the lock file is never removed: a new file would let a third run lock it beside the holder
    info = (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: "
            f"d2v2-prep {' '.join(sys.argv[1:])}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)
    _LOCKS[key] = fd
    for tmp in out.glob(".*.tmp"):  # temp files of a killed run (ours: nobody else writes here now)
        if OURS.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)


def release_out(out: str | os.PathLike | None = None) -> None:
    """Release the lock of `out` (None: every lock this process holds)."""
    keys = list(_LOCKS) if out is None else [os.path.realpath(out)]
    for k in keys:
        fd = _LOCKS.pop(k, None)
        if fd is not None:
            os.close(fd)


def run_fingerprint(args_fingerprint: dict, n_items: int, schema: pa.Schema) -> str:
    """The job's identity as stored in its manifest and progress file.  `schema` without ROW_CRC."""
    schema = schema.append(pa.field(ROW_CRC, pa.uint32()))  # no resume across versions
    return fingerprint({"args": args_fingerprint, "n_items": n_items, "schema": schema.to_string()})


def check_finished(out: Path, fp: str, overwrite: bool) -> dict | None:
    """With the lock held, before anything in `out` changes.  The manifest of a finished corpus
    made by this same job (fingerprint `fp`: nothing to do); None when there is none; exit with
    one line for another job's corpus (or an unreadable manifest) unless `overwrite`, which
    removes the old manifest and report first: from then on the folder is no finished corpus,
    so a reader never sees the old manifest over new shards, even if the rebuild is killed."""
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    if overwrite:
        manifest_path.unlink()
        (out / REPORT_NAME).unlink(missing_ok=True)
        return None
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {manifest_path} cannot be read ({type(e).__name__}: {e}): pass --overwrite to "
                         "rebuild the corpus there, or give another --out") from None
    if isinstance(m, dict) and m.get("fingerprint") == fp:
        return m
    raise SystemExit(f"error: {out} already holds a finished corpus made with other inputs, arguments or d2v2-prep "
                     "version; choose another --out or pass --overwrite to replace it")


def read_progress(path: Path) -> dict | None:
    """A progress file's JSON object, or None (with a warning) when it cannot be read."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"warning: {path} cannot be read ({type(e).__name__}); starting over", file=sys.stderr)
        return None
    return state if isinstance(state, dict) else None


def progress_problem(out: Path, state: dict, n_items: int) -> str | None:
    """What makes a progress file unusable for resuming, or None.  It is read from disk, so its
    shard list is checked against the folder (names, sizes, footers: cheap) before any of it
    goes into a manifest."""
    shards = state.get("shards")
    nxt = state.get("next_item")
    if not (isinstance(shards, list) and type(nxt) is int and 0 <= nxt <= n_items
            and isinstance(state.get("skips"), list) and isinstance(state.get("notes"), list)
            and all(isinstance(k, dict) and isinstance(k.get("source"), str) and isinstance(k.get("reason"), str)
                    for k in state["skips"]) and all(isinstance(n, str) for n in state["notes"])):
        return "it is damaged"
    for k, sh in enumerate(shards):
        name = f"shard-{k:05d}.arrow"
        if not isinstance(sh, dict) or sh.get("file") != name or type(sh.get("rows")) is not int:
            return f"its entry for {name} is damaged"
        p = out / name
        try:
            if p.is_symlink() or p.stat().st_size != sh.get("bytes") or footer_sha256(p) != sh.get("footer_sha256"):
                return f"{name} differs from what it recorded"
        except (OSError, DataError):
            return f"{name} is missing or damaged"
    return None


def walk(root: str | os.PathLike) -> Iterable[tuple[str, list[str]]]:
    """(folder, file names) under `root`, like os.walk, but into symlinked folders too (a corpus
    often links its parts in; os.walk skips them without a word).  A link back up its own path
    (a loop) is not entered; two links to one folder are both walked, and real_files_once reports
    the second one's files as aliases."""
    keys: dict[str, tuple[int, int]] = {}
    top = os.path.normpath(root)
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        st = os.stat(dirpath)
        keys[dirpath] = key = (st.st_dev, st.st_ino)
        up = dirpath
        while up != top:  # this folder's ancestors on the walked path (all walked, so all in keys)
            up = os.path.dirname(up)
            if keys.get(up) == key:
                dirs[:] = []  # a loop: every level below repeats this one
                break
        else:
            yield dirpath, files


def real_files_once(items: list[tuple]) -> tuple[list[tuple], list[Skip]]:
    """Keep the first (in `items` order) of inputs that are the same file on disk (symlinks such
    as fortune's `*.u8 -> *`, hard links); the others become 'alias of ...' entries for the
    report.  items: (path, display path, ...) tuples; inputs that cannot be stat'ed are kept
    (the worker reports them unreadable)."""
    seen: dict[tuple[int, int], str] = {}
    kept, aliases = [], []
    for it in items:
        try:
            st = os.stat(it[0])
        except OSError:
            kept.append(it)
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            aliases.append(Skip(it[1], f"alias of {seen[key]} (same file, read once)"))
        else:
            seen[key] = it[1]
            kept.append(it)
    return kept, aliases


def unsupported_files(root: str | os.PathLike, exts: set[str]) -> list[Skip]:
    """Files under `root` whose extension is not in `exts` (what a folder walk leaves out), as
    report entries with paths relative to `root`, sorted."""
    root = Path(root)
    out = []
    for dirpath, files in walk(root):
        for f in files:
            ext = Path(f).suffix.lower()
            if ext not in exts:
                out.append(Skip(str((Path(dirpath) / f).relative_to(root)),
                                f"unsupported extension '{ext}'" if ext else "unsupported extension (none)"))
    return sorted(out, key=lambda s: s.source)


def row_nbytes(row: dict) -> int:
    n = 0
    for v in row.values():
        if isinstance(v, (bytes, bytearray, str)):
            n += len(v)
        elif isinstance(v, np.ndarray):
            n += v.nbytes
        else:
            n += 8
    return n


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build one table (one record batch) from row dicts; list columns take numpy arrays."""
    cols = []
    for f in schema:
        vals = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            vt = f.type.value_type
            arrs = [np.asarray(v, dtype=vt.to_pandas_dtype()) for v in vals]
            offsets = np.zeros(len(arrs) + 1, dtype=np.int32)
            np.cumsum([len(a) for a in arrs], out=offsets[1:])
            values = np.concatenate(arrs) if arrs else np.zeros(0, dtype=vt.to_pandas_dtype())
            cols.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=vt)))
        else:
            cols.append(pa.array(vals, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def with_row_crc(table: pa.Table) -> pa.Table:
    """`table` plus the ROW_CRC column, computed from the Arrow buffers themselves with the
    function the loader checks it with (so both see exactly the same bytes)."""
    cols = table_columns(table)
    crc = np.fromiter((row_crc32(cols, r) for r in range(table.num_rows)), dtype=np.uint32, count=table.num_rows)
    return table.append_column(pa.field(ROW_CRC, pa.uint32()), pa.array(crc, type=pa.uint32()))


def _write_shard(path: Path, rows: list[dict], schema: pa.Schema) -> dict:
    """`schema` includes the trailing ROW_CRC field; the rows do not."""
    table = with_row_crc(rows_to_table(rows, pa.schema(list(schema)[:-1])))
    tmp = path.with_name("." + path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as w:
            w.write_table(table, max_chunksize=max(len(rows), 1))  # one batch: contiguous columns
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "rows": len(rows), "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "footer_sha256": footer_sha256(path)}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run(out_dir: str | os.PathLike, *, modality: str, items: list, process: Callable[[Any], ItemResult],
        schema: pa.Schema, shard_size_mb: float, workers: int, args_fingerprint: dict,
        manifest_extra: dict, pre_skips: Iterable[Skip] = (), packer: Packer | None = None,
        desc: str = "prep", overwrite: bool = False, progress_extra: dict | None = None,
        ignored: Iterable[Skip] = ()) -> dict:
    """Run the pipeline into out_dir and return the manifest dict.

    ignored: files found but not inputs (aliases, unsupported extensions, hidden files), listed
    in report.json under "ignored"."""
    out = Path(out_dir)
    lock_out(out)  # held until the process ends (or data_prep.cli releases it)
    fp = run_fingerprint(args_fingerprint, len(items), schema)
    schema = schema.append(pa.field(ROW_CRC, pa.uint32()))
    progress_path = out / PROGRESS_NAME
    manifest_path = out / MANIFEST_NAME
    done = check_finished(out, fp, overwrite)
    if done is not None:
        print(f"{manifest_path} is already complete for these inputs and arguments; nothing to do", file=sys.stderr)
        return done
    fresh = {"fingerprint": fp, "next_item": 0, "shards": [], "skips": [], "notes": [], "packer": None,
             "items_done": 0, "extra": progress_extra or {}}
    state = fresh
    old = read_progress(progress_path) if progress_path.exists() and not overwrite else None
    if old is not None:
        problem = "it is from different inputs/arguments" if old.get("fingerprint") != fp else \
            progress_problem(out, old, len(items))
        if problem is None and packer is not None:
            try:
                packer.load(old.get("packer"))
            except ValueError:
                problem = "its text packer state is damaged"
        if problem is None:
            state = old
            print(f"resuming {out}: {len(state['shards'])} shards done, continuing at item "
                  f"{state['next_item']}/{len(items)}", file=sys.stderr)
        else:
            print(f"warning: {progress_path} cannot be resumed ({problem}); starting over", file=sys.stderr)
    if state is fresh:
        progress_path.unlink(missing_ok=True)
        for p in out.glob("shard-*.arrow"):  # leftovers of an unrelated earlier run
            p.unlink()
        state["skips"] = [vars(s) for s in pre_skips]
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    written_here = 0

    shard_bytes = int(shard_size_mb * (1 << 20))
    buf: list[dict] = []
    buf_bytes = 0

    def flush(next_item: int) -> None:
        nonlocal buf, buf_bytes, written_here
        if buf:
            idx = len(state["shards"])
            info = _write_shard(out / f"shard-{idx:05d}.arrow", buf, schema)
            state["shards"].append(info)
            buf, buf_bytes = [], 0
        state["next_item"] = next_item
        state["packer"] = packer.state() if packer is not None else None
        write_json_atomic(progress_path, state)
        written_here += 1
        if exit_after and written_here >= exit_after:
            os._exit(75)  # simulate a kill: nothing after this point runs

    start = state["next_item"]
    todo = items[start:]
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(todo) > 1 else None
    try:
        results = pool.imap(process, todo, chunksize=max(1, min(16, len(todo) // (workers * 8) or 1))) \
            if pool is not None else map(process, todo)
        bar = tqdm(total=len(items), initial=start, desc=desc, unit="item", file=sys.stderr,
                   disable=os.environ.get("D2V2_PREP_NO_PROGRESS") == "1")
        for i, res in enumerate(results, start=start):
            bar.update(1)
            state["skips"].extend(vars(s) for s in res.skips)
            state["notes"].extend(res.notes)
            state["items_done"] = i + 1
            rows = packer.add(res.rows) if packer is not None else res.rows
            for r in rows:
                buf.append(r)
                buf_bytes += row_nbytes(r)
            if buf_bytes >= shard_bytes:
                flush(i + 1)
        bar.close()
    finally:
        if pool is not None:
            pool.terminate()
    if packer is not None:
        for r in packer.finish():
            buf.append(r)
    if buf:
        flush(len(items))

    skips = state["skips"]
    ignored = [vars(s) for s in ignored]
    report = {"modality": modality, "items": len(items), "rows": sum(s["rows"] for s in state["shards"]),
              "shards": len(state["shards"]), "skipped": len(skips),
              "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in skips)),
              "skips": skips, "notes": state["notes"], "ignored": len(ignored),
              "ignored_by_reason": dict(Counter(s["reason"].split(" (")[0].split(" of ")[0] for s in ignored)),
              "ignored_files": ignored}
    write_json_atomic(out / REPORT_NAME, report)
    if ignored:
        print(f"ignored {len(ignored)} files ({', '.join(f'{k}: {v}' for k, v in report['ignored_by_reason'].items())}"
              f"), see {out / REPORT_NAME}", file=sys.stderr)
    if report["rows"] == 0:
        progress_path.unlink(missing_ok=True)
        raise SystemExit(f"error: no rows written: all {len(items)} inputs were skipped ({len(skips)} skips, "
                         f"reasons in {out / REPORT_NAME}); no manifest was written")
    manifest = {"format": FORMAT, "version": VERSION, "modality": modality,
                "schema": {f.name: str(f.type) for f in schema},
                "num_rows": report["rows"], "shards": state["shards"],
                "skipped": len(skips), "report": REPORT_NAME, "fingerprint": fp,
                "row_checksum": f"{ROW_CRC}: zlib.crc32 of each row's other columns in schema order"}
    manifest.update(manifest_extra)
    write_json_atomic(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    print(f"wrote {manifest['num_rows']} rows in {len(state['shards'])} shards to {out} "
          f"({len(skips)} inputs skipped, see {out / REPORT_NAME})", file=sys.stderr)
    return manifest
