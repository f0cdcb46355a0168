"""`d2v2-finetune`: fine-tune an exported transformers folder on a labelled d2v2-prep corpus.

    d2v2-finetune image HF_DIR --data digits/manifest.json --out ft/digits [--recipe reference|small]
    d2v2-finetune ctc   HF_DIR --data esp/manifest.json --out ft/esp --eval-paths '^[^/]+/en-gb-x-rp_'

image: the reference's image classification recipe (layer-wise LR decay, warm-up + cosine, label
smoothing, drop path, mixup / cutmix through timm); ctc: the reference's speech recipe (frozen CNN,
tri-stage LR, time / channel masks, letter vocabulary; transcripts = the rows' class names, the
only text a d2v2-prep audio corpus carries).  --recipe small scales steps, batch and LR to a CPU
run of minutes (docs/FINETUNE.md); --scratch trains the same network from random init (the
baseline of docs/BENCHMARKS.md).  Held-out rows: --eval-paths REGEX (rows whose source path
matches, e.g. held-out speakers) or a seeded stratified --eval-fraction.  Writes the fine-tuned
folder (model + processor, loadable by pipeline(...)) and metrics.json to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from ..export.hf_remote import code_files, register_local_classes
from ..train.schedules import WarmupCosine
from .recipes import CTC_REFERENCE, IMAGE_REFERENCE, cer, layer_decay_groups, tri_stage

SMALL = {"image": dict(lr=2e-3, max_steps=1000, batch_size=32, warmup_steps=100, mixup=0.0, cutmix=0.0,
                       layer_decay=0.65, min_lr=1e-6),
         "ctc": dict(lr=3e-3, max_steps=1500, batch_size=16, mask_time_prob=0.1, mask_time_length=2,
                     mask_feature_prob=0.05, mask_feature_length=8, layerdrop=0.0)}


class FinetuneError(ValueError):
    pass


def _split(labels: np.ndarray, paths: list[str], eval_paths: str | None, fraction: float, seed: int = 0):
    """-> (train row indices, held-out row indices); the split does not move with the training seed."""
    if eval_paths:
        rx = re.compile(eval_paths)
        te = np.array([bool(rx.search(p)) for p in paths])
        if not te.any() or te.all():
            raise FinetuneError(f"--eval-paths {eval_paths!r} matches {int(te.sum())} of {len(paths)} rows: "
                                "it must pick some rows, not all")
        return np.flatnonzero(~te), np.flatnonzero(te)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(te)


def load_rows(manifest, modality: str):
    """-> (inputs: PIL images | float32 waveforms, labels int64 [N], source paths, class names) of the
    labelled rows (label >= 0)."""
    from ..data.augment import decode_image
    from ..data.shards import ShardSet

    shards = ShardSet(manifest)
    if shards.modality != modality:
        raise FinetuneError(f"{manifest} holds {shards.modality} data; this recipe needs {modality} rows")
    if "label" not in shards.manifest["schema"]:
        raise FinetuneError(f"{manifest}: no label column (d2v2-prep ... --label-from parent)")
    labels = shards.column("label").astype(np.int64)
    idx = np.flatnonzero(labels >= 0)
    has_path = "path" in shards.manifest["schema"]
    xs, paths = [], []
    for i in idx:
        if modality == "image":
            cols = ["image"] + (["pixels", "pix_height", "pix_width", "pix_channels"]
                                if "pixels" in shards.manifest["schema"] else []) + (["path"] if has_path else [])
            row = shards.get(int(i), cols)
            xs.append(decode_image(row, 3))
        else:
            row = shards.get(int(i), ["audio"] + (["path"] if has_path else []))
            scale = 1.0 / 32768.0 if shards.manifest.get("dtype", "int16") == "int16" else 1.0
            xs.append(np.asarray(row["audio"], dtype=np.float32) * scale)
        paths.append(str(row.get("path", i)))
    return xs, labels[idx], paths, list(shards.manifest.get("classes") or [])


def _load(auto, folder, scratch: bool, **over):
    """The folder's weights in this package's own model classes: the Python files inside a folder
    (which may come from elsewhere) never run (export/hf_remote.register_local_classes)."""
    from transformers import AutoConfig

    register_local_classes()
    if scratch:  # the same network and config, random init (the baseline)
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False, **over)
        return auto.from_config(cfg, trust_remote_code=False)
    return auto.from_pretrained(folder, trust_remote_code=False, **over)


def _save_model(model, dest: Path) -> None:
    """save_pretrained, plus the model code of this package (export/hf_remote.code_files): the
    model was built from the installed classes, so transformers copies no code, and the saved
    folder must load with trust_remote_code=True like an export does."""
    model.save_pretrained(dest)
    for name, data in code_files().items():
        (dest / name).write_bytes(data)


def _args(out, r, seed):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out / "trainer"), max_steps=r["max_steps"],
                             per_device_train_batch_size=r["batch_size"], seed=seed, report_to="none",
                             save_strategy="no", logging_strategy="steps", logging_steps=max(r["max_steps"] // 5, 1),
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             use_cpu=not _cuda(), max_grad_norm=0.0)  # the reference: no clipping


def _cuda():
    import torch

    return torch.cuda.is_available()


def finetune_image(folder, manifest, out, recipe="small", seed=0, scratch=False, eval_paths=None,
                   eval_fraction=0.5, **over) -> dict:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer

    r = dict(IMAGE_REFERENCE) | (SMALL["image"] if recipe == "small" else {}) | over
    out = Path(out)
    imgs, labels, paths, classes = load_rows(manifest, "image")
    tr, te = _split(labels, paths, eval_paths, eval_fraction)
    n_cls = int(labels.max()) + 1
    names = {i: (classes[i] if i < len(classes) else str(i)) for i in range(n_cls)}
    proc = AutoImageProcessor.from_pretrained(folder)
    pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
    model = _load(AutoModelForImageClassification, folder, scratch, num_labels=n_cls, id2label=names,
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
    Trainer(model=model, args=_args(out, r, seed), train_dataset=ds, data_collator=collate,
            optimizers=(opt, sched)).train()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=pv[te[i:i + 64]]).logits.argmax(-1) for i in range(0, len(te), 64)])
    acc = float((pred.numpy() == labels[te]).mean())
    _save_model(model, out / "model")
    proc.save_pretrained(out / "model")
    res = {"task": "image", "accuracy": acc, "n_train": len(tr), "n_eval": len(te), "scratch": scratch,
           "seed": seed, "recipe": recipe, "steps": total}
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    return res


def finetune_ctc(folder, manifest, out, recipe="small", seed=0, scratch=False, eval_paths=None,
                 eval_fraction=0.5, **over) -> dict:
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForCTC, Trainer, Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    r = dict(CTC_REFERENCE) | (SMALL["ctc"] if recipe == "small" else {}) | over
    out = Path(out)
    waves, labels, paths, classes = load_rows(manifest, "audio")
    if not classes:
        raise FinetuneError(f"{manifest}: no class names (d2v2-prep audio --label-from parent): no transcripts")
    texts = [classes[i].lower() for i in labels]
    tr, te = _split(labels, paths, eval_paths, eval_fraction)
    letters = sorted({c for t in texts for c in t.replace(" ", "|")})
    vocab = {"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(letters)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                               word_delimiter_token="|")
    fe = AutoFeatureExtractor.from_pretrained(folder)
    d = None
    keys = ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length", "layerdrop",
            "activation_dropout")
    over_cfg = {k: r[k] for k in keys}
    from transformers import AutoConfig

    register_local_classes()
    d = AutoConfig.from_pretrained(folder, trust_remote_code=False).embed_dim
    over_cfg["mask_feature_length"] = min(over_cfg["mask_feature_length"], d // 2)
    model = _load(AutoModelForCTC, folder, scratch, vocab_size=len(vocab), pad_token_id=tok.pad_token_id,
                  ctc_loss_reduction="mean", **over_cfg)
    if r["freeze_feature_encoder"]:
        model.freeze_feature_encoder()
    ds = [{"wav": waves[i], "text": texts[i]} for i in tr]

    def collate(rows):
        b = fe([q["wav"] for q in rows], sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt")
        lab = tok([q["text"] for q in rows], padding=True, return_tensors="pt")
        b["labels"] = lab["input_ids"].masked_fill(lab["attention_mask"].eq(0), -100)
        return dict(b)

    params = layer_decay_groups(model, r["lr"], r["layer_decay"], r["weight_decay"])
    opt = torch.optim.Adam(params, betas=r["betas"], eps=r["eps"])
    total = r["max_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: tri_stage(s, total, r["phase_ratio"], final_lr_scale=r["final_lr_scale"]))
    Trainer(model=model, args=_args(out, r, seed), train_dataset=ds, data_collator=collate,
            optimizers=(opt, sched)).train()
    model.eval()
    hyps = []
    with torch.no_grad():
        for i in range(0, len(te), 32):
            b = fe([waves[j] for j in te[i:i + 32]], sampling_rate=fe.sampling_rate, padding=True,
                   return_tensors="pt")
            hyps += tok.batch_decode(model(**b).logits.argmax(-1))
    refs = [texts[j] for j in te]
    _save_model(model, out / "model")
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out / "model")
    res = {"task": "ctc", "cer": cer(hyps, refs), "n_train": len(tr), "n_eval": len(te), "scratch": scratch,
           "seed": seed, "recipe": recipe, "steps": total, "examples": list(zip(hyps[:5], refs[:5]))}
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    return res


TASKS = {"image": finetune_image, "ctc": finetune_ctc}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="d2v2-finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("folder", help="a d2v2-export --format hf folder")
    p.add_argument("--data", required=True, help="a labelled d2v2-prep manifest.json")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=["reference", "small"], default="reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", action="store_true", help="same network, random init (the baseline)")
    p.add_argument("--eval-paths", default=None, metavar="REGEX")
    p.add_argument("--eval-fraction", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--mixup", type=float, default=None)
    p.add_argument("--cutmix", type=float, default=None)
    a = p.parse_args(argv)
    over = {k: v for k, v in (("max_steps", a.steps), ("lr", a.lr), ("batch_size", a.batch_size),
                              ("mixup", a.mixup), ("cutmix", a.cutmix)) if v is not None}
    if not (Path(a.folder) / "config.json").is_file():
        print(f"d2v2-finetune: error: {a.folder} has no config.json: export it with d2v2-export RUN --out DIR "
              f"--format hf", file=sys.stderr)
        return 2
    mod = json.loads((Path(a.folder) / "config.json").read_text()).get("modality")
    if mod != ("image" if a.task == "image" else "audio"):
        print(f"d2v2-finetune: error: {a.folder} holds {'an image' if mod == 'image' else 'a ' + str(mod)} encoder; the {a.task} recipe needs "
              f"{'an image' if a.task == 'image' else 'a speech'} encoder", file=sys.stderr)
        return 2
    try:
        res = TASKS[a.task](a.folder, a.data, a.out, recipe=a.recipe, seed=a.seed, scratch=a.scratch,
                            eval_paths=a.eval_paths, eval_fraction=a.eval_fraction, **over)
    except FinetuneError as e:
        print(f"d2v2-finetune: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
