"""Labelled rows of a d2v2-prep corpus for fine-tuning: the inputs (PIL images or waveforms), their
labels, source paths and class names, and the held-out split (by source path or stratified)."""

from __future__ import annotations

import re

import numpy as np


class FinetuneError(ValueError):
    """Bad input to d2v2-finetune: the message names the thing and the fix."""


def split(labels: np.ndarray, paths: list[str], eval_paths: str | None, fraction: float, seed: int = 0,
          train_rows: int | None = None):
    """-> (train row indices, held-out row indices); the split does not move with the training seed.
    train_rows: keep only that many of the training rows, stratified by label (the low-resource
    setting: the encoder was pretrained on all of them, unlabelled, and fine-tunes on a labelled
    few); the held-out rows stay the same, and so does the subset across training seeds."""
    from sklearn.model_selection import train_test_split

    if eval_paths:
        rx = re.compile(eval_paths)
        te = np.array([bool(rx.search(p)) for p in paths])
        if not te.any() or te.all():
            raise FinetuneError(f"--eval-paths {eval_paths!r} matches {int(te.sum())} of {len(paths)} rows: "
                                "it must pick some rows, not all")
        tr, te = np.flatnonzero(~te), np.flatnonzero(te)
    else:
        idx = np.arange(len(labels))
        tr, te = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    if train_rows is not None and train_rows != len(tr):
        n_cls = len(np.unique(labels[tr]))
        if not n_cls <= train_rows < len(tr):
            raise FinetuneError(f"--train-rows {train_rows}: the training split has {len(tr)} rows of {n_cls} "
                                f"labels; ask for {n_cls} to {len(tr)} (one per label at least)")
        tr, _ = train_test_split(tr, train_size=train_rows, random_state=seed, stratify=labels[tr])
    return np.sort(tr), np.sort(te)


def load_rows(manifest, modality: str):
    """-> (inputs: PIL images | float32 waveforms, labels int64 [N], source paths, class names) of the
    labelled rows (label >= 0)."""
    from ..data.augment import decode_image
    from ..data.shards import ShardSet

    shards = ShardSet(manifest)
    if shards.modality != modality:
        raise FinetuneError(f"{manifest} holds {shards.modality} data; this recipe needs {modality} rows")
    if "label" not in shards.manifest["schema"]:
        raise FinetuneError(f"{manifest}: no label column (d2v2-prep ... --label-from parent)")
    labels = shards.column("label").astype(np.int64)
    idx = np.flatnonzero(labels >= 0)
    has_path = "path" in shards.manifest["schema"]
    xs, paths = [], []
    extra = ["path"] if has_path else []
    for i in idx:
        if modality == "image":
            row = shards.get(int(i), shards.image_columns() + extra)
            xs.append(decode_image(row, 3))
        else:
            row = shards.get(int(i), ["audio"] + extra)
            xs.append(np.asarray(row["audio"], dtype=np.float32) * shards.audio_scale)
        paths.append(str(row.get("path", i)))
    return xs, labels[idx], paths, list(shards.manifest.get("classes") or [])


