"""Bodies for the scale-out tests (tensor parallelism through training, activation checkpointing,
DeepSpeed JSON configs), run in N processes by d2v2_scale.testing.run_distributed."""

from __future__ import annotations


from d2v2_scale.testing import save_result
from tests.dist_bodies_train import _trainer, ema_check


def fit_body(preset: str, *overrides: str):
    """fit(); every rank returns its losses and layout (the logged loss is the DP mean)."""
    tr = _trainer(preset, overrides)
    out = tr.fit()
    i = tr.info
    save_result({"losses": out["losses"], "step": tr.step, "grad_norm": out["last"].get("opt/grad_norm"),
                 "skipped": tr.guard.skipped_total, "last": out["last"],
                 "tp": [i.tp_rank, i.tp_size], "dp": [i.dp_rank, i.dp_size],
                 "ds_zero": tr.ds_cfg["zero_optimization"]})


def fit_ema_body(preset: str, *overrides: str):
    """fit(), then the sharded-EMA check on the trained teacher."""
    tr = _trainer(preset, overrides)
    out = tr.fit()
    i = tr.info
    res = {"losses": out["losses"], "step": tr.step, "grad_norm": out["last"].get("opt/grad_norm"),
           "tp": [i.tp_rank, i.tp_size], "dp": [i.dp_rank, i.dp_size]}
    if tr.teacher.zero3:
        res["ema"] = ema_check(tr)
    save_result(res)


def modes_body(modes: str, preset: str, *overrides: str):
    """One process group, one Trainer per activation-checkpointing mode (comma list), each trained
    from the same seed on the same data: returns {mode: losses}.  Saves a process start per mode."""
    sweep_body(",".join(f"model.activation_checkpointing={m}" for m in modes.split(",")), preset, *overrides,
               label=lambda v: v.split("=", 1)[1])


def copied_gap(tr) -> float:
    """Max |teacher - student| over the teacher's "copy, don't average" parameters (gathered
    under ZeRO-3); 0.0 when they were copied at the last update."""
    import deepspeed

    gap = 0.0
    for name, t, s in tr.teacher.pairs:
        if name.startswith(tr.teacher.copy or ("\0",)):
            with deepspeed.zero.GatheredParameters([t, s]) if tr.teacher.zero3 else _Null():
                gap = max(gap, float((t.data.float() - s.data.float()).abs().max()))
    return gap


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _close(tr) -> None:
    import gc

    tr.engine.destroy()
    if tr.teacher.engine is not None:
        tr.teacher.engine.destroy()
    if tr.loader is not None:
        tr.loader.close()
    gc.collect()


def sweep_body(variants: str, preset: str, *overrides: str, label=lambda v: v, ema: bool = False):
    """One process group, one Trainer per variant (comma list of `key=value[+key=value]`:
    activation-checkpointing modes, ZeRO stages, ...), each trained from the same seed on the same
    data: returns {variant: losses} and, for teachers with copied parts, {variant + ":copied_gap":
    copied_gap}; with `ema`, for ZeRO-3 variants, {variant + ":ema": ema_check} too.  Saves a
    process start per variant."""
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    res = {}
    for i, variant in enumerate(variants.split(",")):
        ov = [o for o in overrides if not o.startswith("output_dir=")]
        tr = _trainer(preset, [*ov, f"output_dir={out_dir}/v{i}", *variant.split("+")])
        res[label(variant)] = tr.fit()["losses"]
        if tr.teacher.copy:
            res[label(variant) + ":copied_gap"] = copied_gap(tr)
        if ema and tr.teacher.zero3:
            res[label(variant) + ":ema"] = ema_check(tr)
        _close(tr)
        del tr
    save_result(res)


def sweep_ema_body(variants: str, preset: str, *overrides: str):
    """sweep_body, plus the sharded-EMA check (ema_check: one update at decay 0.5 on the shards vs
    on gathered weights) after the ZeRO-3 variants' runs; for teachers without copied parts."""
    sweep_body(variants, preset, *overrides, ema=True)


def resume_body(every: str, preset: str, *overrides: str):
    """fit() to max_steps with a checkpoint every `every` steps; then, in the same processes, a
    new Trainer resumes from the first checkpoint and fits to max_steps again: returns both loss
    lists (the resumed one must equal the uninterrupted one's tail, bitwise on CPU)."""
    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    ov = [o for o in overrides if not o.startswith("output_dir=")]
    ckpt = [f"checkpoint.every_steps={every}", "checkpoint.keep_last=10"]
    tr = _trainer(preset, [*ov, *ckpt, f"output_dir={out_dir}/full"])
    full = tr.fit()["losses"]
    _close(tr)
    del tr
    first = f"{out_dir}/full/checkpoints/step_{int(every):08d}"
    resumed = _trainer(preset, [*ov, *ckpt, f"output_dir={out_dir}/resumed", f"checkpoint.resume={first}"])
    save_result({"full": full, "resumed": resumed.fit()["losses"]})


def tp_dropout_body():
    """TP=2: the same q/k/v through attention with dropout on both TP ranks.  Returns whether the
    outputs (dropout masks) differ between the ranks and the default generator's next draws
    (which must stay identical on both: replicated tensors use it)."""
    import types

    import torch
    import torch.distributed as dist

    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.model.core.attention import SDPACoreAttention
    from d2v2_scale.model.core.tp_random import TP_RANDOM

    info = init_distributed(tp=2)
    torch.manual_seed(0)
    TP_RANDOM.seed(0, info.tp_rank, info.tp_size)
    attn = SDPACoreAttention(types.SimpleNamespace(attention_dropout=0.5)).train()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(16, 2, 2, 8, generator=g) for _ in range(3))  # [T, B, h, d]
    out = attn(q, k, v, None)
    both = [torch.empty_like(out) for _ in range(2)]
    dist.all_gather(both, out)
    TP_RANDOM.seed(0, 0, 1)  # off: the plain default generator on both ranks
    torch.manual_seed(0)
    off = attn(q, k, v, None)
    off_both = [torch.empty_like(off) for _ in range(2)]
    dist.all_gather(off_both, off)
    save_result({"differ_on": not torch.equal(both[0], both[1]), "differ_off": not torch.equal(*off_both),
                 "next_default": torch.rand(4).tolist()})


def fit_presets_body(*specs: str):
    """One process group, one Trainer per `preset|output_dir|override[|override...]` spec, trained
    in turn (the hf export tests: a few updates of each tiny model).  Saves a process start per
    preset."""
    res = {}
    for spec in specs:
        preset, out_dir, *ov = spec.split("|")
        tr = _trainer(preset, [*ov, f"output_dir={out_dir}"])
        res[preset] = tr.fit()["losses"]
        _close(tr)
        del tr
    save_result(res)
