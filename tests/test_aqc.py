"""data2vec-aqc, the objective (model/objectives/aqc/model.py): docs/REFERENCE.md §3: routing (§3.3), the loss
composition on the real objective (§3.8), gradient flow, the parameter count (§3.9), config guards,
plus the keyed random draws and the export of an AQC run's config.  The building blocks
(quantizer, negatives, k-means, logits) are tested in tests/test_aqc_parts.py, the augmented view
in tests/test_aqc_augment.py, scale-out in tests/test_aqc_dist.py."""

from __future__ import annotations

import math

import pytest
import torch

from d2v2_scale.config import ConfigError, build_config, load_preset
from tests.dist_bodies_model import build_models


@pytest.fixture(scope="module", autouse=True)
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


def _batch(cfg, b=3, seconds=1.0, seed=1):
    """Two independent random views and a span mask with the same count per row."""
    g = torch.Generator().manual_seed(seed)
    s = int(seconds * cfg.data.sample_rate)
    t = cfg.model.audio_frames(s)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, 3 + 2 * i: 3 + 2 * i + t // 2] = True
    return {"source": torch.randn(b, s, generator=g), "source_aug": torch.randn(b, s, generator=g), "mask": mask}


def _run(s, t, batch, updates=0):
    """One forward with this update's draws (and the default generator reset, for dropout)."""
    s.set_num_updates(updates)
    torch.manual_seed(123)
    return s(batch, teacher=t)


# ---- 10. parameter count ----------------------------------------------------------------------
def test_parameter_count():
    """aqc-base = 94,427,776 = the data2vec 1.0 speech base student + 672,896 (quantizer 410,240 =
    weight_proj 328,320 + vars 81,920; project_q 65,792; contr_proj 196,864); the teacher is 1.0's."""
    from d2v2_scale.model import build_student, teacher_param_names

    with torch.device("meta"):
        aqc, d2v1 = build_student(load_preset("aqc-base")), build_student(load_preset("d2v1-audio-base"))

    def count(mod):
        return sum(p.numel() for p in mod.parameters())

    assert count(aqc) == 94_427_776 and count(aqc) - count(d2v1) == 672_896
    assert (count(aqc.aqc.quantizer.weight_proj), count(aqc.aqc.quantizer)) == (328_320, 410_240)
    assert (count(aqc.aqc.project_q), count(aqc.aqc.contr_proj)) == (65_792, 196_864)
    assert {n for n, _ in aqc.named_parameters()} - {n for n, _ in d2v1.named_parameters()} == {
        n for n, _ in aqc.named_parameters() if n.startswith("aqc.")}
    # the EMA teacher tracks the 1.0 encoder only: the AQC parts are the student's
    assert teacher_param_names(load_preset("aqc-base")) == teacher_param_names(load_preset("d2v1-audio-base"))


