"""Bodies for the scale-out tests (tensor parallelism through training, activation checkpointing,
DeepSpeed JSON configs), run in N processes by d2v2_scale.testing.run_distributed."""

from __future__ import annotations

import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result


def _trainer(preset: str, overrides, build_data: bool = True):
    from d2v2_scale.train.trainer import Trainer

    return Trainer(build_config(preset, overrides=list(overrides)), build_data=build_data)


def fit_body(preset: str, *overrides: str):
    """fit(); every rank returns its losses and layout (the logged loss is the DP mean)."""
    tr = _trainer(preset, overrides)
    out = tr.fit()
    i = tr.info
    save_result({"losses": out["losses"], "step": tr.step, "grad_norm": out["last"].get("opt/grad_norm"),
                 "tp": [i.tp_rank, i.tp_size], "dp": [i.dp_rank, i.dp_size],
                 "ds_zero": tr.ds_cfg["zero_optimization"]})


def _ema_check(tr) -> dict:
    """The shard-local EMA vs the same update on gathered weights (per rank: with TP > 1 a
    'gathered' parameter is this TP rank's slice, reassembled over the data-parallel group)."""
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
    d = 0.5
    tr.teacher.update(d)
    t1 = gathered((n, t) for n, t, _ in pairs)
    err = max(float((t1[n] - (d * t0[n] + (1 - d) * s[n])).abs().max()) for n in t0)
    moved = max(float((t1[n] - t0[n]).abs().max()) for n in t0)
    # a TP-split weight must be this rank's slice: its first dim (column-parallel) or second
    # (row-parallel) is half the full model's
    shapes = {n: list(t1[n].shape) for n in t1}
    return {"err": err, "moved": moved, "shapes": shapes}


def fit_ema_body(preset: str, *overrides: str):
    """fit(), then the sharded-EMA check on the trained teacher."""
    tr = _trainer(preset, overrides)
    out = tr.fit()
    i = tr.info
    res = {"losses": out["losses"], "step": tr.step, "grad_norm": out["last"].get("opt/grad_norm"),
           "tp": [i.tp_rank, i.tp_size], "dp": [i.dp_rank, i.dp_size]}
    if tr.teacher.zero3:
        res["ema"] = _ema_check(tr)
    save_result(res)


def modes_body(modes: str, preset: str, *overrides: str):
    """One process group, one Trainer per activation-checkpointing mode (comma list), each trained
    from the same seed on the same data: returns {mode: losses}.  Saves a process start per mode."""
    import gc

    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    res = {}
    for mode in modes.split(","):
        ov = [o for o in overrides if not o.startswith("output_dir=")]
        tr = _trainer(preset, [*ov, f"output_dir={out_dir}/{mode}", f"model.activation_checkpointing={mode}"])
        res[mode] = tr.fit()["losses"]
        tr.engine.destroy()
        if tr.teacher.engine is not None:
            tr.teacher.engine.destroy()
        del tr
        gc.collect()
    save_result(res)
