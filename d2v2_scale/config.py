"""One typed config that the whole run reads.

`RunConfig` groups the sections a run needs (model, masking, ema, data, optim, parallel,
checkpoint, logging, guards).  A run starts from a named preset (the spec's table, section 9,
plus tiny CPU presets for tests), optionally merges a YAML file, then applies command-line
overrides (`--model.depth 4` or `model.depth=4`).  `validate()` runs once, up front, before
any process group or GPU memory exists, and raises `ConfigError` with a message that names
the field and says what to change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("image", "audio", "text")

# (channels, kernel, stride) of the wav2vec 2.0 / data2vec audio feature extractor: 320x down.
AUDIO_CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Encoder, decoder and target construction (spec sections 2, 3, 5, 6, 8)."""

    modality: str = "image"
    depth: int = 10  # shared blocks (the ones that can provide targets)
    prenet_depth: int = 0  # context-encoder blocks before the shared ones; never targets
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # residual/attention/activation dropout in the blocks
    # Dropout on the encoder input (spec 12 D3/D7): audio/image after the context LayerNorm, per
    # clone; text on the embeddings once per sample, before cloning (the teacher sees the same
    # tensor).  None: model.dropout (the reference uses 0.1 for audio/text, 0 for images).
    encoder_input_dropout: float | None = None
    # Dropout on the student output before the decoder fills the masked slots (spec 12 D2).
    # None: model.dropout.
    decoder_input_dropout: float | None = None
    layer_norm_eps: float = 1e-6
    layerdrop: float = 0.0
    pre_ln: bool = False  # spec default is post-LN; pre-LN allowed for very large models
    # Per block "none" | "full" | "selective" recomputation of activations.
    activation_checkpointing: str = "none"

    # image front end
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # audio front end
    conv_feature_layers: list = field(default_factory=lambda: [list(x) for x in AUDIO_CONV_LAYERS])
    conv_pos_width: int = 19
    conv_pos_groups: int = 16
    conv_pos_depth: int = 5
    alibi: bool = False  # ALiBi bias with a learned per-head scale (audio)
    # text front end
    vocab_size: int = 50000
    max_positions: int = 512
    pad_token_id: int = 1

    # multi-mask and targets
    clone_batch: int = 16  # M
    top_k_layers: int = 10  # K
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    instance_norm_targets: bool = False
    layer_norm_targets: bool = True

    # decoder
    decoder_dim: int = 768
    decoder_kernel: int = 3
    decoder_layers: int = 6
    decoder_groups: int = 16
    decoder_residual: bool = True
    # masked slots enter the decoder as N(0, std^2) noise (spec: 0.01)
    decoder_noise_std: float = 0.01
    # the decoder's final projection (spec 12 D1): 1 = Linear(decoder_dim, D); 2 (text) =
    # Linear(decoder_dim, ratio * decoder_dim) -> GELU -> Linear(ratio * decoder_dim, D)
    decoder_projection_layers: int = 1
    decoder_projection_ratio: float = 2.0

    # loss
    loss_beta: float = 0.0  # > 0: smooth-L1 with this beta
    loss_scale: float | None = None  # None: 1/sqrt(D)
    cls_loss_weight: float = 0.0  # image: 0.01

    # objective: "data2vec2" (model/data2vec.py), "data2vec1" (model/data2vec1.py, docs/DATA2VEC1.md) or
    # "data2vec_aqc" (model/data2vec_aqc.py, docs/AQC.md)
    variant: str = "data2vec2"

    # data2vec 1.0 (model.variant=data2vec1; data2vec1-spec A.0-A.4)
    # teacher tap: "ffn" = the FFN output before the residual and LN2 (speech, text, 2.0);
    # "block_end" = the block output after its last residual (vision)
    target_tap: str = "ffn"
    # loss scale when loss_scale is None: "inv_sqrt_dim" (1/sqrt(D): speech, 2.0), "inv_dim"
    # (1/D: vision's mean over elements), "one"
    loss_scale_rule: str = "inv_sqrt_dim"
    # regression head on the student's output at masked positions: 1 = Linear(D, D) (speech,
    # vision); 2 = Linear(D, 2D) -> GELU -> Linear(2D, D) (text)
    head_layers: int = 1
    # BEiT-style vision (data2vec 1.0): model/beit.py; the defaults leave the 2.0 ViT unchanged
    image_block: str = "vit2"  # "vit2" (the 2.0 block, model/blocks.py) | "beit" (model/beit.py)
    layer_scale_init: float = 1e-4  # BEiT layer scale gamma_1/gamma_2 init (base 1e-4, large 1e-5); 0: none
    drop_path: float = 0.0  # stochastic depth of the last block; block i gets drop_path * i / (blocks - 1)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (BEiT blocks)
    shared_rel_pos_bias: bool = True  # one relative position bias table for all blocks (else one per block)
    # data2vec-aqc (model.variant=data2vec_aqc; data2vec-aqc-spec.md B.3-B.8, docs/AQC.md): the 1.0
    # speech objective plus a Gumbel quantizer, per-step k-means and two cross-contrastive losses
    aqc_latent_groups: int = 2  # G codebooks
    aqc_latent_vars: int = 320  # V entries per codebook
    aqc_vq_dim: int = 256  # quantized width (final_proj_dim; also project_q and contr_proj's output)
    aqc_latent_temp: tuple = (2.0, 0.5, 0.999995)  # Gumbel temperature max(2 * 0.999995^u, 0.5)
    aqc_num_negatives: int = 100  # per masked frame, same utterance and view, with replacement
    aqc_cluster_factor: int = 16  # k-means clusters per step: max(2, T // factor)
    aqc_logit_temp: float = 0.1  # cosine / temperature
    aqc_same_cluster_scale: float = 0.3  # same-cluster negatives' logits are multiplied by this
    # the reference scales same-cluster logits only in batches where some negative has the
    # positive's codes (a quirk, B.7): false (faithful default) always scales, true copies the gating
    aqc_gate_scaling_on_identical: bool = False
    aqc_contrastive_weight: float = 0.5  # weight of each of L_s and L_t
    aqc_diversity_weight: float = 0.1  # x N_m x (G V - prob_perplexity) / (G V)
    aqc_features_pen_weight: float = 10.0  # x N_m x mean(CNN features^2) of the original view

    @property
    def total_blocks(self) -> int:
        return self.depth + self.prenet_depth

    @property
    def input_dropout(self) -> float:
        return self.dropout if self.encoder_input_dropout is None else self.encoder_input_dropout

    @property
    def decoder_dropout(self) -> float:
        return self.dropout if self.decoder_input_dropout is None else self.decoder_input_dropout

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def audio_frames(self, n_samples: int) -> int:
        """Frames out of the CNN feature extractor for `n_samples` waveform samples."""
        n = int(n_samples)
        for _, kernel, stride in self.conv_feature_layers:
            n = (n - kernel) // stride + 1
        return max(n, 0)


