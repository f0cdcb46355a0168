"""The trainer's side of `d2v2-import --to-run`: <run>/checkpoints/imported/ (written by
export/fairseq/importer.py import_to_run) loaded into the freshly built student and teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..twins import mapping

RUN_IMPORT = "imported"  # <run>/checkpoints/imported/: what `d2v2-train --resume auto` starts from
RUN_WEIGHTS = "weights.safetensors"
RUN_META = "import.json"
RUN_YAML = "import.yaml"
# the ModelConfig fields that decide parameter names and shapes: the run must use the file's
STRUCTURE = ("modality", "depth", "prenet_depth", "embed_dim", "num_heads", "mlp_ratio", "pre_ln", "alibi",
             "image_size", "patch_size", "in_chans", "conv_feature_layers", "conv_pos_width", "conv_pos_groups",
             "conv_pos_depth", "vocab_size", "max_positions", "decoder_dim", "decoder_kernel", "decoder_layers",
             "decoder_groups", "decoder_residual", "variant", "head_layers")


def load_run_import(ckpt_dir: Path, cfg, student, teacher) -> dict[str, torch.Tensor] | None:
    """Trainer side, before ZeRO/PP touch the modules: load <ckpt_dir>/imported/ into the freshly
    built (TP-sharded, whole) student and teacher.  -> the teacher's fp32 weights as this TP rank
    holds them (the EMA masters, see EmaTeacher.set_masters), or None when there is no import."""

    folder = Path(ckpt_dir) / RUN_IMPORT
    if not (folder / RUN_META).is_file():
        return None
    meta = json.loads((folder / RUN_META).read_text())
    for k in STRUCTURE + ("decoder_projection_layers",):
        if not hasattr(cfg.model, k):
            continue
        want, have = meta["model"].get(k), getattr(cfg.model, k)
        if (list(map(list, want)) if k == "conv_feature_layers" else want) != \
                (list(map(list, have)) if k == "conv_feature_layers" else have):
            raise ValueError(f"{folder} holds a model with model.{k}={want!r} but this run has {have!r}: "
                             f"start it with --config {folder.parent.parent / RUN_YAML}")
    sd = load_file(str(folder / RUN_WEIGHTS))
    mapping.load_full_state_dict(student, {k[8:]: v for k, v in sd.items() if k.startswith("student.")})
    own = set(mapping.clean_state_dict(teacher.state_dict()))
    mapping.load_full_state_dict(teacher, {k[8:]: v for k, v in sd.items()
                                           if k.startswith("teacher.") and k[8:] in own})
    return {n: p.detach().float().clone() for n, p in teacher.named_parameters()}

