"""Pretraining on a mix of corpora: `data.manifests` with `data.manifest_weights` (docs/DATA.md).

Each source is prepared once with `d2v2-prep` (one manifest each); a run names several and the
share of samples each contributes, e.g. RoBERTa's books + Wikipedia.  The corpora must be of one
modality and preprocessed alike (text: one sentencepiece vocabulary; audio: one sample rate and
sample type; images: one storage format), checked before any process group exists.

The mixture's epoch has N = the corpora's usable samples together; corpus c contributes
n_c = w_c * N of them (largest remainder, so they sum to N).  Each corpus is read as an endless
stream of permutations (pass k of corpus c: a permutation keyed on (seed, c, k)) and epoch e takes
stream positions [e * n_c, (e + 1) * n_c): a down-weighted corpus goes through all of its samples
over the epochs before any repeats, an up-weighted one repeats whole passes.  The epoch's draws
are shuffled together on (seed, epoch) and then cut into data-parallel slices and length buckets
exactly as one corpus is (sampler.py), so everything stays a pure function of (seed, epoch) and a
resume needs only (epoch, batch position), as for one corpus.

Draw ids: the sample drawn in pass k of its corpus gets the id k * total + its global index
(global index: corpus offset + row), and the batch's random keys (rng.py) are made from that id,
so two draws of one sample in an epoch get different crops, windows and masks.  `MixedShardSet`
reads the row of id % total.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from .manifest import DataError, load_manifest
from .sampler import ShardedBatchSampler
from .shards import ShardSet, check_compatible

_STREAM_SALT = 0x313C  # keeps a corpus' pass permutations apart from the epoch shuffle (0x5A3D)


def corpus_names(paths) -> list[str]:
    """Short names for logs: each manifest's folder name (made unique with its position)."""
    names = [Path(p).parent.name if Path(p).name == "manifest.json" else Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def check_mixture(manifests: list[tuple[dict, Path]]) -> None:
    """Raise DataError naming the first pair of corpora that cannot be mixed.
    manifests: [(manifest dict, manifest.json path)], the first is the reference."""
    (m0, p0) = manifests[0]
    for m, p in manifests[1:]:
        def differ(what: str, a, b, fix: str) -> DataError:
            return DataError(f"data.manifests: {p} and {p0} cannot be mixed: {what} {b!r} vs {a!r}; {fix}")

        if m["modality"] != m0["modality"]:
            raise differ("modality", m0["modality"], m["modality"], "a mix holds one modality")
        mod = m0["modality"]
        if mod == "text":
            s0, s = (m0.get("spm_model") or {}).get("sha256"), (m.get("spm_model") or {}).get("sha256")
            if s0 != s:
                raise differ("the vocabulary (sentencepiece model sha256)", s0, s,
                             f"tokenize every corpus with one vocabulary: re-run d2v2-prep text for {p.parent} with "
                             f"--spm-model {p0.parent / 'spm.model'}")
            for key in ("vocab_size", "pad_id", "bos_id", "eos_id"):
                if m0.get(key) != m.get(key):
                    raise differ(key, m0.get(key), m.get(key), "tokenize every corpus with one vocabulary")
        if mod == "audio":
            for key in ("sample_rate", "dtype"):
                if m0.get(key, "int16") != m.get(key, "int16"):
                    raise differ(key, m0.get(key), m.get(key),
                                 f"re-run d2v2-prep audio for {p.parent} with the --sample-rate/--dtype of {p0.parent}")
        if mod == "image":
            f0 = ("pixels" in m0["schema"], m0.get("pixels_side"))
            f = ("pixels" in m["schema"], m.get("pixels_side"))
            if f0 != f:
                raise differ("the image format (pre-decoded pixels, side)", f0, f,
                             f"re-run d2v2-prep image for {p.parent} with the --pixels option of {p0.parent}")


def load_manifests(paths) -> list[tuple[dict, Path]]:
    out = []
    for p in paths:
        try:
            m, root = load_manifest(p)
        except DataError as e:  # the message speaks of data.manifest: say which list it is in
            raise DataError(f"data.manifests: {e}") from None
        out.append((m, root / "manifest.json"))
    return out


class MixedShardSet:
    """Several corpora' ShardSets as one indexable corpus of `total` rows (global index = corpus
    offset + row); every accessor also takes a draw id (>= total) and reads row id % total."""

    def __init__(self, paths, verify: str = "fast"):
        self.paths = [str(p) for p in paths]
        self.names = corpus_names(self.paths)
        self.sets = [ShardSet(p, verify=verify) for p in self.paths]
        check_mixture([(s.manifest, s.manifest_path) for s in self.sets])
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sets])]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self._starts: list[int] = self.offsets.tolist()
        self.modality = self.sets[0].modality
        # the facts the batch builder reads (schema, vocabulary, sample type) agree (check_mixture);
        # labels only where every corpus has the same classes
        self.manifest = dict(self.sets[0].manifest)
        if any(s.manifest.get("classes") != self.manifest.get("classes") for s in self.sets):
            self.manifest["num_classes"] = 0
        self.manifest_path = " + ".join(str(s.manifest_path) for s in self.sets)
        self.has_row_crc = any(s.has_row_crc for s in self.sets)
        self.check_rows = any(s.check_rows for s in self.sets)

    # the corpora agree on these (check_mixture: sample type, stored pixels), so the first one's hold
    def image_columns(self) -> list[str]:
        return self.sets[0].image_columns()

    @property
    def audio_scale(self) -> float:
        return self.sets[0].audio_scale

    def __len__(self) -> int:
        return self.total

    def corpus_of(self, ids) -> np.ndarray:
        """int64 [N]: which corpus each draw id (or global index) reads."""
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64) % self.total, side="right") - 1

    def _at(self, i) -> tuple[int, int]:
        """(corpus, row) of a draw id; bisect on a list: it runs for every row read (shards.py)."""
        g = int(i) % self.total
        c = bisect.bisect_right(self._starts, g) - 1
        return c, g - self._starts[c]

    def get(self, i, columns=None) -> dict:
        c, r = self._at(i)
        return self.sets[c].get(r, columns)

    def row_ok(self, i) -> bool:
        c, r = self._at(i)
        return self.sets[c].row_ok(r)

    def describe(self, i) -> dict:
        c, r = self._at(i)
        d = self.sets[c].describe(r)
        # the shard named with its corpus: two corpora both have a shard-00000.arrow
        d.update(shard=str(self.sets[c].root / d["shard"]), index=int(i))
        return d

    def substitute(self, i) -> int:
        """The next good row of the same corpus (a global index, keeping the corpus' share)."""
        c, r = self._at(i)
        return int(self.offsets[c]) + self.sets[c].substitute(r)

    def lengths(self) -> np.ndarray | None:
        parts = [s.lengths() for s in self.sets]
        return None if parts[0] is None else np.concatenate(parts)


