"""The BEiT-style encoder of data2vec 1.0 vision (model/modalities/beit.py), its plain twin
(twins/beit.py) and the BEiT blockwise mask generator (data/masking/beit.py), against the
numbers of docs/REFERENCE.md §2.4."""

import math
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.dist_bodies_beit import beit_model_config, perturb_


@pytest.fixture(scope="module")
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


def vit_b_config():
    from d2v2_scale.config import load_preset

    cfg = load_preset("d2v1-image-base")
    m = cfg.model
    m.image_block, m.pre_ln, m.prenet_depth, m.depth, m.top_k_layers = "beit", True, 0, 12, 6
    cfg.validate()
    return m


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,msg", [
    ("image_block", "beit2", "model.image_block='beit2'"),
    ("drop_path", 1.0, "model.drop_path=1.0"),
    ("attention_dropout", -0.1, "model.attention_dropout=-0.1"),
    ("layer_scale_init", -1.0, "model.layer_scale_init=-1.0"),
    ("pre_ln", False, "pre-LN block"),
    ("dropout", 0.1, "model.dropout=0.1"),
    ("prenet_depth", 2, "model.prenet_depth=2"),
])
def test_config_rejects_impossible_beit_values(field, value, msg):
    from d2v2_scale.config import ConfigError, _beit_errors, load_preset

    cfg = load_preset("d2v1-image-tiny")
    cfg.model.image_block, cfg.model.pre_ln = "beit", True
    cfg.validate()
    setattr(cfg.model, field, value)
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        cfg.validate()
    vit2 = load_preset("image-tiny")
    vit2.model.drop_path = 0.1  # the 2.0 block would silently ignore it
    with pytest.raises(ConfigError, match="BEiT blocks only"):
        vit2.validate()


# ---------------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------------


def test_vit_b_parameter_count(dist):
    """docs/REFERENCE.md §2.4: ViT-B student with the Linear(768, 768) head and the mask token: 86,256,720;
    7,088,640 per block.  Built on the meta device (no memory, no init)."""
    from d2v2_scale.model.modalities.beit import BeitBlock, BeitEncoder
    from d2v2_scale.model.flops import beit_encoder_params, encoder_params_analytic
    from d2v2_scale.twins.beit import PlainBeitEncoder

    m = vit_b_config()
    head = 768 * 768 + 768
    with torch.device("meta"):
        enc = BeitEncoder(m)
        twin = PlainBeitEncoder(m)
        blk = BeitBlock(m, 1)
    n = sum(p.numel() for p in enc.parameters())
    assert n + head == 86_256_720
    assert sum(p.numel() for p in blk.parameters()) == 7_088_640
    assert sum(p.numel() for p in twin.parameters()) == n == beit_encoder_params(m) == encoder_params_analytic(m)
    m.layer_scale_init, m.shared_rel_pos_bias = 0.0, False  # no gammas, one table per block
    with torch.device("meta"):
        n2 = sum(p.numel() for p in BeitEncoder(m).parameters())
    assert n2 == beit_encoder_params(m) == n - 12 * 2 * 768 + 11 * 732 * 12
    assert tuple(enc.rel_pos_bias.table.shape) == (732, 12)
    assert tuple(enc.mask_token.shape) == tuple(enc.cls_token.shape) == (1, 1, 768)


# ---------------------------------------------------------------------------------------------
# relative position bias
# ---------------------------------------------------------------------------------------------


