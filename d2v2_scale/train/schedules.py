"""Learning-rate schedules (optim.schedule), stepped by DeepSpeed after every optimizer update.

  * "cosine":    linear warm-up from 0 over optim.warmup_steps, then cosine to
                 optim.min_lr_ratio * lr at optim.total_steps (DeepSpeed's WarmupCosineLR).
  * "tri_stage": fairseq's `tri_stage` (data2vec 1.0 speech, docs/REFERENCE.md §2.2).  With
                 phase ratios (a, h, d) of U = optim.total_steps updates, W = int(a U),
                 H = int(h U), D = int(d U), peak = lr:
                     u < W:           lr(u) = s0 * peak + u * (peak - s0 * peak) / W
                     u < W + H:       lr(u) = peak
                     u <= W + H + D:  lr(u) = peak * exp(ln(s1) * (u - W - H) / D)
                     after:           lr(u) = s1 * peak
                 s0 = optim.tri_stage_init_scale, s1 = optim.tri_stage_final_scale (0.01 both).
                 The last phase is exponential (the paper says "linearly decays"; the code
                 is exponential).
"""

from __future__ import annotations

import math

import torch


class TriStage:
    """lr(u) / peak for update u (a picklable callable: LambdaLR saves its fields in checkpoints)."""

    def __init__(self, total_steps: int, ratios=(0.03, 0.9, 0.07), init_scale: float = 0.01,
                 final_scale: float = 0.01):
        self.warmup = int(total_steps * ratios[0])
        self.hold = int(total_steps * ratios[1])
        self.decay = int(total_steps * ratios[2])
        self.init_scale, self.final_scale = float(init_scale), float(final_scale)

    def __call__(self, u: int) -> float:
        if u < self.warmup:
            return self.init_scale + (1.0 - self.init_scale) * u / self.warmup
        u -= self.warmup
        if u < self.hold:
            return 1.0
        u -= self.hold
        if u <= self.decay and self.decay > 0:
            return math.exp(math.log(self.final_scale) * u / self.decay)
        return self.final_scale


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg):
    """The scheduler for optim.schedule (config validation has checked the name)."""
    if ocfg.schedule == "tri_stage":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, TriStage(ocfg.total_steps, tuple(ocfg.tri_stage_ratios), ocfg.tri_stage_init_scale,
                                ocfg.tri_stage_final_scale))
    import deepspeed

    return deepspeed.runtime.lr_schedules.WarmupCosineLR(
        optimizer, total_num_steps=ocfg.total_steps, warmup_min_ratio=0.0,
        warmup_num_steps=max(ocfg.warmup_steps, 1), cos_min_ratio=ocfg.min_lr_ratio, warmup_type="linear")
