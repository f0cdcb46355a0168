"""Collapse statistics of the teacher targets and student outputs, logged by every objective."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_var(y: Tensor) -> Tensor:
    """Mean over channels of the std over tokens (data2vec 2.0's collapse statistic). y [n, D]."""
    y = y.float().reshape(-1, y.shape[-1])
    if y.shape[0] < 2:
        return y.new_zeros(())
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def position_share(y: Tensor, padding: Tensor | None = None) -> Tensor:
    """Share of the targets' variance that position alone explains: the adjusted R^2 of a
    per-position mean over the batch's samples.  y [B, T, D], padding [B, T] (True = pad) | None.

    ~0 when targets vary with the input, ~1 when every sample gets the same target at a given
    position.  This catches a collapse `compute_var` cannot: targets that are a function of the
    position only (learned positions outgrowing the token embeddings, measured on tiny text
    runs) keep their per-channel variance.  Adjusted (x (n-1)/(n-G), G positions seen) so a
    batch of unrelated samples reads ~0, not ~G/n."""
    y = y.float()
    w = (torch.ones(y.shape[:2], device=y.device) if padding is None else (~padding).float()).unsqueeze(-1)
    n_t = w.sum(0)  # [T, 1] samples at each position
    n = n_t.sum()
    g = (n_t > 0).sum()
    yc = (y - (y * w).sum((0, 1)) / n) * w
    total = yc.square().sum().clamp_min(1e-12)
    between = (yc.sum(0).square() / n_t.clamp_min(1)).sum()  # sum_t n_t * |mean_t|^2
    share = 1 - (1 - between / total) * (n - 1) / (n - g).clamp_min(1)
    # one sample (or one token per position): nothing to compare.  No `if`: no host sync per step
    return torch.where(n > g, share, torch.full_like(share, float("nan")))