def test_relative_position_index_matches_definition(dist):
    from d2v2_scale.twins import beit as plain_beit
    from d2v2_scale.model.modalities.beit import SharedRelativePositionBias, num_relative_distances, relative_position_index

    h, w = 3, 4
    idx = relative_position_index((h, w))
    n = num_relative_distances((h, w))
    assert n == 5 * 7 + 3
    pos = [(y, x) for y in range(h) for x in range(w)]  # row-major patches
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            assert idx[1 + i, 1 + j] == (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
    assert (idx[0, 1:] == n - 3).all()  # cls -> token
    assert (idx[1:, 0] == n - 2).all()  # token -> cls
    assert idx[0, 0] == n - 1  # cls -> cls
    assert int(idx[1:, 1:].max()) == n - 4 and int(idx[1:, 1:].min()) == 0
    assert torch.equal(plain_beit.relative_position_index(3, 3), relative_position_index((3, 3)))
    # ViT-B/16 at 224: (2*14 - 1)^2 + 3 = 732 rows; the bias is table[index] per head
    assert num_relative_distances((14, 14)) == 732
    rpb = SharedRelativePositionBias((h, w), 2)
    assert not rpb.table.any() and rpb.table.tensor_model_parallel and rpb.table.partition_dim == 1
    with torch.no_grad():
        rpb.table.normal_()
    bias = rpb()
    assert bias.shape == (2, 1 + h * w, 1 + h * w)
    for head in range(2):
        assert torch.equal(bias[head], rpb.table[:, head][idx])
    assert "index" not in rpb.state_dict()  # derived from the grid: nothing to checkpoint or EMA


# ---------------------------------------------------------------------------------------------
# one block by hand
# ---------------------------------------------------------------------------------------------


def test_block_by_hand(dist):
    """Pre-LN, q/v-only bias, relative bias on the logits, layer scale, exact GELU, on 3 tokens."""
    from d2v2_scale.model.modalities.beit import BeitBlock

    m = beit_model_config(embed_dim=8, num_heads=2)
    torch.manual_seed(0)
    blk = BeitBlock(m, layer_number=2).eval()
    perturb_(blk)
    p = dict(blk.named_parameters())
    d, nh, hd = 8, 2, 4
    x = torch.randn(3, 2, d)  # [T, B, D]
    bias = torch.randn(nh, 3, 3)

    def ln(t, pre):
        return F.layer_norm(t, (d,), p[pre + ".weight"], p[pre + ".bias"], eps=1e-6)

    # direct computation, [B, T, D]
    xb = x.transpose(0, 1)
    a_in = ln(xb, "norm1")
    w = p["self_attention.linear_qkv.weight"].view(nh, 3, hd, d)  # Megatron: per head (q, k, v)
    qb = p["self_attention.linear_qkv.q_bias"].view(nh, hd)
    vb = p["self_attention.linear_qkv.v_bias"].view(nh, hd)
    heads = []
    for h in range(nh):
        q = a_in @ w[h, 0].T + qb[h]
        k = a_in @ w[h, 1].T  # no k bias
        v = a_in @ w[h, 2].T + vb[h]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias[h], dim=-1)
        heads.append(att @ v)
    attn = torch.cat(heads, -1) @ p["self_attention.linear_proj.weight"].T + p["self_attention.linear_proj.bias"]
    x1 = xb + p["gamma_1"] * attn
    hid = F.gelu(ln(x1, "norm2") @ p["mlp.linear_fc1.weight"].T + p["mlp.linear_fc1.bias"], approximate="none")
    x2 = x1 + p["gamma_2"] * (hid @ p["mlp.linear_fc2.weight"].T + p["mlp.linear_fc2.bias"])
    with torch.no_grad():
        out = blk(x, bias)
    torch.testing.assert_close(out.transpose(0, 1), x2, atol=1e-6, rtol=1e-5)


def test_encoder_taps_are_block_ends(dist):
    """run_blocks taps = each block's output after its second residual (the "end" tap, CLS
    included), before the final LayerNorm; the output is final_norm(last block)."""
    from d2v2_scale.model.modalities.beit import BeitEncoder

    m = beit_model_config(depth=3)
    torch.manual_seed(0)
    enc = BeitEncoder(m).eval()
    perturb_(enc)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, taps = enc(images, None, top_k=2)
        x = enc.embed(images).transpose(0, 1)
        bias = enc.rel_pos_bias()
        ends = []
        for i in range(3):
            x = enc.blocks[i](x, bias)
            ends.append(x.transpose(0, 1))
    assert len(taps) == 2
    for t, e in zip(taps, ends[1:]):
        torch.testing.assert_close(t, e)
    torch.testing.assert_close(out, enc.final_norm(ends[-1]))


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------


