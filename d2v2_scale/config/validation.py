"""Up-front checks of a resolved config: everything that can be checked before a process group
or any GPU memory exists.  Each problem is one line naming the field and the fix; all of them are
reported together in one `ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..objectives import OBJECTIVES
from .common import MODALITIES, ConfigError

if TYPE_CHECKING:
    from .schema import DataConfig, ModelConfig, RunConfig


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
    if m.variant not in OBJECTIVES:
        errs.append(f"model.variant={m.variant!r}: use {', '.join(repr(n) for n in list(OBJECTIVES)[:-1])} or "
                    f"{list(OBJECTIVES)[-1]!r}")
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
    errs += mixture_errors(cfg.data) + tracker_errors(cfg.logging)
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))


def _views_errors(d: DataConfig, modality: str) -> list[str]:
    """data.views and the second-view augmentation fields (docs/REFERENCE.md §3.2)."""
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
        why = noise_dir_problem(d.noise_dir)
        if why:
            errs.append(f"data.noise_dir={d.noise_dir!r} {why}: background noise (data.aug_background_p="
                        f"{d.aug_background_p}) needs a folder of .wav noise recordings (the paper used MUSAN "
                        "noise/); set data.noise_dir=DIR, or turn it off with data.aug_background_p=0")
    return errs


# the objectives built on data2vec 1.0 (mask embedding, M = 1, regression head), from their records
D2V1_VARIANTS = tuple(name for name, o in OBJECTIVES.items() if o.builds_on_data2vec1)


def noise_dir_problem(noise_dir) -> str | None:
    """Why data.noise_dir cannot serve background noise (None: it can)."""
    if not noise_dir:
        return "is not set"
    p = Path(noise_dir)
    if not p.is_dir():
        return "does not exist" if not p.exists() else "is not a directory"
    if not any(q.suffix.lower() == ".wav" for q in p.rglob("*")):
        return "holds no .wav files (searched recursively)"
    return None


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
    obj = OBJECTIVES.get(m.variant)
    if obj is None:  # reported by validate()
        return errs
    allowed = obj.masks.get(m.modality)  # which mask generators this objective draws for the modality
    if allowed and mk.generator not in allowed:
        errs.append(f"masking.generator={mk.generator!r} with model.variant={m.variant} and {m.modality}: use "
                    f"{' or '.join(repr(g) for g in allowed)} (the data2vec 2.0 masks are exact-count masks for M "
                    "clones; data2vec 1.0 draws its own, docs/DATA2VEC1.md)")
    if not obj.builds_on_data2vec1:
        if m.image_block == "beit":
            errs.append("model.image_block=beit with model.variant=data2vec2: the BEiT-style ViT is data2vec 1.0's "
                        "image encoder; set model.variant=data2vec1 (preset d2v1-image-base) or model.image_block=vit2")
        if m.loss_scale_rule != "inv_sqrt_dim":
            errs.append(f"model.loss_scale_rule={m.loss_scale_rule!r} is a data2vec 1.0 setting; with "
                        "model.variant=data2vec2 set model.loss_scale instead")
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
    if m.modality not in OBJECTIVES["data2vec_aqc"].modalities:
        errs.append(f"model.variant=data2vec_aqc with model.modality={m.modality!r}: data2vec-aqc is speech only; "
                    "set model.modality=audio (preset aqc-base)")
    if cfg.data.views != "aqc":
        errs.append(f"data.views={cfg.data.views!r} with model.variant=data2vec_aqc: the student reads the augmented "
                    "second view (batch source_aug); set data.views=aqc")
    # B.8: the reference's smooth-L1 branch leaves its MSE term undefined and `loss_scale` is read
    # only there, so neither has a meaning in AQC mode
    if m.loss_beta != 0:
        errs.append(f"model.loss_beta={m.loss_beta} with model.variant=data2vec_aqc: data2vec-aqc's loss is L2 / "
                    "sqrt(D) (its smooth-L1 branch cannot run, docs/REFERENCE.md §3.8); set model.loss_beta=0")
    if m.loss_scale is not None or m.loss_scale_rule != "inv_sqrt_dim":
        errs.append(f"model.loss_scale={m.loss_scale} / model.loss_scale_rule={m.loss_scale_rule!r} with "
                    "model.variant=data2vec_aqc: the regression term is fixed at 1/sqrt(D) (docs/REFERENCE.md §3.8); set "
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
    """The BEiT-style vision fields (model/modalities/beit.py) that cannot work, or that would be ignored."""
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



def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mixture_errors(d) -> list[str]:
    """Config-level problems of data.manifests / data.manifest_weights (no file is read)."""
    errs = []
    if d.manifests and d.manifest:
        errs.append("data.manifest and data.manifests are both set: give one corpus as data.manifest, or a mix as "
                    "data.manifests=[A/manifest.json,B/manifest.json] (data.manifest=null)")
    if d.manifest_weights and not d.manifests:
        errs.append("data.manifest_weights is set without data.manifests: the weights are the shares of the corpora "
                    "listed in data.manifests")
    if not d.manifests:
        return errs
    if not all(isinstance(p, str) and p for p in d.manifests):
        errs.append(f"data.manifests={list(d.manifests)!r}: give a list of manifest paths")
    elif len({os.path.normpath(p) for p in d.manifests}) != len(d.manifests):
        errs.append(f"data.manifests={list(d.manifests)!r} names a corpus twice: list each once and raise its "
                    "share in data.manifest_weights instead")
    if d.manifest_weights:
        w = d.manifest_weights
        if len(w) != len(d.manifests):
            errs.append(f"data.manifest_weights has {len(w)} values for {len(d.manifests)} data.manifests: give one "
                        "weight per corpus (or none: in proportion to their sizes)")
        elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x)
                     for x in w):
            errs.append(f"data.manifest_weights={list(w)!r}: every weight must be a positive number")
    return errs


_TAG_MAX = 64  # W&B's limit on a tag's length


def tracker_errors(lg) -> list[str]:
    """Problems of the logging.wandb* fields (config only; the package is checked by wandb_missing)."""
    errs = []
    if not lg.wandb:
        return errs
    if not isinstance(lg.wandb_project, str) or not lg.wandb_project.strip() or re.search(r"[/\\#?%:]",
                                                                                          lg.wandb_project):
        errs.append(f"logging.wandb_project={lg.wandb_project!r}: give a W&B project name without / \\ # ? % :")
    if lg.wandb_entity is not None and (not str(lg.wandb_entity).strip() or "/" in str(lg.wandb_entity)):
        errs.append(f"logging.wandb_entity={lg.wandb_entity!r}: give a W&B user or team name, or null for the "
                    "account's default")
    bad = [t for t in lg.wandb_tags if not isinstance(t, str) or not t.strip() or len(t) > _TAG_MAX]
    if bad:
        errs.append(f"logging.wandb_tags: {bad!r}: tags are non-empty strings of at most {_TAG_MAX} characters")
    return errs
