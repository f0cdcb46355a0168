"""Bodies for tests/test_finetune_dist.py (run in N processes by d2v2_scale.testing.run_distributed):
d2v2-finetune's image recipe (finetune/image.py, the command's code path) under torchrun / srun,
with or without Trainer's DeepSpeed."""

from __future__ import annotations

from d2v2_scale.testing import save_result


def image_body(folder: str, manifest: str, out: str, steps: str, batch: str, deepspeed: str = "none"):
    """A few steps of the small image recipe, the global batch `batch` split over the processes,
    with the regularizers that draw random numbers off (drop path 0, no mixup / cutmix; label
    smoothing stays: it is deterministic), 2 warm-up steps then cosine, a log every step; the
    rank's result: Trainer's log history and the metrics."""
    from d2v2_scale.finetune.image import finetune_image

    res = finetune_image(folder, manifest, out, recipe="small", seed=0, max_steps=int(steps),
                         batch_size=int(batch), mixup=0.0, cutmix=0.0, drop_path_rate=0.0, warmup_steps=2,
                         logging_steps=1, deepspeed=None if deepspeed == "none" else deepspeed)
    save_result({k: res[k] for k in ("train_log", "accuracy", "world_size", "n_train", "n_eval")})