def test_beit_init(dist):
    from d2v2_scale.model.modalities.beit import BeitEncoder

    m = beit_model_config(depth=3)
    torch.manual_seed(0)
    enc = BeitEncoder(m)
    # normal(0, 0.02) truncated at +-1 std has std 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
    phi1, big_phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    trunc_std = 0.02 * math.sqrt(1 - 2 * phi1 / (2 * big_phi1 - 1))
    for name, p in enc.named_parameters():
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else None
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            scale = math.sqrt(2 * layer)  # divided by sqrt(2 * layer_id), layer_id 1-based
        else:
            scale = 1.0
        if name.endswith("weight") and p.ndim >= 2 or name in ("extra_tokens", "mask_token"):
            v = p.detach() * scale
            assert v.abs().max() <= 0.02 + 1e-7, name
            assert v.abs().max() > 0.015, name  # fills the truncation range
            if p.numel() >= 4096:
                assert abs(v.std().item() - trunc_std) < 0.03 * trunc_std, (name, v.std().item(), trunc_std)
        elif "gamma_" in name:
            assert torch.all(p == 1e-4), name
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "final_norm.weight":
            assert torch.all(p == 1), name
        else:  # biases, q/v biases, the relative position table
            assert not p.any(), name
    # the rescale: block l's proj / fc2 spread is 1/sqrt(2l) of the un-rescaled ones
    for i in range(3):
        s = enc.blocks[i].mlp.linear_fc2.weight.std().item()
        assert abs(s * math.sqrt(2 * (i + 1)) - trunc_std) < 0.03 * trunc_std


# ---------------------------------------------------------------------------------------------
# mask token, drop path
# ---------------------------------------------------------------------------------------------


def test_mask_token_replaces_patch_embedding_before_cls(dist):
    from d2v2_scale.model.modalities.beit import BeitEncoder

    m = beit_model_config()
    torch.manual_seed(0)
    enc = BeitEncoder(m)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.4
    with torch.no_grad():
        patches = enc.local(images)
        x = enc.embed(images, mask)
    assert x.shape == (2, 65, 64)
    assert torch.equal(x[:, 0], enc.cls_token[0].expand(2, -1))  # CLS first, never masked
    body = x[:, 1:]
    assert torch.equal(body[mask], enc.mask_token[0, 0].expand(int(mask.sum()), -1))
    assert torch.equal(body[~mask], patches[~mask])  # no absolute position added
    assert torch.equal(enc.embed(images, torch.zeros_like(mask)), enc.embed(images))
    with pytest.raises(ValueError, match="does not match"):
        enc.embed(images, mask[:, :10])


def test_drop_path_rate_and_eval(dist):
    from d2v2_scale.model.modalities.beit import BeitBlock, BeitEncoder, DropPath, drop_path_rates

    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    y = dp(torch.ones(3, 8000, 5))  # [T, B, D]
    per_sample = y[0, :, 0]
    assert torch.all(y == per_sample[None, :, None])  # a whole sample's branch, all tokens
    kept = per_sample[per_sample != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))  # kept branches scaled by 1/(1-p)
    assert abs((per_sample == 0).float().mean().item() - 0.25) < 0.015
    assert torch.equal(dp.eval()(y), y)
    # BEiT's linear schedule over depth: 0 at the first block, drop_path at the last
    m = beit_model_config(depth=4, drop_path=0.3)
    assert drop_path_rates(m) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # a block in training drops both residual branches of a sample with p^2
    blk = BeitBlock(beit_model_config(drop_path=0.5), 1, drop_path=0.5).train()
    perturb_(blk)
    x = torch.randn(5, 4000, 64)
    with torch.no_grad():
        out = blk(x)
    same = (out == x).all(0).all(-1)
    assert abs(same.float().mean().item() - 0.25) < 0.03
    # eval (the teacher): deterministic; train: not
    enc = BeitEncoder(m)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        enc.eval()
        a, b = enc(images)[0], enc(images)[0]
        enc.train()
        c, d = enc(images)[0], enc(images)[0]
    assert torch.equal(a, b) and not torch.equal(c, d)


