"""Per-step spherical (cosine) k-means for data2vec-aqc's same-cluster negatives (docs/REFERENCE.md §3.6).

The reference builds a fresh `fast_pytorch_kmeans.KMeans(n_clusters=max(2, T // 16),
mode='cosine', max_iter=100, tol=1e-4)` every step; this is that algorithm (full batch, random
data points as the initial centroids), written here so it runs on the GPU tensors with no
dependency and draws its initial points from a generator the caller seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def num_clusters(frames: int, factor: int = 16) -> int:
    """max(2, T // factor), T the full frame count of the student input (not the masked count)."""
    return max(2, frames // factor)


def _cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """[N, C] x [K, C] -> [N, K], fast_pytorch_kmeans 0.2.2's cos_sim (a zero centroid scores 0)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


@torch.no_grad()
def cosine_kmeans(x: Tensor, k: int, generator: torch.Generator | None = None, max_iter: int = 100,
                  tol: float = 1e-4) -> Tensor:
    """x [N, C] -> labels [N] long in [0, k), without gradient.

    The points are L2-normalized (fp32); the initial centroids are k distinct points drawn from
    `generator`.  Each iteration assigns every point to the centroid of maximal cosine similarity,
    then moves each centroid to the mean of its points (a centroid left empty becomes zero, as the
    reference's NaN -> 0); it stops once sum ||centroid change||^2 <= tol or after max_iter
    iterations.  The labels are those of the last assignment."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cosine_kmeans: {k} clusters need at least as many points, got {n} "
                         f"(use fewer clusters or more masked frames)")
    if max_iter < 1:
        raise ValueError(f"cosine_kmeans: max_iter must be >= 1, got {max_iter}")
    x = F.normalize(x.detach().float(), dim=-1)
    dev = generator.device if generator is not None else x.device
    init = torch.randperm(n, generator=generator, device=dev)[:k].to(x.device)
    centroids = x[init]
    ids = torch.arange(k, device=x.device)
    labels = None
    for _ in range(max_iter):
        labels = _cos_sim(x, centroids).argmax(dim=-1)
        # one-hot [K, N] @ [N, C]: a deterministic matmul (index_add_ is atomic, so not bitwise
        # reproducible on the GPU); 0/0 of an empty cluster gives NaN, zeroed as the reference does
        member = (labels.unsqueeze(0) == ids.unsqueeze(1)).float()
        new = (member @ x) / member.sum(-1, keepdim=True)
        new = torch.nan_to_num(new, nan=0.0)
        shift = (new - centroids).pow(2).sum()
        centroids = new
        if shift.item() <= tol:
            break
    return labels


__all__ = ["cosine_kmeans", "num_clusters"]
