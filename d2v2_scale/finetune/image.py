"""Image classification fine-tuning (the reference's recipe: layer-wise LR decay, warm-up + cosine,
label smoothing, drop path, mixup / cutmix) of an exported image encoder with transformers.Trainer."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.schedules import WarmupCosine
from .common import load_model, save_model, training_args
from .recipes import IMAGE_REFERENCE, SMALL, layer_decay_groups
from .rows import FinetuneError, load_rows, split


def finetune_image(folder, manifest, out, recipe="small", seed=0, scratch=False, eval_paths=None,
                   eval_fraction=0.5, **over) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, set_seed

    r = dict(IMAGE_REFERENCE) | (SMALL["image"] if recipe == "small" else {}) | over
    out = Path(out)
    imgs, labels, paths, classes = load_rows(manifest, "image")
    tr, te = split(labels, paths, eval_paths, eval_fraction)
    n_cls = int(labels.max()) + 1
    names = {i: (classes[i] if i < len(classes) else str(i)) for i in range(n_cls)}
    proc = AutoImageProcessor.from_pretrained(folder)
    pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
    set_seed(seed)  # the head (and with --scratch the whole network) is initialized here, before Trainer seeds
    model = load_model(AutoModelForImageClassification, folder, scratch, num_labels=n_cls, id2label=names,
                  label2id={v: k for k, v in names.items()}, drop_path_rate=r["drop_path_rate"],
                  label_smoothing=r["label_smoothing"])
    mix = None
    if r["mixup"] > 0 or r["cutmix"] > 0:
        try:
            from timm.data import Mixup
        except Exception as e:  # noqa: BLE001 - timm missing or its torchvision broken
            raise FinetuneError(f"mixup/cutmix need timm (pip install -e '.[finetune]'; {type(e).__name__}: {e}); "
                                "or pass --mixup 0 --cutmix 0") from None
        mix = Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=r["mixup_prob"],
                    switch_prob=r["mixup_switch_prob"], label_smoothing=r["label_smoothing"], num_classes=n_cls)
    ds = [{"pixel_values": pv[i], "labels": int(labels[i])} for i in tr]

    def collate(rows):
        x = torch.stack([q["pixel_values"] for q in rows])
        y = torch.tensor([q["labels"] for q in rows])
        if mix is not None and len(rows) % 2 == 0:
            x, y = mix(x, y)
        return {"pixel_values": x, "labels": y}

    opt = torch.optim.AdamW(layer_decay_groups(model, r["lr"], r["layer_decay"], r["weight_decay"]),
                            betas=r["betas"])
    total, warm, floor = r["max_steps"], r["warmup_steps"], r["min_lr"] / r["lr"]

    # fairseq's cosine schedule, the one pretraining runs (update k at its value for k - 1 updates)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [WarmupCosine(total, warm, floor)] * len(opt.param_groups))
    Trainer(model=model, args=training_args(out, r, seed), train_dataset=ds, data_collator=collate,
            optimizers=(opt, sched)).train()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=pv[te[i:i + 64]]).logits.argmax(-1) for i in range(0, len(te), 64)])
    acc = float((pred.numpy() == labels[te]).mean())
    save_model(model, out / "model")
    proc.save_pretrained(out / "model")
    res = {"task": "image", "accuracy": acc, "n_train": len(tr), "n_eval": len(te), "scratch": scratch,
           "seed": seed, "recipe": recipe, "steps": total}
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    return res
