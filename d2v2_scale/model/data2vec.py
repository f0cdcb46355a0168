"""data2vec 2.0: the student forward (with loss) and the teacher module.

Student forward, top to bottom like the paper (N = B*M student rows):

    1. features = local(source)                    [B, T, D]   once per sample
    2. targets  = teacher(features or source)      [B, T, D]   once per sample, no_grad, eval
    3. clones   = features.repeat_interleave(M)    [N, T, D]   each row has its own mask
    4. student  = blocks(gather(positions(clones), kept) [+ CLS])      [N, E + T_keep, D]
    5. decoder  = conv(restore_order(student + noise at masked))       [N, T, D]
    6. loss     = at masked, non-padded positions, vs targets[row // M]

Loss (spec section 6), with s = loss_scale or 1/sqrt(D) and n = number of loss positions:
    loss_regression = (1/n) * sum_{masked tokens} s * sum_c l(pred, y)       (l = MSE or smooth-L1)
    loss_cls        = cls_loss_weight * sum_{rows r} s * sum_c l(cls_r, mean_t y[r // M])
    loss            = loss_regression + loss_cls
The CLS term is summed over the N rows, not averaged: data2vec 2.0 weights it by
`cls_loss * sample_size` before the criterion divides the whole sum by `sample_size`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import Encoder, kept_indices
from .modality import get_modality
from .targets import make_targets

MASK_NOISE_STD = 0.01  # decoder input at masked slots: N(0, 0.01^2)


def compute_var(y: Tensor) -> Tensor:
    """Mean over channels of the std over tokens (data2vec 2.0's collapse statistic). y [n, D]."""
    y = y.float().reshape(-1, y.shape[-1])
    if y.shape[0] < 2:
        return y.new_zeros(())
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def fill_masked(x_kept: Tensor, mask: Tensor, std: float = MASK_NOISE_STD) -> Tensor:
    """Student outputs at kept positions [N, T_keep, D] -> [N, T, D] in the original order, masked
    slots filled with N(0, std^2) noise.  Kept positions are ascending (see kept_indices), and
    masked_scatter fills in row-major order, so this is the inverse of the gather."""
    n, t = mask.shape
    noise = x_kept.new_empty(n, t, x_kept.shape[-1]).normal_(0.0, std)
    return noise.masked_scatter((~mask).unsqueeze(-1), x_kept)


class Data2Vec2Teacher(nn.Module):
    """The EMA teacher: forward(x, padding=None) -> targets [B, T, D] fp32 (extra tokens dropped).

    x is the raw image (image), the student's local features (audio) or the student's
    embeddings (text).  Always in eval mode; parameters are frozen."""

    def __init__(self, cfg):
        super().__init__()
        self.mcfg = cfg.model
        modality = get_modality(cfg.model)
        self.encoder = Encoder(cfg.model, modality, parts=modality.teacher_parts)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):  # the teacher never trains (dropout off, layerdrop off)
        return super().train(False)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        if self.encoder.local is not None:
            x, padding = self.encoder.local_features(x, padding)
        _, layers = self.encoder.forward_full(x, padding, self.mcfg.top_k_layers)
        return make_targets(layers, self.mcfg, padding)