# ---- 3. routing --------------------------------------------------------------------------------
def test_routing_student_aug_masked_teacher_orig_unmasked():
    """The student encoder reads only the augmented view with mask_emb at the masked frames, the
    teacher only the original view unmasked; the quantizer reads both views' LayerNormed CNN
    features at the SAME masked frames, original first.  Perturbing the augmented view leaves the
    teacher input, features_pen and the perplexities unchanged; perturbing the original leaves the
    student's encoder input unchanged."""
    cfg, s, t = build_models("aqc-tiny")
    batch = _batch(cfg)
    mask, b = batch["mask"], batch["mask"].shape[0]
    seen = {"q": []}
    t.register_forward_pre_hook(lambda mod, args: seen.update(teacher=args[0].clone()))
    s.encoder.positions.register_forward_pre_hook(lambda mod, args: seen.update(student=args[0].clone()))
    s.aqc.quantizer.register_forward_pre_hook(lambda mod, args: seen["q"].append(args[0].clone()))
    s.train()

    def run(bt):
        seen["q"] = []
        _, st = _run(s, t, bt)
        return {k: v.clone() for k, v in seen.items() if k != "q"}, list(seen["q"]), st

    ref, q_in, st = run(batch)
    with torch.no_grad():
        local = s.encoder.local
        orig, aug = local(batch["source"])[0], local(batch["source_aug"])[0]
        ln_o, ln_a = local.norm(local.cnn(batch["source"])), local.norm(local.cnn(batch["source_aug"]))
    torch.testing.assert_close(ref["teacher"], orig, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref["student"], torch.where(mask[..., None], s.mask_emb, aug), rtol=1e-5, atol=1e-6)
    assert len(q_in) == 2
    torch.testing.assert_close(q_in[0], ln_o[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_in[1], ln_a[mask], rtol=1e-5, atol=1e-6)

    pert_aug = dict(batch, source_aug=batch["source_aug"] + 0.5 * torch.randn_like(batch["source_aug"]))
    out, _, st_a = run(pert_aug)
    assert torch.equal(out["teacher"], ref["teacher"]) and not torch.equal(out["student"], ref["student"])
    for k in ("aqc/features_pen", "aqc/prob_perplexity", "aqc/code_perplexity", "target_var"):
        assert st_a[k] == st[k], k
    assert st_a["loss"] != st["loss"]

    pert_orig = dict(batch, source=batch["source"] + 0.5 * torch.randn_like(batch["source"]))
    out, _, st_o = run(pert_orig)
    assert torch.equal(out["student"], ref["student"]) and not torch.equal(out["teacher"], ref["teacher"])
    for k in ("aqc/features_pen", "aqc/prob_perplexity", "target_var"):
        assert st_o[k] != st[k], k

    # swapping the views swaps the roles: the teacher now reads what the student read (unmasked)
    out, _, _ = run(dict(batch, source=batch["source_aug"], source_aug=batch["source"]))
    torch.testing.assert_close(out["teacher"], aug, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["student"], torch.where(mask[..., None], s.mask_emb, orig), rtol=1e-5, atol=1e-6)
    assert b == 3


# ---- 8. total loss composition -----------------------------------------------------------------
def test_loss_composition_on_the_objective():
    """loss = (1/N_m) [sum_masked ||final_proj(x_aug) - y||^2 / sqrt(D) + 0.5 L_s + 0.5 L_t
    + 0.1 N_m (GV - ppl_orig)/GV + 10 N_m mean(cnn_orig^2)], each term recomputed from the parts
    (head output and teacher targets through hooks, the CNN by hand, the original view's
    quantizer call)."""
    cfg, s, t = build_models("aqc-tiny")
    batch = _batch(cfg)
    mask = batch["mask"]
    n = int(mask.sum())
    seen = {"q": []}
    t.register_forward_hook(lambda mod, args, out: seen.update(y=out.detach().float()))
    s.decoder.register_forward_hook(lambda mod, args, out: seen.update(p=out.detach()))
    s.aqc.quantizer.register_forward_hook(lambda mod, args, out: seen["q"].append(out))
    s.train()
    loss, st = _run(s, t, batch)
    d = cfg.model.embed_dim
    mse = ((seen["p"] - seen["y"][mask]) ** 2).sum() / math.sqrt(d) / n
    with torch.no_grad():
        pen = s.encoder.local.cnn(batch["source"]).pow(2).mean()
    gv = cfg.model.aqc_latent_groups * cfg.model.aqc_latent_vars
    ppl = seen["q"][0]["prob_perplexity"].detach()
    assert st["masked_tokens"] == n == 3 * (cfg.model.audio_frames(16000) // 2)
    torch.testing.assert_close(st["loss_regression"], mse, rtol=1e-5, atol=0)
    torch.testing.assert_close(st["aqc/features_pen"], pen, rtol=1e-5, atol=0)
    torch.testing.assert_close(st["aqc/prob_perplexity"], ppl)
    want = mse + 0.5 * st["loss_contrastive"] + 0.1 * (gv - ppl) / gv + 10 * pen
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(st["loss_contrastive"], st["aqc/loss_student"] + st["aqc/loss_teacher"])
    # the logged extras: temperature at u = 0 and at 100k, k-means clusters max(2, T // 16)
    assert st["aqc/gumbel_temp"] == 2.0 and st["aqc/num_clusters"] == max(2, cfg.model.audio_frames(16000) // 16)
    _, st = _run(s, t, batch, updates=100_000)
    assert st["aqc/gumbel_temp"] == pytest.approx(1.21306, abs=1e-5)


def test_random_draws_are_keyed_on_the_update():
    """The same update (and micro-batch) draws the same Gumbel noise, negatives and k-means init;
    another update draws others (the dropout RNG reset alike in both)."""
    cfg, s, t = build_models("aqc-tiny", dropout=0.0)
    batch = _batch(cfg)
    s.train()
    a, b, c = (_run(s, t, batch, u)[0] for u in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s.set_num_updates(7)
    torch.manual_seed(123)
    first = s(batch, teacher=t)[0]
    second = s(batch, teacher=t)[0]  # the next micro-batch of update 7: its own draws
    assert torch.equal(first, a) and not torch.equal(second, a)


# ---- 9. gradient flow --------------------------------------------------------------------------
def test_gradient_flow(monkeypatch):
    """contr_proj gets gradient from L_t alone (the student term zeroed); the teacher none; the CNN
    through both views; the quantizer and project_q too."""
    import d2v2_scale.model.objectives.aqc.model as aqc_mod

    real = aqc_mod.cross_contrastive_loss
    calls = []

    def student_zeroed(*args, **kw):
        loss, st = real(*args, **kw)
        calls.append(loss)
        return (loss * 0 if len(calls) % 2 == 1 else loss), st  # the first call is L_s

    cfg, s, t = build_models("aqc-tiny")
    batch = _batch(cfg)
    s.train()
    grabbed = {}

    def keep(mod, args, out):
        out.retain_grad()
        grabbed["cnn"] = out

    s.encoder.local.cnn.register_forward_hook(keep)
    monkeypatch.setattr(aqc_mod, "cross_contrastive_loss", student_zeroed)
    loss, _ = _run(s, t, batch)
    loss.backward()
    assert len(calls) == 2 and float(calls[0].detach()) > 0
    assert float(s.aqc.contr_proj.weight.grad.abs().sum()) > 0  # from L_t only (the regression skips it)
    assert all(p.grad is None for p in t.parameters()) and not any(p.requires_grad for p in t.parameters())
    g = grabbed["cnn"].grad  # [2B, T, C]: original rows, then augmented rows
    b = batch["mask"].shape[0]
    assert float(g[:b].abs().sum()) > 0 and float(g[b:].abs().sum()) > 0
    for p in (s.aqc.quantizer.weight_proj.weight, s.aqc.quantizer.vars, s.aqc.project_q.weight, s.mask_emb):
        assert float(p.grad.abs().sum()) > 0


# ---- 11. config guards -------------------------------------------------------------------------
@pytest.mark.parametrize("preset,override,needle", [
    ("aqc-tiny", "model.loss_beta=0.25", "model.loss_beta=0.25 with model.variant=data2vec_aqc"),
    ("aqc-tiny", "model.loss_scale=1.0", "model.loss_scale=1.0"),
    ("aqc-tiny", "model.loss_scale_rule=one", "loss_scale_rule='one'"),
    ("aqc-tiny", "data.views=single", "set data.views=aqc"),
    ("aqc-tiny", "parallel.pp=2", "use parallel.pp=1"),
    ("aqc-tiny", "data.audio_crop=random_length", "set data.audio_crop=batch_min"),
    ("aqc-tiny", "model.aqc_vq_dim=33", "vq_dim divisible by groups"),
    ("aqc-tiny", "model.aqc_latent_temp=[0.5,2.0,0.9]", "model.aqc_latent_temp"),
    ("aqc-tiny", "model.aqc_num_negatives=0", "model.aqc_num_negatives=0"),
    ("aqc-tiny", "masking.generator=data2vec2", "masking.generator='data2vec2'"),
    ("aqc-tiny", "model.variant=data2vec3", "'data2vec_aqc'"),
    ("aqc-base", "data.batch_size=8", "set data.noise_dir=DIR, or turn it off with data.aug_background_p=0"),
])
def test_config_guards(preset, override, needle):
    cfg = build_config(preset, overrides=[override])
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert needle in str(e.value), str(e.value)


def test_presets():
    """aqc-base: d2v1-audio-base plus the B.9 numbers; both presets validate as shipped (aqc-base
    once a noise folder is named)."""
    base, d2v1 = load_preset("aqc-base"), load_preset("d2v1-audio-base")
    m = base.model
    assert (m.variant, base.data.views, m.aqc_latent_groups, m.aqc_latent_vars, m.aqc_vq_dim) == (
        "data2vec_aqc", "aqc", 2, 320, 256)
    assert tuple(m.aqc_latent_temp) == (2.0, 0.5, 0.999995)
    assert (m.aqc_num_negatives, m.aqc_cluster_factor, m.aqc_logit_temp, m.aqc_same_cluster_scale) == (100, 16, 0.1, 0.3)
    assert (m.aqc_contrastive_weight, m.aqc_diversity_weight, m.aqc_features_pen_weight) == (0.5, 0.1, 10.0)
    assert not m.aqc_gate_scaling_on_identical
    assert (base.data.aug_noise_p, base.data.aug_reverb_p, base.data.aug_background_p) == (0.6, 0.7, 0.8)
    skip = {k for k in vars(m) if k.startswith("aqc_")} | {"variant"}
    assert {k: v for k, v in vars(m).items() if k not in skip} == {k: v for k, v in vars(d2v1.model).items()
                                                                   if k not in skip}
    assert (base.optim, base.ema, base.masking) == (d2v1.optim, d2v1.ema, d2v1.masking)
    load_preset("aqc-tiny").validate()


def test_export_accepts_aqc_runs():
    """An AQC run's encoder is a data2vec 1.0 speech encoder: --format hf maps it to
    Data2VecAudioModel, and the student-only aqc.* tensors are left out of the plain twin."""
    from d2v2_scale.export import consolidate
    from d2v2_scale.export.hf import hf_target

    assert hf_target(load_preset("aqc-base").model.__dict__) == "Data2VecAudioModel"
    assert "aqc." in consolidate.STUDENT_ONLY_PREFIXES
