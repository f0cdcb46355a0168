"""`d2v2-finetune`: fine-tune an exported transformers folder on a labelled d2v2-prep corpus.

    d2v2-finetune image HF_DIR --data digits/manifest.json --out ft/digits [--recipe reference|small]
    d2v2-finetune ctc   HF_DIR --data esp/manifest.json --out ft/esp --eval-paths '^[^/]+/en-gb-x-rp_'
    d2v2-finetune text  HF_DIR --data train.tsv --out ft/sst2 --eval-data dev.tsv

image: the reference's image classification recipe (layer-wise LR decay, warm-up + cosine, label
smoothing, drop path, mixup / cutmix through timm); ctc: the reference's speech recipe (frozen CNN,
tri-stage LR, time / channel masks, letter vocabulary; transcripts = the rows' class names, the
only text a d2v2-prep audio corpus carries); text: the reference's GLUE recipe (sequence
classification or --regression with the folder's tokenizer, polynomial LR decay) on a .csv / .tsv /
.jsonl file (text.py).  --recipe small scales steps, batch and LR to a CPU
run of minutes (docs/FINETUNE.md); --scratch trains the same network from random init (the
baseline of docs/BENCHMARKS.md).  Held-out rows: --eval-paths REGEX (rows whose source path
matches, e.g. held-out speakers) or a seeded stratified --eval-fraction.  Writes the fine-tuned
folder (model + processor, loadable by pipeline(...)) and metrics.json to --out.

Several processes (GPUs, nodes): the same command under `torchrun --nproc_per_node N`, the
`deepspeed` launcher or `srun`, with --deepspeed ds_configs/finetune_zero2.json for Trainer's
DeepSpeed (or without it: DDP); --batch-size stays the global batch (docs/FINETUNE.md "Multi-GPU
and multi-node").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .ctc import finetune_ctc
from .common import check_deepspeed_config, folder_kind, per_device_batch, world_size
from .image import finetune_image
from .recipes import CTC_REFERENCE, IMAGE_REFERENCE, SMALL, TEXT_REFERENCE
from .rows import FinetuneError
from .text import add_arguments as add_text_arguments, finetune_text, options as text_options

TASKS = {"image": finetune_image, "ctc": finetune_ctc, "text": finetune_text}
RECIPES = {"image": IMAGE_REFERENCE, "ctc": CTC_REFERENCE, "text": TEXT_REFERENCE}
# what each task needs in the folder (the kinds: common.KINDS)
NEEDS = {"image": ("image", "an image"), "ctc": ("audio", "a speech"), "text": ("text", "a text")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="d2v2-finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("folder", help="a d2v2-export --format hf folder")
    p.add_argument("--data", required=True, help="a labelled d2v2-prep manifest.json (text: a .csv/.tsv/.jsonl file)")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=["reference", "small"], default="reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", action="store_true", help="same network, random init (the baseline)")
    p.add_argument("--eval-paths", default=None, metavar="REGEX")
    p.add_argument("--eval-fraction", type=float, default=0.5)
    p.add_argument("--train-rows", type=int, default=None, metavar="N",
                   help="image / ctc: fine-tune on N labelled rows of the training split (stratified, the same "
                        "N rows for every --seed; the held-out rows unchanged): the low-resource setting")
    p.add_argument("--freeze-steps", type=int, default=None, metavar="N",
                   help="ctc: train only the CTC head for the first N updates, then the encoder too (the "
                        "reference's freeze_finetune_updates: 10,000 in its 10 min / 1 h / 10 h recipes, 0 in base_100h)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--mixup", type=float, default=None)
    p.add_argument("--cutmix", type=float, default=None)
    # the deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK, which Trainer reads)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="a DeepSpeed config for Trainer (ds_configs/finetune_zero2.json, finetune_zero3.json)")
    add_text_arguments(p)
    a = p.parse_args(argv)
    if a.freeze_steps is not None and (a.task != "ctc" or a.freeze_steps < 0):
        p.error("--freeze-steps is for ctc, N >= 0 updates")
    over = {k: v for k, v in (("max_steps", a.steps), ("lr", a.lr), ("batch_size", a.batch_size),
                              ("freeze_finetune_updates", a.freeze_steps),
                              ("mixup", a.mixup), ("cutmix", a.cutmix), ("deepspeed", a.deepspeed)) if v is not None}
    if a.task == "text":
        if a.train_rows is not None:
            p.error("--train-rows is for image and ctc; for text, give --data the rows to train on")
        over |= text_options(a)
    elif a.train_rows is not None:
        over["train_rows"] = a.train_rows
    try:  # what the folder holds (finetune/common.KINDS): a head that does not fit it -> one line
        kind = folder_kind(a.folder)
    except FinetuneError as e:
        print(f"d2v2-finetune: error: {e}", file=sys.stderr)
        return 2
    if kind.task != a.task:
        print(f"d2v2-finetune: error: {a.folder} holds {kind.name}; the {a.task} recipe needs {NEEDS[a.task][1]} "
              f"encoder: use d2v2-finetune {kind.task}", file=sys.stderr)
        return 2
    try:  # DeepSpeed config and the batch split over the processes: checked before the data loads
        if a.deepspeed is not None:
            check_deepspeed_config(a.deepspeed)
        recipe = RECIPES[a.task] | (SMALL[a.task] if a.recipe == "small" else {}) | over
        if "batch_size" in recipe:
            per_device_batch(recipe["batch_size"], world_size())
        res = TASKS[a.task](a.folder, a.data, a.out, recipe=a.recipe, seed=a.seed, scratch=a.scratch,
                            eval_paths=a.eval_paths, eval_fraction=a.eval_fraction, **over)
    except FinetuneError as e:
        print(f"d2v2-finetune: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(json.dumps({k: v for k, v in res.items() if k not in ("examples", "train_log")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
