"""data2vec 2.0 model: gather/restore correctness, targets, loss scaling, EMA, name contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from d2v2_scale.config import load_preset
from d2v2_scale.model.core.stats import position_share
from tests.dist_bodies_model import make_batch


@pytest.fixture(scope="module", autouse=True)
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


def _build(name, **model_overrides):
    from d2v2_scale.model import build_student, build_teacher, init_teacher_from_student

    cfg = load_preset(name)
    for k, v in model_overrides.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    s, t = build_student(cfg), build_teacher(cfg)
    # perturb the 1-D parameters (norms, biases, ALiBi scales) so they are not trivially 0/1
    with torch.no_grad():
        for n, p in s.named_parameters():
            if p.ndim == 1:
                p.copy_(p.uniform_(0.5, 1.5) if "alibi" in n else p + 0.1 * torch.randn_like(p))
    init_teacher_from_student(t, s)
    return cfg, s, t


def _capture(student):
    """Record the encoder output and the decoder input/output of the next forward."""
    cap = {}
    run_blocks = student.encoder.run_blocks_tbd

    def run_blocks_rec(*a, **k):
        out = run_blocks(*a, **k)
        cap["encoder_out"] = out[0].transpose(0, 1)  # [T, N, D] -> [N, T, D]
        return out

    student.encoder.run_blocks_tbd = run_blocks_rec
    student.decoder.register_forward_hook(lambda m, i, o: cap.update(dec_in=i[0], dec_out=o))
    return cap


@pytest.mark.parametrize("name", ["image-tiny", "audio-tiny", "text-tiny"])
def test_student_sees_only_kept_tokens_and_order_is_restored(name):
    """Decoder input = the encoder run separately on each row's kept tokens, at their original
    positions; masked slots hold N(0, 0.01^2) noise."""
    from d2v2_scale.model.core.attention import attention_bias

    cfg, s, t = _build(name)
    s.eval()  # dropout off so the reference pass is comparable
    batch = make_batch(cfg)
    cap = _capture(s)
    with torch.no_grad():
        s(batch, t)
        enc_out, dec_in = cap["encoder_out"], cap["dec_in"]
        m = cfg.model.clone_batch
        feats, pad = s.encoder.local_features(batch["source"], batch.get("padding_mask"))
        mask = batch["mask"]
        e = s.encoder.num_extra_tokens
        for r in range(mask.shape[0]):
            x = feats[r // m: r // m + 1]
            zero = mask[r:r + 1] if pad is None else mask[r:r + 1] | pad[r // m: r // m + 1]
            if s.encoder.positions is not None:
                x = s.encoder.positions(x, zero)
            kept = (~mask[r]).nonzero()[:, 0]
            x = x[:, kept]  # boolean/nonzero route, not the model's gather
            if s.encoder.extra_tokens is not None:
                x = torch.cat([s.encoder.extra_tokens, x], 1)
            if s.encoder.context_norm is not None:
                x = s.encoder.context_norm(x)
            bias = attention_bias(1, x.shape[1], positions=kept[None],
                                  slopes=getattr(s.encoder, "alibi_slopes", None), scale=s.encoder.alibi_scale)
            ref, _ = s.encoder.run_blocks(x, bias)
            torch.testing.assert_close(enc_out[r], ref[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dec_in[r, kept], ref[0, e:], atol=1e-5, rtol=1e-5)
        noise = dec_in[mask]
        assert abs(noise.std().item() - 0.01) < 0.002 and abs(noise.mean().item()) < 0.002


def _hand_block(blk, x, heads):
    """A Megatron block by hand: x [B, T, D] -> (out, ffn_out); post-LN; interleaved qkv rows."""
    sa, mlp = blk.self_attention, blk.mlp
    b, t, d = x.shape
    hd = d // heads
    qkv = x @ sa.linear_qkv.weight.T + sa.linear_qkv.bias
    q, k, v = qkv.view(b, t, heads, 3, hd).permute(3, 0, 2, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    a = a.transpose(1, 2).reshape(b, t, d) @ sa.linear_proj.weight.T + sa.linear_proj.bias
    x = F.layer_norm(x + a, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    ffn = F.gelu(x @ mlp.linear_fc1.weight.T + mlp.linear_fc1.bias) @ mlp.linear_fc2.weight.T + mlp.linear_fc2.bias
    return F.layer_norm(x + ffn, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps), ffn


def _in(y, pad=None):  # instance norm over time by hand (real positions only)
    w = torch.ones(y.shape[:2]) if pad is None else (~pad).float()
    w = w[..., None]
    mu = (y * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    var = ((y - mu) ** 2 * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5)


def _ln(y):
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("variant", ["image", "text-large-style"])
def test_targets_by_hand(variant):
    """image: IN per layer -> mean -> LN, CLS dropped; text large: LN per layer -> mean -> IN
    (IN statistics over real tokens only).  FFN output tapped before residual and LN2."""
    if variant == "image":
        cfg, s, t = _build("image-tiny", depth=3, top_k_layers=2)
        src, pad = make_batch(cfg)["source"], None
    else:
        cfg, s, t = _build("text-tiny", depth=3, top_k_layers=2, dropout=0.0, instance_norm_target_layer=False,
                           layer_norm_target_layer=True, layer_norm_targets=False, instance_norm_targets=True)
        batch = make_batch(cfg)
        src, pad = batch["source"], batch["padding_mask"]
    enc = t.encoder
    with torch.no_grad():
        if variant == "image":
            x = s.encoder.local.proj(src).flatten(2).transpose(1, 2) + s.encoder.positions.table
            x = torch.cat([enc.extra_tokens.expand(x.shape[0], -1, -1), x], 1)
            x = enc.context_norm(x)
            heads_in = src
        else:
            x, _ = s.encoder.local_features(src, pad)
            heads_in = x
        ffns = []
        for blk in enc.blocks:
            if pad is not None:  # key padding needs the real attention; use the model's block
                x, f = blk(x.transpose(0, 1), torch.zeros(pad.shape).masked_fill(pad, float("-inf"))[:, None, None])
                x, f = x.transpose(0, 1), f.transpose(0, 1)
            else:
                x, f = _hand_block(blk, x, cfg.model.num_heads)
            ffns.append(f)
        e = 1 if variant == "image" else 0
        last = [f[:, e:] for f in ffns[-2:]]
        if variant == "image":
            y = _ln(sum(_in(f) for f in last) / 2)
        else:
            y = _in(sum(_ln(f) for f in last) / 2, pad)
        got = t(heads_in) if pad is None else t(heads_in, pad)
    assert got.dtype == torch.float32 and got.shape == y.shape
    torch.testing.assert_close(got, y, atol=2e-5, rtol=1e-4)
    # the hand block agrees with the Megatron block (checks the qkv layout and the FFN tap)
    with torch.no_grad():
        z = torch.randn(2, 5, cfg.model.embed_dim)
        ref, ref_f = _hand_block(enc.blocks[0], z, cfg.model.num_heads)
        out, f = enc.blocks[0](z.transpose(0, 1))
    torch.testing.assert_close(out.transpose(0, 1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.transpose(0, 1), ref_f, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,beta", [("image-tiny", 0.0), ("audio-tiny", 0.0), ("text-tiny", 0.0),
                                       ("image-tiny", 0.5)])
def test_loss_scaling_and_cls_weight(name, beta):
    cfg, s, t = _build(name, loss_beta=beta)
    s.eval()
    batch = make_batch(cfg)
    cap = _capture(s)
    with torch.no_grad():
        loss, stats = s(batch, t)
        feats, pad = s.encoder.local_features(batch["source"], batch.get("padding_mask"))
        y = t(s.modality.teacher_input(batch, feats)) if pad is None else t(feats, pad)
    m, d = cfg.model.clone_batch, cfg.model.embed_dim
    scale = cfg.model.loss_scale if cfg.model.loss_scale is not None else 1 / math.sqrt(d)
    if name == "text-tiny":
        assert scale == 1.0
    else:
        assert scale == pytest.approx(1 / math.sqrt(d))
    y_rep = y.repeat_interleave(m, 0)
    lpos = batch["mask"] if pad is None else batch["mask"] & ~pad.repeat_interleave(m, 0)
    err = F.smooth_l1_loss(cap["dec_out"], y_rep, reduction="none", beta=beta) if beta > 0 else \
        (cap["dec_out"] - y_rep) ** 2
    reg = (err.sum(-1) * scale)[lpos].mean()
    torch.testing.assert_close(stats["loss_regression"], reg, atol=1e-5, rtol=1e-5)
    expected = reg
    if cfg.model.cls_loss_weight > 0:
        assert cfg.model.cls_loss_weight == 0.01
        cls = cap["encoder_out"][:, 0]
        tgt = y.mean(1).repeat_interleave(m, 0)
        cerr = F.smooth_l1_loss(cls, tgt, reduction="none", beta=beta) if beta > 0 else (cls - tgt) ** 2
        lcls = 0.01 * (cerr.sum(-1) * scale).sum()  # summed over the B*M rows (see model/objectives/data2vec2.py)
        torch.testing.assert_close(stats["loss_cls"], lcls, atol=1e-5, rtol=1e-5)
        expected = reg + lcls
    else:
        assert "loss_cls" not in stats
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert stats["masked_tokens"].item() == lpos.sum().item()
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # text: the two-layer head keeps BERT's N(0, 0.02) init (docs/REFERENCE.md §1.10 D1/D9), so the untrained
    # predictions are small (0.004 here); image/audio heads have PyTorch's default init
    assert stats["target_var"] > 0.1 and stats["pred_var"] > (1e-3 if name == "text-tiny" else 0.01)
    torch.testing.assert_close(stats["target_position_share"], position_share(y.float(), pad))


def _share_by_hand(y, valid):
    """Adjusted R^2 of y on position, one position at a time: y [B, T, D], valid [B, T] bool."""
    pts = [(t, y[b, t].double()) for b in range(y.shape[0]) for t in range(y.shape[1]) if valid[b, t]]
    allv = torch.stack([v for _, v in pts])
    mu, n = allv.mean(0), len(pts)
    total = ((allv - mu) ** 2).sum()
    groups = sorted({t for t, _ in pts})
    between = sum(len(g) * ((torch.stack(g).mean(0) - mu) ** 2).sum()
                  for g in ([v for t, v in pts if t == t0] for t0 in groups))
    return 1 - (1 - between / total) * (n - 1) / (n - len(groups))


def test_position_share():
    """stats/target_position_share: ~0 for inputs unrelated to position, ~1 for a function of
    position, the share in between; padding ignored; equal to the textbook formula."""
    g = torch.Generator().manual_seed(0)
    b, t, d = 16, 32, 8
    noise = torch.randn(b, t, d, generator=g)
    pos = torch.randn(1, t, d, generator=g).expand(b, t, d)
    assert abs(position_share(noise).item()) < 0.03
    assert position_share(pos + 0.01 * noise).item() > 0.999
    assert position_share(pos + noise).item() == pytest.approx(0.5, abs=0.06)
    lengths = torch.randint(8, t + 1, (b,), generator=g)
    padding = torch.arange(t)[None] >= lengths[:, None]  # [B, T] True = pad
    y = pos + 0.5 * noise
    share = position_share(y.masked_fill(padding[..., None], 1e6), padding)  # pad values must not count
    torch.testing.assert_close(share.double(), _share_by_hand(y, ~padding), rtol=1e-5, atol=1e-5)
    assert math.isnan(position_share(noise[:1]).item())  # one sample: nothing to compare


def test_position_share_guard_is_opt_in():
    from d2v2_scale.config import GuardConfig
    from d2v2_scale.train.guards import Guard

    on = Guard(GuardConfig(collapse_check=True, collapse_after_steps=10, max_target_position_share=0.9))
    assert "positional collapse" in on.collapse_reason(10, 1.0, 1.0, 0.95)
    assert on.collapse_reason(9, 1.0, 1.0, 0.95) is None  # not before collapse_after_steps
    assert on.collapse_reason(10, 1.0, 1.0, 0.5) is None
    assert on.collapse_reason(10, 1.0, 1.0, math.nan) is None
    off = Guard(GuardConfig(collapse_check=True, collapse_after_steps=10))
    assert off.collapse_reason(10, 1.0, 1.0, 0.99) is None


def test_ema_schedule_values():
    from d2v2_scale.model import ema_decay, ema_decay_from_cfg

    assert ema_decay(0, 0.999, 0.99999, 75_000) == pytest.approx(0.999)
    assert ema_decay(37_500, 0.999, 0.99999, 75_000) == pytest.approx(0.999 + 0.5 * (0.99999 - 0.999))
    assert ema_decay(75_000, 0.999, 0.99999, 75_000) == 0.99999
    assert ema_decay(10 ** 6, 0.999, 0.99999, 75_000) == 0.99999
    cfg = load_preset("image-huge")  # .9998 -> 1 @ 300k
    assert ema_decay_from_cfg(cfg, 150_000) == pytest.approx(0.9999)
    assert ema_decay_from_cfg(cfg, 300_000) == 1.0


def test_ema_update_exact_and_skipped_at_one():
    from d2v2_scale.model import ema_update
    from d2v2_scale.model.core.ema import ModuleEma, matched_params

    cfg, s, t = _build("audio-tiny")
    names = [n for n, _, _ in matched_params(t, s)]
    # audio teacher: no CNN, has its own positional conv / norm / blocks / ALiBi scale
    assert not any(n.startswith("encoder.local.") for n in names)
    assert "encoder.alibi_scale" in names and "encoder.positions.convs.0.weight" in names
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in t.named_parameters()}
    d = 0.9
    assert ema_update(t, s, d)
    sp = dict(s.named_parameters())
    for n, p in t.named_parameters():
        torch.testing.assert_close(p - before[n], (1 - d) * (sp[n] - before[n]), atol=1e-6, rtol=1e-5)
    snap = {n: p.clone() for n, p in t.named_parameters()}
    assert not ema_update(t, s, 1.0)
    assert all(torch.equal(snap[n], p) for n, p in t.named_parameters())
    cfg.ema.decay, cfg.ema.end_decay, cfg.ema.anneal_end_step = 0.5, 1.0, 2
    et = ModuleEma(t, cfg)
    assert [et.step(s), et.step(s), et.step(s)] == [0.5, 0.75, 1.0]


@pytest.mark.parametrize("name,has_local,has_context", [("image-tiny", True, True), ("audio-tiny", False, True),
                                                         ("text-tiny", False, False)])
def test_teacher_name_contract(name, has_local, has_context):
    from d2v2_scale.model import teacher_param_names

    cfg, s, t = _build(name)
    sp = dict(s.named_parameters())
    for n, p in t.named_parameters():
        assert n in sp and sp[n].shape == p.shape and not p.requires_grad
        assert getattr(p, "partition_dim", None) == getattr(sp[n], "partition_dim", None)
    names = [n for n, _ in t.named_parameters()]
    assert names == teacher_param_names(cfg)
    assert "encoder.blocks.1.mlp.linear_fc1.weight" in names
    assert not any(n.startswith("decoder.") for n in names)
    assert any(n.startswith("encoder.local.") for n in names) == has_local
    assert (any("norm" in n and "blocks" not in n for n in names)) == has_context
    t.train()
    assert not t.training  # the teacher stays in eval mode


def test_weight_decay_groups():
    """docs/REFERENCE.md §1.10 D4: no decay only for 1-D parameters, biases and the ALiBi scale; the image CLS
    token and the learned text positions are decayed (the paper's description exempts them, docs/REFERENCE.md §4.1)."""
    from d2v2_scale.model import param_groups_for_weight_decay

    for name in ("image-tiny", "audio-tiny", "text-tiny"):
        cfg, s, _ = _build(name)
        dec, nodec = param_groups_for_weight_decay(s, 0.05)
        assert dec["weight_decay"] == 0.05 and nodec["weight_decay"] == 0.0
        ids = {id(p) for p in nodec["params"]}
        for n, p in s.named_parameters():
            expect_no = p.ndim == 1 or n.endswith(".bias") or "alibi_scale" in n
            assert (id(p) in ids) == expect_no, n
        assert len(dec["params"]) + len(nodec["params"]) == len(list(s.parameters()))
        names = {n for n, p in s.named_parameters() if id(p) not in ids}
        decayed = {"image-tiny": "encoder.extra_tokens", "text-tiny": "encoder.local.positions.weight",
                   "audio-tiny": "encoder.local.proj.weight"}[name]
        assert decayed in names and "encoder.alibi_scale" not in names


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_grads(mode):
    cfg, s, t = _build("image-tiny")
    batch = make_batch(cfg)
    grads = []
    for m in ("none", mode):
        for blk in s.encoder.blocks:
            blk.set_checkpointing(m)
        s.zero_grad()
        torch.manual_seed(3)
        loss, _ = s(batch, t)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_mask_rows_must_keep_same_count():
    cfg, s, t = _build("image-tiny")
    batch = make_batch(cfg)
    batch["mask"][0, (~batch["mask"][0]).nonzero()[0, 0]] = True
    with pytest.raises(ValueError, match="exactly the same number"):
        s(batch, t)
