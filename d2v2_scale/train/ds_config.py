"""The DeepSpeed JSON config a run uses, derived from the typed config.

The harness owns the settings that must agree with the rest of the run (batch sizes, precision,
ZeRO stage, clipping); a user JSON (`parallel.ds_config`, e.g. one of `ds_configs/*.json`) may add
everything else (bucket sizes, offload, comms tuning).  Where the user JSON sets one of the
harness's keys to a different value, that is an error naming the key, not a silent override.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig


def use_bf16(cfg: RunConfig) -> bool:
    p = cfg.parallel.precision
    return p == "bf16" or (p == "auto" and torch.cuda.is_available())


def _harness_keys(cfg: RunConfig, dp_size: int) -> dict:
    p, o = cfg.parallel, cfg.optim
    micro, accum = cfg.data.batch_size, o.grad_accum
    if p.pp > 1:
        # The pipeline schedule runs all micro-batches of an update before DeepSpeed sees the
        # gradients: to the engine, one update is one (large) micro-batch.
        micro, accum = micro * accum, 1
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        if p.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * dp_size,
        "gradient_clipping": float(o.clip_grad),
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
    }


_DEFAULTS = {
    "steps_per_print": 10**9,  # the harness prints its own line
    "wall_clock_breakdown": False,
    "zero_allow_untested_optimizer": True,  # the client AdamW
}


def _check_agree(user: dict, ours: dict, path: str, src: str) -> None:
    for k, v in ours.items():
        if k not in user:
            continue
        if isinstance(v, dict) and isinstance(user[k], dict):
            _check_agree(user[k], v, f"{path}{k}.", src)
        elif user[k] != v and not (k == "gradient_clipping" and float(user[k]) == float(v)):
            raise ConfigError(
                f"{src} sets {path}{k}={user[k]!r} but the run's config gives {v!r}; the harness owns this "
                f"key (set it through the run config, e.g. data.batch_size / optim.grad_accum / optim.clip_grad / "
                f"parallel.precision / parallel.zero_stage) or delete it from {src}")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def student_ds_config(cfg: RunConfig, dp_size: int) -> dict:
    ours = _harness_keys(cfg, dp_size)
    defaults = dict(_DEFAULTS)
    if cfg.parallel.zero_stage == 3:
        # gather layer by layer (teacher and student forwards fetch parameters block by block)
        # memory_efficient_linear off: zero.Init would replace torch.nn.functional.linear for the
        # whole process with a version that adds the bias after the matmul (two roundings), so the
        # torch Linears (decoder projection, audio projection: non-zero biases at the reference
        # init, docs/REFERENCE.md §1.10 D9) computed other bf16 numbers than under ZeRO-0/1/2 (measured: first
        # loss 14.09796 vs 14.09918).  The Megatron blocks never used it.
        defaults["zero_optimization"] = {"stage3_prefetch_bucket_size": 50_000_000,
                                         "stage3_max_live_parameters": 1_000_000_000,
                                         "memory_efficient_linear": False}
    user: dict = {}
    if cfg.parallel.ds_config:
        path = Path(cfg.parallel.ds_config)
        if not path.is_file():
            raise ConfigError(f"parallel.ds_config={path} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"parallel.ds_config={path} is not valid JSON: {e}") from None
        for k in ("optimizer", "scheduler"):
            if k in user:
                raise ConfigError(f"{path} has an '{k}' section; the harness builds AdamW and the warmup+cosine "
                                  f"schedule from optim.*: delete '{k}' from the JSON")
        _check_agree(user, ours, "", str(path))
    merged = _merge(_merge(defaults, user), ours)
    if offloads_optimizer(merged) and not torch.cuda.is_available():
        # ZeRO-Offload wants DeepSpeedCPUAdam (JIT-compiled C++ with g++, minutes on first use);
        # on a CPU-only machine every tensor is on the host already, so the client torch AdamW
        # does the same work: allow it instead of failing (the trainer picks DeepSpeedCPUAdam on GPU).
        merged.setdefault("zero_force_ds_cpu_optimizer", False)
    if cfg.parallel.zero_stage == 3 and cfg.model.activation_checkpointing == "full":
        # ZeRO-3 prefetches parameters in the order it traced in the first step; the backward
        # recompute of fully checkpointed blocks breaks that order, and with the teacher's forward
        # nested in the student's, the next step fails with a student parameter left INFLIGHT
        # (`assert param.ds_status == ZeroParamStatus.AVAILABLE`, deepspeed 0.19.8, measured).
        # Fetch on demand instead: correct, and on a GPU it only loses the comm/compute overlap.
        zo = merged["zero_optimization"]
        if zo.get("stage3_prefetch_bucket_size", 1):
            if user.get("zero_optimization", {}).get("stage3_prefetch_bucket_size"):
                warnings.warn(f"{cfg.parallel.ds_config}: stage3_prefetch_bucket_size set to 0 because "
                              f"model.activation_checkpointing=full under ZeRO-3 (see d2v2_scale/train/ds_config.py)")
            zo["stage3_prefetch_bucket_size"] = 0
    return merged


def offloads_optimizer(ds_cfg: dict) -> bool:
    """Does this DeepSpeed config offload the optimizer state to the host (ZeRO-Offload)?"""
    off = ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def teacher_ds_config(student_cfg: dict) -> dict:
    """The teacher engine: same precision and ZeRO stage, no optimizer, and no persisted
    parameters, so that every teacher parameter lives only as its shard (`ds_tensor`) between
    forwards and a shard-local EMA write is what the next forward gathers."""
    zero = dict(student_cfg["zero_optimization"])
    zero.pop("offload_optimizer", None)
    if zero.get("stage") == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "model_persistence_threshold": 0})
    return {
        "train_micro_batch_size_per_gpu": student_cfg["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "bf16": student_cfg["bf16"],
        "zero_optimization": zero,
        **_DEFAULTS,
    }
