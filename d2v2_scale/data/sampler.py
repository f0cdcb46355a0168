"""Which samples each data-parallel rank sees, batch by batch, epoch by epoch.

Per epoch: a permutation of all N samples from (seed, epoch); data-parallel rank r takes
positions r, r + dp_size, ... of it (disjoint slices; every rank gets N // dp_size samples so
all ranks run the same number of steps).  TP/PP ranks of one DP rank pass the same dp_rank and
so see the same data.  With `lengths` (audio, text), samples are length-bucketed: the rank's
slice is cut into windows of `bucket_batches` batches, each window is sorted by length and cut
into batches, and the batch order is shuffled, so a batch holds similar lengths (little
padding, few extra masked positions) while the epoch stays random.

Everything is a pure function of (seed, epoch, dp_rank, dp_size), so the resume state is just
(epoch, batch position).
"""

from __future__ import annotations

import numpy as np


class ShardedBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 lengths: np.ndarray | None = None, bucket_batches: int = 64, eligible: np.ndarray | None = None):
        """lengths: per global sample index; eligible: the global indices to draw from (default
        all; audio leaves out clips under data.min_seconds, docs/REFERENCE.md §1.10 D6)."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.eligible = None if eligible is None else np.asarray(eligible, dtype=np.int64)
        num_samples = num_samples if eligible is None else len(self.eligible)
        per_rank = num_samples // dp_size
        if per_rank < batch_size:
            raise ValueError(f"{num_samples} samples over {dp_size} data-parallel ranks leave {per_rank} per rank, "
                             f"fewer than data.batch_size={batch_size}: use more data or a smaller batch")
        self.n, self.bs, self.rank, self.world, self.seed = num_samples, batch_size, dp_rank, dp_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.bucket_batches = bucket_batches
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // batch_size  # incomplete last batch dropped
        self._cache: tuple[int, np.ndarray] | None = None

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in visiting order before batching."""
        perm = np.random.default_rng([self.seed, epoch, 0x5A3D]).permutation(self.n)
        if self.eligible is not None:
            perm = self.eligible[perm]
        return perm[self.rank::self.world][:self.per_rank]

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """int64 [batches_per_epoch, batch_size] global sample indices of this rank's batches."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        idx = self.rank_indices(epoch)[:self.batches_per_epoch * self.bs]
        if self.lengths is None:
            batches = idx.reshape(-1, self.bs)
        else:
            win = self.bs * self.bucket_batches
            parts = []
            for s in range(0, len(idx), win):
                w = idx[s:s + win]
                parts.append(w[np.argsort(self._length(w), kind="stable")])
            batches = np.concatenate(parts).reshape(-1, self.bs)
            order = np.random.default_rng([self.seed, epoch, self.rank, 0xB0C4]).permutation(len(batches))
            batches = batches[order]
        self._cache = (epoch, batches)
        return batches

    def _length(self, indices: np.ndarray) -> np.ndarray:
        """Bucketing lengths of these samples (a mixture's draw ids map to rows: data/mixture.py)."""
        return self.lengths[indices]

    def __len__(self) -> int:
        return self.batches_per_epoch