def open_corpus(cfg):
    """data.manifest -> ShardSet; data.manifests -> MixedShardSet."""
    if cfg.data.manifests:
        return MixedShardSet(cfg.data.manifests, verify=cfg.data.verify)
    return ShardSet(cfg.data.manifest, verify=cfg.data.verify)


def weights_of(cfg, sizes) -> np.ndarray:
    """float64 [C] shares summing to 1: data.manifest_weights normalized, or the usable sizes'."""
    w = np.asarray(cfg.data.manifest_weights if cfg.data.manifest_weights else sizes, dtype=np.float64)
    return w / w.sum()


def draws_per_epoch(weights: np.ndarray, n: int) -> np.ndarray:
    """int64 [C] summing to n: n * weights rounded by largest remainder (ties: the earlier corpus)."""
    exact = weights * n
    counts = np.floor(exact).astype(np.int64)
    rest = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


class MixtureBatchSampler(ShardedBatchSampler):
    """ShardedBatchSampler over a mixture's epoch (module docstring): the same data-parallel
    slicing, length bucketing and batching; only the epoch's sample list differs."""

    def __init__(self, shards: MixedShardSet, weights: np.ndarray, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, lengths: np.ndarray | None = None, eligible: np.ndarray | None = None,
                 bucket_batches: int = 64):
        total = shards.total
        elig = np.arange(total, dtype=np.int64) if eligible is None else np.asarray(eligible, dtype=np.int64)
        corpus = shards.corpus_of(elig)
        self.corpus_eligible = [elig[corpus == c] for c in range(len(shards.sets))]
        for c, e in enumerate(self.corpus_eligible):
            if len(e) == 0:
                raise DataError(f"data.manifests: {shards.sets[c].manifest_path} has no usable sample (audio: none "
                                "at least data.min_seconds long): prepare it again or leave it out of the mix")
        n = len(elig)
        self.draws = draws_per_epoch(weights, n)
        self.total = total
        super().__init__(n, batch_size, dp_rank, dp_size, seed, lengths=lengths, bucket_batches=bucket_batches)

    def _stream(self, c: int, start: int, count: int) -> np.ndarray:
        """Draw ids at positions [start, start + count) of corpus c's stream of permutations."""
        el = self.corpus_eligible[c]
        m, out, pos = len(el), [], start
        while pos < start + count:
            k, j = divmod(pos, m)
            take = min(m - j, start + count - pos)
            perm = np.random.default_rng([self.seed, c, k, _STREAM_SALT]).permutation(m)
            out.append(el[perm[j:j + take]] + np.int64(k) * self.total)
            pos += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def epoch_draws(self, epoch: int) -> np.ndarray:
        """int64 [N]: the mixture's draw ids of `epoch`, shuffled together (before rank slicing)."""
        ids = np.concatenate([self._stream(c, epoch * int(k), int(k)) for c, k in enumerate(self.draws)])
        return ids[np.random.default_rng([self.seed, epoch, 0x5A3D]).permutation(len(ids))]

    def rank_indices(self, epoch: int) -> np.ndarray:
        return self.epoch_draws(epoch)[self.rank::self.world][:self.per_rank]

    def _length(self, ids: np.ndarray) -> np.ndarray:
        return self.lengths[ids % self.total]


