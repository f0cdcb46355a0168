"""Analytic FLOPs of one training step (per micro-batch of B samples).

A multiply-add counts 2 FLOPs; backward = 2x forward, so forward + backward = 3x forward.
Counted: matmuls and convolutions (norms, softmax, GELU, the loss are ignored, < 1-2%).

    teacher  = 1x forward of the teacher part on B full sequences (T + E tokens)
             (+ the image patch embedding; audio/text teachers reuse the student's features)
    local    = 3x local encoder on B samples (computed once per sample, not per clone)
    student  = 3x blocks on B*M rows of (T_keep + E) tokens
             (+ 3x audio positional conv, which runs full-length on all B*M rows)
    decoder  = 3x decoder on B*M rows of T positions
data2vec 1.0 (model.variant=data2vec1): M = 1, the student's blocks see all T positions, and the
"decoder" term is the regression head on the masked positions.  What differs per objective is its
record (d2v2_scale/objectives.py: gathers_kept, flops_head, student_local_views); per modality,
the cost methods of its `Modality` (model/core/modality.py).
"""

from __future__ import annotations

from ..objectives import objective_of, uses_beit
from .modalities import get_modality



def block_flops(tokens: int, d: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block on a sequence of `tokens` tokens."""
    f = int(d * mlp_ratio)
    dense = 2 * tokens * d * (3 * d) + 2 * tokens * d * d + 2 * 2 * tokens * d * f  # qkv, proj, fc1+fc2
    attn = 2 * 2 * tokens * tokens * d  # q k^T and probs v
    return float(dense + attn)


def _decoder_flops(m, t: int) -> float:
    k = m.decoder_kernel ** get_modality(m).decoder_ndim
    total, c_in = 0.0, m.embed_dim
    for _ in range(m.decoder_layers):
        total += 2 * t * (c_in // m.decoder_groups) * k * m.decoder_dim
        c_in = m.decoder_dim
    if m.decoder_projection_layers == 2:  # Linear(dec, r*dec) -> GELU -> Linear(r*dec, D) (text, docs/REFERENCE.md §1.10 D1)
        hidden = int(m.decoder_dim * m.decoder_projection_ratio)
        return total + 2 * t * hidden * (m.decoder_dim + m.embed_dim)
    return total + 2 * t * m.decoder_dim * m.embed_dim


def _head_flops(m, masked: float) -> float:
    """data2vec 1.0 regression head on ~masked positions (masking.ratio x T: an upper bound, spans
    overlap): Linear(D, D), or Linear(D, 2D) -> Linear(2D, D)."""
    d = m.embed_dim
    return 2.0 * masked * (d * d if m.head_layers == 1 else 4 * d * d)


def _local_flops(m, seq: int, n_samples: int | None) -> float:
    return get_modality(m).local_flops(seq, n_samples)


def seq_len_and_keep(cfg, audio_samples: int | None = None, text_tokens: int | None = None) -> tuple[int, int]:
    """(T, T_keep) for the config's modality and masking ratio (docs/REFERENCE.md §1.7 counts)."""
    m, r = cfg.model, cfg.masking.ratio
    mod = get_modality(m)
    t = mod.sequence_length(cfg, audio_samples, text_tokens)
    if not objective_of(m).gathers_kept:
        return t, t  # data2vec 1.0: the student encodes every position (mask embedding, no gather)
    return t, mod.kept_count(t, r)


def step_flops(cfg, batch_size: int | None = None, audio_samples: int | None = None,
               text_tokens: int | None = None, t_keep: int | None = None) -> dict[str, float]:
    """FLOPs of one micro-step for `batch_size` samples (default cfg.data.batch_size)."""
    m = cfg.model
    b = batch_size or cfg.data.batch_size
    if uses_beit(m):  # data2vec 1.0 vision: its own step shape (beit_step_flops)
        return beit_step_flops(cfg, b)
    n = b * m.clone_batch
    t, keep = seq_len_and_keep(cfg, audio_samples, text_tokens)
    keep = t_keep if t_keep is not None else keep
    mod, obj = get_modality(m), objective_of(m)
    e = mod.num_extra_tokens
    nb = m.total_blocks
    local = _local_flops(m, t, audio_samples or int(cfg.data.max_seconds * cfg.data.sample_rate))
    pos = mod.positions_flops(t)

    # the teacher runs the front end itself only where it owns it (image: the patch embedding)
    teacher = b * (nb * block_flops(t + e, m.embed_dim, m.mlp_ratio) + pos
                   + (local if "local" in mod.teacher_parts else 0.0))
    student = 3 * n * (nb * block_flops(keep + e, m.embed_dim, m.mlp_ratio) + pos)
    # data2vec-aqc runs the CNN front end on two views (its quantizer, projections and k-means are
    # small next to it and are left out)
    local_s = 3 * b * local * obj.student_local_views
    decoder = 3 * n * (_head_flops(m, cfg.masking.ratio * t) if obj.flops_head == "regression"
                       else _decoder_flops(m, t))
    out = {"teacher": teacher, "student": student, "local": local_s, "decoder": decoder}
    out["total"] = sum(out.values())
    return out


def beit_encoder_flops(m) -> float:
    """Forward FLOPs of the BEiT encoder (model/modalities/beit.py) on one image: the patch embedding, then
    every block on 1 + P tokens (its relative position bias is a gather, not a matmul)."""
    return _local_flops(m, m.num_patches, None) + m.total_blocks * block_flops(m.num_patches + 1, m.embed_dim,
                                                                                m.mlp_ratio)


def beit_step_flops(cfg, batch_size: int | None = None) -> dict[str, float]:
    """One data2vec 1.0 vision micro-step on B images: the teacher encodes each image once
    (forward), the student encodes each once with its masked patches replaced (M = 1, all 1 + P
    tokens, forward + backward); no decoder.  The Linear(D, D) head on the masked patches adds
    < 1 % and is not counted, like the norms."""
    m = cfg.model
    b = batch_size or cfg.data.batch_size
    local = _local_flops(m, m.num_patches, None)
    blocks = beit_encoder_flops(m) - local
    out = {"teacher": b * (blocks + local), "student": 3 * b * blocks, "local": 3 * b * local, "decoder": 0.0}
    out["total"] = sum(out.values())
    return out


def train_step_flops(cfg, **kwargs) -> float:
    """Total FLOPs of one micro-step on one data-parallel rank (cfg.data.batch_size samples)."""
    return step_flops(cfg, **kwargs)["total"]


def encoder_params_analytic(m) -> int:
    """Encoder parameter count from the config alone (blocks + front end), no model built."""
    if uses_beit(m):
        return beit_encoder_params(m)
    d, f = m.embed_dim, int(m.embed_dim * m.mlp_ratio)
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return m.total_blocks * per_block + get_modality(m).front_end_params()


def beit_encoder_params(m) -> int:
    """Parameter count of the BEiT encoder (model/modalities/beit.py) at TP=1 from the config alone: patch
    embedding, CLS, mask token, relative position table(s) ((2g-1)^2 + 3 rows x H), blocks with
    q/v-only qkv bias and layer scale, final norm."""
    d, f, g = m.embed_dim, int(m.embed_dim * m.mlp_ratio), m.image_size // m.patch_size
    table = ((2 * g - 1) ** 2 + 3) * m.num_heads
    per_block = (3 * d * d + 2 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    per_block += 2 * d if m.layer_scale_init > 0 else 0
    per_block += 0 if m.shared_rel_pos_bias else table
    front = m.in_chans * m.patch_size ** 2 * d + d + 2 * d  # patch embedding, CLS, mask token
    return front + (table if m.shared_rel_pos_bias else 0) + m.total_blocks * per_block + 2 * d


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, peak_tflops: float) -> float:
    return flops_per_step / max(step_seconds, 1e-12) / (n_devices * peak_tflops * 1e12)


__all__ = ["beit_encoder_flops", "beit_encoder_params", "beit_step_flops", "block_flops", "step_flops", "train_step_flops", "seq_len_and_keep", "encoder_params_analytic", "mfu"]

