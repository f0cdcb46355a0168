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
