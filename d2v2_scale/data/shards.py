"""Read-only, zero-copy access to prepared shards through one global sample index.

Each shard (an Arrow IPC file holding one record batch) is opened with `pyarrow.memory_map`,
so rows are views into the page cache: binary and list columns become (offsets, values)
numpy views and a row is two slices, no copy and no Python objects per element.  Sample i
of the corpus lives in shard `searchsorted(row_offsets, i)`.

Row checksums (manifest version >= 2): each shard has a `row_crc32` column, the zlib.crc32 of
the row's other columns' bytes in schema order (`row_crc32`).  The shard-level checks on open
read only the footer, so a flipped byte inside a row is found here, when the row is read.
"""

from __future__ import annotations

import bisect
import os
import sys
import zlib

import numpy as np
import pyarrow as pa

from .manifest import ROW_CRC, DataError, footer_sha256, load_manifest, sha256_file

_NOTED_NO_CRC: set[str] = set()  # manifests already reported as lacking row checksums (once per process)


class _Column:
    """One column of one shard as numpy views: `get(row)` returns a scalar or an array view."""

    def __init__(self, arr: pa.Array):
        t = arr.type
        self.kind = "scalar"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or \
                pa.types.is_large_string(t):
            bufs = arr.buffers()  # strings share the binary layout: int offsets + a byte buffer
            odt = np.int64 if pa.types.is_large_binary(t) or pa.types.is_large_string(t) else np.int32
            self.offsets = np.frombuffer(bufs[1], dtype=odt)[arr.offset:arr.offset + len(arr) + 1]
            self.values = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
            self.kind = "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else "binary"
            if self.kind == "string":
                self.arr = arr
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            self.offsets = arr.offsets.to_numpy()
            self.values = arr.values.to_numpy(zero_copy_only=True)
            self.kind = "list"
        else:
            self.values = arr.to_numpy(zero_copy_only=False)

    def get(self, i: int):
        if self.kind in ("binary", "list"):
            return self.values[self.offsets[i]:self.offsets[i + 1]]
        if self.kind == "string":
            return self.arr[i].as_py()
        return self.values[i]

    def raw(self, i: int) -> np.ndarray:
        """Row i's bytes as a contiguous numpy view (what the row checksum covers)."""
        if self.kind == "scalar":
            return self.values[i:i + 1]
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def table_columns(table: pa.Table) -> dict[str, _Column]:
    """{name: column views} of a table, in schema order."""
    table = table.combine_chunks()  # no-op for d2v2-prep shards (one batch per file)
    return {name: _Column(table.column(name).chunk(0) if table.column(name).num_chunks else
                          pa.array([], type=table.schema.field(name).type))
            for name in table.column_names}


def row_crc32(cols: dict[str, _Column], r: int) -> int:
    """zlib.crc32 of row r over every column but ROW_CRC, in column (schema) order.

    Covers labels and sizes as well as the payload: a flipped label trains as silently as a
    flipped pixel.  One pass over the row's bytes, no copies."""
    crc = 0
    for name, col in cols.items():
        if name != ROW_CRC:
            crc = zlib.crc32(col.raw(r), crc)
    return crc


