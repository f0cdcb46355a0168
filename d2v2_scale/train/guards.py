"""Guards that stop a run from silently burning GPU hours.

* Non-finite loss or gradient: the step is skipped on every rank (no update, no EMA, no LR
  step) and counted; K in a row stop the run with a checkpoint of the last good weights.
* Collapse (spec section 6): after `collapse_after_steps` updates, target variance below
  `min_target_var` or prediction variance below `min_pred_var` stops the run with a checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..config import GuardConfig


class TrainingStopped(RuntimeError):
    """Raised after the trainer saved a checkpoint and decided the run cannot go on."""


def any_rank_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def grads_nonfinite(engine, device: torch.device) -> bool:
    """True on every rank if any rank holds a non-finite gradient after backward.

    Under ZeRO-1/2/3 the reduced gradients live in the optimizer's partitions; DeepSpeed's own
    overflow check (the fp16 machinery, which bf16/fp32 runs do not call) reads them and agrees
    across ranks.  Without ZeRO the gradients are on the parameters.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() >= 1 and hasattr(opt, "has_overflow"):
        return bool(opt.has_overflow(partition_gradients=True))
    bad = False
    for p in engine.module.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad = True
            break
    return any_rank_true(bad, device)


class Guard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.consecutive_nonfinite = 0
        self.skipped_total = 0

    def record_skip(self) -> bool:
        """Count a skipped step; True if the run must stop."""
        self.consecutive_nonfinite += 1
        self.skipped_total += 1
        return self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite

    def record_ok(self) -> None:
        self.consecutive_nonfinite = 0

    def collapse_reason(self, step: int, target_var: float, pred_var: float) -> str | None:
        c = self.cfg
        if not c.collapse_check or step < c.collapse_after_steps:
            return None
        if not math.isfinite(target_var) or target_var < c.min_target_var:
            return (f"target variance {target_var:.4g} < guards.min_target_var={c.min_target_var} after {step} "
                    f"updates: the teacher's representations collapsed")
        if not math.isfinite(pred_var) or pred_var < c.min_pred_var:
            return (f"prediction variance {pred_var:.4g} < guards.min_pred_var={c.min_pred_var} after {step} "
                    f"updates: the student's predictions collapsed")
        return None

    def state_dict(self) -> dict:
        return {"consecutive_nonfinite": self.consecutive_nonfinite, "skipped_total": self.skipped_total}

    def load_state_dict(self, d: dict) -> None:
        self.consecutive_nonfinite = d["consecutive_nonfinite"]
        self.skipped_total = d["skipped_total"]
