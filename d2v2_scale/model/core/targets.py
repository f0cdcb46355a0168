"""Teacher targets from the top-K FFN outputs (docs/REFERENCE.md §1.3).

    y = final_norm( mean_k  layer_norm_k( instance_norm_k( t_k ) ) )      in fp32

t_k [B, T, D] is block k's MLP output before the residual add and LN2, extra tokens (CLS)
already dropped.  None of the norms has affine parameters.  Instance norm is over time (per
sample and channel, across positions); with padding, its statistics use only the real positions
(equal to `F.instance_norm` when there is no padding).  eps = 1e-5 everywhere (torch default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5


def instance_norm_time(x: Tensor, padding: Tensor | None = None, eps: float = EPS) -> Tensor:
    """x [B, T, D] normalized per (sample, channel) over T; padding [B, T] True = ignore, None
    when nothing is padded (every caller's token padding is None then, data/layout.py: no
    `.any()` read back here)."""
    x = x.float()
    if padding is None:
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    keep = (~padding).unsqueeze(-1).float()  # [B, T, 1]
    n = keep.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * keep).sum(1, keepdim=True) / n
    var = (((x - mean) * keep) ** 2).sum(1, keepdim=True) / n  # biased, as instance_norm
    return (x - mean) * torch.rsqrt(var + eps)


def layer_norm_channels(x: Tensor, eps: float = EPS) -> Tensor:
    x = x.float()
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def accumulate_layers(layer_outputs: list[Tensor], mcfg, padding: Tensor | None = None,
                      partial: Tensor | None = None) -> Tensor | None:
    """partial + sum_k norm_k(t_k) in fp32 ([B, T, D]), or `partial` when there are no layers.

    Split from `make_targets` for pipeline parallelism: the top-K blocks may live on several
    stages; each stage adds its blocks' normalized outputs to the running sum it received, in the
    same order as one process would, so the targets do not depend on the pipeline layout."""
    y = partial
    for t in layer_outputs:
        t = t.float()
        if mcfg.instance_norm_target_layer:
            t = instance_norm_time(t, padding)
        if mcfg.layer_norm_target_layer:
            t = layer_norm_channels(t)
        y = t if y is None else y + t
    return y


def finish_targets(y_sum: Tensor, mcfg, padding: Tensor | None = None) -> Tensor:
    """Sum of the K normalized layers [B, T, D] -> targets [B, T, D] (fp32)."""
    y = y_sum / mcfg.top_k_layers
    if mcfg.layer_norm_targets:
        y = layer_norm_channels(y)
    if mcfg.instance_norm_targets:
        y = instance_norm_time(y, padding)
    return y


def make_targets(layer_outputs: list[Tensor], mcfg, padding: Tensor | None = None) -> Tensor:
    """Average of the per-layer normalized FFN outputs -> targets [B, T, D] (fp32).

    layer_outputs: the last K = mcfg.top_k_layers blocks' FFN outputs, each [B, T, D] (extra
    tokens removed).  mcfg: ModelConfig (instance_norm_target_layer, layer_norm_target_layer,
    layer_norm_targets, instance_norm_targets).
    """
    if len(layer_outputs) != mcfg.top_k_layers:
        raise ValueError(f"{len(layer_outputs)} layer outputs for model.top_k_layers={mcfg.top_k_layers}")
    return finish_targets(accumulate_layers(layer_outputs, mcfg, padding), mcfg, padding)
