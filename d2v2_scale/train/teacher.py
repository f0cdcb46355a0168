"""The EMA teacher during training: sharded under ZeRO-3, a plain fp32 EMA otherwise.

Under ZeRO-3 the teacher is built under `deepspeed.zero.Init` with the student's data-parallel
group, so every teacher parameter is partitioned exactly like the student parameter of the same
name (ZeRO-3 partitions each parameter on its own: same shape + same group = same slice).  The
EMA update is then shard-local, with no communication:

    master_t <- d * master_t + (1 - d) * fp32_master_shard(student)      (fp32, [numel / dp])
    master_t <- fp32_master_shard(student)          (the `copy` prefixes: data2vec 1.0 skip keys)
    teacher.ds_tensor <- master_t                                       (training dtype)

and the next teacher forward gathers the updated shards layer by layer like any ZeRO-3 forward.
Without ZeRO-3 the teacher is a replicated module with fp32 master copies of its parameters.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.utils import safe_get_local_fp32_param

from ..model.core.ema import copied


def _zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


class EmaTeacher:
    """Owns the teacher module (or engine), its fp32 master weights and the EMA update.

    `student` is the DeepSpeed engine of the student; teacher parameters are matched to the
    student's by name (the model's contract).
    """

    def __init__(self, teacher_module: torch.nn.Module, student_engine, ds_config: dict, zero3: bool,
                 dtype: torch.dtype, mpu=None, copy: tuple[str, ...] = ()):
        self.zero3 = zero3
        # "copy, don't average": parameters under these name prefixes take the student's values
        # at every update (data2vec 1.0's speech positional conv); shard-local like the EMA
        self.copy = tuple(copy)
        self.dtype = dtype
        self.student = student_engine
        if zero3:
            # mpu: with TP > 1 the engine's data-parallel group must be the student's, not the world
            self.engine, *_ = deepspeed.initialize(model=teacher_module, config=ds_config, mpu=mpu)
            self.module = self.engine.module
        else:
            self.module = teacher_module.to(dtype=dtype)
            self.engine = None
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        student_params = dict(student_engine.module.named_parameters())
        self.pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]] = []
        for name, t in self.module.named_parameters():
            if name not in student_params:
                raise KeyError(f"teacher parameter {name!r} has no student parameter of the same name")
            self.pairs.append((name, t, student_params[name]))
        self.master: dict[str, torch.Tensor] = {}
        self.copy_from_student()

    # ---- the forward the student calls ----------------------------------------------------
    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            if self.engine is not None:
                return self.engine(*args, **kwargs)
            return self.module(*args, **kwargs)

    # ---- EMA ------------------------------------------------------------------------------
    def _student_fp32(self, s: torch.nn.Parameter) -> torch.Tensor:
        """The student's fp32 weights, shard-local under ZeRO-3 (`[numel_local]`)."""
        if self.zero3:
            return safe_get_local_fp32_param(s).view(-1)
        return s.detach().float()

    def _local(self, t: torch.nn.Parameter) -> torch.Tensor:
        return t.ds_tensor.data if self.zero3 else t.data

    def _release_gathered(self) -> None:
        """Drop every gathered full copy of the teacher's parameters before writing shards.

        ZeRO-3 releases a module's parameters in its post-forward hook, but some stay gathered
        after a no-grad forward: Megatron's linear layers return their bias (skip_bias_add) to
        the caller, and such 'external' parameters of a module run without grad are never
        released (DeepSpeed's `partition_all_parameters` docstring).  The next forward would then
        use that stale full copy instead of gathering the EMA-updated shard.  The student is not
        affected: its optimizer step partitions all its parameters."""
        if self.zero3:
            self.engine.optimizer.partition_all_parameters()

    @torch.no_grad()
    def copy_from_student(self) -> None:
        """Teacher := student (start of training)."""
        self._release_gathered()
        for name, t, s in self.pairs:
            src = self._student_fp32(s) if (not self.zero3 or s.requires_grad) else self._local(s).float()
            self.master[name] = src.clone().view_as(self._local(t)) if self.zero3 else src.clone()
            self._local(t).copy_(self.master[name])

    @torch.no_grad()
    def set_masters(self, weights: dict[str, torch.Tensor], dp_rank: int) -> None:
        """Teacher := given fp32 weights (an imported EMA teacher), each as this TP rank holds the
        parameter; under ZeRO-3 this rank keeps its flat slice (the same cut as the student's)."""
        self._release_gathered()
        for name, t, _ in self.pairs:
            w = weights[name].float().reshape(-1)
            if self.zero3:
                n = t.ds_tensor.numel()
                part = w[dp_rank * n:(dp_rank + 1) * n]
                w = torch.cat([part, part.new_zeros(n - part.numel())])  # the last shard's padding
            self.master[name].copy_(w.view_as(self.master[name]))
            self._local(t).copy_(self.master[name])

    def _ema_lists(self) -> tuple[list[torch.Tensor], ...]:
        """(averaged masters, their student fp32 sources, copied masters (the `copy` prefixes), their
        sources, all masters, teacher storage) in `pairs` order, built once.  They alias storage
        that lives as long as the engines (the student's parameters or fp32 partitions, the
        teacher's parameters or shards), so an update is a few multi-tensor operations instead of
        a handful of operators per tensor.  Rebuilt after a checkpoint load, and whenever a student
        parameter's storage moved (ZeRO-0/1/2)."""
        # a bf16 student module (ZeRO-0/1/2) has no fp32 alias: `_student_fp32` makes fresh fp32
        # copies, so the lists are made again at every update there
        aliased = self.zero3 or all(s.dtype == torch.float32 for _, _, s in self.pairs)
        ptrs = None if self.zero3 else [s.data_ptr() for _, _, s in self.pairs]
        if getattr(self, "_lists", None) is None or not aliased or ptrs != self._list_ptrs:
            masters = [self.master[name] for name, _, _ in self.pairs]
            sources = [self._student_fp32(s).view_as(m) for (_, _, s), m in zip(self.pairs, masters)]
            avg = [not copied(name, self.copy) for name, _, _ in self.pairs]
            self._lists = ([m for m, a in zip(masters, avg) if a], [x for x, a in zip(sources, avg) if a],
                           [m for m, a in zip(masters, avg) if not a], [x for x, a in zip(sources, avg) if not a],
                           masters, [self._local(t) for _, t, _ in self.pairs])
            self._list_ptrs = ptrs
        return self._lists

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step; skipped (by the caller) once decay == 1.  Bitwise the per-tensor
        `m.mul_(d).add_(s, alpha=1 - d)` it replaces."""
        self._release_gathered()
        avg, avg_src, cop, cop_src, masters, local = self._ema_lists()
        if avg:
            torch._foreach_mul_(avg, decay)
            torch._foreach_add_(avg, avg_src, alpha=1.0 - decay)
        if cop:
            torch._foreach_copy_(cop, cop_src)
        torch._foreach_copy_(local, masters)

    # ---- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's fp32 masters.  Under ZeRO-3 each entry is this rank's flat shard; `meta`
        records each parameter's full shape so an exporter can reassemble shards."""
        meta = {}
        if self.zero3:
            meta = {name: {"shape": list(t.ds_shape), "numel": int(t.ds_numel),
                           "partition_numel": int(t.ds_tensor.numel())} for name, t, _ in self.pairs}
        return {"master": {k: v.clone() for k, v in self.master.items()}, "zero3": self.zero3, "meta": meta}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if bool(sd["zero3"]) != self.zero3:
            raise ValueError("checkpoint teacher was saved with a different ZeRO stage family (3 vs 0-2); "
                             "resume with the same parallel.zero_stage")
        self._release_gathered()
        self._lists = None
        for name, t, _ in self.pairs:
            if name not in sd["master"]:
                raise KeyError(f"checkpoint has no teacher master weight for {name!r}")
            self.master[name].copy_(sd["master"][name])
            self._local(t).copy_(self.master[name])

    @torch.no_grad()
    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 teacher weights on every rank (all-gather under ZeRO-3: for tests/export)."""
        out = {}
        for name, t, _ in self.pairs:
            if self.zero3:
                with deepspeed.zero.GatheredParameters([t]):
                    out[name] = t.data.detach().float().clone()
            else:
                out[name] = self.master[name].clone()
        return out