# ---------------------------------------------------------------------------------------------
# plain twin, tensor parallelism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_plain_twin_matches_megatron(dist, shared):
    from d2v2_scale.twins import mapping
    from d2v2_scale.model.modalities.beit import BeitEncoder
    from d2v2_scale.twins.beit import PlainBeitEncoder

    m = beit_model_config(depth=3, shared_rel_pos_bias=shared)
    torch.manual_seed(0)
    enc = BeitEncoder(m).eval()
    perturb_(enc)
    full = {"encoder." + k: v for k, v in mapping.gather_tp_state_dict(enc).items()}
    plain_sd = mapping.megatron_to_plain(full, m.num_heads)
    twin = PlainBeitEncoder(m).eval()
    twin.load_state_dict(plain_sd, strict=True)  # every twin tensor covered, nothing extra
    back = mapping.plain_to_megatron(plain_sd, m.num_heads)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in back)
    for k, dim in mapping.partition_dims_from_module(enc).items():
        assert mapping.partition_dim(k) == dim, k
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.5
    with torch.no_grad():
        out, taps = enc(images, mask, top_k=3)
        ref = twin(images, mask=mask)
    torch.testing.assert_close(out, ref["x"], atol=1e-5, rtol=1e-5)
    for a, b in zip(taps, ref["hidden"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # d2v2-export's path: names and shapes checked against the BEiT twin, then load_export
    import dataclasses
    import json

    from safetensors.torch import save_file

    from d2v2_scale.export import consolidate

    tensors = consolidate.to_plain(full, m, consolidate.plain_keys(m), "test")
    d = tempfile.mkdtemp(prefix="d2v2beit-export-")
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{d}/{consolidate.WEIGHTS}")
    with open(f"{d}/{consolidate.CONFIG}", "w") as f:
        json.dump(dataclasses.asdict(m), f)
    loaded, _, _ = consolidate.load_export(d)
    assert type(loaded).__name__ == "PlainBeitEncoder"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, mask=mask)["x"], ref["x"], atol=0, rtol=0)


def test_plain_beit_is_standalone():
    import ast
    import inspect

    import d2v2_scale.twins.beit as plain

    tree = ast.parse(inspect.getsource(plain))
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"torch", "math"}, mods


