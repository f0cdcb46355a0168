"""Read-only, zero-copy access to prepared shards through one global sample index.

Each shard (an Arrow IPC file holding one record batch) is opened with `pyarrow.memory_map`,
so rows are views into the page cache: binary and list columns become (offsets, values)
numpy views and a row is two slices, no copy and no Python objects per element.  Sample i
of the corpus lives in shard `searchsorted(row_offsets, i)`.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from .manifest import DataError, footer_sha256, load_manifest, sha256_file


class _Column:
    """One column of one shard as numpy views: `get(row)` returns a scalar or an array view."""

    def __init__(self, arr: pa.Array):
        t = arr.type
        self.kind = "scalar"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            bufs = arr.buffers()
            odt = np.int64 if pa.types.is_large_binary(t) else np.int32
            self.offsets = np.frombuffer(bufs[1], dtype=odt)[arr.offset:arr.offset + len(arr) + 1]
            self.values = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
            self.kind = "binary"
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            self.offsets = arr.offsets.to_numpy()
            self.values = arr.values.to_numpy(zero_copy_only=True)
            self.kind = "list"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            self.arr = arr
            self.kind = "string"
        else:
            self.values = arr.to_numpy(zero_copy_only=False)

    def get(self, i: int):
        if self.kind in ("binary", "list"):
            return self.values[self.offsets[i]:self.offsets[i + 1]]
        if self.kind == "string":
            return self.arr[i].as_py()
        return self.values[i]


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
        self._cols: list[dict[str, _Column] | None] = [None] * len(self.shard_rows)
        if verify != "none":
            self.verify(full=(verify == "full"))

    # ---- verification -------------------------------------------------------------------
    def _fix(self) -> str:
        return (f"re-run the d2v2-prep {self.modality} command that made {self.root} (with --overwrite) to "
                "rebuild it, or restore the shard from a copy")

    def verify(self, full: bool = False) -> None:
        """Raise DataError naming the first missing or corrupt shard."""
        for s in self.manifest["shards"]:
            p = self.root / s["file"]
            if not p.is_file():
                raise DataError(f"shard {p} listed in {self.manifest_path} is missing: {self._fix()}")
            size = p.stat().st_size
            if size != s["bytes"]:
                raise DataError(f"shard {p} is corrupt: {size} bytes, manifest says {s['bytes']}: {self._fix()}")
            try:
                fh = footer_sha256(p)
            except DataError as e:
                raise DataError(f"shard {p} is corrupt ({e}): {self._fix()}") from None
            if fh != s["footer_sha256"]:
                raise DataError(f"shard {p} is corrupt: its footer hash does not match the manifest: {self._fix()}")
            if full and sha256_file(p) != s["sha256"]:
                raise DataError(f"shard {p} is corrupt: its sha256 does not match the manifest: {self._fix()}")

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
            table = table.combine_chunks()  # no-op for d2v2-prep shards (one batch per file)
            cols = {name: _Column(table.column(name).chunk(0) if table.column(name).num_chunks else
                                  pa.array([], type=table.schema.field(name).type))
                    for name in table.column_names}
            self._cols[k] = cols
        return cols

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.manifest_path}")
        k = int(np.searchsorted(self.row_offsets, i, side="right") - 1)
        return k, int(i - self.row_offsets[k])

    def get(self, i: int, columns: list[str] | None = None) -> dict:
        """Row i as {column: value}; binary/list values are read-only numpy views."""
        k, r = self.locate(i)
        cols = self._open(k)
        names = columns if columns is not None else list(cols)
        return {n: cols[n].get(r) for n in names}

    def column(self, name: str) -> np.ndarray:
        """A numeric column over the whole corpus (e.g. lengths for bucketing), as one array."""
        return np.concatenate([self._open(k)[name].values for k in range(len(self.shard_rows))]) \
            if len(self.shard_rows) else np.zeros(0)

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
                        f"{m.modality} ...) or use a {mod} preset")
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
