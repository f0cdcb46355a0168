"""Megatron encoder <-> plain twin parity (TP=1, fp32) and TP=2 == TP=1 (2 gloo processes)."""

import tempfile

import pytest
import torch

from d2v2_scale.config import load_preset
from tests.dist_bodies_model import PRESETS, make_batch


@pytest.fixture(scope="module")
def dist():
    from d2v2_scale.distributed import init_distributed

    return init_distributed()


@pytest.mark.parametrize("name", PRESETS)
def test_plain_twin_matches_megatron(dist, name):
    from d2v2_scale.twins import mapping
    from d2v2_scale.model import build_student
    from d2v2_scale.twins.encoder import PlainEncoder

    cfg = load_preset(name)
    torch.manual_seed(0)
    s = build_student(cfg).eval()
    with torch.no_grad():  # move norms/biases/ALiBi scales off their 0/1 init
        for n, p in s.named_parameters():
            if p.ndim == 1:
                p.copy_(p.uniform_(0.5, 1.5) if "alibi" in n else p + 0.1 * torch.randn_like(p))
    full = mapping.gather_tp_state_dict(s)
    plain_sd = mapping.megatron_to_plain(full, cfg.model.num_heads)
    twin = PlainEncoder(cfg.model)
    twin.load_state_dict(plain_sd, strict=True)  # every twin tensor is covered, nothing extra
    # the mapping round-trips exactly
    back = mapping.plain_to_megatron(plain_sd, cfg.model.num_heads)
    enc = {k: v for k, v in full.items() if k.startswith("encoder.")}
    assert set(back) == set(enc) and all(torch.equal(back[k], enc[k]) for k in back)
    # the name-based partition rules agree with Megatron's own parameter attributes
    for k, dim in mapping.partition_dims_from_module(s).items():
        assert mapping.partition_dim(k) == dim, k

    batch = make_batch(cfg)
    src, pm = batch["source"], batch.get("padding_mask")
    with torch.no_grad():
        f, pad = s.encoder.local_features(src, pm)
        out, layers = s.encoder.forward_full(f, pad, cfg.model.total_blocks)
        ref = twin(src, pm)
    e = s.encoder.num_extra_tokens
    if pad is not None:
        assert torch.equal(pad, ref["padding"])
    torch.testing.assert_close(out, ref["x"][:, e:], atol=1e-5, rtol=1e-5)
    for a, b in zip(layers, ref["ffn"]):
        torch.testing.assert_close(a, b[:, e:], atol=1e-5, rtol=1e-5)


def test_plain_twin_is_standalone():
    import ast
    import inspect

    import d2v2_scale.twins.encoder as plain

    tree = ast.parse(inspect.getsource(plain))
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"torch", "math"}, mods


def test_tp2_matches_tp1():
    """Same weights, same batch, same decoder noise: TP=2 loss and (gathered) gradients equal TP=1."""
    from d2v2_scale.testing import run_distributed

    d = tempfile.mkdtemp(prefix="d2v2tp-")
    r1 = run_distributed("tests.dist_bodies_model:tp_step_body", nproc=1, args=["1", d], timeout=150)
    r2 = run_distributed("tests.dist_bodies_model:tp_step_body", nproc=2, args=["2", d], timeout=150)
    for name in PRESETS:
        l1 = r1[0][name]["loss"]
        for rank in (0, 1):
            assert r2[rank][name]["loss"] == pytest.approx(l1, rel=1e-5, abs=1e-5), name
        g1 = torch.load(f"{d}/{name}-grads-tp1.pt")
        g2 = torch.load(f"{d}/{name}-grads-tp2.pt")
        assert set(g1) == set(g2)
        for k in g1:
            assert g1[k].shape == g2[k].shape, k
            torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=2e-4, msg=f"{name} {k}")
