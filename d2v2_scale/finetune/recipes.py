"""The reference's fine-tuning recipes (docs/FINETUNE.md) and the pieces transformers.Trainer lacks:
layer-wise LR decay param groups (as fairseq's mae_image_classification / wav2vec2_asr), the
tri-stage LR schedule (fairseq's tri_stage), character error rate."""

from __future__ import annotations

from ..train.schedules import TriStage

# fairseq examples/data2vec/config/vision/finetuning/mae_imagenet_clean.yaml + mae_image_classification defaults
IMAGE_REFERENCE = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=16000, max_steps=250200,
                       batch_size=512, layer_decay=0.65, mixup=0.7, cutmix=1.0, mixup_prob=0.9, mixup_switch_prob=0.5,
                       label_smoothing=0.1, drop_path_rate=0.1, min_lr=1e-6)
# fairseq examples/wav2vec/config/finetuning/base_100h.yaml (+ Wav2Vec2AsrConfig defaults)
CTC_REFERENCE = dict(lr=3e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, max_steps=80000,
                     phase_ratio=(0.1, 0.4, 0.5), final_lr_scale=0.05, freeze_feature_encoder=True,
                     mask_time_prob=0.65, mask_time_length=10, mask_feature_prob=0.5, mask_feature_length=64,
                     layerdrop=0.1, activation_dropout=0.1, freeze_finetune_updates=0, layer_decay=1.0,
                     # Wav2Vec2AsrConfig's defaults (0; transformers' Data2VecAudioConfig defaults to 0.1),
                     # fairseq's ctc criterion zero_infinity: true
                     hidden_dropout=0.0, attention_dropout=0.0, final_dropout=0.0, feat_proj_dropout=0.0,
                     ctc_zero_infinity=True)
# fairseq examples/data2vec/config/v2/text_finetuning/*.yaml (task sentence_prediction, model
# data2vec_text_classification; docs/FINETUNE.md "Text"): Adam, lr 2e-5 (STS-B 4e-5), polynomial_decay
# (power 1, to 0) after 6% warm-up, ~10 epochs (max_update = 10 epochs' updates, max_epoch 10), batch 32
# (16 on the small sets), max_positions 512, pooler_dropout 0, no clipping.  max_steps None: 10 epochs.
TEXT_REFERENCE = dict(lr=2e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_ratio=0.06, warmup_steps=None,
                      power=1.0, epochs=10, max_steps=None, batch_size=32, max_positions=512, pooler_dropout=0.0)

# --recipe small: a CPU run of minutes (docs/FINETUNE.md); the reference's values otherwise
SMALL = {"image": dict(lr=2e-3, max_steps=1000, batch_size=32, warmup_steps=100, mixup=0.0, cutmix=0.0,
                       layer_decay=0.65, min_lr=1e-6),
         "ctc": dict(lr=3e-3, max_steps=1500, batch_size=16, mask_time_prob=0.1, mask_time_length=2,
                     mask_feature_prob=0.05, mask_feature_length=8, layerdrop=0.0)}
SMALL["text"] = dict(lr=2e-3, max_steps=1500, batch_size=32, max_positions=64)


def layer_decay_groups(model, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW param groups: block i (0-based) of N gets lr * layer_decay ** (N - i), everything else
    (front end, heads, norms after the blocks) lr; no weight decay on 1-D tensors (biases, norms),
    as the reference.  The blocks: the folder kind's (finetune/common.KINDS: data2vec2.encoder.blocks,
    transformers' Data2VecAudio encoder.layers, Data2VecVision / text encoder.layer)."""
    from .common import encoder_blocks

    blocks = encoder_blocks(model)
    n = len(blocks) + 1
    owner = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            owner[id(p)] = layer_decay ** (n - (i + 1))
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = owner.get(id(p), 1.0)
        wd = 0.0 if p.ndim == 1 or name.endswith(".bias") else weight_decay
        g = groups.setdefault((scale, wd), {"params": [], "lr": lr * scale, "weight_decay": wd})
        g["params"].append(p)
    return list(groups.values())


def tri_stage(step: int, total: int, phase_ratio=(0.1, 0.4, 0.5), init_lr_scale: float = 0.01,
              final_lr_scale: float = 0.05) -> float:
    """fairseq's tri_stage LR multiplier at `step`: linear warm-up from init_lr_scale, hold at 1,
    exponential decay to final_lr_scale, then stay there (pretraining's train/schedules.TriStage)."""
    return TriStage(total, phase_ratio, init_lr_scale, final_lr_scale)(step)


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(hyps: list[str], refs: list[str]) -> float:
    """Character error rate: total edit distance / total reference characters."""
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / max(sum(len(r) for r in refs), 1)
