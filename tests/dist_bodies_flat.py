"""Bodies for tests/test_flat_engine.py (parallel.engine=flat), run by run_distributed."""

from __future__ import annotations

import torch

from d2v2_scale.config import build_config
from d2v2_scale.testing import save_result


def count_body(*overrides: str):
    """Operators of one image-tiny update under the flat engine (after one warm-up update), the
    student's trainable tensor count, and the operators of a plain `loss.backward()` of the same
    student with no engine (grads None: autograd's own work, the floor of the backward phase)."""
    from d2v2_scale.bench import synthetic_batch
    from d2v2_scale.opcount import OpCounter, count_update
    from d2v2_scale.train.trainer import Trainer

    cfg = build_config("image-tiny", overrides=list(overrides))
    tr = Trainer(cfg, build_data=False)
    batches = [synthetic_batch(cfg, step=i) for i in range(cfg.optim.grad_accum)]
    tr.train_step(batches)
    counts = count_update(tr, batches)
    student = tr.engine.module
    n_params = sum(1 for p in student.parameters() if p.requires_grad)
    for p in student.parameters():
        p.grad = None
    loss, _ = student(tr._to_device(batches[0]), teacher=tr.teacher)
    plain = OpCounter()
    with plain:
        loss.backward()
    save_result({"counts": counts, "n_params": n_params, "plain_backward": sum(plain.ops.values())})