class Data2Vec2(nn.Module):
    """The student: forward(batch, teacher) -> (loss, stats)."""

    def __init__(self, cfg):
        super().__init__()
        self.mcfg = m = cfg.model
        if m.variant != "data2vec2":
            raise NotImplementedError(f"model.variant={m.variant!r} is not implemented (only data2vec2)")
        self.modality = get_modality(m)
        self.encoder = Encoder(m, self.modality, parts=frozenset({"local", "context"}))
        self.decoder = self.modality.build_decoder()
        self.clone_batch = m.clone_batch
        self.loss_scale = m.loss_scale if m.loss_scale is not None else 1.0 / math.sqrt(m.embed_dim)

    # ---------------------------------------------------------------------------------------
    def token_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """[..., D] x [..., D] -> [...]: scaled loss summed over channels, in fp32."""
        pred, target = pred.float(), target.float()
        if self.mcfg.loss_beta > 0:
            l = F.smooth_l1_loss(pred, target, reduction="none", beta=self.mcfg.loss_beta)
        else:
            l = F.mse_loss(pred, target, reduction="none")
        return l.sum(-1) * self.loss_scale

    @torch.no_grad()
    def teacher_targets(self, batch: dict, features: Tensor, padding: Tensor | None,
                        teacher: Callable | None) -> Tensor:
        """Targets [B, T, D] fp32 from one unmasked teacher pass per sample."""
        if teacher is None:  # parameter-count / FLOP / memory dry runs only, never training
            return features.new_zeros(features.shape, dtype=torch.float32)
        x = self.modality.teacher_input(batch, features)
        y = teacher(x) if padding is None else teacher(x, padding)
        return y.float()

    def forward(self, batch: dict, teacher: Callable | None = None) -> tuple[Tensor, dict]:
        mask = batch["mask"]  # [N, T] True = masked (or padding)
        m = self.clone_batch

        # 1. local features, once per sample: [B, T, D]
        features, padding = self.encoder.local_features(batch["source"], batch.get("padding_mask"))
        b, t, d = features.shape
        if mask.shape != (b * m, t):
            raise ValueError(f"batch['mask'] is {tuple(mask.shape)}, expected [B*M, T] = [{b * m}, {t}] "
                             f"(B={b}, M=model.clone_batch={m})")

        # 2. teacher: once per sample, full input
        targets = self.teacher_targets(batch, features, padding, teacher)  # [B, T, D]

        # 3. clone batch: M copies of each sample, each with its own mask
        x = features.repeat_interleave(m, 0)  # [N, T, D]
        pad = padding.repeat_interleave(m, 0) if padding is not None else None
        zero = mask if pad is None else mask | pad

        # 4. student: positions on the full sequence, then only kept tokens (+ extra tokens)
        keep = kept_indices(mask)  # [N, T_keep], ascending original positions
        x = self.encoder.contextualize(x, keep=keep, zero=zero)  # [N, E + T_keep, D]
        bias = self.encoder.bias(x.shape[0], x.shape[1], keep, None, x.dtype, x.device)
        x, _ = self.encoder.run_blocks(x, bias)
        e = self.encoder.num_extra_tokens

        # 5. decoder: noise at masked slots, original order, one prediction per position
        pred = self.decoder(fill_masked(x[:, e:], mask, self.mcfg.decoder_noise_std))  # [N, T, D]

        # 6. loss at masked, non-padded positions against the (repeated) teacher targets
        loss_pos = mask if pad is None else mask & ~pad
        rows, cols = loss_pos.nonzero(as_tuple=True)
        p, y = pred[rows, cols], targets[torch.div(rows, m, rounding_mode="floor"), cols]  # [n, D]
        n = p.shape[0]
        loss_reg = self.token_loss(p, y).sum() / max(n, 1)
        loss = loss_reg
        stats = {"loss_regression": loss_reg.detach(), "masked_tokens": p.new_tensor(float(n), dtype=torch.float32),
                 "target_var": compute_var(y).detach(), "pred_var": compute_var(p.detach()).detach()}

        if self.mcfg.cls_loss_weight > 0 and e > 0:
            # the final CLS output regresses the mean target over the sample's (real) positions
            if padding is None:
                cls_target = targets.mean(1)
            else:
                w = (~padding).unsqueeze(-1).float()
                cls_target = (targets * w).sum(1) / w.sum(1).clamp_min(1)
            cls_target = cls_target.repeat_interleave(m, 0)  # [N, D]
            loss_cls = self.mcfg.cls_loss_weight * self.token_loss(x[:, 0], cls_target).sum()
            loss = loss + loss_cls
            stats["loss_cls"] = loss_cls.detach()

        stats["loss"] = loss.detach()
        return loss, stats
