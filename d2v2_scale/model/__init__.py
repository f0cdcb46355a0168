"""The data2vec models on Megatron-core: shared parts (core/), one front end per modality
(modalities/), one module per objective (objectives/).

Three objectives share the parts (encoder, teacher, targets, EMA, loss): model.variant picks
data2vec 2.0 (objectives/data2vec2.py: multi-mask, gathered student, conv decoder), data2vec 1.0
(objectives/data2vec1.py: mask embedding, every position encoded, regression head) or
data2vec-aqc (objectives/aqc/: 1.0 speech + an augmented view, a quantizer, k-means,
cross-contrastive losses).  What each objective is as data (masks, gather, copied teacher parts,
FLOP terms, HF classes) is its record in d2v2_scale/objectives.py.

Public API (see the contracts in the module docstrings):
    build_student(cfg) -> Data2Vec2 | Data2Vec1 | Data2VecAQC  forward(batch, teacher) -> (loss, stats)
    build_teacher(cfg) -> EncoderTeacher | BeitTeacher  forward(x, padding=None) -> targets [B, T, D]
    init_teacher_from_student(teacher, student)
    teacher_param_names(cfg)                   names the teacher shares with the student
    param_groups_for_weight_decay(model, wd)   [decay group, no-decay group]

Name contract: every teacher parameter has exactly the name (and shape and TP sharding) of the
student parameter it tracks, e.g. "encoder.blocks.3.mlp.linear_fc1.weight".  Megatron-core's
parallel_state must be initialized before building (d2v2_scale.distributed.init_distributed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..objectives import objective_of, uses_beit
from .core.ema import ModuleEma, ema_decay, ema_decay_from_cfg, ema_update, init_teacher_from_student
from .objectives.aqc.model import Data2VecAQC
from .objectives.data2vec1 import BeitTeacher, Data2Vec1
from .objectives.data2vec2 import Data2Vec2, EncoderTeacher

# parameters without weight decay besides biases and norms (all 1-D tensors): the ALiBi scales
# (docs/REFERENCE.md §1.10 D4: the reference's `optim_overrides` skip only 1-D parameters, biases and the ALiBi
# scale, so the image CLS token and the learned text positions ARE decayed)
NO_DECAY_MARKERS = ("alibi_scale",)


# model.variant -> the student class of the objective (its record: d2v2_scale/objectives.py)
STUDENTS = {"data2vec2": Data2Vec2, "data2vec1": Data2Vec1, "data2vec_aqc": Data2VecAQC}


def build_student(cfg) -> nn.Module:
    return STUDENTS[cfg.model.variant](cfg)


def teacher_copied_prefixes(cfg) -> tuple[str, ...]:
    """Teacher parameter-name prefixes the EMA copies from the student instead of averaging."""
    return objective_of(cfg.model).copied_prefixes(cfg.model.modality)


def build_teacher(cfg) -> nn.Module:
    """The EMA teacher module: the shared one, or (data2vec 1.0 vision) the whole BEiT encoder."""
    return BeitTeacher(cfg) if uses_beit(cfg.model) else EncoderTeacher(cfg)


def teacher_param_names(cfg) -> list[str]:
    """The teacher's parameter names (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        t = build_teacher(cfg)
    return [n for n, _ in t.named_parameters()]


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # Under ZeRO-3 a parameter's data is an empty placeholder: its real shape is ds_shape.
    ndim = len(getattr(p, "ds_shape", p.shape))
    return ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_MARKERS)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Optimizer groups: [{"params": decayed, "weight_decay": wd}, {"params": rest, 0.0}], empty ones left out.

    No decay for biases, norms (every 1-D parameter) and the ALiBi scales (docs/REFERENCE.md §1.10 D4); the CLS
    token, learned positions and embeddings are decayed, except what a module's
    `no_weight_decay()` names.  `decay_all` (optim.weight_decay_all, fairseq's Adam): every
    parameter is decayed.  Frozen parameters are left out."""
    # modules may name more exempt parameters, timm's convention (`no_weight_decay()` -> local
    # names): the BEiT encoder exempts its CLS token, as the reference's timm optimizer does
    exempt = {f"{prefix}.{n}" if prefix else n for prefix, mod in model.named_modules()
              if callable(getattr(mod, "no_weight_decay", None)) for n in mod.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if not decay_all and (name in exempt or no_weight_decay(name, p)) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    # an empty group (decay_all leaves no_decay empty) is dropped: DeepSpeed's ZeRO optimizers
    # drop it themselves, and the LR schedule must see the same groups as the optimizer
    return [g for g in groups if g["params"]]


__all__ = ["Data2Vec1", "Data2VecAQC", "Data2Vec2", "EncoderTeacher", "teacher_copied_prefixes", "ModuleEma", "build_student", "build_teacher",
           "ema_decay", "ema_decay_from_cfg", "ema_update", "init_teacher_from_student",
           "param_groups_for_weight_decay", "teacher_param_names", "no_weight_decay"]