class ShardSet:
    """All shards of a manifest as one indexable corpus.

    `verify`: "fast" checks every shard's size and footer hash on open, "full" also its
    sha256, "none" skips checks.  Shards are opened lazily (once per process: after a fork or
    pickling into a DataLoader worker, each worker maps the files itself).
    """

    def __init__(self, manifest_path: str | os.PathLike, verify: str = "fast"):
        self.manifest, self.root = load_manifest(manifest_path)
        self.manifest_path = self.root / "manifest.json"
        self.modality: str = self.manifest["modality"]
        self.shard_rows = np.array([s["rows"] for s in self.manifest["shards"]], dtype=np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])
        self._starts: list[int] = self.row_offsets.tolist()
        self._cols: list[dict[str, _Column] | None] = [None] * len(self.shard_rows)
        self.has_row_crc = ROW_CRC in self.manifest["schema"]
        self.check_rows = verify != "none" and self.has_row_crc  # row checksums checked on every read
        if verify != "none":
            self.verify(full=(verify == "full"))
        if not self.has_row_crc and str(self.manifest_path) not in _NOTED_NO_CRC:
            _NOTED_NO_CRC.add(str(self.manifest_path))
            print(f"note: {self.manifest_path} has no per-row checksums (manifest version "
                  f"{self.manifest.get('version', 1)}, an older d2v2-prep): a corrupt row cannot be found or "
                  f"skipped; re-run the d2v2-prep {self.modality} command that made {self.root} (with "
                  f"--overwrite) to add them", file=sys.stderr)

    # ---- verification -------------------------------------------------------------------
    def _fix(self) -> str:
        return (f"re-run the d2v2-prep {self.modality} command that made {self.root} (with --overwrite) to "
                "rebuild it, or restore the shard from a copy")

    def shard_problem(self, k: int, full: bool = False) -> str | None:
        """What is wrong with shard k as a whole (missing, size, footer, sha256 if `full`), or None."""
        s = self.manifest["shards"][k]
        p = self.root / s["file"]
        if not p.is_file():
            return f"shard {p} listed in {self.manifest_path} is missing"
        size = p.stat().st_size
        if size != s["bytes"]:
            return f"shard {p} is corrupt: {size} bytes, manifest says {s['bytes']}"
        try:
            fh = footer_sha256(p)
        except DataError as e:
            return f"shard {p} is corrupt ({e})"
        if fh != s["footer_sha256"]:
            return f"shard {p} is corrupt: its footer hash does not match the manifest"
        if full and sha256_file(p) != s["sha256"]:
            return f"shard {p} is corrupt: its sha256 does not match the manifest"
        return None

    def verify(self, full: bool = False) -> None:
        """Raise DataError naming the first missing or corrupt shard."""
        for k in range(len(self.shard_rows)):
            problem = self.shard_problem(k, full)
            if problem:
                raise DataError(f"{problem}: {self._fix()}")

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.row_offsets[-1])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cols"] = [None] * len(self.shard_rows)  # memory maps do not pickle; reopen lazily
        return d

    def _open(self, k: int) -> dict[str, _Column]:
        cols = self._cols[k]
        if cols is None:
            p = self.root / self.manifest["shards"][k]["file"]
            try:
                table = pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all()
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"cannot read shard {p}: {e}: {self._fix()}") from None
            cols = table_columns(table)
            self._cols[k] = cols
        return cols

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row in shard) of sample i.  bisect on a list: ~10x cheaper than
        np.searchsorted for one scalar, and it runs for every row read (twice with row checks)."""
        i, starts = int(i), self._starts
        if not 0 <= i < starts[-1]:
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.manifest_path}")
        k = bisect.bisect_right(starts, i) - 1
        return k, i - starts[k]

    def get(self, i: int, columns: list[str] | None = None) -> dict:
        """Row i as {column: value}; binary/list values are read-only numpy views."""
        k, r = self.locate(i)
        cols = self._open(k)
        names = columns if columns is not None else list(cols)
        return {n: cols[n].get(r) for n in names}

    # ---- row checksums ------------------------------------------------------------------
    def row_ok(self, i: int) -> bool:
        """Whether sample i's bytes match its stored checksum (True when there is none)."""
        if not self.has_row_crc:
            return True
        k, r = self.locate(i)
        cols = self._open(k)
        return row_crc32(cols, r) == int(cols[ROW_CRC].values[r])

    def describe(self, i: int) -> dict:
        """{shard, row, source, index} naming sample i for a human (source: the input it came from)."""
        k, r = self.locate(i)
        cols = self._open(k)
        name = next((n for n in ("path", "source") if n in cols), None)
        # raw bytes, decoded leniently: the row (and so its source string) may be the corrupt part
        src = bytes(cols[name].raw(r)).decode("utf-8", "replace") if name else "?"
        return {"shard": self.manifest["shards"][k]["file"], "row": r, "source": src, "index": int(i)}

    def substitute(self, i: int) -> int:
        """The sample read in place of a bad sample i: the next good one after it (wrapping
        around the corpus), a rule that depends only on the index and the data, so batches
        stay dense and resume stays exact."""
        n = len(self)
        for d in range(1, n):
            j = (i + d) % n
            if self.row_ok(j):
                return j
        raise DataError(f"no row of {self.manifest_path} matches its checksum: {self._fix()}")

    def scan(self) -> list[dict]:
        """Every problem of the corpus, reading all of it (`d2v2-prep verify`): per shard its
        whole-file checks (row None) and, when it can be read, every row's checksum; as dicts
        {shard, row, source, reason} (describe() plus reason, index for rows)."""
        out = []
        for k, s in enumerate(self.manifest["shards"]):
            problem = self.shard_problem(k, full=True)
            if problem:
                out.append({"shard": s["file"], "row": None, "source": None, "reason": problem})
            try:
                self._open(k)
            except DataError as e:
                if not problem:
                    out.append({"shard": s["file"], "row": None, "source": None, "reason": str(e)})
                continue
            start = int(self.row_offsets[k])
            out += [dict(self.describe(i), reason="row checksum mismatch")
                    for i in range(start, start + int(self.shard_rows[k])) if not self.row_ok(i)]
        return out

    def column(self, name: str) -> np.ndarray:
        """A numeric column over the whole corpus (e.g. lengths for bucketing), as one array."""
        return np.concatenate([self._open(k)[name].values for k in range(len(self.shard_rows))]) \
            if len(self.shard_rows) else np.zeros(0)

    def image_columns(self) -> list[str]:
        """The columns one image row is decoded from (data/augment.decode_image): the encoded file,
        plus the raw pixels d2v2-prep stores for modes PIL cannot re-encode losslessly."""
        return ["image"] + (["pixels", "pix_height", "pix_width", "pix_channels"]
                            if "pixels" in self.manifest["schema"] else [])

    @property
    def audio_scale(self) -> float:
        """Multiplier from the stored samples to float waveforms in [-1, 1): int16 shards / 32768."""
        return 1.0 / 32768.0 if self.manifest.get("dtype", "int16") == "int16" else 1.0

    def lengths(self) -> np.ndarray | None:
        """Per-sample length used for bucketing (audio samples, text tokens), or None."""
        if self.modality == "audio":
            return self.column("n_samples").astype(np.int64)
        if self.modality == "text":
            return self.column("n_tokens").astype(np.int64)
        return None


