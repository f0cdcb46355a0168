"""data2vec-aqc's cross-contrastive InfoNCE pieces (docs/REFERENCE.md §3.5, §3.7, §3.8).

    sample_negatives      per masked position, `num` other masked positions of the same utterance
    cross_contrastive_loss  cos/0.1 logits against [positive; negatives], identical-code
                          negatives at -inf, same-cluster negatives x0.3, CE(target 0) summed
    aqc_total_loss        the B.8 sum the trainer divides by N_m

Plain PyTorch; the objective runs them replicated on every rank that holds the final outputs
(negatives never cross utterances, so they are per-sample).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .quantizer import diversity_loss


def sample_negatives(batch: int, masked: int, num: int = 100, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """-> idx [B, M, num] long: flat row indices into the [B*M] masked positions.

    wav2vec 2.0's `sample_negatives` (n_negatives = num, no cross-sample negatives, no padding):
    for row b and position i, `num` draws uniform over {0, ..., M-2} with replacement, each draw
    >= i shifted by +1 (never the position itself), plus the row offset b*M (same utterance only).
    Drawn in fairseq's order, so the same seed gives fairseq's indices."""
    if masked < 2:
        raise ValueError(f"sample_negatives: need at least 2 masked positions per row to draw negatives, got {masked}")
    dev = generator.device if generator is not None else device
    idx = torch.randint(0, masked - 1, (batch, masked, num), generator=generator, device=dev)
    pos = torch.arange(masked, device=idx.device).view(1, masked, 1)
    idx = idx + (idx >= pos).long()
    idx = idx + torch.arange(batch, device=idx.device).view(batch, 1, 1) * masked
    return idx.to(device) if device is not None else idx


def cross_contrastive_loss(query: Tensor, positive: Tensor, pos_codes: Tensor, neg_idx: Tensor, labels: Tensor,
                           temperature: float = 0.1, same_cluster_scale: float = 0.3,
                           gate_on_identical: bool = False) -> tuple[Tensor, dict]:
    """InfoNCE of query [B, M, C] against its positive [B, M, C] and K negatives drawn from the
    positives of the same utterance (neg_idx [B, M, K], flat into the B*M rows, each within its own
    row's [b*M, (b+1)*M) as sample_negatives draws them; anything else is a ValueError).

    logits [B, M, 1+K] = cos(query, [positive; negatives]) / temperature, in fp32;
    a negative whose codes (pos_codes [B, M, G]) all equal the positive's gets -inf (the
    reference's float equality of the quantized vectors, B.7); a negative in the positive's k-means
    cluster (labels [B, M]) has its logit multiplied by same_cluster_scale, always, or with
    gate_on_identical=True only when some negative in the batch is identical (the reference's
    literal gating).  Loss = sum over the B*M rows of CE(logits, class 0).

    Gradient reaches the query and, as in the reference (fairseq does not detach the negatives),
    the positive tensor through both the positive and the negative slots; not the codes/labels.
    -> (loss_sum 0-dim fp32, stats {"correct", "identical", "same_cluster"}: detached 0-dim counts)."""
    b, m, _ = query.shape
    local = neg_idx - torch.arange(b, device=neg_idx.device).view(b, 1, 1) * m  # index within the row
    if not ((local >= 0) & (local < m)).all():
        raise ValueError("cross_contrastive_loss: neg_idx must index positives of the same utterance "
                         "(flat indices in [b*M, (b+1)*M), as sample_negatives draws them)")
    # negatives come from the same utterance, so every cosine is in the per-utterance [M, M] table
    # of query x positive: a gather from it equals cos(query, positive.flatten(0, 1)[neg_idx])
    # without materializing the [B, M, K, C] negatives (same values, same gradients)
    qn = F.normalize(query.float(), dim=-1, eps=1e-8)
    pn = F.normalize(positive.float(), dim=-1, eps=1e-8)
    cos = qn @ pn.transpose(1, 2)  # [B, M(query), M(positive)]
    logits = torch.cat([cos.diagonal(dim1=1, dim2=2).unsqueeze(-1), cos.gather(2, local)], dim=-1) / temperature
    codes = pos_codes.flatten(0, 1)
    identical = (codes[neg_idx] == pos_codes.unsqueeze(2)).all(-1)  # [B, M, K]
    same = labels.flatten()[neg_idx] == labels.unsqueeze(-1)  # [B, M, K]
    if gate_on_identical:
        same = same & identical.any()  # 0-dim condition: no host sync
    pos_logit, neg_logits = logits[..., :1], logits[..., 1:]
    neg_logits = torch.where(same, neg_logits * same_cluster_scale, neg_logits)
    neg_logits = neg_logits.masked_fill(identical, float("-inf"))
    logits = torch.cat([pos_logit, neg_logits], dim=-1).view(b * m, -1)
    target = torch.zeros(b * m, dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    with torch.no_grad():
        stats = {"correct": (logits.argmax(-1) == 0).sum(), "identical": identical.sum(), "same_cluster": same.sum()}
    return loss, stats


def aqc_total_loss(mse_sum: Tensor, loss_s: Tensor, loss_t: Tensor, prob_perplexity: Tensor, features_pen: Tensor,
                   n_masked: int, dim: int = 768, weights: tuple[float, float, float, float] = (0.5, 0.5, 0.1, 10.0),
                   num_codes: int = 640) -> tuple[Tensor, dict]:
    """B.8: mse_sum/sqrt(dim) + w_s*L_s + w_t*L_t + w_div*N_m*(num_codes - ppl)/num_codes + w_pen*N_m*pen.

    mse_sum: squared error summed over the masked frames and channels; L_s, L_t: CE sums over the
    N_m = n_masked rows; the diversity and feature-penalty terms are per-batch means, scaled by N_m
    so the trainer's division by N_m (the sample size) turns them back into the reference's weights.
    -> (total 0-dim, parts {"regression", "contrastive_s", "contrastive_t", "diversity",
    "features_pen"}: each weighted term, detached; they sum to total)."""
    w_s, w_t, w_div, w_pen = weights
    parts = {
        "regression": mse_sum / math.sqrt(dim),
        "contrastive_s": w_s * loss_s,
        "contrastive_t": w_t * loss_t,
        "diversity": w_div * n_masked * diversity_loss(prob_perplexity, num_codes),
        "features_pen": w_pen * n_masked * features_pen,
    }
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}


__all__ = ["aqc_total_loss", "cross_contrastive_loss", "sample_negatives"]