@dataclass
class MaskConfig:
    """Mask ratio R, adjust A, block/span length B (spec section 7)."""

    ratio: float = 0.8
    adjust: float = 0.07
    length: int = 3
    # "data2vec2" (data/masking.py: exact counts, M clones) or a data2vec 1.0 generator
    # (data/masking_d2v1.py): "speech_spans" (fairseq compute_mask_indices: p = ratio, span =
    # length, probabilistic rounding, trimmed to the batch minimum), "text_spans" (span = length
    # at p = ratio, every masked token -> <mask>), "bert" (ratio of tokens selected; of those
    # bert_unchanged stay and bert_random become random tokens, the rest <mask>)
    generator: str = "data2vec2"
    bert_unchanged: float = 0.1
    bert_random: float = 0.1


@dataclass
class EmaConfig:
    """Teacher EMA schedule (spec section 4)."""

    decay: float = 0.9998
    end_decay: float = 0.99999
    anneal_end_step: int = 100_000


@dataclass
class DataConfig:
    """Shards and batches."""

    manifest: str | None = None  # path to a data_prep manifest.json
    batch_size: int = 16  # samples per data-parallel rank per micro-step (before x M)
    num_workers: int = 2
    seed: int = 1
    verify: str = "fast"  # "fast" (size + footer hash) | "full" | "none"; rows: checksum on read unless "none"
    max_bad_rows: int = 100  # rows failing their checksum that are replaced (and logged) before the run stops
    # image augmentation (random-resized-crop + flip, bicubic): the reference's scale range
    # (0.2, 1.0) (spec 12 D5; torchvision's default would be 0.08)
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    hflip: bool = True
    # colour jitter strength (brightness = contrast = saturation), applied before the crop:
    # data2vec 1.0 vision (BEiT's ColorJitter(0.4, 0.4, 0.4)); 0 = off (data2vec 2.0)
    color_jitter: float = 0.0
    # audio, seconds: clips under min_seconds are dropped; "batch_min" cuts every clip of a batch to
    # the batch's shortest (at most max_seconds) at a random start, so batches carry no padding
    # (the reference, spec 12 D6); "random_length" draws one length per batch in [min, max] and pads
    sample_rate: int = 16000
    min_seconds: float = 2.0
    max_seconds: float = 20.0
    audio_crop: str = "batch_min"
    # text blocks (tokens)
    max_tokens: int = 512
    # text: each sample is `<s>` + a window of max_tokens - 1 stream tokens (the reference's 511-token
    # blocks with <s> prepended, spec 12 D10; d2v2-prep text packs blocks of 511 by default)
    prepend_bos: bool = True
    # data2vec-aqc (data2vec-aqc-spec.md B.2): "aqc" adds `source_aug` [B, S] to audio batches, an
    # augmented copy of each whole utterance (normalized separately, cropped at the same offset as
    # `source`); "single" (default) leaves batches as they are.  model.variant=data2vec_aqc reads it.
    views: str = "single"
    # folder of .wav noise recordings for the background-noise augmentation (the paper: MUSAN noise/)
    noise_dir: str | None = None
    # second-view augmentations, applied in this order with these probabilities (the reference's)
    aug_noise_p: float = 0.6
    aug_noise_std: tuple = (0.001, 0.7)  # Gaussian noise std as a fraction of the utterance's std
    aug_reverb_p: float = 0.7
    aug_background_p: float = 0.8
    aug_background_snr_db: tuple = (0, 15)  # integer snr_db range; the mix uses exp(snr_db / 10)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-6
    # "torch": torch.optim.AdamW's eps, added to sqrt(v / (1 - beta2^t)); "fairseq": fairseq's Adam,
    # eps added to sqrt(v) before the bias correction (a larger effective eps early in training;
    # docs/TRAINING.md "Optimizer")
    adam_eps_form: str = "torch"
    weight_decay: float = 0.05
    # true: decay every parameter, 1-D ones included (fairseq's Adam: the data2vec 1.0 speech and
    # text references; also what fairseq's trainer did for the released 2.0 models, whose recipes ask
    # otherwise, docs/TRAINING.md "Optimizer"); false: biases, norms and the ALiBi scale are not
    # decayed (data2vec 2.0's recipes and paper, BEiT)
    weight_decay_all: bool = False
    clip_grad: float = 4.0  # 0 disables
    warmup_steps: int = 50_040
    # optimizer updates; "auto": max_steps (a short run with a complete LR schedule), set by build_config
    total_steps: int = field(default=375_300, metadata={"auto": True})
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    # The public config's global batch in samples per update (spec section 9: batch/GPU x GPUs),
    # which its LR, warmup and EMA steps were tuned for; None: unknown (nothing to compare).
    reference_global_batch: int | None = None
    # true: set grad_accum so that data-parallel ranks x data.batch_size x grad_accum equals
    # reference_global_batch on however many GPUs this run has (docs/SCALING.md)
    match_reference_batch: bool = False
    # "cosine" (linear warm-up from 0 over warmup_steps, cosine to min_lr_ratio * lr) or
    # "tri_stage" (fairseq: linear from init_scale * lr, hold, exponential decay to final_scale * lr
    # over the phase ratios of total_steps; warmup_steps is not used)
    schedule: str = "cosine"
    tri_stage_ratios: tuple = (0.03, 0.9, 0.07)
    tri_stage_init_scale: float = 0.01
    tri_stage_final_scale: float = 0.01


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    offload_optimizer: bool = False
    ds_config: str | None = None  # extra DeepSpeed JSON; harness settings win where they must
    pp_microbatches: int = 4
    # "deepspeed" | "flat": a data-parallel engine over one contiguous gradient buffer
    # (train/flat_engine.py): ZeRO-0's layout with a few operators per update instead of a
    # handful per parameter; needs zero_stage=0 and pp=1
    engine: str = "deepspeed"


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: str | None = None  # None | "auto" | a checkpoint directory


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    peak_tflops: float = 989.0  # H100/H200 SXM bf16 dense, for MFU


@dataclass
class GuardConfig:
    max_consecutive_nonfinite: int = 5
    collapse_check: bool = False  # spec: image configs turn it off
    collapse_after_steps: int = 5000
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    # Opt-in: stop (under collapse_check) when position alone explains more than this share of
    # the targets' variance (stats/target_position_share): a collapse the variance thresholds
    # miss.  None: log it only.  Measured on text-tiny: 0.49 at init, 0.98 by step 500.
    max_target_position_share: float | None = None