def make_sampler(shards, cfg, dp_rank: int, dp_size: int, lengths, eligible):
    """The loader's sampler: one corpus as before, or a mixture."""
    if isinstance(shards, MixedShardSet):
        ids = np.arange(shards.total) if eligible is None else np.asarray(eligible)
        sizes = np.bincount(shards.corpus_of(ids), minlength=len(shards.sets))
        return MixtureBatchSampler(shards, weights_of(cfg, sizes), cfg.data.batch_size, dp_rank, dp_size,
                                   cfg.data.seed, lengths=lengths, eligible=eligible)
    return ShardedBatchSampler(len(shards), cfg.data.batch_size, dp_rank, dp_size, cfg.data.seed,
                               lengths=lengths, eligible=eligible)


def check_data_mixture(cfg) -> None:
    """`check_data` for data.manifests: every manifest readable, fit for the config, mixable."""
    ms = load_manifests(cfg.data.manifests)
    for m, p in ms:
        check_compatible(m, p, cfg)
    check_mixture(ms)


def mixture_description(shards, cfg, sampler) -> dict | None:
    """For the run record: each corpus' name, manifest path, rows, share and draws per epoch (the
    manifests' sha256 are in the record's data.manifests); None for one corpus."""
    if not isinstance(shards, MixedShardSet):
        return None
    return {"weights_given": list(cfg.data.manifest_weights) or None,
            "corpora": [{"name": n, "manifest": str(s.manifest_path), "rows": len(s),
                         "share": float(k) / float(sampler.draws.sum()), "draws_per_epoch": int(k)}
                        for n, s, k in zip(shards.names, shards.sets, sampler.draws)]}
