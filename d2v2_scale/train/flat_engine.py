"""A data-parallel engine over one contiguous gradient buffer (`parallel.engine=flat`).

DeepSpeed's ZeRO-0/1/2 engines do per-parameter host work every update: ZeRO-1/2's backward
hooks copy each gradient into a reduction bucket (`view`, `detach`, `copy_` per parameter) and
its step flattens, norms and unflattens per tensor; ZeRO-0 hands the step to a per-tensor AdamW
and clips per tensor (docs/BENCHMARKS.md "Host work per update": 78 % of image-large's
operators).  On a GPU at the reference batch each of those operators is a launch the device
waits for.  This engine keeps the replicated (ZeRO-0) layout but lays the data out flat, the
approach of Megatron's DDP with a contiguous gradient buffer:

    params   p_i = flat_param[o_i : o_i + n_i].view(shape_i)   (compute dtype, grouped by
                                                                 weight-decay group)
    grads    p_i.grad = flat_grad[o_i : o_i + n_i].view(shape_i), set before the first
             backward, so autograd accumulates in place (one `add_` per parameter, its floor)
    main     fp32 gradient buffer = flat_grad itself in fp32 runs; in bf16 runs each
             micro-batch's bf16 buffer is added into it (2 operators), so accumulation and
             the all-reduce are in fp32
    update   one all-reduce (sum, then x 1/dp) of the main buffer; the norm of the buffer
             (TP-aware: tensors replicated across TP ranks are counted on TP rank 0, as
             DeepSpeed's `clip_grad_norm_`); one multiply by min(1, clip / (norm + 1e-6))
             (DeepSpeed's ZeRO-0 formula, no host sync); AdamW over ONE flat fp32 master per
             weight-decay group (as ZeRO-1/2's flat partitions, unsharded); in bf16 runs one
             copy of each master back into the compute-dtype buffer.

The operator count of an update is then independent of the parameter count except for
autograd's own per-parameter accumulation (tests/test_flat_engine.py bounds it).

It exposes the slice of DeepSpeed's engine interface the trainer uses (forward, backward, step,
the accumulation boundary, zero_grad, the grad norm, checkpoint save/load), and writes DeepSpeed's
ZeRO-0 file name for the module (`mp_rank_XX_model_states.pt`, key "module"), so `d2v2-export`
reads its checkpoints unchanged.  No ZeRO sharding and no pipeline parallelism (validated up
front in config/validation.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .safe_load import load as safe_load


class FileWriter:
    """Where the flat engine's checkpoint bytes go: shaped like DeepSpeed's checkpoint engine
    (`save(state_dict, path)`), so train/checkpoint.install_write_guard wraps both engines' writes
    the same way (a full disk: one line on every rank, no hang, nothing half-written kept)."""

    @staticmethod
    def save(state_dict, path) -> None:
        torch.save(state_dict, path)


class FlatEngine(torch.nn.Module):
    measures_grad_norm = True  # the trainer reads get_global_grad_norm() instead of measuring it

    def __init__(self, module: torch.nn.Module, groups: list[dict], clip_grad: float, grad_accum: int,
                 dp_group=None, mpu=None):
        """module: the student, on its device in the compute dtype.  groups: the weight-decay
        groups (`param_groups_for_weight_decay`); `param_groups` are the same groups over flat
        fp32 masters, for the caller's optimizer (then `attach`)."""
        super().__init__()
        self.module = module
        self.checkpoint_engine = FileWriter()  # train/checkpoint wraps its save (a full disk)
        self.clip_grad = float(clip_grad)
        self.gas = int(grad_accum)
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dist.is_initialized() else 1
        self.mpu = mpu
        self.micro_steps = 0
        self.global_steps = 0
        self.optimizer = None
        self.lr_scheduler = None
        self._grad_norm = None
        params = [p for g in groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is in two optimizer groups")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"parallel.engine=flat needs one parameter dtype, got {sorted(map(str, dtypes))}")
        dtype, device = params[0].dtype, params[0].device
        total = sum(p.numel() for p in params)
        self.params = params
        with torch.no_grad():
            self.flat_param = torch.empty(total, dtype=dtype, device=device)
            self.flat_grad = torch.zeros(total, dtype=dtype, device=device)
            off = 0
            self._offsets = []
            for p in params:
                n = p.numel()
                self.flat_param[off:off + n].copy_(p.data.reshape(-1))
                p.data = self.flat_param[off:off + n].view_as(p)
                self._offsets.append(off)
                off += n
        self.fp32 = dtype == torch.float32
        # fp32: the module's buffers are the masters and the main gradient; otherwise fp32 copies
        self.main_param = self.flat_param if self.fp32 else self.flat_param.float()
        self.main_grad = self.flat_grad if self.fp32 else torch.zeros(total, dtype=torch.float32, device=device)
        self.param_groups, self._masters, off = [], [], 0
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            # a Parameter made from a slice aliases the slice's storage: the optimizer updates
            # the flat buffer in place
            m = torch.nn.Parameter(self.main_param[off:off + n], requires_grad=True)
            self._masters.append((m, self.main_grad[off:off + n]))
            self.param_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [m]})
            off += n
        self._attach_grads()
        # the gradient norm counts a TP-replicated tensor once (TP rank 0), as DeepSpeed does
        from deepspeed.runtime.utils import is_model_parallel_parameter

        tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
        self._norm_views = None
        if tp_rank != 0:
            self._norm_views = [self.main_grad[o:o + p.numel()] for p, o in zip(params, self._offsets)
                                if is_model_parallel_parameter(p)]

    def attach(self, optimizer, lr_scheduler) -> None:
        """The optimizer built over `param_groups`, and its LR schedule."""
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

    def _attach_grads(self) -> None:
        # torch's zero_grad(set_to_none=True) drops .grad: put the views back (no operator)
        for p, o in zip(self.params, self._offsets):
            p.grad = self.flat_grad[o:o + p.numel()].view_as(p)
        for m, g in self._masters:
            m.grad = g

    @property
    def flat_grads(self) -> list[torch.Tensor]:
        """The reduced gradients, for the non-finite guard (guards.local_grads_nonfinite)."""
        return [self.main_grad]

    # ---- the engine interface the trainer uses ------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_optimization_stage(self) -> int:
        return 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gas == 0

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Accumulate this micro-batch's gradients; at the boundary, all-reduce them (mean over
        data parallelism).  The loss is divided by grad_accum, as DeepSpeed's backward does."""
        if self.gas > 1:
            loss = loss / self.gas
        if self.params[0].grad is None or self.params[0].grad.data_ptr() != self.flat_grad.data_ptr():
            self._attach_grads()
        loss.backward()
        if not self.fp32:
            self.main_grad.add_(self.flat_grad)
            self.flat_grad.zero_()
        if self.is_gradient_accumulation_boundary() and self.dp_size > 1:
            dist.all_reduce(self.main_grad, group=self.dp_group)
            self.main_grad.mul_(1.0 / self.dp_size)  # DeepSpeed ZeRO-0's postscale
        return loss

    def _norm(self) -> torch.Tensor:
        """0-d fp32: the global L2 norm of the gradients (TP-aware)."""
        if self._norm_views is None:
            sq = torch.linalg.vector_norm(self.main_grad).square()
        elif self._norm_views:
            sq = torch.stack(torch._foreach_norm(self._norm_views)).square().sum()
        else:
            sq = self.main_grad.new_zeros(())
        if self.mpu is not None and self.mpu.get_model_parallel_world_size() > 1:
            dist.all_reduce(sq, group=self.mpu.get_model_parallel_group())
        return sq.sqrt()

    def step(self) -> None:
        """At the boundary: clip, AdamW, LR step, zero the buffers.  Elsewhere: count the
        micro-batch (DeepSpeed's semantics)."""
        if not self.is_gradient_accumulation_boundary():
            self.micro_steps += 1
            return
        for m, g in self._masters:
            if m.grad is None:
                m.grad = g
        norm = self._norm()
        self._grad_norm = norm
        if self.clip_grad > 0:
            # no host sync: multiplying by 1 leaves the gradients as they are
            # (a tensor divided by a tensor, as DeepSpeed's `clip_grad_norm_`: `float / tensor`
            # is a reciprocal and a multiply, another rounding)
            self.main_grad.mul_(torch.clamp(norm.new_tensor(self.clip_grad) / (norm + 1e-6), max=1.0))
        self.optimizer.step()
        if not self.fp32:
            self.flat_param.copy_(self.main_param)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.zero_grad()
        self.global_steps += 1

    def zero_grad(self) -> None:
        """Drop the gathered gradients (after a step, or a skipped update) and restart the
        accumulation count."""
        self.flat_grad.zero_()
        if not self.fp32:
            self.main_grad.zero_()
        self.micro_steps = 0

    def get_global_grad_norm(self):
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    # ---- checkpoints ------------------------------------------------------------------------
    def _file(self, save_dir: str, tag: str) -> Path:
        mp = self.mpu.get_model_parallel_rank() if self.mpu is not None else 0
        return Path(save_dir) / tag / f"mp_rank_{mp:02d}_model_states.pt"

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None,
                        save_latest: bool = True) -> None:
        """Collective in the trainer's sense (every rank calls it); data-parallel rank 0 of each
        model-parallel rank writes the module, the fp32 masters (bf16 runs), the optimizer and
        the LR schedule, under a temp name then renamed."""
        f = self._file(save_dir, tag)
        f.parent.mkdir(parents=True, exist_ok=True)
        dp_rank = dist.get_rank(self.dp_group) if dist.is_initialized() else 0
        if dp_rank != 0:
            return
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "fp32_masters": None if self.fp32 else self.main_param.detach().clone(),
                 "global_steps": self.global_steps, "engine": "flat", **(client_state or {})}
        tmp = f.with_name(f.name + ".tmp")
        self.checkpoint_engine.save(state, tmp)
        if not tmp.exists():  # the write failed (a full disk): train/checkpoint reports it collectively
            return
        os.replace(tmp, f)
        if save_latest and (not dist.is_initialized() or dist.get_rank() == 0):
            latest = Path(save_dir) / "latest"
            tmp = latest.with_name("latest.tmp")
            tmp.write_text(tag)
            os.replace(tmp, latest)

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True):
        f = self._file(load_dir, tag)
        if not f.is_file():
            return None, None
        state = safe_load(f, map_location=self.flat_param.device)
        if state.get("engine") != "flat":
            raise ValueError(f"{f} was not written by parallel.engine=flat (DeepSpeed's engine wrote it): resume "
                             f"with the engine that wrote it")
        self.module.load_state_dict(state["module"], strict=load_module_strict)
        with torch.no_grad():
            if not self.fp32:
                self.main_param.copy_(state["fp32_masters"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps = state["global_steps"]
        self.zero_grad()
        return str(f.parent), state