@dataclass
class RunConfig:
    preset: str = "image-base"
    output_dir: str = "runs/default"
    seed: int = 1
    max_steps: int | None = None  # stop early (None: optim.total_steps)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)

    # ---- derived -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.optim.total_steps

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically (temp name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls()
        _merge(cfg, d, prefix="")
        return cfg

    def validate(self, world_size: int | None = None) -> "RunConfig":
        validate(self, world_size)
        return self


# --------------------------------------------------------------------------------------------
# Presets (spec section 9); tiny ones are 2 layers x width 64 for CPU tests
# --------------------------------------------------------------------------------------------

_IMAGE = dict(
    model=dict(modality="image", layer_norm_eps=1e-6, dropout=0.0, instance_norm_target_layer=True,
               layer_norm_targets=True, instance_norm_targets=False, cls_loss_weight=0.01,
               decoder_residual=True),
    # eps 1e-8: the image yamls leave fairseq's Adam default (audio/text set 1e-6; spec 12 D8)
    optim=dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, clip_grad=4.0, warmup_steps=50_040),
    guards=dict(collapse_check=False),
)
_AUDIO = dict(
    model=dict(modality="audio", layer_norm_eps=1e-5, dropout=0.1, alibi=True,
               instance_norm_target_layer=True, layer_norm_targets=False, instance_norm_targets=False,
               cls_loss_weight=0.0, decoder_residual=True),
    optim=dict(betas=(0.9, 0.98), weight_decay=0.01),
    guards=dict(collapse_check=True),
)
_TEXT = dict(
    model=dict(modality="text", layer_norm_eps=1e-5, dropout=0.1, instance_norm_target_layer=True,
               layer_norm_targets=False, instance_norm_targets=False, cls_loss_weight=0.0,
               decoder_dim=768, decoder_kernel=9, decoder_layers=5, decoder_groups=1,
               decoder_residual=False, decoder_projection_layers=2, decoder_projection_ratio=2.0,
               loss_scale=1.0, vocab_size=50000, max_positions=512),
    masking=dict(adjust=0.0, length=1),
    optim=dict(betas=(0.9, 0.98), weight_decay=0.01, clip_grad=1.0, warmup_steps=4000),
    guards=dict(collapse_check=True),
)

PRESETS: dict[str, dict] = {
    "image-base": _IMAGE | dict(
        model=_IMAGE["model"] | dict(depth=10, prenet_depth=2, embed_dim=768, num_heads=12, clone_batch=16,
                                     top_k_layers=10, decoder_dim=768, decoder_kernel=3, decoder_layers=6,
                                     decoder_groups=16, image_size=224, patch_size=16),
        masking=dict(ratio=0.8, adjust=0.07, length=3),
        ema=dict(decay=0.9998, end_decay=0.99999, anneal_end_step=100_000),
        data=dict(batch_size=16),
        optim=_IMAGE["optim"] | dict(lr=1e-3, total_steps=375_300,
                                     reference_global_batch=256),
    ),
    "image-large": _IMAGE | dict(
        model=_IMAGE["model"] | dict(depth=24, prenet_depth=0, embed_dim=1024, num_heads=16, clone_batch=16,
                                     top_k_layers=18, decoder_dim=1024, decoder_kernel=5, decoder_layers=3,
                                     decoder_groups=16, image_size=224, patch_size=16),
        masking=dict(ratio=0.75, adjust=0.1, length=3),
        ema=dict(decay=0.9998, end_decay=0.99999, anneal_end_step=150_000),
        data=dict(batch_size=8),
        optim=_IMAGE["optim"] | dict(lr=4e-4, total_steps=375_300,
                                     reference_global_batch=128),
    ),
    "image-huge": _IMAGE | dict(
        model=_IMAGE["model"] | dict(depth=32, prenet_depth=0, embed_dim=1280, num_heads=16, clone_batch=16,
                                     top_k_layers=24, decoder_dim=1024, decoder_kernel=5, decoder_layers=3,
                                     decoder_groups=16, image_size=224, patch_size=14),
        masking=dict(ratio=0.75, adjust=0.1, length=3),
        ema=dict(decay=0.9998, end_decay=1.0, anneal_end_step=300_000),
        data=dict(batch_size=8),
        optim=_IMAGE["optim"] | dict(lr=4e-4, total_steps=500_000,
                                     reference_global_batch=256),
    ),
    "audio-base": _AUDIO | dict(
        model=_AUDIO["model"] | dict(depth=12, prenet_depth=0, embed_dim=768, num_heads=12, clone_batch=8,
                                     top_k_layers=8, decoder_dim=384, decoder_kernel=7, decoder_layers=4,
                                     decoder_groups=16, layerdrop=0.05),
        masking=dict(ratio=0.5, adjust=0.05, length=5),
        ema=dict(decay=0.999, end_decay=0.99999, anneal_end_step=75_000),
        data=dict(batch_size=8, min_seconds=2.0, max_seconds=20.0),
        optim=_AUDIO["optim"] | dict(lr=7.5e-4, clip_grad=0.0, warmup_steps=8000, total_steps=400_000,
                                     reference_global_batch=64),
    ),
    "audio-large": _AUDIO | dict(
        model=_AUDIO["model"] | dict(depth=16, prenet_depth=8, embed_dim=1024, num_heads=16, clone_batch=12,
                                     top_k_layers=16, decoder_dim=768, decoder_kernel=7, decoder_layers=4,
                                     decoder_groups=16),
        masking=dict(ratio=0.55, adjust=0.1, length=5),
        ema=dict(decay=0.9997, end_decay=1.0, anneal_end_step=300_000),
        data=dict(batch_size=2, min_seconds=2.0, max_seconds=20.0),
        optim=_AUDIO["optim"] | dict(lr=4e-4, clip_grad=1.0, warmup_steps=10_000, total_steps=600_000,
                                     reference_global_batch=96),
    ),
    "text-base": _TEXT | dict(
        model=_TEXT["model"] | dict(depth=12, embed_dim=768, num_heads=12, clone_batch=8, top_k_layers=12),
        masking=_TEXT["masking"] | dict(ratio=0.48),
        ema=dict(decay=0.9999, end_decay=0.99999, anneal_end_step=100_000),
        data=dict(batch_size=4, max_tokens=512),
        optim=_TEXT["optim"] | dict(lr=2e-4, total_steps=1_000_000,
                                    reference_global_batch=64),
    ),
    "text-large": _TEXT | dict(
        model=_TEXT["model"] | dict(depth=24, embed_dim=1024, num_heads=16, clone_batch=8, top_k_layers=24,
                                    layer_norm_target_layer=True, instance_norm_target_layer=False,
                                    instance_norm_targets=True),
        masking=_TEXT["masking"] | dict(ratio=0.5),
        ema=dict(decay=0.9999, end_decay=0.99999, anneal_end_step=100_000),
        data=dict(batch_size=2, max_tokens=512),
        optim=_TEXT["optim"] | dict(lr=1e-4, total_steps=600_000,
                                    reference_global_batch=64),
    ),
}

_TINY = dict(depth=2, prenet_depth=0, embed_dim=64, num_heads=4, top_k_layers=2, clone_batch=4,
             decoder_dim=32, decoder_layers=2, decoder_groups=4)