def test_tp2_matches_tp1(dist, monkeypatch):
    """Same weights, images, mask and drop-path seed: TP=2 (2 gloo ranks; relative position bias
    and q/v biases sharded over heads) gives the TP=1 outputs, taps and gradients."""
    from d2v2_scale.testing import run_distributed
    from tests.dist_bodies_beit import beit_step

    d = tempfile.mkdtemp(prefix="d2v2beit-")
    monkeypatch.setenv("D2V2_TEST_DIR", d)
    beit_step("1", d)  # TP=1 in this process (also writes the weights TP=2 loads)
    r2 = run_distributed("tests.dist_bodies_beit:beit_step", nproc=2, args=["2", d], timeout=120)
    t1, t2 = torch.load(f"{d}/beit-tp1.pt"), torch.load(f"{d}/beit-tp2.pt")
    assert r2[0]["loss"] == r2[1]["loss"] == pytest.approx(t1["loss"].item(), rel=1e-5)
    torch.testing.assert_close(t2["out"], t1["out"], atol=1e-5, rtol=1e-5)
    for a, b in zip(t2["taps"], t1["taps"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(t1["grads"]) == set(t2["grads"])
    assert any("rel_pos_bias" in k for k in t1["grads"])
    for k in t1["grads"]:
        torch.testing.assert_close(t2["grads"][k], t1["grads"][k], atol=1e-6, rtol=2e-4, msg=k)


# ---------------------------------------------------------------------------------------------
# the mask generator
# ---------------------------------------------------------------------------------------------


def _beit_reference(u_of_attempt, height=14, width=14, num_mask=120, min_p=16, max_p=None, min_aspect=0.3):
    """BEiT's MaskingGenerator, transcribed line by line (masking_generator.py); its Python
    `random` calls read the four uniforms of attempt c from `u_of_attempt(c)`:
    random.uniform(a, b) = a + (b - a) u, random.randint(0, n) = floor(u (n + 1))."""
    max_p = num_mask if max_p is None else max_p
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=int)
    state = {"c": 0}

    def _mask(max_mask_patches):
        delta = 0
        for _attempt in range(10):
            u = u_of_attempt(state["c"])
            state["c"] += 1
            target_area = min_p + (max_mask_patches - min_p) * u[0]
            aspect_ratio = math.exp(log_ar[0] + (log_ar[1] - log_ar[0]) * u[1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = math.floor(u[2] * (height - h + 1))
                left = math.floor(u[3] * (width - w + 1))
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    count = 0
    while count < num_mask:
        delta = _mask(min(num_mask - count, max_p))
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1).astype(bool)


def test_mask_generator_is_beit_exactly():
    """The vectorized lockstep generator = BEiT's sequential loop fed the same draws."""
    from d2v2_scale.data import rng
    from d2v2_scale.data.masking.beit import beit_block_mask

    keys = rng.make_keys(3, 1, np.arange(300))
    got = beit_block_mask(keys)
    for r, k in enumerate(keys):
        def u_of(c, k=k):
            return rng.uniform_at(k[None], np.arange(4)[None] + 4 * c, rng.STREAM_MASK_BEIT)[0]

        assert np.array_equal(got[r], _beit_reference(u_of)), r
    # a non-square grid and other parameters take the same path
    keys = keys[:50]
    got = beit_block_mask(keys, grid=(6, 9), num_mask=20, min_patches=4, max_patches=10)
    for r, k in enumerate(keys):
        def u_of(c, k=k):
            return rng.uniform_at(k[None], np.arange(4)[None] + 4 * c, rng.STREAM_MASK_BEIT)[0]

        assert np.array_equal(got[r], _beit_reference(u_of, 6, 9, 20, 4, 10)), r


def test_mask_generator_10000_draws():
    """docs/REFERENCE.md §2.4 masking, over 10,000 draws: at most 120 masked, mean >= 119.5; blocks inside the
    grid, each adding between 1 and `remaining` new cells; keyed (same key -> same mask,
    independent of the batch it is drawn in)."""
    from d2v2_scale.data import rng
    from d2v2_scale.data.masking.beit import beit_block_mask

    keys = rng.make_keys(1, 0, np.arange(10_000))
    t0 = time.perf_counter()
    mask, blocks = beit_block_mask(keys, return_blocks=True)
    took = time.perf_counter() - t0
    print(f"10,000 BEiT masks in {took:.2f} s")
    assert took < 5.0
    assert mask.shape == (10_000, 196) and mask.dtype == bool
    counts = mask.sum(1)
    assert counts.max() == 120 and counts.mean() >= 119.5
    # BEiT's own loop gives 119.53 and 69 % exactly 120 (Python's random, 10,000 draws): the
    # generator is "at most 120", not exact-count
    assert 0.65 < (counts == 120).mean() < 0.73
    row, top, left, h, w, new, remaining = blocks.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 14).all() and (left + w <= 14).all()
    assert (new >= 1).all() and (new <= remaining).all()
    assert np.array_equal(np.bincount(row, weights=new, minlength=10_000).astype(int), counts)
    # a block's target area is >= 16 while >= 16 patches remain; rounding h = round(sqrt(A a)),
    # w = round(sqrt(A / a)) can give 12..15 cells (e.g. A = 16, a = 0.38 -> 2 x 6)
    big = remaining >= 16
    assert (h[big] * w[big] >= 12).all() and (h[big] * w[big] >= 16).mean() > 0.9
    assert (h[big] * w[big]).max() <= 120
    # keyed: the same key gives the same mask in any batch; different keys differ
    sub = np.array([5, 9_999, 17, 5])
    assert np.array_equal(beit_block_mask(keys[sub]), mask[sub])
    # (not all distinct: a single 120-cell rectangle, e.g. 10 x 12, recurs now and then)
    assert len({m.tobytes() for m in mask[:1000]}) > 990


# ---------------------------------------------------------------------------------------------
# activation checkpointing, pipeline stages
# ---------------------------------------------------------------------------------------------


def _train_step(enc, images, mask, seed=3):
    torch.manual_seed(seed)  # drop path and attention dropout draw from here (TP=1)
    out, taps = enc(images, mask, top_k=2)
    (out.square().mean() + sum(t.mean() for t in taps)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_replays_the_same_step(dist, mode):
    """Recomputation replays drop path and attention dropout: same output and gradients."""
    from d2v2_scale.model.modalities.beit import BeitEncoder

    m = beit_model_config(depth=2, drop_path=0.3, attention_dropout=0.2)
    torch.manual_seed(0)
    enc = BeitEncoder(m).train()
    perturb_(enc)
    images, mask = torch.randn(4, 3, 32, 32), torch.rand(4, 64) < 0.5
    out0, g0 = _train_step(enc, images, mask)
    enc.zero_grad(set_to_none=True)
    enc.set_checkpointing(mode)
    assert all(b.checkpointing == mode for b in enc.blocks)
    out1, g1 = _train_step(enc, images, mask)
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-7, rtol=1e-6, msg=k)


def test_pipeline_stages_compose_to_the_whole_encoder(dist):
    """prune_to_stage (train/pipeline.py) on the BEiT encoder: stage 0 keeps the front end (patch
    embedding, CLS, mask token) and blocks 0-1, stage 1 blocks 2-3 and the final norm, both the
    shared relative position table (replicated: gradients summed over stages); stage 0 then
    stage 1 gives the unsplit encoder's output and taps."""
    from d2v2_scale.model.modalities.beit import BeitEncoder
    from d2v2_scale.train.pipeline import prune_to_stage

    m = beit_model_config(depth=4, drop_path=0.3)
    models = []
    for _ in range(3):  # the whole encoder, stage 0, stage 1 (Megatron modules do not deepcopy)
        models.append(torch.nn.Module())
        models[-1].encoder = BeitEncoder(m).train()
    whole, stages = models[0], models[1:]
    perturb_(whole)
    for s in stages:
        s.load_state_dict(whole.state_dict())
    replicated = [prune_to_stage(s, r, 2) for r, s in enumerate(stages)]
    assert replicated == [["encoder.rel_pos_bias.table"]] * 2
    names = [{n for n, _ in s.named_parameters()} for s in stages]
    assert {"encoder.mask_token", "encoder.extra_tokens", "encoder.local.proj.weight"} <= names[0]
    assert not any(n.startswith(("encoder.mask_token", "encoder.local", "encoder.extra_tokens")) for n in names[1])
    assert stages[0].encoder.blocks.indices() == [0, 1] and stages[1].encoder.blocks.indices() == [2, 3]
    assert stages[0].encoder.final_norm is None and stages[1].encoder.final_norm is not None
    images, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.5
    with torch.no_grad():
        torch.manual_seed(5)
        out, taps = whole.encoder(images, mask, top_k=3)
        torch.manual_seed(5)
        h, taps0 = stages[0].encoder.run_blocks_tbd(stages[0].encoder.embed(images, mask).transpose(0, 1), 3)
        h, taps1 = stages[1].encoder.run_blocks_tbd(h, 3)
    torch.testing.assert_close(h.transpose(0, 1), out, atol=0, rtol=0)
    assert len(taps0) == 1 and len(taps1) == 2
    for a, b in zip(taps0 + taps1, taps):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_step_flops_beit_base():
    """d2v2-bench / d2v2-plan count a BEiT config by beit_step_flops: teacher 1x and student 3x the
    encoder on all 1 + 196 tokens (M = 1), no decoder."""
    from d2v2_scale.config import load_preset
    from d2v2_scale.model.flops import beit_encoder_flops, block_flops, step_flops, train_step_flops

    cfg = load_preset("d2v1-image-base")
    cfg.model.image_block, cfg.model.pre_ln, cfg.model.prenet_depth, cfg.model.depth = "beit", True, 0, 12
    cfg.validate()
    patch = 2 * 196 * 3 * 16 * 16 * 768
    assert beit_encoder_flops(cfg.model) == patch + 12 * block_flops(197, 768)
    f = step_flops(cfg, batch_size=128)
    assert f["teacher"] == 128 * beit_encoder_flops(cfg.model)
    assert f["student"] == 3 * 128 * 12 * block_flops(197, 768) and f["local"] == 3 * 128 * patch
    assert f["decoder"] == 0 and f["total"] == pytest.approx(4 * 128 * beit_encoder_flops(cfg.model))
    assert train_step_flops(cfg) == step_flops(cfg, batch_size=cfg.data.batch_size)["total"]
    print(f"BEiT-B encoder forward: {beit_encoder_flops(cfg.model) / 1e9:.2f} GFLOP per image")


def test_probe_reads_the_beit_twin():
    """d2v2-probe on a BEiT export: the twin is PlainBeitEncoder, final / block / CLS features
    work, and --layer targets (data2vec 2.0 FFN targets) is refused with a message."""
    import dataclasses

    from d2v2_scale.export import probe

    config = dataclasses.asdict(beit_model_config(depth=2))
    enc = probe.torch_init(config, seed=0)
    assert type(enc).__name__ == "PlainBeitEncoder"
    samples = [np.random.default_rng(i).standard_normal((3, 32, 32)).astype(np.float32) for i in range(3)]
    for layer, pool in (("final", "mean"), (1, "cls")):
        f = probe.features(enc, samples, pool=pool, layer=layer)
        assert f.shape == (3, 64) and np.isfinite(f).all()
    with pytest.raises(probe.ProbeError, match="BEiT"):
        probe.check_layer("targets", config)


def test_weight_decay_groups_follow_beit(dist):
    """docs/REFERENCE.md §2.4 (timm optimizer): no decay on 1-D parameters (norms, biases, q/v biases, layer
    scales) and the CLS token; the mask token (3-D) and the relative position table (2-D) decay."""
    from d2v2_scale.model import param_groups_for_weight_decay
    from d2v2_scale.model.modalities.beit import BeitEncoder

    model = torch.nn.Module()
    model.encoder = BeitEncoder(beit_model_config(depth=1))
    decay, no_decay = param_groups_for_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in no_decay["params"]}
    assert got == {n for n, p in model.named_parameters() if p.ndim == 1} | {"encoder.extra_tokens"}
    assert {"encoder.mask_token", "encoder.rel_pos_bias.table", "encoder.local.proj.weight",
            "encoder.blocks.0.self_attention.linear_qkv.weight"} <= {names[id(p)] for p in decay["params"]}
    assert {"encoder.blocks.0.gamma_1", "encoder.blocks.0.self_attention.linear_qkv.q_bias"} <= got
