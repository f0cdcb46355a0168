"""Teacher = EMA of the student (docs/REFERENCE.md §1.4), single-process version.

The decay anneals linearly from `ema.decay` to `ema.end_decay` over `ema.anneal_end_step`
updates, then stays at `end_decay`:

    decay(t) = end - (end - start) * (1 - t / T)    for t < T,   end  otherwise.

The update runs after every optimizer step and is skipped once decay == 1 (the teacher is then
frozen).  Teacher and student parameters are matched BY NAME (the model's name contract: a
teacher parameter has exactly the name of the student parameter it tracks); the EMA math is done
in fp32 on master weights.  The ZeRO-3 sharded EMA (d2v2_scale/train/) uses the same schedule
and the same name matching.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, start: float, end: float, anneal_end_step: int) -> float:
    """Decay to use for the EMA update after optimizer update number `step` (0-based)."""
    if anneal_end_step <= 0 or step >= anneal_end_step:
        return float(end)
    return float(end - (end - start) * (1.0 - step / anneal_end_step))


def ema_decay_from_cfg(cfg, step: int) -> float:
    e = cfg.ema
    return ema_decay(step, e.decay, e.end_decay, e.anneal_end_step)


def matched_params(teacher: nn.Module, student: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, teacher_param, student_param)] for every teacher parameter, matched by name.

    Raises if a teacher parameter has no student counterpart or the shapes differ: a silent
    mismatch would train a teacher that tracks nothing."""
    sp = dict(student.named_parameters())
    out = []
    for name, tp in teacher.named_parameters():
        if name not in sp:
            raise KeyError(f"teacher parameter {name!r} has no student parameter of the same name")
        if sp[name].shape != tp.shape:
            raise ValueError(f"teacher {name} {tuple(tp.shape)} != student {tuple(sp[name].shape)}")
        out.append((name, tp, sp[name]))
    return out


@torch.no_grad()
def init_teacher_from_student(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's weights into the teacher (name-matched); freeze the teacher."""
    for _, t, s in matched_params(teacher, student):
        t.copy_(s)
        t.requires_grad_(False)
    teacher.eval()


def copied(name: str, copy: tuple[str, ...]) -> bool:
    """Is teacher parameter `name` in a "copy, don't average" group (prefixes `copy`)?"""
    return bool(copy) and name.startswith(tuple(copy))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, copy: tuple[str, ...] = ()) -> bool:
    """teacher <- decay * teacher + (1 - decay) * student, in fp32; parameters whose names start
    with a prefix in `copy` are copied from the student instead (data2vec 1.0's `skip_keys`, e.g.
    the speech positional conv).  Returns False (and does nothing) when decay >= 1."""
    if decay >= 1.0:
        return False
    for name, t, s in matched_params(teacher, student):
        if copied(name, copy):
            t.copy_(s.detach())
        elif t.dtype == torch.float32:
            t.mul_(decay).add_(s.detach().float(), alpha=1.0 - decay)
        else:  # low-precision teacher copy: do the math in fp32, then cast once
            t.copy_(t.float().mul_(decay).add_(s.detach().float(), alpha=1.0 - decay))
    return True


class ModuleEma:
    """The EMA of a plain (non-DeepSpeed) teacher module, with its step counter: call
    `step(student)` after every optimizer update.  Single-process use and tests; the trainer's
    teacher (fp32 masters, ZeRO, TP) is train/teacher.py's EmaTeacher."""

    def __init__(self, teacher: nn.Module, cfg, copy: tuple[str, ...] = ()):
        self.teacher = teacher
        self.cfg = cfg
        self.copy = tuple(copy)
        self.num_updates = 0

    def decay(self) -> float:
        return ema_decay_from_cfg(self.cfg, self.num_updates)

    def step(self, student: nn.Module) -> float:
        d = self.decay()
        ema_update(self.teacher, student, d, self.copy)
        self.num_updates += 1
        return d