_TINY_OPT = dict(lr=1e-3, warmup_steps=10, total_steps=300, reference_global_batch=None)
_TINY_CKPT = dict(every_steps=100, keep_last=2)
PRESETS["image-tiny"] = PRESETS["image-base"] | dict(
    model=PRESETS["image-base"]["model"] | _TINY | dict(image_size=32, patch_size=4, decoder_kernel=3),
    masking=dict(ratio=0.8, adjust=0.07, length=3),
    ema=dict(decay=0.998, end_decay=0.9999, anneal_end_step=300),
    data=dict(batch_size=8, num_workers=1),
    optim=PRESETS["image-base"]["optim"] | _TINY_OPT,
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)
PRESETS["audio-tiny"] = PRESETS["audio-base"] | dict(
    model=PRESETS["audio-base"]["model"] | _TINY | dict(
        conv_feature_layers=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
        conv_pos_width=5, conv_pos_groups=4, conv_pos_depth=2, decoder_kernel=7, layerdrop=0.0),
    ema=dict(decay=0.998, end_decay=0.9999, anneal_end_step=300),
    data=dict(batch_size=4, num_workers=1, min_seconds=0.5, max_seconds=1.0),
    optim=PRESETS["audio-base"]["optim"] | _TINY_OPT,
    guards=dict(collapse_check=False),
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)
PRESETS["text-tiny"] = PRESETS["text-base"] | dict(
    model=PRESETS["text-base"]["model"] | _TINY | dict(vocab_size=1000, max_positions=128, decoder_kernel=5,
                                                       decoder_groups=1),
    ema=dict(decay=0.998, end_decay=0.9999, anneal_end_step=300),
    data=dict(batch_size=8, num_workers=1, max_tokens=64),
    optim=PRESETS["text-base"]["optim"] | _TINY_OPT,
    guards=dict(collapse_check=False),
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)


# ---- data2vec 1.0 (data2vec1-spec A.1-A.2; docs/DATA2VEC1.md): M = 1, regression head, no decoder ----
_D2V1 = dict(variant="data2vec1", clone_batch=1, decoder_layers=0, cls_loss_weight=0.0)
PRESETS["d2v1-audio-base"] = dict(
    # fairseq data2vec_audio base_librispeech: post-LN, conv positions (k = 95 // 5 = 19, 16 groups,
    # 5 layers), no ALiBi, FFN taps, K = 8 instance-normed, L2 / sqrt(D), Linear head
    model=_AUDIO["model"] | _D2V1 | dict(
        alibi=False, depth=12, prenet_depth=0, embed_dim=768, num_heads=12, top_k_layers=8, layerdrop=0.05,
        conv_pos_width=19, conv_pos_groups=16, conv_pos_depth=5, target_tap="ffn", loss_beta=0.0,
        loss_scale=None, loss_scale_rule="inv_sqrt_dim", head_layers=1),
    masking=dict(generator="speech_spans", ratio=0.65, length=10),
    ema=dict(decay=0.999, end_decay=0.9999, anneal_end_step=30_000),
    data=dict(batch_size=8, min_seconds=2.0, max_seconds=20.0),
    optim=dict(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, weight_decay_all=False, clip_grad=0.0,
               schedule="tri_stage",
               tri_stage_ratios=(0.03, 0.9, 0.07), warmup_steps=12_000, total_steps=400_000),
    guards=dict(collapse_check=True, collapse_after_steps=5000, min_target_var=0.1, min_pred_var=0.01),
)
PRESETS["d2v1-text-base"] = dict(
    # fairseq data2vec_text base (released config): RoBERTa vocabulary 50,265 with <mask> last,
    # 514 position rows, span-4 masking at 0.35, FFN taps, K = 10 layer-normed, smooth-L1 beta 4 x 1,
    # 2-layer head; cosine lr with 10k warm-up; no collapse guard (the reference has none)
    model=_TEXT["model"] | _D2V1 | dict(
        depth=12, embed_dim=768, num_heads=12, top_k_layers=10, vocab_size=50_265, max_positions=514,
        layer_norm_target_layer=True, instance_norm_target_layer=False, layer_norm_targets=False,
        instance_norm_targets=False, target_tap="ffn", loss_beta=4.0, loss_scale=1.0, head_layers=2),
    masking=dict(generator="text_spans", ratio=0.35, length=4, adjust=0.0),
    ema=dict(decay=0.999, end_decay=0.9999, anneal_end_step=300_000),
    data=dict(batch_size=16, max_tokens=512),
    # 16 GPUs x 8,192 tokens = 256 sequences of 512 per update
    optim=dict(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, weight_decay_all=False, clip_grad=5.0,
               schedule="cosine",
               warmup_steps=10_000, total_steps=1_000_000, min_lr_ratio=0.0, reference_global_batch=256),
    guards=dict(collapse_check=False),
)
PRESETS["d2v1-image-base"] = dict(
    # facebookresearch/data2vec_vision (BEiT code base) ViT-B/16: BEiT-style encoder (pre-LN, layer
    # scale 1e-4, shared relative position bias, drop path 0.25, attention dropout 0.05), blockwise
    # masks of 120 / 196 patches (blocks >= 16), block-end targets of the top 6 blocks (LN each,
    # average, LN), smooth-L1 beta 2 x 1/D, Linear head, constant EMA 0.9998 of the whole model
    model=_IMAGE["model"] | _D2V1 | dict(
        image_block="beit", pre_ln=True, depth=12, prenet_depth=0, embed_dim=768, num_heads=12,
        layer_norm_eps=1e-6, dropout=0.0, layerdrop=0.0, layer_scale_init=1e-4, drop_path=0.25,
        attention_dropout=0.05, shared_rel_pos_bias=True, image_size=224, patch_size=16, top_k_layers=6,
        instance_norm_target_layer=False, layer_norm_target_layer=True, layer_norm_targets=True,
        instance_norm_targets=False, target_tap="block_end", loss_beta=2.0, loss_scale=None,
        loss_scale_rule="inv_dim", head_layers=1),
    # masking.ratio x patches = 120 of 196; masking.length = the smallest block (BEiT min_num_patches)
    masking=dict(generator="blockwise", ratio=120 / 196, length=16, adjust=0.0),
    ema=dict(decay=0.9998, end_decay=0.9998, anneal_end_step=0),
    # BEiT's DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4), flip, RandomResizedCrop(0.08, 1)
    data=dict(batch_size=128, crop_scale_min=0.08, color_jitter=0.4),
    # AdamW (0.9, 0.999), eps 1e-8, wd 0.05, lr 2e-3, 10 epochs (6,250 updates) of warm-up, cosine
    # to 1e-5 at 800 epochs x 625 = 500,000 updates, clip 3
    # 128 images x 16 GPUs = 2,048 per update
    optim=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, clip_grad=3.0, schedule="cosine",
               warmup_steps=6250, total_steps=500_000, min_lr_ratio=1e-5 / 2e-3, reference_global_batch=2048),
    guards=dict(collapse_check=False),
)
_TINY1 = dict(depth=2, prenet_depth=0, embed_dim=64, num_heads=4, top_k_layers=2, layerdrop=0.0)
PRESETS["d2v1-image-tiny"] = PRESETS["d2v1-image-base"] | dict(
    model=PRESETS["d2v1-image-base"]["model"] | _TINY1 | dict(image_size=32, patch_size=4),
    ema=dict(decay=0.998, end_decay=0.998, anneal_end_step=0),
    data=PRESETS["d2v1-image-base"]["data"] | dict(batch_size=8, num_workers=1),
    optim=PRESETS["d2v1-image-base"]["optim"] | dict(lr=1e-3, warmup_steps=10, total_steps=300, min_lr_ratio=0.0,
                                                     reference_global_batch=None),
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)
PRESETS["d2v1-audio-tiny"] = PRESETS["d2v1-audio-base"] | dict(
    model=PRESETS["d2v1-audio-base"]["model"] | _TINY1 | dict(
        conv_feature_layers=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
        conv_pos_width=5, conv_pos_groups=4, conv_pos_depth=2),
    ema=dict(decay=0.998, end_decay=0.9999, anneal_end_step=300),
    data=dict(batch_size=4, num_workers=1, min_seconds=0.5, max_seconds=1.0),
    optim=PRESETS["d2v1-audio-base"]["optim"] | dict(lr=1e-3, warmup_steps=10, total_steps=300, reference_global_batch=None),
    guards=dict(collapse_check=False),
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)
PRESETS["d2v1-text-tiny"] = PRESETS["d2v1-text-base"] | dict(
    # vocab 1001: the test corpora's 1000 sentencepiece ids, plus <mask> = 1000
    model=PRESETS["d2v1-text-base"]["model"] | _TINY1 | dict(vocab_size=1001, max_positions=128),
    ema=dict(decay=0.998, end_decay=0.9999, anneal_end_step=300),
    data=dict(batch_size=8, num_workers=1, max_tokens=64),
    optim=PRESETS["d2v1-text-base"]["optim"] | dict(lr=1e-3, warmup_steps=10, total_steps=300, reference_global_batch=None),
    checkpoint=_TINY_CKPT, logging=dict(every_steps=10),
)


