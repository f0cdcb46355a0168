"""The reference's training details D1-D10 (docs/REFERENCE.md §1.10), each against its
definition.  D4 (weight decay) is in test_model_core.test_weight_decay_groups, D5 (image crop) in
test_data_loader.test_image_crop_is_reference_random_resized_crop, D8 (Adam eps) in
test_config.test_spec_table_numbers, D6 (audio batches) in test_data_loader.test_audio_batch_contract,
D10's loader side in test_data_loader.test_text_batch_contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2v2_scale.config import load_preset
from d2v2_scale.model.modalities import get_modality
from tests.dist_bodies_model import make_batch


@pytest.fixture(scope="module", autouse=True)
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


from tests.dist_bodies_model import build_models as _build  # noqa: E402


def _record(module, cap, key, which="input"):
    """Keep the first positional input (or the output) of every call of `module` under cap[key]."""
    if which == "input":
        module.register_forward_pre_hook(lambda m, a: cap.setdefault(key, []).append(a[0].detach().clone()))
    else:
        module.register_forward_hook(lambda m, a, o: cap.setdefault(key, []).append(o.detach().clone()))


def _block_input(student, cap):
    """Record the encoder's block input ([T, N, D]) of the next forward as cap['blocks_in']."""
    run = student.encoder.run_blocks_tbd

    def rec(x, *a, **k):
        cap["blocks_in"] = x.detach().clone()
        out = run(x, *a, **k)
        cap["blocks_out"] = out[0].detach().clone()
        return out

    student.encoder.run_blocks_tbd = rec


def _dropout_of(x, ref, p):
    """Assert x is inverted dropout of ref (zeros, else ref / (1 - p)) and return the zero share."""
    zero = x == 0
    torch.testing.assert_close(x[~zero], ref[~zero] / (1 - p), atol=1e-5, rtol=1e-5)
    return zero.float().mean().item()


# ---- D1 -----------------------------------------------------------------------------------

def test_d1_text_decoder_ends_in_two_layer_projection():
    """Text: Linear(768, 1536) -> GELU -> Linear(1536, 768) named decoder.proj.0/.2 (fairseq's
    keys); image/audio end in one Linear."""
    for name in ("text-base", "text-large"):
        m = load_preset(name).model
        assert (m.decoder_projection_layers, m.decoder_projection_ratio) == (2, 2.0)
        with torch.device("meta"):
            dec = get_modality(m).build_decoder()
        shapes = {n: tuple(p.shape) for n, p in dec.named_parameters() if n.startswith("proj.")}
        assert shapes == {"proj.0.weight": (2 * m.decoder_dim, m.decoder_dim), "proj.0.bias": (2 * m.decoder_dim,),
                          "proj.2.weight": (m.embed_dim, 2 * m.decoder_dim), "proj.2.bias": (m.embed_dim,)}
        assert isinstance(dec.proj[1], nn.GELU)
    for name in ("image-base", "audio-base"):
        m = load_preset(name).model
        with torch.device("meta"):
            assert isinstance(get_modality(m).build_decoder().proj, nn.Linear)
    # the forward: convs, then Linear -> GELU (exact erf) -> Linear
    m = load_preset("text-tiny").model
    torch.manual_seed(0)
    dec = get_modality(m).build_decoder()
    x = torch.randn(3, 10, m.embed_dim)
    h = []
    dec.proj[0].register_forward_pre_hook(lambda mod, a: h.append(a[0]))
    y = dec(x)
    p0, p2 = dec.proj[0], dec.proj[2]
    torch.testing.assert_close(y, F.linear(F.gelu(F.linear(h[0], p0.weight, p0.bias)), p2.weight, p2.bias))


# ---- D2 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,p", [("audio-tiny", 0.1), ("text-tiny", 0.1), ("image-tiny", 0.0)])
def test_d2_decoder_input_dropout(name, p):
    """The student output is dropped out (p = 0.1 audio/text, 0 images) before the masked slots
    are filled with noise: at kept positions the decoder input is inverted dropout of the encoder
    output; masked slots hold the N(0, 0.01^2) noise untouched."""
    cfg, s, t = _build(name)
    assert cfg.model.decoder_dropout == p
    s.train()
    batch = make_batch(cfg)
    cap = {}
    _block_input(s, cap)
    _record(s.decoder, cap, "dec_in")
    s(batch, t)
    e = s.encoder.num_extra_tokens
    enc = cap["blocks_out"].transpose(0, 1)[:, e:]  # [N, T_keep, D]
    mask = batch["mask"]
    dec_in = cap["dec_in"][0]
    kept = dec_in[~mask].reshape(enc.shape)  # row-major, ascending kept positions
    share = _dropout_of(kept, enc, p) if p else (torch.testing.assert_close(kept, enc), 0.0)[1]
    assert abs(share - p) < 0.02
    noise = dec_in[mask]
    assert (noise != 0).all() and abs(noise.std().item() - 0.01) < 1e-3


