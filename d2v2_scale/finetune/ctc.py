"""Speech recognition (CTC) fine-tuning (the reference's recipe: frozen CNN, tri-stage LR, time /
channel masks, letter vocabulary) of an exported speech encoder with transformers.Trainer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..export.hf_remote import register_local_classes
from ..train.schedules import TriStage
from .common import folder_kind, load_model, publish, recipe_trainer, training_args
from .recipes import CTC_REFERENCE, SMALL, cer, layer_decay_groups
from .rows import FinetuneError, load_rows, split


def finetune_ctc(folder, manifest, out, recipe="small", seed=0, scratch=False, eval_paths=None,
                 eval_fraction=0.5, train_rows=None, **over) -> dict:
    import torch
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoModelForCTC, Wav2Vec2CTCTokenizer,
                              Wav2Vec2Processor)

    r = dict(CTC_REFERENCE) | (SMALL["ctc"] if recipe == "small" else {}) | over
    out = Path(out)
    waves, labels, paths, classes = load_rows(manifest, "audio")
    if not classes:
        raise FinetuneError(f"{manifest}: no class names (d2v2-prep audio --label-from parent): no transcripts")
    texts = [classes[i].lower() for i in labels]
    tr, te = split(labels, paths, eval_paths, eval_fraction, train_rows=train_rows)
    letters = sorted({c for t in texts for c in t.replace(" ", "|")})
    vocab = {"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(letters)}
    with tempfile.TemporaryDirectory() as vd:  # per process: N ranks never write one file (the saved folder has it)
        (Path(vd) / "vocab.json").write_text(json.dumps(vocab))
        tok = Wav2Vec2CTCTokenizer(str(Path(vd) / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                   word_delimiter_token="|")
    fe = AutoFeatureExtractor.from_pretrained(folder)
    keys = ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length", "layerdrop",
            "activation_dropout", "hidden_dropout", "attention_dropout", "final_dropout", "feat_proj_dropout",
            "ctc_zero_infinity")
    register_local_classes()
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    over_cfg = {k: r[k] for k in keys if hasattr(cfg, k)}  # feat_proj_dropout: transformers' Data2VecAudio only
    # the model width: embed_dim (data2vec 2.0) or hidden_size (transformers' Data2VecAudio: 1.0, aqc)
    d = getattr(cfg, folder_kind(folder).width)
    over_cfg["mask_feature_length"] = min(over_cfg["mask_feature_length"], d // 2)
    model = load_model(AutoModelForCTC, folder, scratch, seed=seed, vocab_size=len(vocab),
                       pad_token_id=tok.pad_token_id, ctc_loss_reduction="mean", **over_cfg)
    if r["freeze_feature_encoder"]:
        model.freeze_feature_encoder()
    ds = [{"wav": waves[i], "text": texts[i]} for i in tr]

    def collate(rows):
        b = fe([q["wav"] for q in rows], sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt")
        lab = tok([q["text"] for q in rows], padding=True, return_tensors="pt")
        b["labels"] = lab["input_ids"].masked_fill(lab["attention_mask"].eq(0), -100)
        return dict(b)

    freeze = int(r["freeze_finetune_updates"])  # CTC_REFERENCE: 0 (base_100h)
    callbacks = [encoder_frozen_for(model.base_model, freeze)] if freeze else []
    params = layer_decay_groups(model, r["lr"], r["layer_decay"], r["weight_decay"])
    opt = torch.optim.Adam(params, betas=r["betas"], eps=r["eps"])
    total = r["max_steps"]
    # fairseq's tri_stage, the class pretraining's schedule is (built once, not per update)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, TriStage(total, r["phase_ratio"], 0.01, r["final_lr_scale"]))
    trainer = recipe_trainer(model=model, args=training_args(out, r, seed), train_dataset=ds, data_collator=collate,
                             optimizers=(opt, sched), callbacks=callbacks)  # the recipe's optimizer and schedule
    trainer.train()
    model.eval()
    hyps = []
    with torch.no_grad():
        for i in range(0, len(te), 32):
            b = fe([waves[j] for j in te[i:i + 32]], sampling_rate=fe.sampling_rate, padding=True,
                   return_tensors="pt")
            hyps += tok.batch_decode(model(**b).logits.argmax(-1))
    refs = [texts[j] for j in te]
    res = {"task": "ctc", "cer": cer(hyps, refs), "n_train": len(tr), "n_eval": len(te), "scratch": scratch,
           "seed": seed, "recipe": recipe, "steps": total, "examples": list(zip(hyps[:5], refs[:5]))}
    # rank 0 writes model/ (with the processor) and metrics.json
    return publish(trainer, out, res, Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained)


def encoder_frozen_for(base, updates: int):
    """A Trainer callback: the encoder `base` gets no gradient for the first `updates` updates, only
    the CTC head trains; then all of it (but the CNN, frozen throughout).  fairseq's
    freeze_finetune_updates (wav2vec2_asr.Wav2VecEncoder runs the pretrained model under no_grad
    while num_updates < freeze_finetune_updates; the 10 min / 1 h / 10 h recipes freeze it for
    10,000 updates): the encoder's output is detached, so its parameters have no gradient at all
    and Adam leaves them and their state untouched (their step count starts at the first update
    after the freeze, as fairseq's Adam's)."""
    from transformers import TrainerCallback

    class Frozen(TrainerCallback):
        active = True

        def on_step_begin(self, args, state, control, **kw):
            self.active = state.global_step < updates

    cb = Frozen()

    def detach(module, inputs, out):
        if not (cb.active and module.training):
            return out
        if isinstance(out, tuple):  # return_dict=False
            return tuple(v.detach() if hasattr(v, "detach") else v for v in out)
        return type(out)(**{k: v.detach() if hasattr(v, "detach") else v for k, v in out.items()})

    base.register_forward_hook(detach)
    return cb