# ---- data2vec-aqc (data2vec-aqc-spec.md B.9; docs/AQC.md): data2vec 1.0 speech + two views, quantizer,
# k-means, cross-contrastive losses; the numbers besides model.aqc_* are d2v1-audio-base's
_AQC = dict(variant="data2vec_aqc", aqc_latent_groups=2, aqc_latent_vars=320, aqc_vq_dim=256,
            aqc_latent_temp=(2.0, 0.5, 0.999995),
            aqc_num_negatives=100, aqc_cluster_factor=16, aqc_logit_temp=0.1, aqc_same_cluster_scale=0.3,
            aqc_gate_scaling_on_identical=False, aqc_contrastive_weight=0.5, aqc_diversity_weight=0.1,
            aqc_features_pen_weight=10.0)
PRESETS["aqc-base"] = PRESETS["d2v1-audio-base"] | dict(
    model=PRESETS["d2v1-audio-base"]["model"] | _AQC,
    # the augmented view: Gaussian noise 0.6, reverb 0.7, background noise 0.8 from data.noise_dir
    # (the paper: MUSAN noise/; the user must name it, or set data.aug_background_p=0)
    data=PRESETS["d2v1-audio-base"]["data"] | dict(views="aqc"),
)
# CPU-sized: d2v1-audio-tiny plus a small quantizer (2 x 32 codes of 16), 20 negatives; no
# background noise (no MUSAN here; give data.noise_dir and data.aug_background_p=0.8 to add it)
PRESETS["aqc-tiny"] = PRESETS["d2v1-audio-tiny"] | dict(
    model=PRESETS["d2v1-audio-tiny"]["model"] | _AQC | dict(aqc_latent_vars=32, aqc_vq_dim=32,
                                                           aqc_num_negatives=20),
    data=PRESETS["d2v1-audio-tiny"]["data"] | dict(views="aqc", aug_background_p=0.0),
)


def preset_names() -> list[str]:
    return list(PRESETS)


def load_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; "
                          f"available: {', '.join(PRESETS)}")
    cfg = RunConfig.from_dict(copy.deepcopy(PRESETS[name]))
    cfg.preset = name
    return cfg


