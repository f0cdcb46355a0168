"""The shard manifest: what `d2v2-prep` writes and the loader reads (format in docs/DATA.md).

A prepared corpus is a directory with Arrow IPC files `shard-00000.arrow`, ... and one
`manifest.json` (written last, atomically) holding: modality, Arrow schema, per-shard row
count, size in bytes, sha256 of the whole file and sha256 of its footer, plus per-modality
facts (audio sample rate; text vocab size, pad id and the sentencepiece model's path and hash).
From version 2 every shard also holds a per-row checksum column (ROW_CRC) that the loader
checks on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

FORMAT = "d2v2-shards"
# 2: every shard has a `row_crc32` column (zlib.crc32 of the row, see shards.row_crc32); 1 had none
VERSION = 2
ROW_CRC = "row_crc32"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
ARROW_MAGIC = b"ARROW1"


class DataError(RuntimeError):
    """A problem with prepared data; the message names the file and how to fix it."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def footer_sha256(path: str | os.PathLike) -> str:
    """sha256 of an Arrow IPC file's footer (flatbuffer + int32 length + magic).

    The footer lists every record batch's offset and length, so a truncated, re-written or
    swapped shard changes it; reading it costs one small read at the end of the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 16:
            raise DataError(f"{path} is {size} bytes: too small to be an Arrow IPC file")
        f.seek(size - 10)
        tail = f.read(10)
        if tail[4:] != ARROW_MAGIC:
            raise DataError(f"{path} does not end with the Arrow IPC magic: the file is truncated or not a shard")
        (flen,) = struct.unpack("<i", tail[:4])
        if not 0 < flen <= size - 10:
            raise DataError(f"{path} has an invalid Arrow footer length {flen}")
        f.seek(size - 10 - flen)
        return hashlib.sha256(f.read(flen + 10)).hexdigest()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temp name, fsync, then os.replace: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """Read a manifest; `path` is the manifest file or its directory. Returns (manifest, dir)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise DataError(f"no manifest at {p}: prepare the data first with `d2v2-prep image|audio|text ... "
                        f"--out {p.parent}` (an interrupted run leaves no manifest; re-run the same command to "
                        "finish it), then set data.manifest to the manifest.json path")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"manifest {p} is not valid JSON ({e}); re-run d2v2-prep to rewrite it") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{p} is not a d2v2-prep manifest (format={m.get('format')!r}, expected {FORMAT!r})")
    if m.get("version", 0) > VERSION:
        raise DataError(f"manifest {p} has version {m.get('version')}; this reader understands <= {VERSION}: "
                        "update d2v2-scale")
    shards = m.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise DataError(f"manifest {p} has no list of shard entries ('shards'): re-run d2v2-prep to rewrite it")
    for k, s in enumerate(shards):
        confined_path(p, s.get("file"), f"shards[{k}].file")
        for key in ("rows", "bytes"):
            if type(s.get(key)) is not int or s[key] < 0:
                raise DataError(f"{p}: shards[{k}].{key} = {s.get(key)!r} is not a count: the manifest is damaged; "
                                "re-run d2v2-prep to rewrite it")
    return m, p.parent


def confined_path(manifest_path: str | os.PathLike, name, entry: str, fix: str | None = None) -> Path:
    """The file a manifest entry names, refused (DataError, one line naming the manifest and the
    entry) unless it stays inside the manifest's folder: a relative path without `..`, that does
    not resolve (symlinks followed) outside the folder.  A manifest may come from elsewhere (a
    downloaded corpus, someone else's run): it must not make a reader open /etc/passwd or
    another user's files (docs/DATA.md, "Trust boundary")."""
    root = Path(manifest_path).parent
    fix = "a manifest names only files inside its own folder: " + (fix or "re-run d2v2-prep to rewrite it")
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{manifest_path}: {entry} = {name!r} is not a file name: {fix}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise DataError(f"{manifest_path}: {entry} = {name!r} points outside the manifest's folder "
                        f"({'an absolute path' if Path(name).is_absolute() else 'a .. path'}): {fix}")
    path = root / name
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DataError(f"{manifest_path}: {entry} = {name!r} is a symlink to {real}, outside the manifest's "
                        f"folder {real_root}: {fix}, or copy the file into the folder")
    return path
