"""Bodies for the training tests, run in N processes by d2v2_scale.testing.run_distributed.

Each takes its overrides as `key=value` strings and hands back what the test compares."""

from __future__ import annotations


import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result


def _trainer(preset: str, overrides: list[str], build_data: bool = True):
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(preset, overrides=list(overrides))
    return Trainer(cfg, build_data=build_data)


def fit_body(preset: str, *overrides: str):
    """Train with fit(); return the loss per step and the last logged scalars."""
    tr = _trainer(preset, overrides)
    out = tr.fit()
    save_result({"losses": out["losses"], "last": out["last"], "step": tr.step,
                 "skipped": tr.guard.skipped_total})


def stop_body(preset: str, *overrides: str):
    """Train with fit() until a guard stops the run; return why and where."""
    from d2v2_scale.train.trainer import TrainingStopped

    tr = _trainer(preset, overrides)
    stopped = None
    try:
        tr.fit()
    except TrainingStopped as e:
        stopped = str(e)
    save_result({"step": tr.step, "stopped": stopped})


def ema_check(tr) -> dict:
    """The shard-local EMA vs the same update computed on gathered weights.

    Per rank: with TP > 1 a 'gathered' parameter is this TP rank's slice, reassembled over the
    data-parallel group.  Decay 0.5 is a large step: a stale gathered copy (the bug this guards
    against) would be off by half the student-teacher gap."""
    import deepspeed

    def gathered(params):
        out = {}
        for n, p in params:
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.data.detach().clone().double()
        return out

    pairs = tr.teacher.pairs
    t0 = gathered((n, t) for n, t, _ in pairs)
    s = gathered((n, s) for n, _, s in pairs)
    sharded = sum(1 for _, t, _ in pairs if t.ds_tensor.numel() < t.ds_numel)
    d = 0.5
    tr.teacher.update(d)
    t1 = gathered((n, t) for n, t, _ in pairs)
    err = max(float((t1[n] - (d * t0[n] + (1 - d) * s[n])).abs().max()) for n in t0)
    moved = max(float((t1[n] - t0[n]).abs().max()) for n in t0)
    return {"err": err, "moved": moved, "sharded": sharded, "n": len(t0),
            "shapes": {n: list(t1[n].shape) for n in t1}}


def ema_body(*overrides: str):
    """Train 3 updates (student and teacher move apart), then the sharded-EMA check."""
    tr = _trainer("image-tiny", overrides)
    it = iter(tr.loader)
    for _ in range(3):
        tr.train_step([next(it)])
    save_result(ema_check(tr))


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward blows up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def nan_body(inject_at: str, count: str, where: str, *overrides: str):
    """Poison `count` consecutive updates from `inject_at`: the loss ("loss") or only the
    gradients ("grad", the loss stays finite); then fit()."""
    from d2v2_scale.train.guards import TrainingStopped

    tr = _trainer("image-tiny", overrides)
    first, n = int(inject_at), int(count)
    fwd = tr.engine.module.forward

    def poisoned(batch, teacher=None):
        loss, stats = fwd(batch, teacher=teacher)
        if first <= tr.step + 1 < first + n:
            loss = loss * float("nan") if where == "loss" else _NanGrad.apply(loss)
        return loss, stats

    tr.engine.module.forward = poisoned
    stopped = None
    try:
        tr.fit()
    except TrainingStopped as e:
        stopped = str(e)
    finite = all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
                 for p in tr.engine.module.parameters())
    save_result({"step": tr.step, "updates": tr.updates, "skipped": tr.guard.skipped_total, "stopped": stopped,
                 "params_finite": finite})
