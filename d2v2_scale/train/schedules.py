"""Learning-rate schedules (optim.schedule), stepped once after every applied optimizer update.

Both are fairseq's `step_update(u)` formulas for u = the number of updates applied so far: fairseq's
trainer sets the LR for update k (1-based) with `step_update(k - 1)` (`Trainer.__init__` calls
`step_update(0)`, each `set_num_updates(k)` after update k calls `step_update(k)` for the next
one).  `torch.optim.lr_scheduler.LambdaLR` does the same: it applies f(0) when built and f(u)
after its u-th `step()`, so update k runs at f(k - 1) x peak under DeepSpeed's engine and the
flat engine alike (both step the scheduler after each applied update).  DeepSpeed's
`WarmupCosineLR` (used before) started at iteration -1 and was one update late in warm-up (update
k ran at (k - 2) / W x peak: two updates at LR 0, update W + 1 at (W - 1) / W x peak, the peak
never reached); docs/TRAINING.md "Learning rate".

  * "cosine":    fairseq's `cosine` (t_mult 1, lr_shrink unused) with W = optim.warmup_steps,
                 U = optim.total_steps, peak = lr, m = optim.min_lr_ratio * lr:
                     u < W:  lr(u) = u * peak / W
                     else:   lr(u) = m + (peak - m) * (1 + cos(pi * min(u - W, U - W) / (U - W))) / 2
                 fairseq's warm-up starts at its min_lr (0 in every data2vec recipe; here always 0),
                 and past U it would start a second cosine period; here the LR stays at m.
  * "tri_stage": fairseq's `tri_stage` (data2vec 1.0 speech, docs/REFERENCE.md §2.2).  With phase
                 ratios (a, h, d) of U updates, W = int(a U), H = int(h U), D = int(d U):
                     u < W:           lr(u) = s0 * peak + u * (peak - s0 * peak) / W
                     u < W + H:       lr(u) = peak
                     u <= W + H + D:  lr(u) = peak * exp(ln(s1) * (u - W - H) / D)
                     after:           lr(u) = s1 * peak
                 s0 = optim.tri_stage_init_scale, s1 = optim.tri_stage_final_scale (0.01 both).
                 The last phase is exponential (the paper says "linearly decays"; the code
                 is exponential).
  * fine-tuning's "polynomial_decay" (fairseq's, the text fine-tuning recipes, docs/FINETUNE.md;
                 WarmupPolynomial) with W warm-up updates of U, power p, end e (0 there):
                     W > 0, u <= W:  lr(u) = u * peak / W          (update 1 at 0, update W + 1 at peak)
                     u >= U:         lr(u) = e
                     else:           lr(u) = e + (peak - e) * (1 - (u - W) / (U - W)) ** p
"""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """lr(u) / peak for u updates applied (a picklable callable: LambdaLR saves its fields in checkpoints)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        self.total, self.warmup, self.min_ratio = int(total_steps), int(warmup_steps), float(min_ratio)

    def __call__(self, u: int) -> float:
        if u < self.warmup:
            return u / self.warmup
        period = self.total - self.warmup
        if period <= 0:
            return self.min_ratio
        t = min(u - self.warmup, period)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / period))


class TriStage:
    """lr(u) / peak for u updates applied (a picklable callable: LambdaLR saves its fields in checkpoints)."""

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


class WarmupPolynomial:
    """lr(u) / peak for u updates applied: fairseq's polynomial_decay (its `step_update(u)`, the
    warm-up boundary u <= W included), end_learning_rate = end_ratio x peak."""

    def __init__(self, total_steps: int, warmup_steps: int, power: float = 1.0, end_ratio: float = 0.0):
        self.total, self.warmup = int(total_steps), int(warmup_steps)
        self.power, self.end_ratio = float(power), float(end_ratio)

    def __call__(self, u: int) -> float:
        if self.warmup > 0 and u <= self.warmup:
            return u / self.warmup
        if u >= self.total:
            return self.end_ratio
        left = 1.0 - (u - self.warmup) / (self.total - self.warmup)
        return self.end_ratio + (1.0 - self.end_ratio) * left ** self.power


class UpdateLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also resumes a checkpoint written when the cosine schedule was DeepSpeed's
    `WarmupCosineLR` (state {"last_batch_iteration": k - 1} after k updates)."""

    def load_state_dict(self, state_dict: dict) -> None:
        if "last_batch_iteration" in state_dict and "last_epoch" not in state_dict:
            self.last_epoch = int(state_dict["last_batch_iteration"]) + 1
            for g, lam, base in zip(self.optimizer.param_groups, self.lr_lambdas, self.base_lrs):
                g["lr"] = base * lam(self.last_epoch)
            self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            return
        super().load_state_dict(state_dict)


def schedule_fn(ocfg):
    """The schedule's lr(u) / peak for optim.* (config validation has checked the name)."""
    if ocfg.schedule == "tri_stage":
        return TriStage(ocfg.total_steps, tuple(ocfg.tri_stage_ratios), ocfg.tri_stage_init_scale,
                        ocfg.tri_stage_final_scale)
    return WarmupCosine(ocfg.total_steps, ocfg.warmup_steps, ocfg.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg):
    """The scheduler for optim.schedule: update k runs at schedule_fn(ocfg)(k - 1) x optim.lr."""
    return UpdateLR(optimizer, schedule_fn(ocfg))


def fairseq_adam_eps(eps: float, beta2: float, t: int) -> float:
    """The eps that makes torch's AdamW step t (1-based) equal fairseq's Adam step t.

    fairseq (fairseq/optim/adam.py):  p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    torch AdamW:                      p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')
    The two are equal for eps' = eps / sqrt(1 - b2^t): up to 1 / sqrt(1 - b2) larger than eps at
    t = 1 (4.5x for b2 = 0.95), -> eps as t grows."""
    return eps / math.sqrt(1.0 - beta2 ** t)
