"""Image classification fine-tuning (the reference's recipe: layer-wise LR decay, warm-up + cosine,
label smoothing, drop path, mixup / cutmix) of an exported image encoder with transformers.Trainer."""

from __future__ import annotations

from pathlib import Path

from ..train.schedules import WarmupCosine
from .common import classification_loss, folder_kind, load_model, publish, recipe_trainer, training_args
from .recipes import IMAGE_REFERENCE, SMALL, layer_decay_groups
from .rows import load_rows, split


def mixer(r: dict, n_cls: int):
    """The recipe's batch Mixup / CutMix (None when both alphas are 0): timm's when timm.data
    imports, else finetune/mixup.py's, equal to it bit for bit (tests/test_finetune_mixup.py).
    `import timm` imports torchvision, and a CPU-only torch has no matching torchvision in the
    package registry (its wheel is CUDA-linked and fails at import): docs/FINETUNE.md."""
    if not (r["mixup"] > 0 or r["cutmix"] > 0):
        return None
    try:
        from timm.data import Mixup
    except Exception:  # noqa: BLE001 - timm missing, or its torchvision not built for this torch
        from .mixup import Mixup
    return Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=r["mixup_prob"],
                 switch_prob=r["mixup_switch_prob"], label_smoothing=r["label_smoothing"], num_classes=n_cls)


def finetune_image(folder, manifest, out, recipe="small", seed=0, scratch=False, eval_paths=None,
                   eval_fraction=0.5, train_rows=None, **over) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    r = dict(IMAGE_REFERENCE) | (SMALL["image"] if recipe == "small" else {}) | over
    out = Path(out)
    imgs, labels, paths, classes = load_rows(manifest, "image")
    tr, te = split(labels, paths, eval_paths, eval_fraction, train_rows=train_rows)
    n_cls = int(labels.max()) + 1
    names = {i: (classes[i] if i < len(classes) else str(i)) for i in range(n_cls)}
    proc = AutoImageProcessor.from_pretrained(folder)
    pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
    kind = folder_kind(folder)
    model = load_model(AutoModelForImageClassification, folder, scratch, seed=seed, num_labels=n_cls, id2label=names,
                  label2id={v: k for k, v in names.items()}, drop_path_rate=r["drop_path_rate"],
                  **({"label_smoothing": r["label_smoothing"]} if kind.remote else {}), **dict(kind.head))
    mix = mixer(r, n_cls)
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
    # transformers' own heads (1.0 vision): the reference's loss through the Trainer (common.classification_loss)
    loss = None if kind.remote else classification_loss(r["label_smoothing"])
    trainer = recipe_trainer(model=model, args=training_args(out, r, seed), train_dataset=ds, data_collator=collate,
                             optimizers=(opt, sched), compute_loss_func=loss)  # the recipe's optimizer and schedule
    trainer.train()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=pv[te[i:i + 64]]).logits.argmax(-1) for i in range(0, len(te), 64)])
    acc = float((pred.numpy() == labels[te]).mean())
    res = {"task": "image", "accuracy": acc, "n_train": len(tr), "n_eval": len(te), "scratch": scratch,
           "seed": seed, "recipe": recipe, "steps": total}
    return publish(trainer, out, res, proc.save_pretrained)  # rank 0 writes model/ and metrics.json
