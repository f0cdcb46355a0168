"""Guards that stop a run from silently burning GPU hours.

* Non-finite loss or gradient: the step is skipped on every rank (no update, no EMA, no LR
  step) and counted; K in a row stop the run WITHOUT a new checkpoint: the weights then in memory
  (those of the last applied update) are what gave the non-finite steps (an LR of 1e6 leaves them
  finite but ~5e7 in size), so the checkpoints holding them are marked unhealthy and the message
  names the newest healthy one, which `--resume auto` then takes (docs/TRAINING.md, Guards).
* Collapse (docs/REFERENCE.md §1.6): after `collapse_after_steps` updates, target variance below
  `min_target_var` or prediction variance below `min_pred_var` stops the run with a checkpoint;
  so does, opt-in, a target position share above `max_target_position_share` (targets that
  have become a function of the position: their variance looks healthy).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..config import GuardConfig


class TrainingStopped(RuntimeError):
    """Raised after the trainer saved a checkpoint and decided the run cannot go on."""


def any_rank_true(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (a bool, or a 0-d device tensor: one host sync)."""
    t = (flag.reshape(1).to(device, torch.float32) if torch.is_tensor(flag)
         else torch.tensor([1.0 if flag else 0.0], device=device))
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool on the device: does any tensor hold a NaN or an Inf?  max |x| over all of them
    (NaN propagates through max) in one multi-tensor launch per dtype, rather than the handful
    of kernels per tensor that DeepSpeed's per-gradient check launches (measured: ~1,800 small
    launches per ViT-L step, host-bound on an H100)."""
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.nn.utils.get_total_norm(tensors, float("inf"), foreach=True).isfinite()


def local_grads_nonfinite(engine) -> torch.Tensor | None:
    """0-d device bool: does THIS rank hold a non-finite gradient after backward?  None where only
    DeepSpeed's own check can tell (it is collective): ZeRO-3, and optimizer offload.

    Under ZeRO-1/2 the reduced gradients are this rank's partitions (`averaged_gradients`).  Under
    ZeRO-3 DeepSpeed's overflow check is already one test of its flat gradient buffer, and with
    optimizer offload the partitions are on the host: there its check (the fp16 machinery, which
    bf16/fp32 runs do not call on their own) reads them and agrees across ranks.  Without ZeRO the
    gradients are on the parameters."""
    if getattr(engine, "flat_grads", None) is not None:  # parallel.engine=flat: one buffer
        return _any_nonfinite(engine.flat_grads)
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage in (1, 2) and not getattr(opt, "cpu_offload", False) and \
            isinstance(getattr(opt, "averaged_gradients", None), dict):
        return _any_nonfinite([g for gs in opt.averaged_gradients.values() if gs is not None
                               for g in gs if g is not None])
    if stage >= 1 and hasattr(opt, "has_overflow"):
        return None
    return _any_nonfinite([p.grad for p in engine.module.parameters() if p.grad is not None])


def grads_nonfinite(engine, device: torch.device) -> bool:
    """True on every rank if any rank holds a non-finite gradient after backward."""
    local = local_grads_nonfinite(engine)
    if local is None:
        return bool(engine.optimizer.has_overflow(partition_gradients=True))
    return any_rank_true(local, device)


class Guard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.consecutive_nonfinite = 0
        self.skipped_total = 0
        # the step of the last applied (finite) update: checkpoints written before it are known
        # healthy, those from it on hold the weights that a non-finite streak started from
        self.last_ok_step = 0

    def record_skip(self) -> bool:
        """Count a skipped step; True if the run must stop."""
        self.consecutive_nonfinite += 1
        self.skipped_total += 1
        return self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite

    def record_ok(self, step: int) -> None:
        self.consecutive_nonfinite = 0
        self.last_ok_step = step

    def collapse_reason(self, step: int, target_var: float, pred_var: float,
                        position_share: float = math.nan) -> str | None:
        c = self.cfg
        if not c.collapse_check or step < c.collapse_after_steps:
            return None
        if not math.isfinite(target_var) or target_var < c.min_target_var:
            return (f"target variance {target_var:.4g} < guards.min_target_var={c.min_target_var} after {step} "
                    f"updates: the teacher's representations collapsed")
        if not math.isfinite(pred_var) or pred_var < c.min_pred_var:
            return (f"prediction variance {pred_var:.4g} < guards.min_pred_var={c.min_pred_var} after {step} "
                    f"updates: the student's predictions collapsed")
        if c.max_target_position_share is not None and position_share > c.max_target_position_share:
            return (f"position alone explains {position_share:.3f} > guards.max_target_position_share="
                    f"{c.max_target_position_share} of the target variance after {step} updates: the teacher's "
                    f"targets collapsed to a function of the position (positional collapse)")
        return None

    def state_dict(self) -> dict:
        return {"consecutive_nonfinite": self.consecutive_nonfinite, "skipped_total": self.skipped_total,
                "last_ok_step": self.last_ok_step}

    def load_state_dict(self, d: dict, step: int = 0) -> None:
        self.consecutive_nonfinite = d["consecutive_nonfinite"]
        self.skipped_total = d["skipped_total"]
        # checkpoints written before the field: their own step, less the streak they were in
        self.last_ok_step = d.get("last_ok_step", step - self.consecutive_nonfinite)