def load_yaml(path: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
    """Load a YAML config.  If it names a `preset`, start from that preset."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if base is None:
        base = load_preset(d["preset"]) if "preset" in d else RunConfig()
    _merge(base, d, prefix="")
    return base


def build_config(preset: str | None = None, yaml_path: str | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """Preset -> YAML -> command-line overrides, in that order (later wins)."""
    cfg = load_preset(preset) if preset else RunConfig()
    if yaml_path:
        cfg = load_yaml(yaml_path, base=cfg if preset else None)
    apply_overrides(cfg, overrides or [])
    if cfg.optim.total_steps == "auto":
        if cfg.max_steps is None:
            raise ConfigError("optim.total_steps=auto takes its value from max_steps: set max_steps too (or give "
                              "optim.total_steps a number of updates)")
        cfg.optim.total_steps = cfg.max_steps
    return cfg


def apply_overrides(cfg: RunConfig, args: list[str]) -> RunConfig:
    """Apply `--section.key value`, `--section.key=value` or `section.key=value` items."""
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" in a:
                key, value = a.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override --{a} has no value; write --{a} VALUE or {a}=VALUE")
                key, value = a, args[i + 1]
                i += 1
        elif "=" in a:
            key, value = a.split("=", 1)
        else:
            raise ConfigError(f"cannot read override {a!r}; write section.key=VALUE or --section.key VALUE")
        set_path(cfg, key.replace("-", "_"), yaml.safe_load(value) if value != "" else None)
        i += 1
    return cfg


def set_path(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for j, p in enumerate(parts[:-1]):
        _check_key(obj, p, ".".join(parts[:j]))
        obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:j + 1])} is a value, not a section")
    last = parts[-1]
    _check_key(obj, last, ".".join(parts[:-1]))
    f = {f.name: f for f in dataclasses.fields(obj)}[last]
    if dataclasses.is_dataclass(getattr(obj, last)):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} is a section; set its keys, e.g. {dotted}.KEY=VALUE")
        _merge(getattr(obj, last), value, prefix=dotted + ".")
        return
    setattr(obj, last, _coerce(value, f, obj, dotted))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check everything that can be checked before a process group exists."""
    m, p = cfg.model, cfg.parallel
    errs: list[str] = []
    if m.modality not in MODALITIES:
        errs.append(f"model.modality={m.modality!r}: must be one of {MODALITIES}")
    if m.embed_dim % m.num_heads:
        errs.append(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.num_heads % p.tp:
        errs.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}: "
                    f"choose a tp that divides the head count (e.g. {_divisors(m.num_heads)})")
    if (m.embed_dim * m.mlp_ratio) % p.tp:
        errs.append(f"the MLP width {int(m.embed_dim * m.mlp_ratio)} is not divisible by parallel.tp={p.tp}")
    if m.total_blocks % p.pp:
        errs.append(f"model.depth + model.prenet_depth = {m.total_blocks} blocks are not divisible by "
                    f"parallel.pp={p.pp}: choose pp in {_divisors(m.total_blocks)}")
    if p.pp > 1 and p.zero_stage >= 2:
        errs.append(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: pipeline parallelism works with "
                    "ZeRO stage 1 only (ZeRO-2/3 reduce and partition gradients/parameters during backward, which the "
                    "pipeline schedule interleaves across micro-batches). Use parallel.zero_stage=1 with pp>1, or "
                    "pp=1 with ZeRO-3 (add tp to fit memory)")
    elif p.pp > 1 and p.zero_stage == 0:
        errs.append(f"parallel.zero_stage=0 with parallel.pp={p.pp}: pipeline parallelism is wired for ZeRO stage 1 "
                    "(DeepSpeed's ZeRO-0 gradient clipping does not sum the norm over pipeline stages). Use "
                    "parallel.zero_stage=1: the same compute and gradient traffic, optimizer states sharded over "
                    "data parallelism")
    if p.engine not in ("deepspeed", "flat"):
        errs.append(f"parallel.engine={p.engine!r}: use 'deepspeed' or 'flat'")
    elif p.engine == "flat" and (p.zero_stage != 0 or p.pp > 1 or p.offload_optimizer):
        errs.append(f"parallel.engine=flat with parallel.zero_stage={p.zero_stage}, parallel.pp={p.pp}, "
                    f"parallel.offload_optimizer={p.offload_optimizer}: the flat engine replicates the optimizer "
                    f"(ZeRO-0's layout) and has no pipeline schedule; set parallel.zero_stage=0, parallel.pp=1 and "
                    f"no offload, or parallel.engine=deepspeed for sharding or pipelining")
    if p.zero_stage not in (0, 1, 2, 3):
        errs.append(f"parallel.zero_stage={p.zero_stage}: must be 0, 1, 2 or 3")
    if p.tp < 1 or p.pp < 1:
        errs.append(f"parallel.tp={p.tp} and parallel.pp={p.pp} must be >= 1")
    if world_size is not None and world_size % (p.tp * p.pp):
        errs.append(f"world size {world_size} is not divisible by tp x pp = {p.tp} x {p.pp} = {p.tp * p.pp}: "
                    f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp/parallel.pp")
    if not 1 <= m.top_k_layers <= m.depth:
        errs.append(f"model.top_k_layers={m.top_k_layers} must be between 1 and model.depth={m.depth} "
                    "(targets come from the last K shared blocks; prenet blocks never give targets)")
    if m.clone_batch < 1:
        errs.append(f"model.clone_batch={m.clone_batch} must be >= 1")
    if m.activation_checkpointing not in ("none", "full", "selective"):
        errs.append(f"model.activation_checkpointing={m.activation_checkpointing!r}: "
                    "use 'none', 'full' or 'selective'")
    if m.variant not in ("data2vec2",) + D2V1_VARIANTS:
        errs.append(f"model.variant={m.variant!r}: use 'data2vec2', 'data2vec1' or 'data2vec_aqc'")
    errs += _beit_errors(m)
    if m.modality == "image" and m.image_size % m.patch_size:
        errs.append(f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}")
    for key in ("dropout", "encoder_input_dropout", "decoder_input_dropout"):
        v = getattr(m, key)
        if v is not None and not 0.0 <= v < 1.0:
            errs.append(f"model.{key}={v} must be in [0, 1)")
    if m.decoder_projection_layers not in (1, 2):
        errs.append(f"model.decoder_projection_layers={m.decoder_projection_layers}: use 1 (one Linear) or 2 "
                    "(Linear -> GELU -> Linear, the text presets)")
    if m.decoder_dim % max(m.decoder_groups, 1):
        errs.append(f"model.decoder_dim={m.decoder_dim} is not divisible by model.decoder_groups={m.decoder_groups}")
    if not 0.0 < cfg.masking.ratio < 1.0:
        errs.append(f"masking.ratio={cfg.masking.ratio} must be in (0, 1)")
    if cfg.masking.length < 1:
        errs.append(f"masking.length={cfg.masking.length} must be >= 1")
    e = cfg.ema
    if not 0.0 <= e.decay <= e.end_decay <= 1.0:
        errs.append(f"ema.decay={e.decay} and ema.end_decay={e.end_decay} must satisfy 0 <= decay <= end_decay <= 1")
    if cfg.data.batch_size < 1:
        errs.append(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    if cfg.data.prepend_bos and cfg.data.max_tokens < 2:
        errs.append(f"data.max_tokens={cfg.data.max_tokens} leaves no text after <s>: use >= 2 or data.prepend_bos=false")
    if cfg.data.min_seconds > cfg.data.max_seconds:
        errs.append(f"data.min_seconds={cfg.data.min_seconds} > data.max_seconds={cfg.data.max_seconds}")
    if cfg.data.audio_crop not in ("batch_min", "random_length"):
        errs.append(f"data.audio_crop={cfg.data.audio_crop!r}: use 'batch_min' (the reference) or 'random_length'")
    if cfg.data.verify not in ("fast", "full", "none"):
        errs.append(f"data.verify={cfg.data.verify!r}: use 'fast', 'full' or 'none'")
    errs += _views_errors(cfg.data, m.modality)
    if not 0.0 <= cfg.data.color_jitter < 1.0:
        errs.append(f"data.color_jitter={cfg.data.color_jitter} must be in [0, 1) (BEiT: 0.4; 0 turns it off)")
    if cfg.data.max_bad_rows < 0:
        errs.append(f"data.max_bad_rows={cfg.data.max_bad_rows} must be >= 0 (0 stops at the first bad row)")
    if p.precision not in ("auto", "bf16", "fp32"):
        errs.append(f"parallel.precision={p.precision!r}: use 'auto', 'bf16' or 'fp32'")
    if cfg.optim.match_reference_batch and not cfg.optim.reference_global_batch:
        errs.append("optim.match_reference_batch=true needs optim.reference_global_batch (this preset has no "
                    "reference): set optim.reference_global_batch=N, or optim.grad_accum yourself")
    if not cfg.optim.lr > 0:
        errs.append(f"optim.lr={cfg.optim.lr} must be > 0 (the peak learning rate)")
    if cfg.optim.adam_eps_form not in ("torch", "fairseq"):
        errs.append(f"optim.adam_eps_form={cfg.optim.adam_eps_form!r}: use 'torch' (AdamW's) or 'fairseq' (eps "
                    f"added before the bias correction)")
    if cfg.optim.grad_accum < 1:
        errs.append(f"optim.grad_accum={cfg.optim.grad_accum} must be >= 1")
    if not isinstance(cfg.optim.total_steps, int):  # "auto" outside build_config
        errs.append(f"optim.total_steps={cfg.optim.total_steps!r}: give a number of updates, or build the config "
                    "with build_config (it resolves 'auto' to max_steps)")
    elif cfg.optim.warmup_steps > cfg.optim.total_steps:
        errs.append(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds optim.total_steps={cfg.optim.total_steps}")
    if cfg.checkpoint.keep_last < 1:
        errs.append(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    share = cfg.guards.max_target_position_share
    if share is not None and not 0.0 < share < 1.0:
        errs.append(f"guards.max_target_position_share={share} must be in (0, 1) (or null to only log it)")
    errs += _objective_errors(cfg)
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))


def _views_errors(d: DataConfig, modality: str) -> list[str]:
    """data.views and the second-view augmentation fields (data2vec-aqc-spec.md B.2)."""
    if d.views not in ("single", "aqc"):
        return [f"data.views={d.views!r}: use 'single' or 'aqc' (data2vec-aqc's augmented second view)"]
    if d.views == "single":
        return []
    errs = []
    if modality != "audio":
        errs.append(f"data.views='aqc' is for speech; model.modality is {modality!r}: use data.views=single")
    for key in ("aug_noise_p", "aug_reverb_p", "aug_background_p"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            errs.append(f"data.{key}={getattr(d, key)} must be in [0, 1]")
    lo, hi = (tuple(d.aug_noise_std) + (None, None))[:2]
    if len(d.aug_noise_std) != 2 or not 0.0 <= lo <= hi:
        errs.append(f"data.aug_noise_std={d.aug_noise_std}: give (min, max) with 0 <= min <= max")
    snr = tuple(d.aug_background_snr_db)
    if len(snr) != 2 or not all(float(v).is_integer() for v in snr) or snr[0] > snr[1]:
        errs.append(f"data.aug_background_snr_db={d.aug_background_snr_db}: give integers (min, max), min <= max")
    if d.aug_background_p > 0:
        from .data.augment_speech import noise_dir_problem

        why = noise_dir_problem(d.noise_dir)
        if why:
            errs.append(f"data.noise_dir={d.noise_dir!r} {why}: background noise (data.aug_background_p="
                        f"{d.aug_background_p}) needs a folder of .wav noise recordings (the paper used MUSAN "
                        "noise/); set data.noise_dir=DIR, or turn it off with data.aug_background_p=0")
    return errs


# the objectives built on data2vec 1.0 (mask embedding, M = 1, regression head): model/data2vec1.py
# and model/data2vec_aqc.py
D2V1_VARIANTS = ("data2vec1", "data2vec_aqc")

# which mask generator serves which (objective, modality); data2vec 1.0 vision: "blockwise"
_GENERATORS = {("data2vec2", mod): ("data2vec2",) for mod in MODALITIES} | {
    ("data2vec1", "audio"): ("speech_spans",), ("data2vec1", "text"): ("text_spans", "bert"),
    ("data2vec1", "image"): ("blockwise",), ("data2vec_aqc", "audio"): ("speech_spans",)}


def _objective_errors(cfg: RunConfig) -> list[str]:
    """Mixes of the two objectives that cannot work (docs/DATA2VEC1.md)."""
    m, mk, errs = cfg.model, cfg.masking, []
    if m.target_tap not in ("ffn", "block_end"):
        errs.append(f"model.target_tap={m.target_tap!r}: use 'ffn' or 'block_end'")
    if m.loss_scale_rule not in ("inv_sqrt_dim", "inv_dim", "one"):
        errs.append(f"model.loss_scale_rule={m.loss_scale_rule!r}: use 'inv_sqrt_dim', 'inv_dim' or 'one'")
    if cfg.optim.schedule not in ("cosine", "tri_stage"):
        errs.append(f"optim.schedule={cfg.optim.schedule!r}: use 'cosine' or 'tri_stage'")
    elif cfg.optim.schedule == "tri_stage" and (len(cfg.optim.tri_stage_ratios) != 3 or
                                                abs(sum(cfg.optim.tri_stage_ratios) - 1.0) > 1e-6):
        errs.append(f"optim.tri_stage_ratios={list(cfg.optim.tri_stage_ratios)}: give three phase shares "
                    "(warm-up, hold, decay) that sum to 1, e.g. [0.03, 0.9, 0.07]")
    allowed = _GENERATORS.get((m.variant, m.modality))
    if allowed and mk.generator not in allowed:
        errs.append(f"masking.generator={mk.generator!r} with model.variant={m.variant} and {m.modality}: use "
                    f"{' or '.join(repr(g) for g in allowed)} (the data2vec 2.0 masks are exact-count masks for M "
                    "clones; data2vec 1.0 draws its own, docs/DATA2VEC1.md)")
    if m.variant == "data2vec2":
        if m.image_block == "beit":
            errs.append("model.image_block=beit with model.variant=data2vec2: the BEiT-style ViT is data2vec 1.0's "
                        "image encoder; set model.variant=data2vec1 (preset d2v1-image-base) or model.image_block=vit2")
        if m.loss_scale_rule != "inv_sqrt_dim":
            errs.append(f"model.loss_scale_rule={m.loss_scale_rule!r} is a data2vec 1.0 setting; with "
                        "model.variant=data2vec2 set model.loss_scale instead")
        return errs
    if m.variant not in D2V1_VARIANTS:
        return errs
    if m.variant == "data2vec_aqc":
        errs += _aqc_errors(cfg)
    if m.clone_batch != 1:
        errs.append(f"model.clone_batch={m.clone_batch} with model.variant=data2vec1: data2vec 1.0 encodes one "
                    "masked copy of each sample; set model.clone_batch=1")
    if m.decoder_layers != 0:
        errs.append(f"model.decoder_layers={m.decoder_layers} with model.variant=data2vec1: data2vec 1.0 has no "
                    "convolutional decoder (its regression head is model.head_layers); set model.decoder_layers=0")
    if m.head_layers not in (1, 2):
        errs.append(f"model.head_layers={m.head_layers}: use 1 (Linear) or 2 (Linear-GELU-Linear)")
    if m.modality == "image" and m.image_block != "beit":
        errs.append(f"model.image_block={m.image_block!r} with model.variant=data2vec1: data2vec 1.0 vision is the "
                    "BEiT-style ViT (pre-LN, layer scale, shared relative position bias), not the data2vec 2.0 image "
                    "block; set model.image_block=beit (preset d2v1-image-base)")
    elif m.modality == "image" and m.target_tap != "block_end":
        errs.append(f"model.target_tap={m.target_tap!r} with model.image_block=beit: the BEiT encoder hands out "
                    "block-end taps only; set model.target_tap=block_end")
    if m.modality == "text" and mk.generator == "bert" and not (
            0 <= mk.bert_unchanged and 0 <= mk.bert_random and mk.bert_unchanged + mk.bert_random < 1):
        errs.append(f"masking.bert_unchanged={mk.bert_unchanged} + masking.bert_random={mk.bert_random} must be "
                    "in [0, 1) (the rest of the selected tokens become <mask>)")
    return errs


def _aqc_errors(cfg: RunConfig) -> list[str]:
    """data2vec-aqc (model.variant=data2vec_aqc): what the reference cannot run, and bad AQC numbers."""
    m, errs = cfg.model, []
    if m.modality != "audio":
        errs.append(f"model.variant=data2vec_aqc with model.modality={m.modality!r}: data2vec-aqc is speech only; "
                    "set model.modality=audio (preset aqc-base)")
    if cfg.data.views != "aqc":
        errs.append(f"data.views={cfg.data.views!r} with model.variant=data2vec_aqc: the student reads the augmented "
                    "second view (batch source_aug); set data.views=aqc")
    # B.8: the reference's smooth-L1 branch leaves its MSE term undefined and `loss_scale` is read
    # only there, so neither has a meaning in AQC mode
    if m.loss_beta != 0:
        errs.append(f"model.loss_beta={m.loss_beta} with model.variant=data2vec_aqc: data2vec-aqc's loss is L2 / "
                    "sqrt(D) (its smooth-L1 branch cannot run, spec B.8); set model.loss_beta=0")
    if m.loss_scale is not None or m.loss_scale_rule != "inv_sqrt_dim":
        errs.append(f"model.loss_scale={m.loss_scale} / model.loss_scale_rule={m.loss_scale_rule!r} with "
                    "model.variant=data2vec_aqc: the regression term is fixed at 1/sqrt(D) (spec B.8); set "
                    "model.loss_scale=null and model.loss_scale_rule=inv_sqrt_dim")
    if cfg.parallel.pp > 1:
        errs.append(f"parallel.pp={cfg.parallel.pp} with model.variant=data2vec_aqc: the quantizer needs the CNN "
                    "features of both views on the stage that holds the encoder outputs, which pipeline stages "
                    "do not pass on; use parallel.pp=1 (tensor parallelism and ZeRO-3 work)")
    if m.aqc_latent_groups < 1 or m.aqc_latent_vars < 2 or m.aqc_vq_dim % max(m.aqc_latent_groups, 1):
        errs.append(f"model.aqc_latent_groups={m.aqc_latent_groups}, model.aqc_latent_vars={m.aqc_latent_vars}, "
                    f"model.aqc_vq_dim={m.aqc_vq_dim}: need groups >= 1, vars >= 2 and vq_dim divisible by groups "
                    "(reference: 2, 320, 256)")
    temp = tuple(m.aqc_latent_temp)
    if len(temp) != 3 or not (temp[0] >= temp[1] > 0 and 0 < temp[2] <= 1):
        errs.append(f"model.aqc_latent_temp={m.aqc_latent_temp}: give (max, min, decay) with max >= min > 0 and "
                    "0 < decay <= 1 (reference: 2, 0.5, 0.999995)")
    if cfg.data.audio_crop != "batch_min":
        errs.append(f"data.audio_crop={cfg.data.audio_crop!r} with model.variant=data2vec_aqc: negatives and k-means "
                    "assume unpadded batches with the same masked count per row; set data.audio_crop=batch_min")
    if m.aqc_num_negatives < 1 or m.aqc_cluster_factor < 1:
        errs.append(f"model.aqc_num_negatives={m.aqc_num_negatives} and model.aqc_cluster_factor="
                    f"{m.aqc_cluster_factor} must be >= 1 (reference: 100, 16)")
    if not m.aqc_logit_temp > 0 or not 0 <= m.aqc_same_cluster_scale <= 1:
        errs.append(f"model.aqc_logit_temp={m.aqc_logit_temp} must be > 0 and model.aqc_same_cluster_scale="
                    f"{m.aqc_same_cluster_scale} in [0, 1] (reference: 0.1, 0.3)")
    for key in ("aqc_contrastive_weight", "aqc_diversity_weight", "aqc_features_pen_weight"):
        if getattr(m, key) < 0:
            errs.append(f"model.{key}={getattr(m, key)} must be >= 0 (reference: 0.5, 0.1, 10)")
    return errs


def _beit_errors(m: ModelConfig) -> list[str]:
    """The BEiT-style vision fields (model/beit.py) that cannot work, or that would be ignored."""
    errs = []
    if m.image_block not in ("vit2", "beit"):
        return [f"model.image_block={m.image_block!r}: use 'vit2' (the data2vec 2.0 ViT) or 'beit' "
                "(the BEiT-style ViT of data2vec 1.0)"]
    if not 0.0 <= m.drop_path < 1.0:
        errs.append(f"model.drop_path={m.drop_path} must be in [0, 1)")
    if not 0.0 <= m.attention_dropout < 1.0:
        errs.append(f"model.attention_dropout={m.attention_dropout} must be in [0, 1)")
    if m.layer_scale_init < 0:
        errs.append(f"model.layer_scale_init={m.layer_scale_init} must be >= 0 (0: no layer scale)")
    if m.image_block == "vit2":
        # the 2.0 block has its own knobs (model.dropout, model.layerdrop): refuse silently ignored ones
        for name in ("drop_path", "attention_dropout"):
            if getattr(m, name) != 0.0:
                errs.append(f"model.{name}={getattr(m, name)} is used by BEiT blocks only: set "
                            f"model.image_block=beit, or model.{name}=0 (the 2.0 block uses model.dropout)")
        return errs
    if m.modality != "image":
        errs.append(f"model.image_block='beit' is an image encoder, but model.modality={m.modality!r}: "
                    "set model.image_block=vit2")
    if not m.pre_ln:
        errs.append("model.image_block='beit' is a pre-LN block: set model.pre_ln=true")
    if m.prenet_depth:
        errs.append(f"model.prenet_depth={m.prenet_depth}: the BEiT encoder has no prenet; put all "
                    "blocks in model.depth")
    if m.dropout != 0.0 or m.layerdrop != 0.0:
        errs.append(f"model.dropout={m.dropout} / model.layerdrop={m.layerdrop} apply to the 2.0 blocks; "
                    "BEiT blocks use model.attention_dropout and model.drop_path: set both to 0")
    return errs


def match_reference_batch(cfg: RunConfig, world_size: int) -> RunConfig:
    """With optim.match_reference_batch, set optim.grad_accum so that the global batch
    (data-parallel ranks x data.batch_size x grad_accum) equals optim.reference_global_batch;
    ConfigError when no whole number of micro-batches does.  Otherwise nothing changes."""
    o = cfg.optim
    if not o.match_reference_batch or not o.reference_global_batch:
        return cfg
    dp = max(world_size // (cfg.parallel.tp * cfg.parallel.pp), 1)
    per_update = dp * cfg.data.batch_size
    if o.reference_global_batch % per_update:
        raise ConfigError(f"optim.match_reference_batch: the reference global batch {o.reference_global_batch} is not "
                          f"a multiple of {dp} data-parallel ranks x data.batch_size={cfg.data.batch_size}: choose "
                          f"data.batch_size so that {dp} x data.batch_size divides {o.reference_global_batch} "
                          f"(or set optim.grad_accum yourself)")
    o.grad_accum = o.reference_global_batch // per_update
    return cfg


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_key(obj: Any, key: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        section = where or "top level"
        raise ConfigError(f"unknown config key {(where + '.' if where else '') + key!r} in {section}"
                          f"{_did_you_mean(key, names)}; known keys: {', '.join(names)}")


def _merge(obj: Any, d: dict, prefix: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    for k, v in d.items():
        _check_key(obj, k, prefix.rstrip("."))
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, prefix=prefix + k + ".")
        else:
            f = {f.name: f for f in dataclasses.fields(obj)}[k]
            setattr(obj, k, _coerce(v, f, obj, prefix + k))


def _coerce(value: Any, f: dataclasses.Field, owner: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, or raise a readable error."""
    if value == "auto" and f.metadata.get("auto"):
        return value  # resolved by build_config (optim.total_steps=auto)
    hints = typing.get_type_hints(type(owner))
    tp = hints.get(f.name, Any)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if math.isnan(v):
                raise TypeError
            return v
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if tp in (tuple, list) or origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(value) if (tp is tuple or origin is tuple) else [
                list(x) if isinstance(x, tuple) else x for x in value]
    except (TypeError, ValueError):
        tname = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{name}={value!r} is not a valid {tname}") from None
    return value


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x
