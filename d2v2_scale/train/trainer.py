"""The pretraining loop: batches -> student (+ teacher targets) -> loss -> DeepSpeed step -> EMA.

    trainer = Trainer(cfg)          # process groups, model, engines, loader, resume
    trainer.fit()                   # until cfg.steps; checkpoints, logs, guards

`Trainer.train_step(batch)` is one optimizer update (grad_accum micro-batches); tests drive it
directly.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from ..config import RunConfig, match_reference_batch
from ..data.loader import build_loader
from ..distributed import MegatronMPU, init_distributed
from ..model import build_student, build_teacher, param_groups_for_weight_decay, teacher_copied_prefixes
from ..model.core.ema import ema_decay_from_cfg
from ..model.core.tp_random import TP_RANDOM
from ..model.flops import train_step_flops
from . import checkpoint as ckpt
from . import preempt, safe_load
from . import run_record
from .ds_config import offloads_optimizer, student_ds_config, teacher_ds_config, use_bf16
from .flat_engine import FlatEngine
from .guards import Guard, TrainingStopped, any_rank_true, grads_nonfinite, local_grads_nonfinite
from .imported_run import load_run_import
from .metrics import Metrics, format_line
from .pipeline import mark_replicated, prune_to_stage, sum_replicated_grads, PipelineRunner
from .progress import Progress
from .schedules import build_scheduler, fairseq_adam_eps
from .teacher import EmaTeacher
from .trackers import WandbTracker


def _scalar_name(key: str) -> str:
    """Model stats -> TensorBoard names: loss -> loss/total, loss_cls -> loss/cls, x -> stats/x."""
    if key == "loss":
        return "loss/total"
    if key.startswith("loss_"):
        return "loss/" + key[5:]
    return key if "/" in key else "stats/" + key


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: RunConfig, build_data: bool = True):

        self.cfg = cfg
        self.info = info = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
        cfg.validate(world_size=info.world_size)
        match_reference_batch(cfg, info.world_size)  # optim.match_reference_batch: sets grad_accum
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.main = info.rank == 0
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")

        # ---- data first: a shard/preset mismatch fails before any model memory exists ----
        self.loader = None
        if build_data:

            self.loader = build_loader(cfg, dp_rank=info.dp_rank, dp_size=info.dp_size)

        # ---- model: the same seed on every rank, so every rank builds the same weights ----
        seed_everything(cfg.seed)

        TP_RANDOM.seed(cfg.seed, info.tp_rank, info.tp_size)  # attention dropout per TP slice
        zero3 = cfg.parallel.zero_stage == 3
        self.dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        ds_cfg = student_ds_config(cfg, info.dp_size)
        self.ds_cfg = ds_cfg
        dp_group = None
        from megatron.core import parallel_state as ps

        dp_group = ps.get_data_parallel_group()
        # Build whole, then partition: the model's init runs exactly as without ZeRO (same RNG
        # draws, so ZeRO-3 starts from the ZeRO-0 weights), and init code that touches weights
        # after a submodule's constructor never sees an already-partitioned tensor.  Peak memory
        # is one full fp32 copy per process on the host (ViT-H: 2.5 GB), freed by partitioning.
        student = build_student(cfg)
        teacher = build_teacher(cfg)
        # `d2v2-import --to-run`: a fairseq model to continue from, loaded before PP/ZeRO cut it up
        imported_teacher = None
        if cfg.checkpoint.resume == "auto" and not ckpt.complete_checkpoints(self.ckpt_dir):

            imported_teacher = load_run_import(self.ckpt_dir, cfg, student, teacher)
        self.pipeline = None
        self.pipeline_replicated: list[str] = []
        if info.pp_size > 1:
            # every stage built the whole model (same init as pp=1); keep this stage's part

            self.pipeline_replicated = prune_to_stage(student, info.pp_rank, info.pp_size)
            prune_to_stage(teacher, info.pp_rank, info.pp_size)
            mark_replicated(student, self.pipeline_replicated, first_stage=info.pp_rank == 0)
        # DeepSpeed's view of the layout: "model parallel" = tensor x pipeline parallel, which it
        # must neither partition nor average across.  Every DeepSpeedConfig it builds (zero.Init's
        # too) needs it: without it, it checks train_batch_size against the whole world and fails.
        mpu = MegatronMPU() if info.tp_size * info.pp_size > 1 else None
        # Built on the host in fp32; onto the device in the compute dtype here, for every stage.
        # ZeRO-0/1/2 engines would cast the student themselves, but zero.Init(module=) neither casts
        # nor moves buffers (the image position table) and the ZeRO-3 engine does neither later:
        # without this a bf16 run computed in fp32 under ZeRO-3 (measured on an H100: 2.5-6x slower
        # steps, 1.5-1.7x memory), and the teacher (no engine under ZeRO-0/1/2) stayed on the host.
        student.to(info.device, self.dtype)
        teacher.to(info.device, self.dtype)
        if zero3:
            # With TP > 1 zero.Init must get the data-parallel group: with only mpu= it partitions
            # across the whole world and corrupts TP shards (wrong loss, no error).
            deepspeed.zero.Init(module=student, config_dict_or_path=ds_cfg, data_parallel_group=dp_group, mpu=mpu)
            deepspeed.zero.Init(module=teacher, config_dict_or_path=teacher_ds_config(ds_cfg),
                                data_parallel_group=dp_group, mpu=mpu)

        groups = param_groups_for_weight_decay(student, cfg.optim.weight_decay, cfg.optim.weight_decay_all)
        flat = None
        if offloads_optimizer(ds_cfg) and torch.cuda.is_available():
            # ZeRO-Offload steps the optimizer on the host: DeepSpeed's vectorised CPU Adam (built
            # with g++ on first use); a torch AdamW there would be several times slower.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                         adamw_mode=True)
        else:
            if cfg.parallel.engine == "flat":

                # the optimizer steps one flat fp32 master per group (train/flat_engine.py)
                flat = FlatEngine(student, groups, cfg.optim.clip_grad, cfg.optim.grad_accum, dp_group=dp_group,
                                  mpu=mpu)
                groups = flat.param_groups
            # fused on a GPU: one kernel for all tensors (the foreach default launches several)
            optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                          fused=True if torch.cuda.is_available() else None)
        scheduler = build_scheduler(optimizer, cfg.optim)
        self.adam = optimizer  # the torch optimizer whose groups hold lr / eps (DeepSpeed wraps it)
        if flat is not None:
            flat.attach(optimizer, scheduler)
            self.engine, self.optimizer, self.scheduler = flat, optimizer, scheduler
            ckpt.install_write_guard(self.engine)  # a full disk: one line on every rank, no hang
        else:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, mpu=mpu)
            safe_load.install(self.engine)  # DeepSpeed reads its files weights-only, with our allowlist
            ckpt.install_write_guard(self.engine)  # a full disk: one line on every rank, no hang
        self.teacher = EmaTeacher(teacher, self.engine, teacher_ds_config(ds_cfg), zero3=zero3, dtype=self.dtype,
                                   mpu=mpu, copy=teacher_copied_prefixes(cfg))
        if imported_teacher is not None:
            self.teacher.set_masters(imported_teacher, info.dp_rank)
            if self.main:
                print(f"initialized from the imported checkpoint in {self.ckpt_dir / 'imported'} (student, EMA "
                      f"teacher, decoder); fresh optimizer and LR schedule from step 0", flush=True)
        if info.pp_size > 1:

            # Backward runs in Megatron's schedule, outside engine.backward: tell ZeRO-1 so it
            # sets up its reduction buffers itself, as under DeepSpeed's own pipeline engine.
            self.engine.pipeline_parallelism = True
            self.pipeline = PipelineRunner(self.engine.module, self.teacher.module, self.dtype, cfg.model)

        self.guard = Guard(cfg.guards)
        self.step = 0  # optimizer updates applied or skipped
        self.updates = 0  # optimizer updates applied (the EMA schedule's clock)

        m = cfg.model
        samples = cfg.data.batch_size * cfg.optim.grad_accum * info.dp_size
        self.samples_per_step = samples
        self.flops_per_step = train_step_flops(cfg) * cfg.optim.grad_accum * info.dp_size
        tokens = {"image": m.num_patches, "text": cfg.data.max_tokens,
                  "audio": m.audio_frames(int(cfg.data.max_seconds * cfg.data.sample_rate))}[m.modality]
        self.metrics = Metrics(self.out / "tensorboard", enabled=self.main, tensorboard=cfg.logging.tensorboard,
                               flops_per_step=self.flops_per_step, samples_per_step=samples,
                               tokens_per_step=tokens * samples, world_size=info.world_size,
                               # a GPU's peak means nothing for a CPU run: no MFU there
                               peak_tflops=cfg.logging.peak_tflops if torch.cuda.is_available() else None)
        self.stopped_reason: str | None = None
        self.corpus_samples: dict[str, int] | None = None  # a mix of corpora: samples so far per corpus

    # ------------------------------------------------------------------------------------
    def ema_decay(self) -> float:

        return ema_decay_from_cfg(self.cfg, self.updates)

    def _to_device(self, batch: dict) -> dict:
        dev = self.info.device
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(dev, non_blocking=True)
                if v.is_floating_point() and k == "source":
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer update over `grad_accum` micro-batches.  Returns scalars to log."""
        assert len(micro_batches) == self.cfg.optim.grad_accum
        self.engine.train()
        lr = self.adam.param_groups[0]["lr"]  # the LR this update runs at (the scheduler steps after it)
        o = self.cfg.optim
        if o.adam_eps_form == "fairseq":  # this update is the optimizer's step updates + 1
            eps = fairseq_adam_eps(o.eps, o.betas[1], self.updates + 1)
            for g in self.adam.param_groups:
                g["eps"] = eps
        set_updates = getattr(self.engine.module, "set_num_updates", None)
        if set_updates is not None:  # data2vec-aqc: the Gumbel temperature and the key of its random draws
            set_updates(self.updates)
        if self.pipeline is not None:
            skipped, grad_norm, scalars = self._forward_backward_pipelined(micro_batches)
        else:
            skipped, grad_norm, scalars = self._forward_backward(micro_batches)
        if skipped:
            # no update, no EMA, no LR step: drop whatever gradients this update gathered
            self.engine.zero_grad()
            self.engine.optimizer.zero_grad()
            self.step += 1
            stop = self.guard.record_skip()
            out = {"guard/skipped_total": self.guard.skipped_total,
                   "guard/consecutive_nonfinite": self.guard.consecutive_nonfinite}
            if stop:
                self._stop_nonfinite()
            return out
        self.guard.record_ok(self.step + 1)
        self.step += 1
        self.updates += 1
        decay = self.ema_decay()
        if decay < 1.0:  # the EMA step is skipped once decay == 1 (docs/REFERENCE.md §1.4)
            self.teacher.update(decay)
        out = dict(scalars)
        gn = grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()
        out.update({"opt/lr": lr, "opt/ema_decay": decay, "opt/grad_norm": float(gn) if gn is not None else 0.0,
                    "guard/skipped_total": self.guard.skipped_total})
        reason = self.guard.collapse_reason(self.updates, out.get("stats/target_var", math.inf),
                                            out.get("stats/pred_var", math.inf),
                                            out.get("stats/target_position_share", math.nan))
        if reason:
            self._stop(reason + ". Set guards.collapse_check=false to train on regardless")
        return out

    def _forward_backward(self, micro_batches: list[dict]) -> tuple[bool, float | None, dict[str, float]]:
        """Without pipelining: each micro-batch through the engine; the last backward reduces the
        gradients and `engine.step()` applies them.  -> (skipped, grad norm measured here (ZeRO-0
        only; DeepSpeed reports it otherwise), the statistics averaged over micro-batches and
        data-parallel ranks).

        One collective decides the update and averages the statistics: this rank's non-finite
        loss and gradient flags ride in the same all-reduce as the statistics (a non-finite loss
        is still backpropagated: its gradients are dropped with the step)."""
        stats_sum: dict[str, torch.Tensor] = {}  # device tensors: no host sync per statistic
        bad = torch.zeros((), dtype=torch.bool, device=self.info.device)  # this rank's non-finite flag
        grad_norm, scalars = None, {}
        for mb in micro_batches:
            loss, stats = self.engine(self._to_device(mb), teacher=self.teacher)
            bad = bad | ~torch.isfinite(loss.detach()).all()
            self.engine.backward(loss)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v.detach().double()
            if self.engine.is_gradient_accumulation_boundary():
                local = local_grads_nonfinite(self.engine)
                if local is None:  # ZeRO-3 / offload: DeepSpeed's own check, collective already
                    bad = bad | torch.tensor(bool(self.engine.optimizer.has_overflow(partition_gradients=True)),
                                             device=self.info.device)
                else:
                    bad = bad | local
                skipped, scalars = self._agree(bad, {_scalar_name(k): v / len(micro_batches)
                                                     for k, v in stats_sum.items()})
                if skipped:  # every rank decides together: one rank skipping alone would hang
                    return True, None, {}
                if self.engine.zero_optimization_stage() == 0 and not getattr(self.engine, "measures_grad_norm",
                                                                              False):
                    # DeepSpeed clips without ZeRO but drops the norm; measure it (TP-aware) here.
                    # A tensor replicated across TP ranks counts once (TP rank 0), as in DeepSpeed's
                    # clipping: summing every rank's copies over-counted it (TP=2 image-tiny logged
                    # 21.98 for a norm of 15.54, tests/test_flat_engine.py)
                    from deepspeed.runtime.utils import get_global_norm_of_tensors, is_model_parallel_parameter

                    mpu = self.engine.mpu
                    tp0 = mpu is None or mpu.get_model_parallel_rank() == 0
                    grad_norm = float(get_global_norm_of_tensors(
                        [p.grad for p in self.engine.module.parameters()
                         if p.grad is not None and (tp0 or is_model_parallel_parameter(p))], mpu=mpu))
            self.engine.step()
        return False, grad_norm, scalars

    def _agree(self, bad: torch.Tensor, scalars: dict[str, torch.Tensor]) -> tuple[bool, dict[str, float]]:
        """One all-reduce over every rank of [bad flag, statistics] -> (any rank bad, statistics
        averaged over the data-parallel ranks).  Tensor-parallel ranks hold the same statistics:
        only TP rank 0's count, so the sum is the data-parallel one.  One host copy."""
        keys = sorted(scalars)
        t = torch.stack([bad.to(torch.float64)] + [scalars[k].to(self.info.device, torch.float64) for k in keys])
        if dist.is_initialized() and self.info.world_size > 1:
            from megatron.core import parallel_state as ps

            if ps.get_tensor_model_parallel_rank() != 0:
                t[1:] = 0.0
            dist.all_reduce(t)
        vals = t.tolist()
        return vals[0] > 0, {k: v / self.info.dp_size for k, v in zip(keys, vals[1:])}

    def _forward_backward_pipelined(self, micro_batches: list[dict]) -> tuple[bool, None, dict[str, float]]:
        """With pipelining: Megatron-core's schedule runs the teacher and the student over all
        micro-batches (train/pipeline.py); then the replicated parameters' gradients are summed
        over the stages, DeepSpeed reduces over data parallelism (ZeRO-1) and steps."""
        from megatron.core import parallel_state as ps

        per_mb = self.pipeline.run([self._to_device(mb) for mb in micro_batches])
        names = self.engine.module.stat_names()
        # the last stage holds the statistics; one sum over the pipeline group gives them to all
        vec = torch.zeros(len(names), dtype=torch.float64, device=self.info.device)
        for st in per_mb:
            vec += torch.stack([st[k].detach().double() for k in names])
        dist.all_reduce(vec, group=ps.get_pipeline_model_parallel_group())
        stats_sum = dict(zip(names, vec))
        # only the loss decides a skip, as without pipelining: a statistic may be undefined (the
        # target position share of a one-sample micro-batch is NaN) on a finite step
        if any_rank_true(~torch.isfinite(vec[names.index("loss")]), self.info.device):
            return True, None, {}
        sum_replicated_grads(self.engine.module, self.pipeline_replicated)
        self.engine.allreduce_gradients()
        if grads_nonfinite(self.engine, self.info.device):
            return True, None, {}
        self.engine.step()
        return False, None, self._dp_mean({_scalar_name(k): v / len(micro_batches) for k, v in stats_sum.items()})

    def _dp_mean(self, scalars: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average logged statistics over the data-parallel group, so the logged loss is the
        global batch's, not rank 0's share of it: one stacked all-reduce, one host copy."""
        if not scalars:
            return {}
        keys = sorted(scalars)
        t = torch.stack([scalars[k].to(self.info.device, torch.float64) for k in keys])
        if self.info.dp_size > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(t, group=ps.get_data_parallel_group())
            t = t / self.info.dp_size
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------------------------
    def state_client(self) -> dict:
        return {"rng": ckpt.rng_state(), "loader": self.loader.state_dict() if self.loader else None,
                "teacher": self.teacher.state_dict(), "step": self.step, "updates": self.updates,
                "guard": self.guard.state_dict()}

    def save(self) -> Path:
        meta = {"preset": self.cfg.preset, "modality": self.cfg.model.modality,
                "zero_stage": self.cfg.parallel.zero_stage, "tp": self.info.tp_size, "pp": self.info.pp_size,
                "dp": self.info.dp_size, "config": self.cfg.to_dict()}
        folder = ckpt.save(self.engine, self.ckpt_dir, self.step, self.state_client(), meta,
                           keep_last=self.cfg.checkpoint.keep_last, rank=self.info.rank,
                           world_size=self.info.world_size, last_ok_step=self.guard.last_ok_step)
        return folder

    def resume(self, spec: str | None) -> Path | None:
        folder = ckpt.resolve_resume(spec, self.ckpt_dir, warn=self._warn)
        if folder is None:
            return None
        client = ckpt.load(self.engine, folder, self.info.rank, self.info.world_size)
        self.teacher.load_state_dict(client["teacher"])
        self.step, self.updates = client["step"], client["updates"]
        self.guard.load_state_dict(client["guard"], self.step)
        self._apply_config_lr(folder)
        if self.loader is not None and client["loader"] is not None:
            self.loader.load_state_dict(client["loader"])
        ckpt.set_rng_state(client["rng"])
        return folder

    def run_summary(self) -> str:
        """The first log line: layout, the global batch against the preset's reference, and an
        LR schedule that max_steps cuts short."""
        cfg, info, o = self.cfg, self.info, self.cfg.optim
        line = (f"run: {info.world_size} processes (dp {info.dp_size} x tp {info.tp_size} x pp {info.pp_size}), "
                f"global batch {info.dp_size} x {cfg.data.batch_size} x {o.grad_accum} (dp x data.batch_size x "
                f"optim.grad_accum) = {self.samples_per_step} samples per update")
        if o.reference_global_batch:
            line += f"; the {cfg.preset} reference: {o.reference_global_batch}"
            if o.reference_global_batch != self.samples_per_step:
                line += " (optim.match_reference_batch=true matches it; docs/SCALING.md)"
        if cfg.steps < o.total_steps:
            line += (f"; max_steps={cfg.steps} stops at {cfg.steps} of the {o.total_steps}-update LR schedule "
                     f"(optim.total_steps): the LR will not decay to its end; set optim.total_steps={cfg.steps} (or auto) "
                     + ("and optim.warmup_steps below it " if o.warmup_steps > cfg.steps else "")
                     + "for a complete schedule")
        return line

    def _start_record(self, resumed: Path | None) -> None:
        """The run record of this (re)start: to the run folder, TensorBoard and W&B (rank 0).
        Every rank calls it (the per-corpus counts of a mix are summed over data-parallel ranks)."""
        self.corpus_samples = run_record.corpus_counts(self)
        if not self.main:
            return
        rec = run_record.build_record(self, resumed)
        if self.corpus_samples is not None:
            rec["data"]["mixture"]["samples_so_far"] = self.corpus_samples
        run_record.append(self.out, rec)
        if self.metrics.writer is not None:
            run_record.to_tensorboard(self.metrics.writer, rec)
        if self.cfg.logging.wandb:
            self.metrics.trackers.append(WandbTracker(self.cfg, self.out, rec, resumed=resumed is not None))

    def _warn(self, msg: str) -> None:
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    def _write_losses(self, history: list) -> None:
        """losses.json: (step, loss) for every step of the run so far, across resumes."""
        if self.main:
            tmp = self.out / "losses.json.tmp"
            tmp.write_text(json.dumps(history))
            tmp.replace(self.out / "losses.json")

    def _apply_config_lr(self, folder: Path) -> None:
        """A resume with another optim.lr than the checkpoint's (the non-finite guard's advice):
        the schedule continues at its step with the new peak, from the first update on.  The
        scheduler keeps the peak it was built with (LambdaLR's base_lrs, which its state dict
        restores) and the optimizer's groups the checkpoint's current LR, so
        both are set here; with an unchanged optim.lr nothing is touched (exact resume)."""
        info = json.loads((folder / ckpt.MARKER).read_text())
        was = ((info.get("config") or {}).get("optim") or {}).get("lr")
        lr = self.cfg.optim.lr
        if was is None or float(was) == lr:
            return
        sched = self.scheduler  # schedules.UpdateLR (a LambdaLR) for every schedule
        sched.base_lrs = [lr for _ in sched.base_lrs]
        new = [lr * f(sched.last_epoch) for f in sched.lr_lambdas]
        for g, v in zip(sched.optimizer.param_groups, new):
            g["lr"] = v
        sched._last_lr = list(new)
        if self.main:
            print(f"optim.lr={lr:g} (the checkpoint was trained with {float(was):g}): the LR schedule continues at "
                  f"step {self.step} with the new peak", flush=True)

    def _stop_nonfinite(self) -> None:
        """guards.max_consecutive_nonfinite in a row: no checkpoint of these weights (the last
        applied update's, which gave every step since a non-finite loss or gradient); the
        checkpoints that hold them are marked unhealthy, and the message names the newest healthy
        one, the one --resume auto takes."""
        g = self.guard
        why = (f"{g.consecutive_nonfinite} consecutive non-finite steps (guards.max_consecutive_nonfinite="
               f"{self.cfg.guards.max_consecutive_nonfinite})")
        self.stopped_reason = why
        if self.main:
            ckpt.mark_unhealthy(self.ckpt_dir, g.last_ok_step,
                                f"the non-finite guard stopped the run at step {self.step}: the weights of step "
                                f"{g.last_ok_step} gave only non-finite steps after it")
        if dist.is_initialized():
            dist.barrier()
        healthy = ckpt.newest_healthy(self.ckpt_dir, g.last_ok_step)
        where = (f"the newest healthy checkpoint is {healthy}: lower optim.lr (or check the data, or raise "
                 f"optim.warmup_steps) and rerun with --resume auto to continue from it" if healthy is not None else
                 "there is no healthy checkpoint to resume: start over with a lower optim.lr (or raise "
                 "optim.warmup_steps) and --overwrite")
        raise TrainingStopped(f"training stopped at step {self.step}: {why}; the weights after update step "
                              f"{g.last_ok_step} give non-finite losses and are not saved (checkpoints holding them "
                              f"are marked {ckpt.UNHEALTHY}); {where}")

    def _stop(self, reason: str) -> None:
        self.stopped_reason = reason
        folder = self.save()
        raise TrainingStopped(f"training stopped at step {self.step}: {reason}. Checkpoint: {folder}")

    # ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.main:
            print(self.run_summary(), flush=True)
        resumed = self.resume(cfg.checkpoint.resume)
        if resumed and self.main:
            print(f"resumed from {resumed} at step {self.step}", flush=True)
        self._start_record(resumed)
        it = iter(self.loader)
        total = cfg.steps
        progress = Progress(self.step, total)
        first = self.step + 1  # the first and the last step of every (re)start are always logged
        losses: list[tuple[int, float]] = []
        # the steps before the resume point come from the previous runs' losses.json (steps after
        # it, from a run that went on past its last checkpoint, are redone and replaced)
        earlier = []
        if resumed and self.main and (self.out / "losses.json").is_file():
            earlier = [tuple(x) for x in json.loads((self.out / "losses.json").read_text()) if x[0] <= self.step]
        last = {}
        finished = False
        try:
            while self.step < total:
                t0 = time.perf_counter()
                batches = [next(it) for _ in range(cfg.optim.grad_accum)]
                data_wait = time.perf_counter() - t0  # > 0 only when the loader falls behind
                scalars = self.train_step(batches)
                scalars["perf/data_wait_s"] = data_wait
                if "loss/total" in scalars:
                    losses.append((self.step, scalars["loss/total"]))
                self.metrics.accumulate(scalars)
                if self.step % cfg.logging.every_steps == 0 or self.step == total or self.step == first:
                    counts = run_record.corpus_counts(self)  # a collective for a mix of corpora: every rank
                    last = self.metrics.flush(self.step, run_record.count_scalars(counts))
                    progress.update(self.step, last["perf/step_time_s"])
                    if self.main:
                        print(format_line(self.step, total, last, progress.text(self.step) + run_record.mix_text(counts)),
                              flush=True)
                preempted = _save_requested()
                if self.step % cfg.checkpoint.every_steps == 0 or self.step == total or preempted:
                    folder = self.save()
                    self._write_losses(earlier + losses)
                    if self.main:
                        print(f"checkpoint {folder}", flush=True)
                    if preempted:
                        preempt.done()
                        self.stopped_reason = "save-and-exit requested (signal)"
                        break
            finished = True
        finally:
            if self.main:  # no collective here: an exception may have left the other ranks elsewhere
                try:
                    run_record.finish(self.out, {"step": self.step, "stopped": self.stopped_reason,
                                                 "corpus_samples": self.corpus_samples})
                except OSError:
                    # written atomically: the record keeps its previous, complete content.  When the
                    # run is already failing (a full disk), that failure's one line is what the user
                    # needs, not this one's traceback.
                    if finished:
                        raise
            self.metrics.close()
        self._write_losses(earlier + losses)
        return {"step": self.step, "losses": losses, "last": last}


# ---- preemption: SLURM sends SIGUSR1/SIGTERM ahead of the time limit ------------------------
def _save_requested() -> bool:
    """All ranks agree (a signal may reach one rank first)."""
    flag = preempt.requested() is not None
    if not dist.is_initialized():
        return flag
    return any_rank_true(flag, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