# ---- D3 -----------------------------------------------------------------------------------

def test_d3_audio_input_dropout_after_context_norm():
    """Audio: dropout 0.1 on the encoder input AFTER the context LayerNorm (no prenet in audio-base):
    block input = inverted dropout of LayerNorm(gathered positions(features)); the teacher (eval)
    gets none."""
    assert load_preset("audio-base").model.input_dropout == 0.1
    assert load_preset("audio-base").model.prenet_depth == 0
    assert load_preset("image-base").model.input_dropout == 0.0
    cfg, s, t = _build("audio-tiny", dropout=0.0, encoder_input_dropout=0.3)
    s.train()
    batch = make_batch(cfg)
    cap = {}
    _block_input(s, cap)
    s(batch, t)
    enc = s.encoder
    with torch.no_grad():
        feats, pad = enc.local_features(batch["source"], batch["padding_mask"])
        lay = s.layout(batch)
        x = enc.positions(feats.repeat_interleave(cfg.model.clone_batch, 0), lay.zero)
        x = torch.gather(x, 1, lay.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        ref = enc.context_norm(x)
    share = _dropout_of(cap["blocks_in"].transpose(0, 1), ref, 0.3)
    assert abs(share - 0.3) < 0.02
    # the teacher's context: no dropout (eval mode)
    with torch.no_grad():
        assert torch.equal(t.encoder.contextualize(feats, None, pad), t.encoder.contextualize(feats, None, pad))


# ---- D7 -----------------------------------------------------------------------------------

def test_d7_text_dropout_once_per_sample_and_teacher_sees_it():
    """Text: the embedding dropout is drawn once per sample (every clone has the same mask) and the
    teacher's input is that post-dropout tensor (not the clean embeddings)."""
    cfg, s, t = _build("text-tiny", dropout=0.0, encoder_input_dropout=0.3)
    s.train()
    batch = make_batch(cfg)
    cap = {}
    _block_input(s, cap)
    _record(t, cap, "teacher_in")
    s(batch, t)
    m = cfg.model.clone_batch
    emb = cap["teacher_in"][0]  # [B, T, D]
    with torch.no_grad():
        clean, _ = s.encoder.local.eval()(batch["source"], batch["padding_mask"])
    s.train()
    share = _dropout_of(emb, clean, 0.3)
    assert abs(share - 0.3) < 0.03
    student_in = cap["blocks_in"].transpose(0, 1)  # [N, T_keep, D]
    keep = s.layout(batch).keep
    for r in range(student_in.shape[0]):
        torch.testing.assert_close(student_in[r], emb[r // m, keep[r]])  # same mask in every clone
    # pipeline order (teacher pass first): the student's front end replays the teacher's mask
    batch = make_batch(cfg)
    with torch.no_grad():
        src = s.teacher_source(batch)
        torch.rand(5)  # other draws in between
        assert torch.equal(s.front_end(batch), src)


# ---- D9 -----------------------------------------------------------------------------------

def _torch_default(layer, name):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    fan_in = layer.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound + 1e-7, name
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.25 * bound, name  # uniform, not xavier / 0.02


def test_d9_init():
    """Decoder convs: PyTorch default (not xavier, biases not zero); image/audio decoder proj and
    the audio projection: PyTorch default; text decoder head: BERT N(0, 0.02), zero bias; image
    CLS token N(0, 1)."""
    for name in ("image-base", "audio-base", "text-base"):
        m = load_preset(name).model
        torch.manual_seed(0)
        dec = get_modality(m).build_decoder()
        for i, conv in enumerate(dec.convs):
            _torch_default(conv, f"{name} conv {i}")
        if name == "text-base":
            for lin in (dec.proj[0], dec.proj[2]):
                assert abs(lin.weight.std().item() - 0.02) < 1e-3 and not lin.bias.any()
        else:
            _torch_default(dec.proj, f"{name} proj")
    torch.manual_seed(0)
    audio = get_modality(load_preset("audio-base").model).build_local()
    _torch_default(audio.proj, "audio local.proj")
    cls = get_modality(load_preset("image-base").model).build_extra_tokens()
    assert abs(cls.std().item() - 1.0) < 0.1 and abs(cls.mean().item()) < 0.15


# ---- D10 ----------------------------------------------------------------------------------

def test_d10_text_blocks_are_511_stream_tokens_after_bos():
    """d2v2-prep text packs 511-token blocks by default and the loader prepends <s>: 512 in all
    (the batch contract test checks the loader on real shards)."""
    from data_prep.cli import build_parser

    assert build_parser().parse_args(["text", "x", "--out", "y"]).block_size == 511
    for name in ("text-base", "text-large"):
        d = load_preset(name).data
        assert d.prepend_bos and d.max_tokens == 512
