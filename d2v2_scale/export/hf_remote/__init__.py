"""`d2v2-export --format hf` for data2vec 2.0 image and speech encoders: a transformers folder
whose model code ships inside it (`trust_remote_code=True`, `auto_map`), docs/EXPORT.md.

No transformers class computes these encoders (fixed 2-D sin-cos positions and a LayerNorm after
the CLS token for images; ALiBi for speech), so the folder carries its own code, generated from one
source: configuration_data2vec2.py and modeling_data2vec2.py of this package are copied verbatim,
and the encoder they wrap is the plain twin itself (d2v2_scale/twins/encoder.py, written as
data2vec2_encoder.py).  The weights are the twin's, under `encoder.` (the base model), plus the
speech mask embedding `masked_spec_embed` (zeros: masked frames start as zeroed frames, as the
reference's zero mask; it is learned while fine-tuning).

The config carries the reference fine-tuning's regularizers (docs/FINETUNE.md): images: drop path
0.1 and label smoothing 0.1 (mae_image_classification), speech: base_100h's time masks (p 0.65,
length 10), channel masks (p 0.5, length 64, capped at half the width for narrower models),
layerdrop 0.1, activation dropout 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...data.augment import IMAGENET_MEAN, IMAGENET_STD
from ...twins import encoder as plain

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_data2vec2.py", "modeling_data2vec2.py")
ENCODER_FILE = "data2vec2_encoder.py"
AUTO_MAP = {"AutoConfig": "configuration_data2vec2.Data2Vec2Config",
            "AutoModel": "modeling_data2vec2.Data2Vec2Model",
            "AutoModelForImageClassification": "modeling_data2vec2.Data2Vec2ForImageClassification",
            "AutoModelForCTC": "modeling_data2vec2.Data2Vec2ForCTC",
            "AutoModelForAudioClassification": "modeling_data2vec2.Data2Vec2ForAudioClassification"}
ENCODER_FIELDS = ("modality", "depth", "prenet_depth", "embed_dim", "num_heads", "mlp_ratio", "layer_norm_eps",
                  "pre_ln", "alibi", "image_size", "patch_size", "in_chans", "conv_feature_layers",
                  "conv_pos_width", "conv_pos_groups", "conv_pos_depth")


def is_remote_target(cfg: dict) -> bool:
    """True for the encoders this folder format holds: data2vec 2.0 image (ViT blocks) and speech."""
    return (cfg.get("variant", "data2vec2") == "data2vec2" and cfg["modality"] in ("image", "audio")
            and cfg.get("image_block", "vit2") != "beit")


def code_files() -> dict[str, bytes]:
    """The model code written into the folder: this package's two files + the plain twin's source."""
    files = {name: (HERE / name).read_bytes() for name in CODE_FILES}
    files[ENCODER_FILE] = Path(plain.__file__).read_bytes()
    return files


def finetune_defaults(cfg: dict) -> dict:
    """The reference fine-tuning's regularizers for this encoder (docs/FINETUNE.md)."""
    if cfg["modality"] == "image":  # mae_image_classification.py defaults (drop_path_rate, label_smoothing)
        return dict(drop_path_rate=0.1, label_smoothing=0.1, use_fc_norm=True, fc_norm_eps=1e-6)
    d = int(cfg["embed_dim"])  # wav2vec/config/finetuning/base_100h.yaml
    return dict(mask_time_prob=0.65, mask_time_length=10, mask_feature_prob=0.5,
                mask_feature_length=min(64, d // 2), layerdrop=0.1, activation_dropout=0.1)


def to_remote(sd: dict, cfg: dict):
    """Plain-twin tensors + export config -> (HF tensors, HF config dict, extra files {name: bytes})."""
    out = {"encoder." + k: v for k, v in sd.items() if not k.startswith("decoder.")}
    if cfg["modality"] == "audio":
        out["masked_spec_embed"] = torch.zeros(int(cfg["embed_dim"]))
    hcfg = {k: cfg[k] for k in ENCODER_FIELDS} | finetune_defaults(cfg) | {
        "model_type": "data2vec2", "architectures": ["Data2Vec2Model"], "auto_map": dict(AUTO_MAP),
        "sample_rate": int(cfg.get("sample_rate", 16000))}
    extra = dict(code_files())
    extra["preprocessor_config.json"] = json.dumps(preprocessor(cfg), indent=1).encode()
    return out, hcfg, extra


def preprocessor(cfg: dict) -> dict:
    """The pretraining's input pipeline as a transformers processor config (data/augment.py)."""
    if cfg["modality"] == "audio":
        # each waveform to zero mean / unit variance, as training (data/augment.normalize_wave)
        return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                "sampling_rate": int(cfg.get("sample_rate", 16000)), "padding_value": 0.0, "padding_side": "right",
                "do_normalize": True, "return_attention_mask": True}
    size = int(cfg["image_size"])
    mean, std = [float(x) for x in IMAGENET_MEAN], [float(x) for x in IMAGENET_STD]
    if int(cfg.get("in_chans", 3)) == 1:  # grey models: training normalizes with the channel means
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": mean, "image_std": std, "do_convert_rgb": int(cfg.get("in_chans", 3)) == 3}


def register_local_classes() -> None:
    """Build model_type "data2vec2" with this package's own classes in transformers' Auto classes.

    A folder from elsewhere may carry any Python in its modeling files; with these registered,
    `from_pretrained(DIR)` (trust_remote_code left False) takes the classes from the installed
    package and reads only config.json and the safetensors weights from the folder.  d2v2-finetune
    loads every folder this way (docs/FINETUNE.md "Trust")."""
    from transformers import (AutoConfig, AutoModel, AutoModelForAudioClassification, AutoModelForCTC,
                              AutoModelForImageClassification)

    from . import modeling_data2vec2 as m
    from .configuration_data2vec2 import Data2Vec2Config

    AutoConfig.register(Data2Vec2Config.model_type, Data2Vec2Config, exist_ok=True)
    for auto, cls in ((AutoModel, m.Data2Vec2Model), (AutoModelForImageClassification, m.Data2Vec2ForImageClassification),
                      (AutoModelForCTC, m.Data2Vec2ForCTC),
                      (AutoModelForAudioClassification, m.Data2Vec2ForAudioClassification)):
        auto.register(Data2Vec2Config, cls, exist_ok=True)
