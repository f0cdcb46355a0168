"""Body for tests/test_plan.py: count the bytes of every torch.distributed collective during real
ZeRO training steps and hand them back with the planner's prediction for the same config."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from d2v2_scale.testing import save_result

# name -> which argument's size is the logical volume (full gathered / full reduced size)
_WRAP = {
    "all_gather_into_tensor": ("all_gather", 0),  # output (full)
    "_all_gather_base": ("all_gather", 0),
    "all_gather": ("all_gather", 0),  # list of outputs
    "all_gather_coalesced": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),  # input (full)
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter": ("reduce_scatter", 1),  # list of inputs
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "all_to_all_single": ("all_to_all", 0),
}

COUNTS: dict = {}
_DEPTH = [0]


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _wrap(name, kind, argi, fn):
    def wrapper(*a, **k):
        outer = _DEPTH[0] == 0
        _DEPTH[0] += 1
        try:
            if outer:
                arg = a[argi] if len(a) > argi else next(iter(k.values()), None)
                c = COUNTS.setdefault(kind, {"bytes": 0, "calls": 0})
                c["bytes"] += _nbytes(arg)
                c["calls"] += 1
            return fn(*a, **k)
        finally:
            _DEPTH[0] -= 1
    return wrapper


def install() -> None:
    """Wrap before any process group / DeepSpeed comm exists (DeepSpeed binds functions at init)."""
    for name, (kind, argi) in _WRAP.items():
        for mod in (dist, c10d):
            fn = getattr(mod, name, None)
            if fn is not None and not getattr(fn, "_d2v2_wrapped", False):
                w = _wrap(name, kind, argi, fn)
                w._d2v2_wrapped = True
                setattr(mod, name, w)


def comm_body(preset: str, warmup: str, steps: str, *overrides: str):
    install()
    from d2v2_scale.bench import synthetic_batch
    from d2v2_scale.config import build_config
    from d2v2_scale.plan import param_tables, predict_comm
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(preset, overrides=list(overrides))
    tr = Trainer(cfg, build_data=False)
    batch = synthetic_batch(cfg, seed=7 + tr.info.dp_rank)
    for _ in range(int(warmup)):
        tr.train_step([batch])
    COUNTS.clear()
    for _ in range(int(steps)):
        tr.train_step([batch])
    measured = {k: {"bytes": v["bytes"] / int(steps), "calls": v["calls"] / int(steps)} for k, v in COUNTS.items()}
    student, teacher = param_tables(cfg, tp=tr.info.tp_size)
    dtype_bytes = 2 if tr.dtype == torch.bfloat16 else 4
    zo = tr.ds_cfg.get("zero_optimization", {})
    pred = predict_comm(cfg, student, teacher, tr.info.dp_size, tr.info.tp_size, cfg.parallel.zero_stage,
                        dtype_bytes, persistence_threshold=int(zo.get("stage3_param_persistence_threshold", 100_000)),
                        max_reuse_distance=int(zo.get("stage3_max_reuse_distance", 1_000_000_000)))
    save_result({"measured": measured, "predicted": pred, "dp": tr.info.dp_size})


P2P: dict = {"bytes": 0, "calls": 0}


def install_p2p() -> None:
    """Count the floating-point tensors sent or received point-to-point (Megatron's p2p calls
    torch.distributed.isend/irecv by module attribute; the int64 shape messages are left out)."""
    def wrap(fn):
        def wrapper(tensor, *a, **k):
            # outermost call only: on CPU, c10d's isend re-enters itself through the
            # TorchFunctionMode that redirects Megatron's CUDA calls (compat.cuda_calls_on_cpu)
            if tensor.is_floating_point() and _DEPTH[0] == 0:
                P2P["bytes"] += tensor.numel() * tensor.element_size()
                P2P["calls"] += 1
            _DEPTH[0] += 1
            try:
                return fn(tensor, *a, **k)
            finally:
                _DEPTH[0] -= 1
        return wrapper

    # the same wrapper in both modules: P2POp checks `op in [isend, irecv]` against c10d's globals
    for name in ("isend", "irecv", "send", "recv"):
        w = wrap(getattr(c10d, name))
        setattr(c10d, name, w)
        setattr(dist, name, w)


def p2p_body(preset: str, steps: str, *overrides: str):
    """PP training steps on synthetic batches: bytes per update through the stage boundary vs
    the planner's `p2p_bytes` (send + receive of this rank)."""
    install_p2p()
    from d2v2_scale.bench import synthetic_batch
    from d2v2_scale.config import build_config
    from d2v2_scale.plan import p2p_bytes
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(preset, overrides=list(overrides))
    tr = Trainer(cfg, build_data=False)
    batches = [synthetic_batch(cfg, seed=7 + i) for i in range(cfg.optim.grad_accum)]
    tr.train_step(batches)
    P2P.update(bytes=0, calls=0)
    for _ in range(int(steps)):
        tr.train_step(batches)
    dtype_bytes = 2 if tr.dtype == torch.bfloat16 else 4
    save_result({"measured": P2P["bytes"] / int(steps),
                 "predicted": p2p_bytes(cfg, tr.info.tp_size, cfg.optim.grad_accum, dtype_bytes)})
