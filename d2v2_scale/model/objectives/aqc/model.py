"""data2vec-aqc: data2vec 1.0 speech plus an augmented view, a Gumbel quantizer, per-step k-means
and two cross-contrastive losses (docs/REFERENCE.md §3.3-§3.8, docs/AQC.md).

Student forward, B utterances, T frames, M masked per row (the same M in every row), C the CNN
width, D the model width, Q = model.aqc_vq_dim:

    1. cnn        = CNN([orig; aug])                        [2B, T, C]  shared weights, both with grad
       features_pen = mean(cnn_orig^2)                       scalar      original view, before the LN
    2. unmasked   = LayerNorm(cnn)                          [2B, T, C]  the quantizer's input
    3. proj       = post_extract_proj(unmasked)             [2B, T, D]
    4. targets    = teacher(proj_orig, unmasked)            [B, T, D]   data2vec 1.0 speech targets
    5. student    = blocks(ctx(proj_aug with mask_emb))     [B, T, D]   the AUGMENTED view, masked
    6. regression = sum_masked ||final_proj(student) - y||^2             as 1.0 (x 1/sqrt(D) in B.8)
    7. q_o, q_a   = project_q(quantizer(unmasked at masked)) [B, M, Q]  per view, own perplexities
    8. c_s, c_t   = contr_proj(student at masked), contr_proj(y at masked)  [B, M, Q]
    9. negatives  = 100 per frame from the same row and view             [B, M, K] flat indices
   10. labels     = cosine k-means of [q_o; q_a], max(2, T // 16) clusters  [2, B, M]
   11. L_s = CE(c_s vs q_o), L_t = CE(c_t vs q_a), same-cluster negatives x 0.3, identical -inf
   12. loss       = (B.8 total) / N_m,  N_m = B * M

The data2vec 1.0 parts (encoder, mask_emb, head = `decoder`, teacher and its copied positional
conv) are Data2Vec1's, unchanged; the AQC parts live under `aqc.*` (student only: the EMA teacher
and the exported encoder have none of them).  The quantizer, negatives and k-means run on every
tensor-parallel rank alike: their inputs are replicated there, and their random draws come from
one generator keyed on (run seed, update, data-parallel rank, micro-batch), so TP ranks agree
and a resumed run draws what the uninterrupted one drew.

Pipeline parallelism is refused by the config (the quantizer needs the CNN features of both
views on the stage that holds the encoder outputs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ....data import rng
from ....data.layout import TOKEN_PADDING
from ...core.loss import token_loss
from ...core.stats import compute_var, position_share
from ..data2vec1 import Data2Vec1
from .contrastive import aqc_total_loss, cross_contrastive_loss, sample_negatives
from .kmeans import cosine_kmeans, num_clusters
from .quantizer import GumbelVectorQuantizer, diversity_loss


class AQCParts(nn.Module):
    """The student-only AQC modules: quantizer (C -> Q), project_q (Q -> Q), contr_proj (D -> Q).
    torch's default Linear init for the two projections (the reference's nn.Linear)."""

    def __init__(self, mcfg):
        super().__init__()
        m = mcfg
        cnn_width = m.conv_feature_layers[-1][0]
        self.quantizer = GumbelVectorQuantizer(dim=cnn_width, num_vars=m.aqc_latent_vars, groups=m.aqc_latent_groups,
                                               vq_dim=m.aqc_vq_dim, temp=tuple(m.aqc_latent_temp))
        self.project_q = nn.Linear(m.aqc_vq_dim, m.aqc_vq_dim)
        self.contr_proj = nn.Linear(m.embed_dim, m.aqc_vq_dim)


def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0


class Data2VecAQC(Data2Vec1):
    """forward(batch with source, source_aug [B, S] and mask [B, T], teacher) -> (loss, stats)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.mcfg.modality != "audio":
            raise ValueError(f"data2vec-aqc is speech only (model.modality={self.mcfg.modality!r})")
        self.aqc = AQCParts(self.mcfg)
        self.seed = int(cfg.seed)
        self.num_updates = 0
        self._calls = 0  # forwards since the last set_num_updates: micro-batches of one update

    def set_num_updates(self, num_updates: int) -> None:
        """The trainer's update count (before each update): the Gumbel temperature and the key of
        this update's random draws."""
        self.num_updates = int(num_updates)
        self._calls = 0
        self.aqc.quantizer.set_num_updates(self.num_updates)

    def stat_names(self) -> list[str]:
        return super().stat_names() + [
            "loss_contrastive", "aqc/loss_student", "aqc/loss_teacher", "aqc/diversity", "aqc/features_pen",
            "aqc/code_perplexity", "aqc/prob_perplexity", "aqc/gumbel_temp", "aqc/num_clusters",
            "aqc/accuracy_student", "aqc/accuracy_teacher", "aqc/same_cluster_share"]

    def generator(self, device: torch.device) -> torch.Generator:
        """This forward's generator: Gumbel noise, negatives, k-means init.  Keyed on (run seed,
        update, data-parallel rank, micro-batch): every TP rank draws alike, resume is exact."""
        key = rng.make_keys(self.seed, self.num_updates, _dp_rank(), self._calls)
        self._calls += 1
        g = torch.Generator(device=device)
        g.manual_seed(int(key.reshape(-1)[0]) & (2**63 - 1))
        return g

    def forward(self, batch: dict, teacher: Callable | None = None, *, hidden: Tensor | None = None,
                targets: Tensor | None = None):
        if not (self.first_stage and self.last_stage) or hidden is not None:
            raise NotImplementedError("data2vec-aqc runs without pipeline parallelism (parallel.pp=1)")
        if "source_aug" not in batch:
            raise ValueError("data2vec-aqc needs the augmented view batch['source_aug'] [B, S]: set data.views=aqc")
        mask = batch["mask"]  # [B, T] True = masked
        b = mask.shape[0]
        src = batch["source"]
        local = self.encoder.local  # AudioLocal: cnn -> norm -> proj
        cnn = local.cnn(torch.cat([src, batch["source_aug"].to(src.dtype)]))  # [2B, T, C]
        if mask.shape != (b, cnn.shape[1]):
            raise ValueError(f"batch['mask'] is {tuple(mask.shape)}, expected [B, T] = {(b, cnn.shape[1])}")
        if self._layout(batch)[TOKEN_PADDING] is not None:
            raise ValueError("data2vec-aqc batches carry no padding (data.audio_crop=batch_min)")
        features_pen = cnn[:b].float().pow(2).mean()  # original view only, before the LayerNorm
        unmasked = local.norm(cnn)  # [2B, T, C]
        proj = local.proj(unmasked)  # [2B, T, D]
        if targets is None:
            targets = self.teacher_targets(batch, proj[:b], None, teacher)  # the ORIGINAL view, unmasked
        x = self.mask_and_contextualize(proj[b:], mask, None)  # the AUGMENTED view, masked
        x = self._blocks_sequence(x, None).transpose(0, 1)  # [B, T, D]
        return self.aqc_loss(x, targets, unmasked, features_pen, mask)

    def aqc_loss(self, x: Tensor, targets: Tensor, unmasked: Tensor, features_pen: Tensor,
                 mask: Tensor) -> tuple[Tensor, dict]:
        """Student output x [B, T, D], targets [B, T, D] fp32, unmasked [2B, T, C] (original rows
        first), features_pen scalar, mask [B, T] -> (loss = B.8 total / N_m, stats)."""
        m, parts = self.mcfg, self.aqc
        b, t = mask.shape
        counts = mask.sum(1)
        lo, hi = (int(v) for v in counts.aminmax())
        if lo != hi or lo < 2:
            raise ValueError(f"data2vec-aqc needs the same masked count (>= 2) in every row, got {lo}..{hi} "
                             "(masking.generator=speech_spans trims to the batch minimum)")
        n = b * lo  # N_m
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: row b's M frames are rows b*M..(b+1)*M-1
        xm, y = x[rows, cols], targets[rows, cols]  # [N_m, D]
        pred = self.decoder(xm)
        mse_sum = token_loss(pred, y, 0.0, 1.0).sum()

        gen = self.generator(x.device)
        q_o = parts.quantizer(unmasked[:b][rows, cols], generator=gen)  # original view
        q_a = parts.quantizer(unmasked[b:][rows, cols], generator=gen)  # augmented view
        pos_o = parts.project_q(q_o["x"]).view(b, lo, -1)  # [B, M, Q]
        pos_a = parts.project_q(q_a["x"]).view(b, lo, -1)
        c_s = parts.contr_proj(xm).view(b, lo, -1)  # the student (augmented view)
        c_t = parts.contr_proj(y.to(xm.dtype)).view(b, lo, -1)  # the teacher (original), compute dtype
        k = m.aqc_num_negatives
        neg_o = sample_negatives(b, lo, k, generator=gen, device=x.device)
        neg_a = sample_negatives(b, lo, k, generator=gen, device=x.device)
        clusters = num_clusters(t, m.aqc_cluster_factor)  # T: the full frame count, not M
        labels = cosine_kmeans(torch.cat([pos_o, pos_a]).flatten(0, 1), clusters, generator=gen).view(2, b, lo)
        opts = dict(temperature=m.aqc_logit_temp, same_cluster_scale=m.aqc_same_cluster_scale,
                    gate_on_identical=m.aqc_gate_scaling_on_identical)
        # student (aug) <-> quantized original; teacher (orig) <-> quantized augmented
        loss_s, st_s = cross_contrastive_loss(c_s, pos_o, q_o["codes"].view(b, lo, -1), neg_o, labels[0], **opts)
        loss_t, st_t = cross_contrastive_loss(c_t, pos_a, q_a["codes"].view(b, lo, -1), neg_a, labels[1], **opts)
        w = m.aqc_contrastive_weight
        total, terms = aqc_total_loss(
            mse_sum, loss_s, loss_t, q_o["prob_perplexity"], features_pen, n, dim=m.embed_dim,
            weights=(w, w, m.aqc_diversity_weight, m.aqc_features_pen_weight), num_codes=parts.quantizer.num_codes)
        loss = total / n
        f32 = dict(dtype=torch.float32, device=x.device)
        stats = {"loss": loss.detach(), "loss_regression": terms["regression"] / n,
                 "masked_tokens": torch.tensor(float(n), **f32),
                 "target_var": compute_var(y).detach(), "pred_var": compute_var(pred.detach()).detach(),
                 "target_position_share": position_share(targets, None).detach(),
                 # the reference's logged contrastive_loss (L_s + L_t) / N_m, in nats
                 "loss_contrastive": ((loss_s + loss_t) / n).detach(),
                 "aqc/loss_student": (loss_s / n).detach(), "aqc/loss_teacher": (loss_t / n).detach(),
                 "aqc/diversity": diversity_loss(q_o["prob_perplexity"], parts.quantizer.num_codes).detach(),
                 "aqc/features_pen": features_pen.detach(),
                 "aqc/code_perplexity": q_o["code_perplexity"].detach(),
                 "aqc/prob_perplexity": q_o["prob_perplexity"].detach(),
                 "aqc/gumbel_temp": torch.tensor(float(q_o["temp"]), **f32),
                 "aqc/num_clusters": torch.tensor(float(clusters), **f32),
                 "aqc/accuracy_student": st_s["correct"].float() / n, "aqc/accuracy_teacher": st_t["correct"].float() / n,
                 "aqc/same_cluster_share": (st_s["same_cluster"] + st_t["same_cluster"]).float() / (2 * n * k)}
        return loss, stats
