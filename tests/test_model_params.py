"""Preset encoder parameter counts vs the standard architectures, and the FLOP model."""

import pytest
import torch

from d2v2_scale.config import load_preset

# (preset, reference encoder size, relative tolerance).  References: ViT-B/16 86M, ViT-L/16 303M,
# ViT-H/14 631M (timm, incl. a learned position table we do not have), wav2vec 2.0 / data2vec
# audio base ~94-95M, RoBERTa base 125M (50k vocab).
REFERENCE = [("image-base", 86e6, 0.02), ("image-large", 303e6, 0.02), ("image-huge", 631e6, 0.02),
             ("audio-base", 94e6, 0.02), ("text-base", 125e6, 0.02)]


@pytest.mark.parametrize("name,ref,tol", REFERENCE)
def test_preset_encoder_params(name, ref, tol):
    from d2v2_scale.model.flops import encoder_params_analytic
    from d2v2_scale.twins.encoder import PlainEncoder

    cfg = load_preset(name)
    with torch.device("meta"):  # no memory, no init
        enc = PlainEncoder(cfg.model)
    n = sum(p.numel() for p in enc.parameters())
    print(f"{name}: encoder {n / 1e6:.1f}M parameters (reference {ref / 1e6:.0f}M)")
    assert abs(n - ref) / ref < tol
    assert n == encoder_params_analytic(cfg.model)


@pytest.mark.parametrize("name", ["image-tiny", "audio-tiny", "text-tiny"])
def test_megatron_encoder_params_equal_plain(name):
    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.model import build_student
    from d2v2_scale.twins.encoder import PlainEncoder

    init_distributed()
    cfg = load_preset(name)
    s = build_student(cfg)
    n_mega = sum(p.numel() for p in s.encoder.parameters())
    assert n_mega == sum(p.numel() for p in PlainEncoder(cfg.model).parameters())


def test_step_flops_image_base():
    from d2v2_scale.model.flops import block_flops, step_flops, train_step_flops

    cfg = load_preset("image-base")
    f = step_flops(cfg, batch_size=16)
    # student: 16*16 rows x 12 blocks x (39 kept + CLS) tokens, 3x; teacher: 16 x 12 blocks x 197
    assert f["student"] == pytest.approx(3 * 256 * 12 * block_flops(40, 768))
    assert f["teacher"] > 16 * 12 * block_flops(197, 768)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert train_step_flops(cfg) == f["total"]  # cfg.data.batch_size = 16
    print({k: f"{v / 1e12:.2f} TFLOP" for k, v in f.items()})
    # ViT-B block on 197 tokens: ~ 24*T*D^2 + 4*T^2*D
    assert block_flops(197, 768) == 24 * 197 * 768 ** 2 + 4 * 197 ** 2 * 768
