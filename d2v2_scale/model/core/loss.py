"""The per-token regression loss both objectives use (docs/REFERENCE.md §1.6,
§2.2-§2.4).

    token_loss(pred, y) = scale * sum_c l(pred_c, y_c)       l = squared error (beta = 0)
                                                             or smooth-L1 with beta (beta > 0)

scale: model.loss_scale when set, else model.loss_scale_rule: 1/sqrt(D) ("inv_sqrt_dim": speech,
data2vec 2.0), 1/D ("inv_dim": data2vec 1.0 vision, a mean over elements), 1 ("one").
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def loss_scale(mcfg) -> float:
    if mcfg.loss_scale is not None:
        return float(mcfg.loss_scale)
    rule = getattr(mcfg, "loss_scale_rule", "inv_sqrt_dim")
    return {"inv_sqrt_dim": 1.0 / math.sqrt(mcfg.embed_dim), "inv_dim": 1.0 / mcfg.embed_dim, "one": 1.0}[rule]


def token_loss(pred: Tensor, target: Tensor, beta: float, scale: float) -> Tensor:
    """[..., D] x [..., D] -> [...]: scaled loss summed over channels, in fp32."""
    pred, target = pred.float(), target.float()
    if beta > 0:
        l = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        l = F.mse_loss(pred, target, reduction="none")
    return l.sum(-1) * scale
