"""Bodies for the BEiT encoder's tests (model/modalities/beit.py), run by d2v2_scale.testing.run_distributed
or in the test process itself (TP=1).

`beit_step(tp, workdir)`: build the tiny BEiT encoder under TP=`tp`, load the full weights the
TP=1 run saved (the TP=1 run writes them, after moving every parameter off its init), run one
training-mode forward (drop path on, the same default-generator seed) with a mask and all block
taps, backward a fixed random projection of the outputs, and save the output, the taps and the
TP-gathered gradients (megatron names, full tensors) to `workdir/beit-tp{tp}.pt`.
"""

import os

import torch

from d2v2_scale.testing import save_result


def beit_model_config(depth: int = 2, **kw):
    """A tiny BEiT model config: 32 px images, 4 px patches (8 x 8 grid), width 64, 4 heads.  Only
    the encoder's own fields are validated here (`_beit_errors`): the data2vec 1.0 objective's
    checks (masks, head, ...) are not this encoder's business."""
    from d2v2_scale.config import _beit_errors, load_preset

    cfg = load_preset("d2v1-image-tiny")  # the BEiT block is data2vec 1.0's (config validation)
    m = cfg.model
    m.image_block, m.pre_ln, m.prenet_depth, m.depth, m.top_k_layers = "beit", True, 0, depth, depth
    m.drop_path, m.layer_scale_init, m.attention_dropout = 0.2, 1e-4, 0.0
    for k, v in kw.items():
        setattr(m, k, v)
    assert _beit_errors(m) == [], _beit_errors(m)
    return m


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its structured init (zero table and biases, 1e-4 gammas, unit
    norms) so that parity tests see every tensor's effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("rel_pos_bias.table"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "gamma_" in n:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def beit_step(tp: str, workdir: str):
    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.twins import mapping
    from d2v2_scale.model.modalities.beit import BeitEncoder

    tp = int(tp)
    info = init_distributed(tp=tp)
    m = beit_model_config()
    m.drop_path = 0.5  # drops whole samples: the same ones on every TP rank and in the TP=1 run
    torch.manual_seed(0)
    enc = BeitEncoder(m)
    path = os.path.join(workdir, "beit-init.pt")
    if tp == 1:
        perturb_(enc)
        if info.rank == 0:
            torch.save(mapping.gather_tp_state_dict(enc), path)
    else:
        mapping.load_full_state_dict(enc, torch.load(path))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, m.image_size, m.image_size, generator=g)
    mask = torch.rand(6, m.num_patches, generator=g) < 0.5
    proj = torch.randn(m.embed_dim, generator=g)
    enc.train()
    torch.manual_seed(2)
    out, taps = enc(images, mask, m.depth)
    loss = (out @ proj).square().mean() + sum((t @ proj).mean() for t in taps)
    loss.backward()
    grads = mapping.gather_tp({n: p.grad for n, p in enc.named_parameters()})
    if info.rank == 0:
        torch.save({"out": out.detach(), "taps": [t.detach() for t in taps], "loss": loss.detach(),
                    "grads": grads}, os.path.join(workdir, f"beit-tp{tp}.pt"))
    save_result({"loss": loss.item()})
