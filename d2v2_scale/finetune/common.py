"""What every fine-tuning task shares: loading a folder's weights into this package's own classes
(a folder's Python never runs), saving with the package's model code, the Trainer arguments, and
running under N processes (torchrun, the deepspeed launcher, srun; docs/FINETUNE.md "Multi-GPU and
multi-node"): the global batch split over them, DeepSpeed through Trainer's own `deepspeed=`, the
result published once by rank 0."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..export.hf_remote import code_files, register_local_classes
from .rows import FinetuneError


@dataclass(frozen=True)
class FolderKind:
    """What an exported folder holds, for d2v2-finetune: `name` (for messages), `task` (the
    d2v2-finetune task whose head fits its encoder), `remote` (the package's own Data2Vec2*
    classes, whose code is saved with the fine-tuned folder; else transformers' own classes),
    `blocks` (attribute path of the transformer blocks under the task model's base model, for
    layer-wise LR decay), `width` (config field of the model width), `head` (config fields the
    reference's task head needs, set when d2v2-finetune loads the folder)."""

    name: str
    task: str
    remote: bool
    blocks: str
    width: str
    head: tuple = ()


# config.json's model_type (data2vec 2.0: and its modality) -> the folder's kind; the one place
# d2v2-finetune decides what a folder is (docs/FINETUNE.md "data2vec 1.0 and data2vec-aqc folders")
KINDS = {("data2vec2", "image"): FolderKind("an image encoder (data2vec 2.0, Data2Vec2Model)", "image", True,
                                            "encoder.blocks", "embed_dim"),
         ("data2vec2", "audio"): FolderKind("a speech encoder (data2vec 2.0, Data2Vec2Model)", "ctc", True,
                                            "encoder.blocks", "embed_dim"),
         ("data2vec-audio", None): FolderKind("a speech encoder (data2vec 1.0 / data2vec-aqc, Data2VecAudioModel)",
                                              "ctc", False, "encoder.layers", "hidden_size"),
         # the reference's classification head pools the mean of the patch tokens through a new LayerNorm
         # (BEiT's / mae_image_classification's fc_norm); the export's use_mean_pooling false keeps the base
         # model equal to the plain twin (its final norm, CLS pooler), docs/EXPORT.md
         ("data2vec-vision", None): FolderKind("an image encoder (data2vec 1.0, Data2VecVisionModel)", "image", False,
                                               "encoder.layer", "hidden_size", (("use_mean_pooling", True),)),
         ("data2vec-text", None): FolderKind("a text encoder (data2vec 1.0, Data2VecTextModel)", "text", False,
                                             "encoder.layer", "hidden_size"),
         ("roberta", None): FolderKind("a text encoder (data2vec 2.0, RobertaModel)", "text", False, "encoder.layer",
                                       "hidden_size")}


def folder_kind(folder) -> FolderKind:
    """The kind of an exported folder from its config.json (model_type, and modality for 2.0);
    FinetuneError (one line naming the fix) for a folder that is no export this command knows."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise FinetuneError(f"{folder} has no config.json: export it with d2v2-export RUN --out DIR --format hf")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{f} is not readable JSON ({e}): export the run again with d2v2-export "
                            "--format hf") from None
    cfg = cfg if isinstance(cfg, dict) else {}
    mt = cfg.get("model_type")
    kind = KINDS.get((mt, cfg.get("modality") if mt == "data2vec2" else None))
    if kind is None:
        raise FinetuneError(f"{f}: model_type {mt!r} (architectures {cfg.get('architectures')}) is no d2v2-export "
                            f"--format hf folder d2v2-finetune knows (data2vec 2.0 image / speech / text, data2vec "
                            f"1.0 speech / vision / text, data2vec-aqc): give it a folder from d2v2-export RUN "
                            f"--out DIR --format hf")
    return kind


def encoder_blocks(model) -> list:
    """The transformer blocks of a task model (its base model's `FolderKind.blocks`), in order."""
    kind = next(k for (mt, mod), k in KINDS.items()
                if mt == model.config.model_type and mod in (None, getattr(model.config, "modality", None)))
    obj = model.base_model
    for a in kind.blocks.split("."):
        obj = getattr(obj, a)
    return list(obj)


def classification_loss(label_smoothing: float):
    """Trainer's compute_loss_func for transformers' own image classification heads, whose loss
    has no label smoothing and would take mixup's soft targets for multi-label BCE: the
    reference's loss, as Data2Vec2ForImageClassification: logits [B, C], labels [B] -> cross-entropy
    with label smoothing; soft targets [B, C] (mixup / cutmix) -> soft-target cross-entropy."""
    import torch
    import torch.nn.functional as F

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        if labels.ndim == 2:
            return torch.sum(-labels * F.log_softmax(logits, -1), -1).mean()
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    return loss


def load_model(auto, folder, scratch: bool, seed: int = 0, **over):
    """The folder's weights in this package's own model classes: the Python files inside a folder
    (which may come from elsewhere) never run (export/hf_remote.register_local_classes).  The new
    head's (and with `scratch` every) random init is drawn after set_seed(seed): the same on every
    process and in every run of a seed (Trainer seeds only once the model exists)."""
    from transformers import AutoConfig, set_seed

    register_local_classes()
    set_seed(seed)
    if scratch:  # the same network and config, random init (the baseline)
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False, **over)
        return auto.from_config(cfg, trust_remote_code=False)
    return auto.from_pretrained(folder, trust_remote_code=False, **over)


def save_model(model, dest: Path, state_dict=None) -> None:
    """save_pretrained, plus the model code of this package (export/hf_remote.code_files): the
    model was built from the installed classes, so transformers copies no code, and the saved
    folder must load with trust_remote_code=True like an export does.  `state_dict`: the full
    weights when the model's own are ZeRO-3 shards (publish)."""
    model.save_pretrained(dest, state_dict=state_dict)
    if not type(model).__module__.startswith("d2v2_scale."):  # transformers' own class (text): no code to ship
        return
    for name, data in code_files().items():
        (dest / name).write_bytes(data)


def world_size() -> int:
    """The number of training processes, and under srun the variables Trainer reads: torchrun and
    the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, srun sets
    SLURM_* only, which distributed.resolve_launch_env maps to them (the same rule as pretraining:
    MASTER_ADDR = the first host of the allocation, MASTER_PORT from the job id)."""
    from ..distributed import resolve_launch_env

    launcher, env = resolve_launch_env()
    if launcher == "slurm":
        os.environ.update(env)
    return int(env["WORLD_SIZE"])


def check_deepspeed_config(path) -> dict:
    """A DeepSpeed JSON for Trainer's `deepspeed=`, checked before any expensive work: it must not
    carry "optimizer" or "scheduler" sections, which would make Trainer replace the recipe's
    optimizer (layer-wise LR decay groups) and schedule (warm-up + cosine / tri-stage) with
    DeepSpeed's (transformers.integrations.deepspeed.deepspeed_optim_sched); ZeRO-3 must gather
    its shards on save (publish)."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise FinetuneError(f"--deepspeed {path}: no such file (e.g. ds_configs/finetune_zero2.json)") from None
    except (OSError, ValueError) as e:
        raise FinetuneError(f"--deepspeed {path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise FinetuneError(f"--deepspeed {path}: a JSON object is needed (e.g. ds_configs/finetune_zero2.json)")
    both = [k for k in ("optimizer", "scheduler") if k in cfg]
    if both:
        raise FinetuneError(f"--deepspeed {path}: remove its {' and '.join(repr(k) for k in both)} section(s): "
                            "the recipe passes its own optimizer and LR schedule (ds_configs/finetune_zero2.json)")
    zero = cfg.get("zero_optimization") or {}
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        # without it the shards cannot be gathered for the saved folder: the run would fail at its end
        raise FinetuneError(f"--deepspeed {path}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true "
                            "to save the fine-tuned weights (ds_configs/finetune_zero3.json)")
    return cfg


def per_device_batch(batch: int, world: int) -> int:
    """The recipe's batch is the global one (the reference's 512 = 32 x 16 GPUs): each of the
    `world` processes takes batch / world rows per update."""
    if batch % world:
        raise FinetuneError(f"--batch-size {batch} (the global batch) does not split over {world} processes: "
                            f"pass a multiple of {world}")
    return batch // world


def training_args(out, r, seed):
    """Trainer's arguments for recipe `r`: r["batch_size"] global rows per update split over the
    processes, r.get("deepspeed") a DeepSpeed JSON (check_deepspeed_config), r.get("logging_steps")
    (default: 5 logs per run), no gradient clipping (the reference)."""
    from transformers import TrainingArguments

    ds = r.get("deepspeed")
    if ds is not None:
        check_deepspeed_config(ds)
        from ..compat import apply_cpu_compat

        apply_cpu_compat()  # on a CPU machine (CI): DeepSpeed without its inference-only g++ build; no-op with CUDA
    bs = per_device_batch(r["batch_size"], world_size())
    return TrainingArguments(output_dir=str(out / "trainer"), max_steps=r["max_steps"],
                             per_device_train_batch_size=bs, seed=seed, report_to="none",
                             save_strategy="no", logging_strategy="steps",
                             logging_steps=r.get("logging_steps") or max(r["max_steps"] // 5, 1),
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             use_cpu=not cuda(), max_grad_norm=0.0,  # the reference: no clipping
                             # a frozen encoder (freeze_finetune_updates) has no gradients: DDP must not wait for them
                             ddp_find_unused_parameters=bool(r.get("freeze_finetune_updates")) or None,
                             deepspeed=None if ds is None else str(ds))


def recipe_trainer(model, args, train_dataset, data_collator, optimizers, compute_loss_func=None, callbacks=None):
    """transformers.Trainer that keeps the recipe's optimizer and LR schedule, with DeepSpeed too
    (either may be None: Trainer's default from its arguments); `compute_loss_func`: Trainer's
    (common.classification_loss for transformers' own image heads).
    Trainer takes `optimizers=(opt, sched)` as they are without DeepSpeed; with `deepspeed=` its
    deepspeed_init sets trainer.optimizer = None and builds its default AdamW at args.learning_rate
    with a linear schedule instead, silently (transformers 5).  Its documented way out is
    overriding create_optimizer / create_scheduler: these return the recipe's (layer-wise LR decay
    groups; warm-up + cosine or tri-stage as a LambdaLR over them), which DeepSpeed then wraps
    (a client optimizer, ZeRO-1/2/3) and Trainer steps once per update."""
    from transformers import Trainer

    opt, sched = optimizers

    class RecipeTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None and opt is not None:
                self.optimizer = opt
            return super().create_optimizer(model)  # returns self.optimizer when it is set

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None and sched is not None:
                self.lr_scheduler = sched
            return super().create_scheduler(num_training_steps, optimizer)  # likewise

    return RecipeTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         optimizers=(opt, sched), compute_loss_func=compute_loss_func, callbacks=callbacks)


def publish(trainer, out: Path, res: dict, write_extra=None) -> dict:
    """After training and evaluation, on every process: the full weights (gathered when ZeRO-3
    shards them, a collective), then rank 0 alone writes out/model (under a temp name, then
    renamed: never half a folder; an older out/model is replaced) with the package's code and
    `write_extra(folder)` (the processor), and out/metrics.json (temp name, then rename); the other
    ranks wait for it.  res gets "train_log": Trainer's log history (loss and learning_rate per
    logging step)."""
    from ..data.manifest import write_json_atomic

    acc = trainer.accelerator
    model = trainer.model
    res = res | {"train_log": trainer.state.log_history, "world_size": acc.num_processes}
    # ZeRO-3: the consolidated state dict on rank 0 (needs stage3_gather_16bit_weights_on_model_save,
    # set in ds_configs/finetune_zero3.json); otherwise every rank holds the full weights already
    sd = acc.get_state_dict(trainer.model_wrapped) if trainer.is_deepspeed_enabled else None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dest = out / "model"
        tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out))
        try:
            save_model(model, tmp, state_dict=sd)
            if write_extra is not None:
                write_extra(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
            if dest.exists():  # a rerun: move the old folder aside, delete it once the new one is in
                old = out / f".model.old-{os.getpid()}"
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        write_json_atomic(out / "metrics.json", res)
    acc.wait_for_everyone()
    return res


def cuda():
    import torch

    return torch.cuda.is_available()
