"""Bodies for the export tests (run in N processes by d2v2_scale.testing.run_distributed).

`fit_features_body` trains, then computes the distributed teacher's outputs on a fixed batch
through the real (ZeRO-3 / TP) teacher engine and saves them for the parent test to compare
with the exported plain twin."""

from __future__ import annotations

import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result


def fixed_image_batch(mcfg, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, mcfg.in_chans, mcfg.image_size, mcfg.image_size, generator=g)


def fixed_source(mcfg, n: int = 4) -> torch.Tensor:
    """A fixed input of the modality: images, 1 s of noise waveform, or tokens of the tiny vocab."""
    g = torch.Generator().manual_seed(1234)
    if mcfg.modality == "audio":
        return torch.randn(n, 16000, generator=g)
    if mcfg.modality == "text":
        return torch.randint(4, 1000, (n, 32), generator=g)
    return fixed_image_batch(mcfg, n)


def fit_features_body(feat_path: str, preset: str, *overrides: str):
    import deepspeed

    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(preset, overrides=list(overrides))
    tr = Trainer(cfg)
    tr.fit()
    src = fixed_source(cfg.model)
    enc = tr.teacher.module.encoder
    captured = {}
    # the block's output: (x, ffn) for the 2.0 block, x for the BEiT block
    h = enc.blocks[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("last", (o[0] if isinstance(o, tuple) else o).detach().clone()))
    with torch.no_grad():
        # the teacher's input: the image itself, or (audio, text) the student's front end on it
        targets = tr.teacher(tr.engine.module.teacher_source({"source": src})).float()
    h.remove()
    last = captured["last"].transpose(0, 1).float()  # [B, E + T, D] (post-LN: the encoder output)
    out = {"source": src, "targets": targets, "last": last}
    # the student's full weights: ZeRO-3 shards gathered by DeepSpeed, then TP shards all-gathered
    # over the TP group (collective: every rank takes part)
    from d2v2_scale.twins import mapping

    params = [p for _, p in tr.engine.module.named_parameters()]
    with deepspeed.zero.GatheredParameters(params) if tr.cfg.parallel.zero_stage == 3 else _null():
        local = {n: p.detach().float().clone() for n, p in tr.engine.module.named_parameters()}
    out["student"] = mapping.gather_tp(local)
    if tr.info.rank == 0:
        torch.save(out, feat_path)
    save_result({"step": tr.step, "tp": tr.info.tp_size, "dp": tr.info.dp_size})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fit_features_pp_body(feat_path: str, preset: str, *overrides: str):
    """Pipeline-parallel run: train, then the teacher targets of a fixed batch through the real
    pipeline (Megatron schedule over the stages) and each rank's student weights, saved per rank
    (`feat_path.rank{r}`): no stage holds the whole model."""
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config(preset, overrides=list(overrides))
    tr = Trainer(cfg)
    tr.fit()
    src = fixed_image_batch(cfg.model)
    m = cfg.model
    batch = {"source": src, "mask": torch.zeros(src.shape[0] * m.clone_batch, m.num_patches, dtype=torch.bool)}
    targets = tr.pipeline.teacher_targets([batch])[0]
    local = {n: p.detach().float().clone() for n, p in tr.engine.module.named_parameters()}
    torch.save({"source": src, "targets": targets, "student": local, "pp_rank": tr.info.pp_rank},
               f"{feat_path}.rank{tr.info.rank}")
    save_result({"step": tr.step, "pp": tr.info.pp_size, "blocks": tr.engine.module.encoder.blocks.indices()})
