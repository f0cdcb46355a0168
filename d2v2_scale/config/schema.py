"""The typed sections a run reads, and `RunConfig` that groups them.

`RunConfig` holds model (config/model.py), masking, ema, data, optim, parallel, checkpoint,
logging and guards.  A run starts from a named preset (config/presets/*.yaml: the public
recipes of docs/REFERENCE.md §1.9, §2 and §3.9, plus tiny CPU presets for tests), optionally
merges a YAML file, then applies command-line overrides (config/loading.py).  `validate()`
(config/validation.py) runs once, up front, before any process group or GPU memory exists, and
raises `ConfigError` with a message that names the field and says what to change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .merge import _merge, _to_plain
from .model import SECTION_TITLES, ModelConfig
from .validation import validate

__all__ = ["CheckpointConfig", "DataConfig", "EmaConfig", "GuardConfig", "LoggingConfig", "MaskConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig"]


@dataclass
class MaskConfig:
    """Mask ratio R, adjust A, block/span length B (docs/REFERENCE.md §1.7)."""

    ratio: float = 0.8
    adjust: float = 0.07
    length: int = 3
    # "data2vec2" (data/masking/data2vec2.py: exact counts, M clones) or a data2vec 1.0 generator
    # (data/masking/data2vec1.py): "speech_spans" (fairseq compute_mask_indices: p = ratio, span =
    # length, probabilistic rounding, trimmed to the batch minimum), "text_spans" (span = length
    # at p = ratio, every masked token -> <mask>), "bert" (ratio of tokens selected; of those
    # bert_unchanged stay and bert_random become random tokens, the rest <mask>)
    generator: str = "data2vec2"
    bert_unchanged: float = 0.1
    bert_random: float = 0.1


@dataclass
class EmaConfig:
    """Teacher EMA schedule (docs/REFERENCE.md §1.4)."""

    decay: float = 0.9998
    end_decay: float = 0.99999
    anneal_end_step: int = 100_000


@dataclass
class DataConfig:
    """Shards and batches."""

    manifest: str | None = None  # path to a data_prep manifest.json
    # several corpora mixed per run instead of data.manifest (data/mixture.py, docs/DATA.md):
    # manifest paths, and the share of samples drawn from each (any positive numbers, normalized;
    # empty: each corpus in proportion to its size)
    manifests: tuple = ()
    manifest_weights: tuple = ()
    batch_size: int = 16  # samples per data-parallel rank per micro-step (before x M)
    num_workers: int = 2
    seed: int = 1
    verify: str = "fast"  # "fast" (size + footer hash) | "full" | "none"; rows: checksum on read unless "none"
    max_bad_rows: int = 100  # rows failing their checksum that are replaced (and logged) before the run stops
    # image augmentation (random-resized-crop + flip, bicubic): the reference's scale range
    # (0.2, 1.0) (docs/REFERENCE.md §1.10 D5; torchvision's default would be 0.08)
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    hflip: bool = True
    # colour jitter strength (brightness = contrast = saturation), applied before the crop:
    # data2vec 1.0 vision (BEiT's ColorJitter(0.4, 0.4, 0.4)); 0 = off (data2vec 2.0)
    color_jitter: float = 0.0
    # audio, seconds: clips under min_seconds are dropped; "batch_min" cuts every clip of a batch to
    # the batch's shortest (at most max_seconds) at a random start, so batches carry no padding
    # (the reference, docs/REFERENCE.md §1.10 D6); "random_length" draws one length per batch in [min, max] and pads
    sample_rate: int = 16000
    min_seconds: float = 2.0
    max_seconds: float = 20.0
    audio_crop: str = "batch_min"
    # text blocks (tokens)
    max_tokens: int = 512
    # text: each sample is `<s>` + a window of max_tokens - 1 stream tokens (the reference's 511-token
    # blocks with <s> prepended, docs/REFERENCE.md §1.10 D10; d2v2-prep text packs blocks of 511 by default)
    prepend_bos: bool = True
    # data2vec-aqc (docs/REFERENCE.md §3.2): "aqc" adds `source_aug` [B, S] to audio batches, an
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
    # The public config's global batch in samples per update (docs/REFERENCE.md §1.9: batch/GPU x GPUs),
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
    # Weights & Biases next to TensorBoard (train/trackers.py; the optional extra `wandb`), rank 0
    # only; the run id is kept in the run folder so `--resume auto` continues the same W&B run
    wandb: bool = False
    wandb_project: str = "d2v2-scale"
    wandb_entity: str | None = None  # None: the account's default entity
    wandb_run_name: str | None = None  # None: the output folder's name
    wandb_tags: tuple = ()


@dataclass
class GuardConfig:
    max_consecutive_nonfinite: int = 5
    collapse_check: bool = False  # the reference's image configs turn it off (docs/REFERENCE.md §1.6)
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
        """The resolved config as YAML (`config.yaml`, `--print-config`): short lists on one line,
        the model section's groups under a comment heading each (config/model.py)."""
        text = yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=110)
        return _head_model_sections(text)

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


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, with lists of numbers (and lists of such lists) in flow style."""


def _flow_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(x, (list, dict)) or (isinstance(x, list) and not any(isinstance(y, (list, dict)) for y in x))
               for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _flow_list)


def _head_model_sections(text: str) -> str:
    """A `# ---- title` line before the first key of each model section group."""
    heads = {fields(cls)[0].name: title for cls, title in SECTION_TITLES.items()}
    out, in_model = [], False
    for line in text.splitlines():
        if not line.startswith(" "):
            in_model = line == "model:"
        elif in_model and not line.startswith("   ") and line[2:].split(":", 1)[0] in heads:
            out.append(f"  # ---- {heads[line[2:].split(':', 1)[0]]}")
        out.append(line)
    return "\n".join(out) + "\n"
