"""The model builds under deepspeed.zero.Init (ZeRO-3 partitions parameters as each layer is
built): every initialization must survive that."""

import pytest
import torch

from d2v2_scale.config import load_preset


@pytest.mark.parametrize("name", ["image-tiny", "audio-tiny", "text-tiny"])
def test_build_under_zero3_init(name):
    import deepspeed

    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.model import build_student, build_teacher

    init_distributed()
    cfg = load_preset(name)
    torch.manual_seed(0)
    ref = build_student(cfg)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        s = build_student(cfg)
        t = build_teacher(cfg)
    assert all(hasattr(p, "ds_tensor") for p in s.parameters())
    assert all(hasattr(p, "ds_tensor") for p in t.parameters())
    params = list(s.parameters())
    with deepspeed.zero.GatheredParameters(params):
        got = {n: p.detach().clone() for n, p in s.named_parameters()}
    want = dict(ref.named_parameters())
    for n, w in want.items():
        g = got[n]
        assert g.shape == w.shape, n
        # same init distribution (the RNG stream differs under zero.Init, the statistics do not)
        if w.ndim > 1:
            assert abs(g.std().item() - w.std().item()) < 0.25 * w.std().item() + 1e-3, n
        else:
            assert torch.allclose(g, w), n  # biases 0, norms 1, ALiBi scales 1
    if name == "text-tiny":
        assert got["encoder.local.tokens.weight"][cfg.model.pad_token_id].abs().sum() == 0
