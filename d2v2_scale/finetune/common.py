"""What every fine-tuning task shares: loading a folder's weights into this package's own classes
(a folder's Python never runs), saving with the package's model code, the Trainer arguments."""

from __future__ import annotations

from pathlib import Path

from ..export.hf_remote import code_files, register_local_classes


def load_model(auto, folder, scratch: bool, **over):
    """The folder's weights in this package's own model classes: the Python files inside a folder
    (which may come from elsewhere) never run (export/hf_remote.register_local_classes)."""
    from transformers import AutoConfig

    register_local_classes()
    if scratch:  # the same network and config, random init (the baseline)
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False, **over)
        return auto.from_config(cfg, trust_remote_code=False)
    return auto.from_pretrained(folder, trust_remote_code=False, **over)


def save_model(model, dest: Path) -> None:
    """save_pretrained, plus the model code of this package (export/hf_remote.code_files): the
    model was built from the installed classes, so transformers copies no code, and the saved
    folder must load with trust_remote_code=True like an export does."""
    model.save_pretrained(dest)
    for name, data in code_files().items():
        (dest / name).write_bytes(data)


def training_args(out, r, seed):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out / "trainer"), max_steps=r["max_steps"],
                             per_device_train_batch_size=r["batch_size"], seed=seed, report_to="none",
                             save_strategy="no", logging_strategy="steps", logging_steps=max(r["max_steps"] // 5, 1),
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             use_cpu=not cuda(), max_grad_norm=0.0)  # the reference: no clipping


def cuda():
    import torch

    return torch.cuda.is_available()
