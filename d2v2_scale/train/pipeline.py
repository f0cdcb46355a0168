"""Pipeline parallelism: the encoder blocks split over `parallel.pp` stages.

The model stays the model: every stage builds the whole student and teacher (so weights are
initialized exactly as without pipelining), then `prune_to_stage` deletes what the stage does
not own.  Stage r keeps blocks [r*L/pp, (r+1)*L/pp) under their global names; the first stage
also keeps the front end (local features, positions, CLS token, context LayerNorm), the last the
final LayerNorm and the decoder.  Parameters every stage needs (the ALiBi scale, shared by all
blocks) are replicated: their gradients are summed over the pipeline group after backward, and
DeepSpeed counts them once in the gradient norm (`ds_pipe_replicated`).

One update of M = optim.grad_accum micro-batches runs Megatron-core's schedules twice:

  1. teacher, forward only: stage r runs its teacher blocks; the message to the next stage is
     [hidden (E + T rows); running sum of the normalized top-K layer outputs (T rows)] as one fp32
     tensor [E + 2T, B, D], so the top-K taps may sit on any stages.  The last stage finishes the
     targets (average + final norms) and keeps the M target tensors.
  2. student, 1F1B: the message is the student's hidden state [E + T_keep, B*M, D] in the training
     dtype; the last stage runs the decoder and the loss against its stored targets, / M.

Then the caller (Trainer) lets DeepSpeed reduce the gradients over data parallelism and step,
exactly as without pipelining.  Why Megatron-core's schedules rather than DeepSpeed's
PipelineEngine: data2vec 2.0 needs a teacher pass before the student pass and a teacher that
lives beside the student on each stage (the EMA stays stage-local); PipelineEngine wants the
model as one flat layer list with a single train_batch() pass, which would have meant a second
model definition, a second checkpoint layout and a second exporter.  With Megatron's schedules
the stage modules, the DeepSpeed engine (ZeRO-1), the checkpoints and `d2v2-export` are the
ones used without pipelining.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..compat import cuda_calls_on_cpu
from ..data.layout import token_padding
from ..model.core.blocks import make_transformer_config

# Encoder parts only the first stage runs (the front end) and only the last stage runs.
# (mask_token: the BEiT encoder's, model/modalities/beit.py, used by its embed() on the first stage)
FIRST_ONLY = ("local", "positions", "extra_tokens", "context_norm", "mask_token")
LAST_ONLY = ("final_norm",)
FIRST_ONLY_PARAMS = tuple(f"encoder.{p}" for p in FIRST_ONLY)  # parameter-name prefixes
LAST_ONLY_PARAMS = ("decoder.",) + tuple(f"encoder.{p}" for p in LAST_ONLY)


def on_stage(name: str, block: int | None, total_blocks: int, pp: int, rank: int) -> bool:
    """Does pipeline stage `rank` of `pp` hold parameter `name` (of block `block`, or None)?
    Blocks by range; the front end on the first stage; decoder and final norm on the last; the
    rest (the ALiBi scale) on every stage.  prune_to_stage and d2v2-plan both follow this rule."""
    if block is not None:
        return block in stage_blocks(total_blocks, pp, rank)
    if name.startswith(FIRST_ONLY_PARAMS):
        return rank == 0
    if name.startswith(LAST_ONLY_PARAMS):
        return rank == pp - 1
    return True


def replicated(name: str) -> bool:
    """A parameter every stage holds (not a block's, not the first's or last's own)."""
    return not name.startswith(("encoder.blocks.",) + FIRST_ONLY_PARAMS + LAST_ONLY_PARAMS)


def stage_blocks(total_blocks: int, pp: int, rank: int) -> range:
    """Global indices of the blocks stage `rank` of `pp` owns (contiguous, equal shares)."""
    if total_blocks % pp:
        raise ValueError(f"{total_blocks} blocks do not split into {pp} equal pipeline stages")
    per = total_blocks // pp
    return range(rank * per, (rank + 1) * per)


def prune_to_stage(model: nn.Module, rank: int, size: int) -> list[str]:
    """Delete what pipeline stage `rank` of `size` does not own (in place).  Works on the student
    (Data2Vec2) and the teacher (EncoderTeacher).  Returns the names of the parameters every
    stage keeps (replicated across stages: their gradients must be summed over the stages)."""
    enc = model.encoder
    owned = set(stage_blocks(enc.total_blocks, size, rank))
    for i in enc.blocks.indices():
        if i not in owned:
            del enc.blocks[i]
    first, last = rank == 0, rank == size - 1
    if not first:
        for part in FIRST_ONLY:
            setattr(enc, part, None)
    if not last:
        for part in LAST_ONLY:
            setattr(enc, part, None)
        if getattr(model, "decoder", None) is not None:
            model.decoder = None
    model.first_stage, model.last_stage = first, last
    return [n for n, _ in model.named_parameters() if replicated(n)]


def mark_replicated(model: nn.Module, names: list[str], first_stage: bool) -> None:
    """DeepSpeed's gradient norm sums over all stages; count replicated parameters on the first
    stage only (the attribute DeepSpeed's own pipeline engine sets for tied weights)."""
    params = dict(model.named_parameters())
    for n in names:
        params[n].ds_pipe_replicated = not first_stage


def sum_replicated_grads(model: nn.Module, names: list[str]) -> None:
    """Sum the gradients of the replicated parameters over the pipeline group, so every stage
    applies the same update to its copy (one flat all-reduce)."""
    from megatron.core import parallel_state as ps

    if not names:
        return
    params = dict(model.named_parameters())
    grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    off = 0
    for n in names:
        p = params[n]
        k = p.numel()
        p.grad = flat[off:off + k].view_as(p).to(p.dtype).clone()
        off += k


class _ScheduleTarget:
    """What Megatron-core's schedule calls on the "model": `config`, `model_type` and
    `set_input_tensor` (the received activation, read by our step functions)."""

    def __init__(self, config):
        from megatron.core.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.input: Tensor | None = None

    def set_input_tensor(self, tensors) -> None:
        self.input = tensors[0] if isinstance(tensors, (list, tuple)) else tensors


class PipelineRunner:
    """Runs one update's teacher and student passes through Megatron-core's 1F1B schedule.

    student: this stage's Data2Vec2 (the engine's module); teacher: this stage's
    EncoderTeacher; dtype: the training dtype (the student's messages)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, dtype: torch.dtype, mcfg):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.student, self.teacher, self.dtype = student, teacher, dtype
        self.first, self.last = student.first_stage, student.last_stage
        cuda = torch.cuda.is_available()
        base = make_transformer_config(mcfg)
        common = dict(pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                      tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                      variable_seq_lengths=True,  # audio/text batches differ in length
                      moe_token_dispatcher_type="alltoall",  # no MoE; the default refuses variable lengths
                      batch_p2p_comm=cuda,  # gloo has no batched p2p
                      finalize_model_grads_func=None,  # DeepSpeed reduces the gradients
                      grad_scale_func=None, no_sync_func=None, timers=None)
        # The teacher's message carries the running target sum: fp32 whatever the training dtype.
        self.teacher_target = _ScheduleTarget(dataclasses.replace(base, pipeline_dtype=torch.float32,
                                                                  deallocate_pipeline_outputs=False, **common))
        self.student_target = _ScheduleTarget(dataclasses.replace(base, pipeline_dtype=dtype,
                                                                  deallocate_pipeline_outputs=True, **common))
        self.schedule = get_forward_backward_func()

    # ---- step functions (called by the schedule once per micro-batch) ----------------------
    def _teacher_step(self, data, target: _ScheduleTarget):
        batch = next(data)
        t = batch["mask"].shape[1]
        padding = token_padding(batch, self.student.modality, t)  # shipped by the loader (data/layout.py)
        if self.first:
            out = self.teacher.forward_stage(self.student.teacher_source(batch), padding, None)
        else:
            msg = target.input  # [E + T + T, B, D] fp32
            hidden, partial = msg[:-t].to(self.dtype), msg[-t:].transpose(0, 1)
            out = self.teacher.forward_stage(hidden, padding, partial)
        if self.last:
            return out, None  # targets [B, T, D]: kept by the schedule (no loss function)
        hidden, partial = out
        if partial is None:  # no top-K block on the stages so far
            partial = hidden.new_zeros(hidden.shape[1], t, hidden.shape[2], dtype=torch.float32)
        return torch.cat([hidden.float(), partial.transpose(0, 1)], 0), None

    def _student_step(self, data, target: _ScheduleTarget):
        batch, targets = next(data)
        out = self.student(batch, hidden=target.input, targets=targets)
        if not self.last:
            return out, None
        loss, stats = out
        # the schedule divides the loss by M in place; detached stats share its storage
        stats = {k: v.clone() for k, v in stats.items()}
        return loss, lambda loss: (loss, stats)

    # ---- one update ----------------------------------------------------------------------
    def teacher_targets(self, micro_batches: list[dict]) -> list[Tensor | None]:
        """The teacher pass alone: targets [B, T, D] fp32 per micro-batch on the last stage (None
        elsewhere).  Every stage of the pipeline must call it with the same batches."""
        with cuda_calls_on_cpu():
            targets = self.schedule(
                forward_step_func=self._teacher_step, data_iterator=iter(micro_batches), model=self.teacher_target,
                forward_only=True, **self._shape_kw(micro_batches))
        return targets if self.last else [None] * len(micro_batches)

    def run(self, micro_batches: list[dict]) -> list[dict]:
        """Teacher pass, then student forward/backward over all micro-batches; gradients are
        left in `.grad` (loss / M each).  Returns the per-micro-batch stats (last stage; [] else)."""
        targets = self.teacher_targets(micro_batches)
        with cuda_calls_on_cpu():
            stats = self.schedule(
                forward_step_func=self._student_step, data_iterator=iter(list(zip(micro_batches, targets))),
                model=self.student_target, forward_only=False, **self._shape_kw(micro_batches))
        return stats if self.last else []

    @staticmethod
    def _shape_kw(micro_batches: list[dict]) -> dict:
        # with variable_seq_lengths the shapes travel with the data: seq_length/micro_batch_size unused
        return dict(num_microbatches=len(micro_batches), seq_length=1, micro_batch_size=1)