def check_compatible(manifest: dict, manifest_path, cfg) -> None:
    """Raise DataError when prepared data cannot feed the configured model."""
    mod = manifest["modality"]
    m = cfg.model
    if mod != m.modality:
        raise DataError(f"{manifest_path} holds {mod} data but the config's model.modality is {m.modality!r} "
                        f"(preset {cfg.preset!r}): point data.manifest at {m.modality} shards (d2v2-prep "
                        f"{m.modality} ...) or use {'an' if mod[0] in 'aeiou' else 'a'} {mod} preset")
    if mod == "text":
        v = int(manifest["vocab_size"])
        if v > m.vocab_size:
            raise DataError(f"{manifest_path} has a vocabulary of {v} tokens but model.vocab_size is {m.vocab_size}: "
                            f"set model.vocab_size={v} (or larger), or prepare with a smaller --vocab-size")
        pad = manifest.get("pad_id", -1)
        if pad is not None and pad >= 0 and pad != m.pad_token_id:
            raise DataError(f"{manifest_path}: the sentencepiece pad id is {pad} but model.pad_token_id is "
                            f"{m.pad_token_id}: set model.pad_token_id={pad}")
    if mod == "audio":
        sr = int(manifest["sample_rate"])
        if sr != cfg.data.sample_rate:
            raise DataError(f"{manifest_path} holds {sr} Hz audio but data.sample_rate is {cfg.data.sample_rate}: "
                            f"re-run d2v2-prep audio --sample-rate {cfg.data.sample_rate}, or set "
                            f"data.sample_rate={sr}")
