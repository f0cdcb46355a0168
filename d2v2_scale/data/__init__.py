"""Data side of d2v2-scale: shards written by `d2v2-prep`, sampling, masking, augmentation, loading.

Modules (one concept each): manifest (format + hashes), shards (zero-copy reader),
sampler (data-parallel slices, shuffling, length bucketing), rng (counter-based randomness),
masking (docs/REFERENCE.md §1.7 masks), augment (per-sample augmentations), augment_speech (data2vec-aqc's
augmented second view of an utterance: noise, sox reverb, background noise), loader (batches).
`build_loader` is imported lazily so that `data_prep` can use the light modules without torch.
"""

from .manifest import DataError

__all__ = ["DataError", "build_loader", "Loader", "ShardSet"]


def __getattr__(name):
    if name in ("build_loader", "Loader"):
        from . import loader

        return getattr(loader, name)
    if name == "ShardSet":
        from .shards import ShardSet

        return ShardSet
    raise AttributeError(name)
