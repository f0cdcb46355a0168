"""A few hundred CPU steps of image-tiny on real images (sklearn digits) reduce the loss and keep
the target / prediction variance above the collapse thresholds."""

import time

import numpy as np
import torch
import torch.nn.functional as F

from d2v2_scale.config import load_preset


def digits_32x32() -> torch.Tensor:
    """The 1797 8x8 sklearn digits -> [N, 3, 32, 32], normalized per dataset."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std()


def random_mask(rows: int, length: int, keep: int, g: torch.Generator) -> torch.Tensor:
    """Exact-count random mask: every row keeps exactly `keep` positions (True = masked)."""
    noise = torch.rand(rows, length, generator=g)
    kept = noise.argsort(1)[:, :keep]
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask.scatter_(1, kept, False)
    return mask


def test_image_tiny_trains_on_digits():
    from d2v2_scale.distributed import init_distributed
    from d2v2_scale.model import (ModuleEma, build_student, build_teacher, init_teacher_from_student,
                                  param_groups_for_weight_decay)

    init_distributed()
    torch.manual_seed(0)
    cfg = load_preset("image-tiny")
    m, b = cfg.model, cfg.data.batch_size
    steps = 300
    student, teacher = build_student(cfg), build_teacher(cfg)
    init_teacher_from_student(teacher, student)
    ema = ModuleEma(teacher, cfg)
    opt = torch.optim.AdamW(param_groups_for_weight_decay(student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.optim.warmup_steps))
    data = digits_32x32()
    g = torch.Generator().manual_seed(0)
    keep = int(m.num_patches * (1 - cfg.masking.ratio))
    losses, tvar, pvar = [], [], []
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data), (b,), generator=g)
        batch = {"source": data[idx], "mask": random_mask(b * m.clone_batch, m.num_patches, keep, g)}
        loss, stats = student(batch, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        opt.step()
        sched.step()
        ema.step(student)
        losses.append(loss.item())
        tvar.append(stats["target_var"].item())
        pvar.append(stats["pred_var"].item())
    elapsed = time.time() - t0
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"{steps} steps in {elapsed:.1f}s: loss {first:.3f} -> {last:.3f}, "
          f"target_var {np.min(tvar):.3f}..{np.max(tvar):.3f}, pred_var {np.min(pvar):.3f}..{np.max(pvar):.3f}")
    assert elapsed < 60
    assert last < 0.7 * first
    assert min(tvar) > cfg.guards.min_target_var and min(pvar) > cfg.guards.min_pred_var
    assert all(np.isfinite(losses))
