"""Bodies for the model's distributed tests (run by d2v2_scale.testing.run_distributed).

`tp_step_body(tp, workdir)`: for each tiny preset, build student + teacher under TP=`tp`, load
the full weights saved by the TP=1 run (the TP=1 run writes them), run one forward/backward on a
fixed batch and save the loss and the TP-gathered gradients (megatron names, full tensors).
"""

import os

import torch

from d2v2_scale.distributed import init_distributed
from d2v2_scale.testing import save_result

PRESETS = ("image-tiny", "audio-tiny", "text-tiny")


def make_batch(cfg, b: int = 2, seed: int = 0) -> dict:
    """A deterministic batch with exact-count masks (padding in the second sample for audio/text)."""
    g = torch.Generator().manual_seed(seed)
    m, mc = cfg.model.clone_batch, cfg.model
    if mc.modality == "image":
        t = mc.num_patches
        src = torch.randn(b, mc.in_chans, mc.image_size, mc.image_size, generator=g)
        batch, real = {"source": src}, [t] * b
    elif mc.modality == "audio":
        s = 8000
        t = mc.audio_frames(s)
        pm = torch.zeros(b, s, dtype=torch.bool)
        pm[1, 6000:] = True
        batch = {"source": torch.randn(b, s, generator=g), "padding_mask": pm}
        real = [t, mc.audio_frames(6000)]
    else:
        t = 32
        src = torch.randint(4, mc.vocab_size, (b, t), generator=g)
        src[1, 26:] = mc.pad_token_id
        batch, real = {"source": src, "padding_mask": src.eq(mc.pad_token_id)}, [t, 26]
    keep = min(real) // 2
    mask = torch.ones(b * m, t, dtype=torch.bool)
    for i in range(b * m):
        mask[i, torch.randperm(real[i // m], generator=g)[:keep]] = False
    batch["mask"] = mask
    return batch


def tp_step_body(tp: str, workdir: str):
    tp = int(tp)
    info = init_distributed(tp=tp)
    from d2v2_scale.config import load_preset
    from d2v2_scale.model import build_student, build_teacher, init_teacher_from_student
    from d2v2_scale.twins import mapping

    out = {}
    for name in PRESETS:
        cfg = load_preset(name)
        cfg.model.dropout = 0.0  # attention dropout masks cannot match across TP layouts
        # the input dropouts (docs/REFERENCE.md §1.10 D2/D3/D7) act on tensors replicated over the TP group: drawn
        # from the shared default generator, they match across TP layouts and stay on
        cfg.model.encoder_input_dropout = cfg.model.decoder_input_dropout = 0.1
        cfg.parallel.tp = tp
        torch.manual_seed(0)
        student, teacher = build_student(cfg), build_teacher(cfg)
        path = os.path.join(workdir, f"{name}-init.pt")
        if tp == 1:
            if info.rank == 0:
                torch.save(mapping.gather_tp_state_dict(student), path)
        else:
            mapping.load_full_state_dict(student, torch.load(path))
        init_teacher_from_student(teacher, student)
        torch.manual_seed(1)  # decoder noise: same stream on every rank and in both runs
        loss, stats = student(make_batch(cfg), teacher)
        loss.backward()
        grads = mapping.gather_tp({n: p.grad for n, p in student.named_parameters()})
        if info.rank == 0:
            torch.save(grads, os.path.join(workdir, f"{name}-grads-tp{tp}.pt"))
        out[name] = {"loss": loss.item(), "target_var": stats["target_var"].item()}
    save_result(out)


def build_models(name, **model_overrides):
    """(cfg, student, teacher) of preset `name` with model fields overridden, seed 0, the teacher a
    copy of the student (the unit tests' common start)."""
    from d2v2_scale.config import load_preset
    from d2v2_scale.model import build_student, build_teacher, init_teacher_from_student

    cfg = load_preset(name)
    for k, v in model_overrides.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    s, t = build_student(cfg), build_teacher(cfg)
    init_teacher_from_student(t, s)
    return cfg, s, t
