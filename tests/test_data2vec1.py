"""data2vec 1.0 (model/objectives/data2vec1.py, data/masking/data2vec1.py): the facts of docs/REFERENCE.md §2 for
speech and text -- mask statistics, mask-embedding placement, teacher taps and targets by hand,
loss numerics, EMA values and copied parts, teacher input, parameter counts, init, schedules,
the collapse guard, and the impossible mixes the config refuses."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2v2_scale.config import ConfigError, build_config, load_preset
from d2v2_scale.data.masking import data2vec1 as M
from d2v2_scale.data import rng


@pytest.fixture(scope="module", autouse=True)
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


def _keys(n, seed=3):
    return rng.make_keys(seed, 0, np.arange(n), 0)


from tests.dist_bodies_model import build_models as _build  # noqa: E402


# ---- 1. speech masks --------------------------------------------------------------------------
def test_speech_mask_statistics():
    n = 4000
    keys = _keys(n)
    counts = M.span_counts(keys, np.full(n, 500), 0.65, 10, 1)
    assert set(counts.tolist()) == {32, 33} and abs(counts.mean() - 32.5) < 0.03
    for t, expected in ((500, 0.4909), (250, 0.4926)):  # exact combinatorial values (docs/REFERENCE.md §2.2)
        m = M.speech_span_mask(keys, np.full(n, t), t, 0.65, 10, same_count=False)
        assert abs(m.mean() - expected) < 0.005, (t, m.mean())
        # every masked set is a union of length-10 runs starting at <= T - 11
        runs = np.lib.stride_tricks.sliding_window_view(m, 10, axis=1).all(-1)[:, : t - 10]  # start s <= T-11
        assert np.array_equal(M._spread(np.pad(runs, ((0, 0), (0, 10))), 10), m)


def test_speech_mask_same_count_and_padding():
    lengths = np.array([120, 80, 101, 64])
    m = M.speech_span_mask(_keys(4, seed=9), lengths, 120, 0.65, 10)
    assert len(set(m.sum(1).tolist())) == 1  # require_same_masks: the batch minimum everywhere
    untrimmed = M.speech_span_mask(_keys(4, seed=9), lengths, 120, 0.65, 10, same_count=False)
    assert m.sum(1)[0] == untrimmed.sum(1).min() and not (m & ~untrimmed).any()  # trimmed, never added
    for i, length in enumerate(lengths):
        assert not m[i, length:].any()  # spans only inside the real length


# ---- 2. text masks ----------------------------------------------------------------------------
def test_text_span_mask_statistics():
    n = 4000
    keys = _keys(n)
    counts = M.span_counts(keys, np.full(n, 512), 0.35, 4)
    assert set(counts.tolist()) == {44, 45}
    m = M.text_span_mask(keys, np.full(n, 512), 512, 0.35, 4)
    assert abs(m.mean() - 0.3066) < 0.005
    # spans clip at the real end: a row of 10 tokens in a batch of 16 never masks beyond 10
    short = M.text_span_mask(keys[:200], np.full(200, 10), 16, 0.35, 4)
    assert not short[:, 10:].any() and short[:, 9].any()


def test_text_inputs_span_and_bert():
    cfg = load_preset("d2v1-text-tiny")
    tok = np.random.default_rng(0).integers(4, 1000, (2000, 64))
    student, mask = M.text_inputs(_keys(2000), tok, np.full(2000, 64), cfg.masking, 1000, 1000)
    changed = student != tok
    assert np.array_equal(changed, mask) and (student[mask] == 1000).all()  # every masked token -> <mask>
    cfg.masking.generator, cfg.masking.ratio = "bert", 0.15
    student, mask = M.text_inputs(_keys(2000), tok, np.full(2000, 64), cfg.masking, 1000, 1000)
    sel_n = M.span_counts(_keys(2000), np.full(2000, 64), 0.15, 1)
    assert abs(sel_n.mean() / 64 - 0.15) < 0.01
    selected = M._distinct_starts(_keys(2000), sel_n, np.full(2000, 64), 64)
    changed = (student != tok) & ~mask
    assert not (mask & ~selected).any() and not (changed & ~selected).any()
    obs = np.array([mask.sum(), (selected & (student == tok)).sum(), changed.sum()], dtype=float)
    exp = obs.sum() * np.array([0.8, 0.1, 0.1])
    assert ((obs - exp) ** 2 / exp).sum() < 13.8  # chi-square, 2 dof, p = 0.001
    assert np.array_equal(mask, student == 1000)  # the loss covers exactly the <mask> inputs
    assert (student[changed] >= M.N_SPECIAL).all() and (student[changed] < 1000).all()


# ---- 4. mask-embedding placement ----------------------------------------------------------------
def test_speech_mask_emb_enters_before_the_conv_positions():
    cfg, s, _ = _build("d2v1-audio-tiny")
    s.eval()
    seen = {}
    s.encoder.positions.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    wav = torch.randn(1, 16000)
    t = cfg.model.audio_frames(16000)  # 49 frames
    mask = torch.zeros(1, t, dtype=torch.bool)
    mask[0, 20] = True
    batch = {"source": wav, "mask": mask}
    s(batch, teacher=None)
    x0, y0 = seen["x"].clone(), seen["y"].clone()
    assert torch.equal(x0[0, 20], s.mask_emb.detach())  # the encoder input at the masked frame
    with torch.no_grad():
        s.mask_emb.add_(1.0)
    s(batch, teacher=None)
    diff = (seen["y"] - y0).abs().amax(-1)[0]
    reach = cfg.model.conv_pos_depth * (cfg.model.conv_pos_width // 2)  # 2 x 2 frames
    assert diff[20 - reach] > 0 and diff[20 + reach] > 0  # unmasked neighbours see the mask embedding
    assert diff[: 20 - reach].max() == 0 and diff[21 + reach:].max() == 0  # ... within the conv's reach only


def test_text_mask_is_a_vocabulary_row():
    cfg, s, _ = _build("d2v1-text-tiny")
    assert M.text_mask_id(cfg.model) == s.encoder.local.tokens.num_embeddings - 1 == 1000
    src = torch.tensor([[5, 6, 7, 8]])
    stu = torch.tensor([[5, 1000, 7, 8]])
    emb = s.encoder.local.tokens.weight
    s.eval()  # the embedding dropout aside
    feats, _ = s.encoder.local(stu)
    manual = F.layer_norm(emb[stu] + s.encoder.local.positions.weight[:4], (64,),
                          s.encoder.local.norm.weight, s.encoder.local.norm.bias, 1e-5)
    assert torch.allclose(feats, manual)
    clean = s.encoder.local(src)[0]
    # 9. the teacher reads the full original sequence (paper), not the masked one, and in eval
    # mode: no embedding dropout even while the student trains
    s.train()
    teacher_in = s.teacher_source({"source": src, "student_source": stu, "mask": stu == 1000})
    assert torch.equal(teacher_in, clean) and s.encoder.local.training


def test_speech_teacher_reads_unmasked_features():
    cfg, s, t = _build("d2v1-audio-tiny")
    seen = {}
    t.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    wav = torch.randn(2, 8000)
    mask = torch.zeros(2, cfg.model.audio_frames(8000), dtype=torch.bool)
    mask[:, 5:15] = True
    s.train()
    s({"source": wav, "mask": mask}, teacher=t)
    feats, _ = s.encoder.local(wav)  # projected features: no mask_emb, no dropout
    assert torch.equal(seen["x"], feats.detach())


# ---- 5. teacher taps by hand -------------------------------------------------------------------
@pytest.mark.parametrize("tap", ["ffn", "block_end"])
def test_teacher_tap_by_hand(tap):
    cfg, s, _ = _build("d2v1-audio-tiny", target_tap=tap)
    enc = s.encoder
    enc.eval()
    x = torch.randn(3, 1, 64)  # 3 tokens, [T, B, D]
    blk = enc.blocks[1]
    h, taps = enc.run_blocks_tbd(x, None, top_k=1)
    x1, _ = enc.blocks[0](x, None)
    a = blk._attn(x1, None)
    y = blk.norm1(x1 + a)
    fc1, fc2 = blk.mlp.linear_fc1, blk.mlp.linear_fc2
    t = F.linear(F.gelu(F.linear(y, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    want = t if tap == "ffn" else blk.norm2(y + t)
    assert torch.allclose(taps[0], want.transpose(0, 1), atol=1e-6)
    assert torch.allclose(h, blk.norm2(y + t), atol=1e-6)


# ---- 6. targets by hand ------------------------------------------------------------------------
def test_targets_by_hand():
    from d2v2_scale.model.core.targets import make_targets

    g = torch.Generator().manual_seed(0)
    taps = [torch.randn(2, 5, 4, generator=g) * 3 + 1 for _ in range(3)]
    sp = load_preset("d2v1-audio-base").model
    sp.top_k_layers = 3

    def inorm(t):
        return (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)

    def lnorm(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)

    assert torch.allclose(make_targets(taps, sp), sum(inorm(t) for t in taps) / 3, atol=1e-5)
    tx = load_preset("d2v1-text-base").model
    tx.top_k_layers = 3
    assert torch.allclose(make_targets(taps, tx), sum(lnorm(t) for t in taps) / 3, atol=1e-5)
    vi = load_preset("d2v1-text-base").model  # vision's rule: LN per layer, average, LN again
    vi.top_k_layers, vi.layer_norm_targets = 3, True
    assert torch.allclose(make_targets(taps, vi), lnorm(sum(lnorm(t) for t in taps) / 3), atol=1e-5)
    assert make_targets([t.half() for t in taps], sp).dtype == torch.float32


# ---- 7. loss numerics --------------------------------------------------------------------------
def test_loss_numerics():
    from d2v2_scale.model.core.loss import loss_scale, token_loss

    one = torch.ones(1, 1)
    assert token_loss(one, 0 * one, 4.0, 1.0).item() == pytest.approx(0.125)
    assert token_loss(5 * one, 0 * one, 4.0, 1.0).item() == pytest.approx(3.0)
    assert token_loss(one, 0 * one, 2.0, 1.0).item() == pytest.approx(0.25)
    sp, tx = load_preset("d2v1-audio-base").model, load_preset("d2v1-text-base").model
    assert loss_scale(sp) == pytest.approx(1 / math.sqrt(768)) and loss_scale(tx) == 1.0
    sp.loss_scale_rule = "inv_dim"
    assert loss_scale(sp) == pytest.approx(1 / 768)  # vision: Sigma_c SL1_2 / 768
    d = torch.randn(7, 768)
    assert token_loss(d, 0 * d, 0.0, 1 / math.sqrt(768)).sum() / 7 == pytest.approx(
        float((d ** 2).sum(-1).mean() / math.sqrt(768)), rel=1e-5)


def test_student_loss_is_mean_over_masked_positions():
    cfg, s, _ = _build("d2v1-text-tiny")
    x = torch.randn(2, 6, 64)
    y = torch.randn(2, 6, 64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1], mask[1, 2], mask[1, 4] = True, True, True
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4] = True  # masked but padding: no loss
    loss, st = s.loss(x, y, mask, pad)
    p = s.decoder(torch.stack([x[0, 1], x[1, 2]]))
    want = F.smooth_l1_loss(p, torch.stack([y[0, 1], y[1, 2]]), beta=4.0, reduction="none").sum(-1).mean()
    assert st["masked_tokens"] == 2 and torch.allclose(loss, want)


# ---- 8. EMA ------------------------------------------------------------------------------------
def test_ema_schedules_and_copied_parts():
    from d2v2_scale.model import teacher_copied_prefixes
    from d2v2_scale.model.core.ema import ModuleEma, ema_decay_from_cfg

    sp, tx = load_preset("d2v1-audio-base"), load_preset("d2v1-text-base")
    assert ema_decay_from_cfg(sp, 0) == pytest.approx(0.999)
    assert ema_decay_from_cfg(sp, 15_000) == pytest.approx(0.99945)
    assert ema_decay_from_cfg(sp, 30_000) == ema_decay_from_cfg(sp, 40_000) == pytest.approx(0.9999)
    assert ema_decay_from_cfg(tx, 150_000) == pytest.approx(0.99945)
    vi = load_preset("d2v1-image-base")
    assert {ema_decay_from_cfg(vi, u) for u in (0, 1, 10_000, 500_000)} == {0.9998}  # constant
    assert teacher_copied_prefixes(vi) == ()  # vision: every teacher parameter is averaged

    cfg, s, t = _build("d2v1-audio-tiny")
    old = {n: p.detach().clone() for n, p in t.named_parameters()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    ema = ModuleEma(t, cfg, copy=teacher_copied_prefixes(cfg))
    tau = ema.step(s)
    sp_ = dict(s.named_parameters())
    for n, p in t.named_parameters():
        if n.startswith("encoder.positions."):
            assert torch.equal(p, sp_[n]), n  # copied, not averaged
        else:
            assert torch.allclose(p, tau * old[n] + (1 - tau) * sp_[n], atol=1e-6), n
    assert any(n.startswith("encoder.positions.") for n in old) and teacher_copied_prefixes(
        load_preset("d2v1-text-tiny")) == ()
    # text copies its embeddings by having none: they are the student's
    assert not any(n.startswith("encoder.local") for n, _ in _build("d2v1-text-tiny")[2].named_parameters())
    # the teacher never trains: no gradients, eval mode, deterministic
    x = torch.randn(2, 30, 64)
    t.train()
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    assert torch.equal(t(x), t(x))


# ---- 10. parameter counts, 11. init ------------------------------------------------------------
def test_parameter_counts_and_init():
    from d2v2_scale.model import build_student

    counts = {}
    for name in ("d2v1-audio-base", "d2v1-text-base"):
        with torch.device("meta"):
            s = build_student(load_preset(name))
        counts[name] = (sum(p.numel() for p in s.parameters()), sum(p.numel() for p in s.encoder.parameters()))
    with torch.device("meta"):
        s = build_student(load_preset("d2v1-image-base"))
    assert sum(p.numel() for p in s.parameters()) == 86_256_720  # BEiT ViT-B/16 + head (+ mask token)
    assert counts["d2v1-audio-base"] == (93_754_880, 93_163_520)
    assert counts["d2v1-text-base"] == (126_415_872, 124_054_272)
    _, s, _ = _build("d2v1-audio-tiny")
    assert 0 <= float(s.mask_emb.min()) and float(s.mask_emb.max()) < 1
    _, s, _ = _build("d2v1-text-tiny")
    emb = s.encoder.local.tokens.weight
    assert torch.equal(emb[1], torch.zeros(64)) and abs(float(emb.std()) - 0.02) < 0.002
    assert abs(float(s.decoder[0].weight.std()) - 0.02) < 0.002 and float(s.decoder[2].bias.abs().max()) == 0


# ---- issue item 2: the presets carry the reference hyperparameters (docs/REFERENCE.md §2) ----------
def test_presets_carry_the_spec_hyperparameters():
    """The numbers of docs/REFERENCE.md §2.2-§2.4 as the base presets hold them (the mask, target,
    loss and schedule tests above take them from the presets or from literals; this ties the
    two), and the tiny presets differ only in size and schedule length, not in the objective."""
    import dataclasses

    def fields(section, **want):
        got = {k: getattr(section, k) for k in want}
        assert got == want, {k: (got[k], v) for k, v in want.items() if got[k] != v}

    sp, tx, vi = (load_preset(f"d2v1-{m}-base") for m in ("audio", "text", "image"))
    norms = ("instance_norm_target_layer", "layer_norm_target_layer", "instance_norm_targets", "layer_norm_targets")
    # speech (fairseq base_librispeech)
    fields(sp.masking, generator="speech_spans", ratio=0.65, length=10)
    fields(sp.model, variant="data2vec1", clone_batch=1, decoder_layers=0, alibi=False, pre_ln=False,
           top_k_layers=8, target_tap="ffn", loss_beta=0.0, loss_scale=None, loss_scale_rule="inv_sqrt_dim",
           head_layers=1, dropout=0.1, layerdrop=0.05, conv_pos_width=95 // 5, conv_pos_groups=16,
           conv_pos_depth=5, layer_norm_eps=1e-5)
    assert [getattr(sp.model, n) for n in norms] == [True, False, False, False]
    fields(sp.ema, decay=0.999, end_decay=0.9999, anneal_end_step=30_000)
    fields(sp.optim, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_grad=0.0, schedule="tri_stage",
           tri_stage_ratios=(0.03, 0.9, 0.07), tri_stage_init_scale=0.01, tri_stage_final_scale=0.01,
           total_steps=400_000)
    fields(sp.data, min_seconds=2.0, max_seconds=20.0, audio_crop="batch_min")
    fields(sp.guards, collapse_check=True, collapse_after_steps=5000, min_target_var=0.1, min_pred_var=0.01)
    # text (fairseq data2vec_text base, the released config)
    fields(tx.masking, generator="text_spans", ratio=0.35, length=4)
    fields(tx.model, variant="data2vec1", clone_batch=1, decoder_layers=0, pre_ln=False, top_k_layers=10,
           target_tap="ffn", loss_beta=4.0, loss_scale=1.0, head_layers=2, dropout=0.1, layerdrop=0.0,
           vocab_size=50_265, max_positions=514)
    assert [getattr(tx.model, n) for n in norms] == [False, True, False, False]
    fields(tx.ema, decay=0.999, end_decay=0.9999, anneal_end_step=300_000)
    fields(tx.optim, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_grad=5.0, schedule="cosine",
           warmup_steps=10_000, total_steps=1_000_000, min_lr_ratio=0.0)
    fields(tx.data, max_tokens=512)
    assert not tx.guards.collapse_check
    # vision (data2vec_vision BEiT, ViT-B/16)
    fields(vi.masking, generator="blockwise", length=16)
    assert round(vi.masking.ratio * vi.model.num_patches) == 120 and vi.model.num_patches == 196
    fields(vi.model, variant="data2vec1", clone_batch=1, decoder_layers=0, image_block="beit", pre_ln=True,
           top_k_layers=6, target_tap="block_end", loss_beta=2.0, loss_scale=None, loss_scale_rule="inv_dim",
           head_layers=1, layer_norm_eps=1e-6, layer_scale_init=1e-4, drop_path=0.25, attention_dropout=0.05,
           shared_rel_pos_bias=True, dropout=0.0, layerdrop=0.0, image_size=224, patch_size=16)
    assert [getattr(vi.model, n) for n in norms] == [False, True, False, True]  # LN each, average, LN
    fields(vi.ema, decay=0.9998, end_decay=0.9998)
    fields(vi.optim, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, clip_grad=3.0, schedule="cosine",
           warmup_steps=6250, total_steps=500_000)
    assert vi.optim.lr * vi.optim.min_lr_ratio == pytest.approx(1e-5)
    fields(vi.data, color_jitter=0.4, crop_scale_min=0.08)
    # the CPU presets: the same objective, smaller
    objective = ("variant", "clone_batch", "decoder_layers", "target_tap", "loss_beta", "loss_scale",
                 "loss_scale_rule", "head_layers", "alibi", "pre_ln", "image_block", *norms)
    for base in (sp, tx, vi):
        tiny = load_preset(f"d2v1-{base.model.modality}-tiny")
        assert dataclasses.asdict(tiny.masking) == dataclasses.asdict(base.masking)
        assert [getattr(tiny.model, k) for k in objective] == [getattr(base.model, k) for k in objective]
        assert tiny.optim.schedule == base.optim.schedule and tiny.guards.collapse_after_steps == 5000


# ---- 12. schedules -----------------------------------------------------------------------------
def test_tri_stage_and_cosine_schedules():
    from d2v2_scale.train.schedules import build_scheduler

    def lrs(cfg, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
        sch = build_scheduler(opt, cfg.optim)
        out = {}
        for u in range(max(steps) + 1):
            if u in steps:
                out[u] = opt.param_groups[0]["lr"]
            opt.step()
            sch.step()
        return out

    cfg = load_preset("d2v1-audio-base")
    cfg.optim.total_steps = 10_000  # same shape, fewer steps
    lr = lrs(cfg, [0, 150, 300, 5000, 9299, 9300, 9650, 10_000, 10_100])
    peak = 5e-4
    assert lr[0] == pytest.approx(0.01 * peak) and lr[150] == pytest.approx(0.505 * peak)
    assert lr[300] == lr[5000] == lr[9299] == pytest.approx(peak)  # peak at 3 %, flat to 93 %
    assert lr[9650] == pytest.approx(peak * math.sqrt(0.01))  # exponential: half way = geometric mean
    assert lr[10_000] == pytest.approx(0.01 * peak) and lr[10_100] == pytest.approx(0.01 * peak)
    cfg = load_preset("d2v1-text-base")
    lr = lrs(cfg, [0, 5000, 10_000])
    assert lr[0] == pytest.approx(0.0, abs=1e-12) and lr[5000] == pytest.approx(1e-4, rel=1e-3)
    assert lr[10_000] == pytest.approx(2e-4, rel=1e-3)

    def lr_at(cfg, u):  # the cosine schedule's value after u updates, without stepping a million times
        from d2v2_scale.train.schedules import schedule_fn

        return schedule_fn(cfg.optim)(u) * cfg.optim.lr

    # text: cosine from 2e-4 at 10k to 0 at 1M (half way at 505k); vision: linear warm-up over
    # 6,250 updates to 2e-3, cosine to 1e-5 at 500k
    assert lr_at(cfg, 505_000) == pytest.approx(1e-4, rel=1e-4) and lr_at(cfg, 1_000_000) == pytest.approx(0, abs=1e-12)
    vi = load_preset("d2v1-image-base")
    assert [lr_at(vi, u) for u in (0, 3125, 6250)] == pytest.approx([0.0, 1e-3, 2e-3], rel=1e-6, abs=1e-12)
    assert lr_at(vi, 253_125) == pytest.approx(1e-5 + (2e-3 - 1e-5) / 2, rel=1e-4)
    assert lr_at(vi, 500_000) == pytest.approx(1e-5, rel=1e-6)


# ---- 13. collapse guard ------------------------------------------------------------------------
def test_collapse_guard():
    from d2v2_scale.train.guards import Guard

    sp, tx = load_preset("d2v1-audio-base"), load_preset("d2v1-text-base")
    assert Guard(sp.guards).collapse_reason(4999, 0.0, 1.0) is None
    assert "target variance" in Guard(sp.guards).collapse_reason(5001, 0.0, 1.0)
    assert Guard(tx.guards).collapse_reason(5001, 0.0, 0.0) is None  # text has no guard


# ---- 8 (issue). impossible mixes ---------------------------------------------------------------
@pytest.mark.parametrize("preset,override,needle", [
    ("d2v1-audio-tiny", "model.clone_batch=4", "model.clone_batch=4"),
    ("d2v1-audio-tiny", "model.decoder_layers=2", "no convolutional decoder"),
    ("d2v1-audio-tiny", "masking.generator=data2vec2", "masking.generator='data2vec2'"),
    ("audio-tiny", "masking.generator=speech_spans", "masking.generator='speech_spans'"),
    ("image-tiny", "model.variant=data2vec1", "BEiT"),
    ("d2v1-image-tiny", "model.image_block=vit2", "model.image_block='vit2' with model.variant=data2vec1"),
    ("d2v1-image-tiny", "model.variant=data2vec2", "model.image_block=beit with model.variant=data2vec2"),
    ("d2v1-image-tiny", "model.target_tap=ffn", "block-end taps only"),
    ("d2v1-text-tiny", "optim.schedule=linear", "optim.schedule"),
])
def test_impossible_mixes_are_refused(preset, override, needle):
    cfg = build_config(preset, overrides=[override])
    with pytest.raises(ConfigError, match=None) as e:
        cfg.validate()
    assert needle in str(e.value)


# ---- bench FLOPs, plan, bench CLI ----------------------------------------------------------------
def test_flops_plan_and_bench():
    import json

    from d2v2_scale.bench import synthetic_batch
    from d2v2_scale.model.flops import block_flops, step_flops
    from d2v2_scale.plan import param_tables
    from tests.test_bench import _run_script

    cfg = load_preset("d2v1-audio-base")
    t = cfg.model.audio_frames(int(cfg.data.max_seconds * cfg.data.sample_rate))
    f = step_flops(cfg, batch_size=2)
    pos = 5 * 2 * t * 48 * 19 * 768
    assert f["student"] == pytest.approx(3 * 2 * (12 * block_flops(t, 768) + pos))  # all T frames, M = 1
    assert f["decoder"] == pytest.approx(3 * 2 * 2 * 0.65 * t * 768 * 768)  # Linear head at masked frames
    # d2v2-plan's tables: the student counts of docs/REFERENCE.md §2.2-§2.3; the teachers: speech the pos conv, its LN and
    # the blocks (the CNN front end is the student's), text the blocks only (the embeddings are
    # the student's), vision the whole encoder without the head
    for name, n_student, n_teacher in (("d2v1-audio-base", 93_754_880, 3_505_920 + 1_536 + 12 * 7_087_872),
                                       ("d2v1-text-base", 126_415_872, 12 * 7_087_872),
                                       ("d2v1-image-base", 86_256_720, 86_256_720 - 768 * 768 - 768)):
        student, teacher = param_tables(load_preset(name))
        assert (sum(p.numel for p in student), sum(p.numel for p in teacher)) == (n_student, n_teacher), name
    for name in ("d2v1-audio-tiny", "d2v1-text-tiny", "d2v1-image-tiny"):
        c = load_preset(name)
        batch = synthetic_batch(c)
        assert batch["mask"].shape[0] == c.data.batch_size and batch["mask"].any()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        r = _run_script("import warnings\nwarnings.filterwarnings('ignore')\nfrom d2v2_scale.bench import main\n"
                        f"main(['--preset', 'd2v1-text-tiny', '--steps', '1', '--warmup', '1', '--json', "
                        f"r'{tmp}/b.json', '--output-dir', r'{tmp}/b'])\n", Path(tmp), timeout=120)
        row = json.loads(Path(tmp, "b.json").read_text())
    assert row["flops_per_step"] > 0 and row["clone_batch"] == 1, r.stdout[-500:]
    assert row["mfu"] is None if row["device"].startswith("cpu") else 0 < row["mfu"] < 1  # no GPU peak on a CPU


def test_vision_student_teacher_whole_model_ema():
    """BEiT vision: the teacher is an EMA of the whole encoder (patch embedding, CLS, mask token,
    relative position bias, blocks, final norm); mask_token enters before CLS; the loss is
    Sigma_c SL1_2 / D over masked patches against LN(mean_k LN(block end_k)) without CLS."""
    from d2v2_scale.model.core.ema import ModuleEma
    from d2v2_scale.model.core.targets import layer_norm_channels

    cfg, s, t = _build("d2v1-image-tiny")
    names = {n for n, _ in t.named_parameters()}
    assert names == {n for n, _ in s.named_parameters() if n.startswith("encoder.")}
    assert {"encoder.local.proj.weight", "encoder.extra_tokens", "encoder.rel_pos_bias.table",
            "encoder.final_norm.weight"} <= names
    # "parameters and buffers alike" (timm ModelEmaV2): the encoder's only buffer is the relative
    # position index, a constant of the grid (not in the state dict), equal in both: nothing to average
    buffers = dict(t.named_buffers())
    assert list(buffers) == ["encoder.rel_pos_bias.index"] and not any("index" in k for k in t.state_dict())
    assert torch.equal(buffers["encoder.rel_pos_bias.index"], dict(s.named_buffers())["encoder.rel_pos_bias.index"])
    img = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 10:30] = True
    s.eval()
    targets = t(img)
    hidden = t.encoder(img, None, top_k=2)[1]
    want = layer_norm_channels(sum(layer_norm_channels(h[:, 1:]) for h in hidden) / 2)
    assert torch.allclose(targets, want, atol=1e-5) and targets.shape == (2, 64, 64)
    loss, st = s({"source": img, "mask": mask}, teacher=t)
    x, _ = s.encoder(img, mask)
    p = s.decoder(x[:, 1:][mask])
    want = F.smooth_l1_loss(p, targets[mask], beta=2.0, reduction="none").sum(-1).mean() / 64
    assert st["masked_tokens"] == 40 and torch.allclose(loss, want, atol=1e-6)
    old = {n: p.detach().clone() for n, p in t.named_parameters()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    tau = ModuleEma(t, cfg).step(s)
    sp = dict(s.named_parameters())
    assert tau == pytest.approx(0.998)
    for n, p in t.named_parameters():
        assert torch.allclose(p, tau * old[n] + (1 - tau) * sp[n], atol=1e-6), n


@pytest.mark.parametrize("name,decay_all", [("d2v1-audio-tiny", True), ("d2v1-text-tiny", True),
                                            ("d2v1-image-tiny", False)])
def test_weight_decay_option_and_beit_groups(name, decay_all):
    """optim.weight_decay_all=true is fairseq's Adam (speech, text): every parameter decayed,
    mask_emb and norms included (the presets keep it off: docs/DATA2VEC1.md); BEiT's timm
    optimizer (vision) spares 1-D parameters and the CLS token."""
    from d2v2_scale.model import param_groups_for_weight_decay

    cfg, s, _ = _build(name)
    assert cfg.optim.weight_decay_all is False
    groups = param_groups_for_weight_decay(s, cfg.optim.weight_decay, decay_all)
    n_all = sum(1 for p in s.parameters() if p.requires_grad)
    if decay_all:  # one group: an empty no-decay group would be dropped by ZeRO, not by the LR schedule
        assert [g["name"] for g in groups] == ["decay"] and len(groups[0]["params"]) == n_all
    else:
        decay, no_decay = groups
        names = {id(p): n for n, p in s.named_parameters()}
        spared = {names[id(p)] for p in no_decay["params"]}
        assert "encoder.extra_tokens" in spared and all(p.ndim <= 1 or names[id(p)] == "encoder.extra_tokens"
                                                        for p in no_decay["params"])


def test_vision_color_jitter_as_torchvision():
    """BEiT's ColorJitter(0.4, 0.4, 0.4) (docs/REFERENCE.md §2.4): brightness, contrast and saturation factors
    uniform in [0.6, 1.4], applied through PIL's ImageEnhance in a random order (torchvision's
    PIL path); keyed, so a resumed run redraws it; before the crop; the presets turn it on."""
    from PIL import Image, ImageEnhance

    from d2v2_scale.data import augment, rng

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    u = np.array([0.9, 0.1, 0.5, 0.0, 0.5, 1.0])  # order: contrast, saturation, brightness
    got = np.asarray(augment.color_jitter(img, u, 0.4))
    want = ImageEnhance.Brightness(ImageEnhance.Color(ImageEnhance.Contrast(img).enhance(1.0)).enhance(1.4)
                                   ).enhance(0.6)
    assert np.array_equal(got, np.asarray(want))
    assert np.array_equal(np.asarray(augment.color_jitter(img, u, 0.0)), np.asarray(img))  # factors all 1
    keys = rng.make_keys(1, 0, np.arange(600), 0)
    uu = rng.uniform(keys, 6, rng.STREAM_JITTER)
    orders = {tuple(np.argsort(x[:3], kind="stable")) for x in uu}
    assert len(orders) == 6  # every permutation of the three transforms occurs
    f = 0.6 + 0.8 * uu[:, 3:]
    assert f.min() >= 0.6 and f.max() <= 1.4 and abs(f.mean() - 1.0) < 0.03
    rows = [{"image": None, "pixels": np.asarray(img).reshape(-1), "pix_height": 12, "pix_width": 10,
             "pix_channels": 3}] * 4
    a = augment.augment_images(rows, keys[:4], 8, 3, (0.08, 1.0), True, 0.4)
    assert np.array_equal(a, augment.augment_images(rows, keys[:4], 8, 3, (0.08, 1.0), True, 0.4))
    assert not np.array_equal(a, augment.augment_images(rows, keys[:4], 8, 3, (0.08, 1.0), True, 0.0))
    cfg = load_preset("d2v1-image-base")
    assert (cfg.data.color_jitter, cfg.data.crop_scale_min) == (0.4, 0.08)
    assert load_preset("image-base").data.color_jitter == 0.0
