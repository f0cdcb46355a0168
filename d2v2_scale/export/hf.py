"""`d2v2-export --format hf`: an export as a Hugging Face transformers folder (AutoModel.from_pretrained).

Only where a transformers class computes exactly what the plain twin computes (every hidden
state, fp32, tested in tests/test_export_hf.py); nothing is approximated:

    data2vec 1.0 speech  -> Data2VecAudioModel   + preprocessor_config.json (Wav2Vec2FeatureExtractor)
    data2vec 1.0 text    -> Data2VecTextModel    + the run's sentencepiece model as an AutoTokenizer
    data2vec 2.0 text    -> RobertaModel          (post-LN blocks, learned positions, no ALiBi), same tokenizer
    imported fairseq text: + dict.txt and, given the GPT-2 BPE files, a RobertaTokenizer (gpt2_tokenizer.py)
    data2vec 1.0 vision  -> Data2VecVisionModel  + preprocessor_config.json (BeitImageProcessor)

    data2vec 2.0 image / speech -> Data2Vec2Model, the model code shipped inside the folder
                            (trust_remote_code; export/hf_remote/): no transformers class has fixed
                            2-D sin-cos positions + a LayerNorm after the CLS concat, or ALiBi

Refused (HFRefused, naming the reason): prenet blocks, pre-LN 2.0 text, per-block relative
position tables.  config.json names the source checkpoint by its run-relative name only (no local path).

Differences found in the transformers code, and how each is matched (docs/EXPORT.md):
  * text positions: RoBERTa numbers non-pad tokens from pad + 1 (pad + 1 + cumsum of non-pad),
    the twin from 0: the twin's table goes to rows pad + 1 ..., rows 0..pad are zero, so
    max_position_embeddings = max_positions + pad + 1.  Same result for right-padded batches
    (pad tokens only at the end); pad positions' own outputs differ (they are padding).
  * token types: RoBERTa adds token_type_embeddings[0]: a zero table (type_vocab_size 1).
  * q/k/v: the twin's fused qkv rows [q; k; v] are split into query/key/value.
  * speech: feature extractor convs without bias (conv_bias false), per-layer LayerNorm over
    channels (feat_extract_norm "layer", eps 1e-5 as in the twin), exact GELU; the positional
    conv is num_conv_pos_embeddings layers of kernel conv_pos_kernel_size (SamePad drops the last
    frame of an even kernel, as the twin does), affine-free LayerNorm, GELU; padded frames zeroed
    before it, then encoder.layer_norm = the twin's context_norm.  masked_spec_embed (used only
    for the time masks while fine-tuning; not part of the encoder) is the student's learned
    mask_emb, as the reference fine-tunes with it; zeros (with a warning) from a plain export
    folder, which does not keep mask_emb.
  * vision: no absolute positions, one shared relative position table (CLS entries last, same
    index as BEiT), layer scale lambda_1/2 = gamma_1/2, q/v bias with k unbiased;
    use_mean_pooling false so that `layernorm` is the twin's final norm and last_hidden_state
    is the twin's "x" (the pooler then returns the CLS token).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..data.manifest import DataError, confined_path
from ..objectives import objective_of, uses_beit
from .consolidate import (CONFIG, WEIGHTS, ExportError, assemble, read_marker, resolve_checkpoint, stderr_warning,
                          write_export)
from .gpt2_tokenizer import imported_tokenizer_files
from .hf_card import corpus_name, model_card
from .hf_remote import is_remote_target, to_remote

PLAIN_HINT = "export it without --format hf (the plain-PyTorch twin, docs/EXPORT.md) and load it with twins/encoder.py"


# what a --format hf export of a checkpoint holds by default: the reference fine-tunes the student
# (fairseq drops the EMA teacher `_ema` when its fine-tuning model loads a checkpoint; speech copies
# the EMA in only with load_ema=true, default false), docs/FINETUNE.md
FINETUNE_WEIGHTS = "student"


class HFRefused(ExportError):
    """The model has no transformers class that computes exactly what it computes."""


def hf_target(cfg: dict) -> str:
    """The transformers class name for an export config, or HFRefused naming why not."""
    mod, classes = cfg["modality"], objective_of(cfg).hf_classes
    if is_remote_target(cfg):  # data2vec 2.0 image and speech: the folder carries its own model code
        return "Data2Vec2Model"
    if mod == "image" and not uses_beit(cfg):
        raise HFRefused("data2vec 2.0 image encoders have no exact transformers class: they are post-LN ViTs "
                        "with fixed 2-D sin-cos positions and a LayerNorm after the CLS token is prepended "
                        f"(ViT/BEiT/Data2VecVision are pre-LN); {PLAIN_HINT}")
    if cfg.get("alibi"):
        raise HFRefused(f"{mod} encoders with ALiBi attention bias (data2vec 2.0 speech) have no exact transformers "
                        f"class: Data2VecAudio/Wav2Vec2 attention has no ALiBi term; {PLAIN_HINT}")
    if int(cfg.get("prenet_depth", 0)):
        raise HFRefused(f"prenet_depth={cfg['prenet_depth']}: the modality prenet blocks have no place in a "
                        f"transformers class; {PLAIN_HINT}")
    if mod == "image":
        if not cfg.get("shared_rel_pos_bias", True):
            raise HFRefused(f"per-block relative position tables are not mapped yet (shared_rel_pos_bias=false); "
                            f"{PLAIN_HINT}")
        return classes["image"]  # data2vec 1.0 vision: the only image encoder with a class
    if cfg.get("pre_ln"):
        raise HFRefused(f"pre_ln=true {mod} encoders have no exact transformers class (RoBERTa and "
                        f"Data2VecAudio are post-LN); {PLAIN_HINT}")
    if mod in classes:
        return classes[mod]
    raise HFRefused(f"no exact transformers class for {cfg.get('variant')} {mod} encoders; {PLAIN_HINT}")


def _split_qkv(w, d):
    return w[:d], w[d:2 * d], w[2 * d:]


def _common(cfg: dict) -> dict:
    d = int(cfg["embed_dim"])
    return dict(hidden_size=d, num_hidden_layers=int(cfg["depth"]), num_attention_heads=int(cfg["num_heads"]),
                intermediate_size=int(d * cfg["mlp_ratio"]), hidden_act="gelu",
                layer_norm_eps=float(cfg["layer_norm_eps"]))


def _text(sd: dict, cfg: dict, cls: str):
    d, pad, npos = int(cfg["embed_dim"]), int(cfg["pad_token_id"]), int(cfg["max_positions"])
    pos = sd["local.positions.weight"]
    out = {"embeddings.word_embeddings.weight": sd["local.tokens.weight"],
           "embeddings.position_embeddings.weight": torch.cat([pos.new_zeros(pad + 1, d), pos]),
           "embeddings.token_type_embeddings.weight": pos.new_zeros(1, d),
           "embeddings.LayerNorm.weight": sd["local.norm.weight"], "embeddings.LayerNorm.bias": sd["local.norm.bias"]}
    for i in range(int(cfg["depth"])):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            q, k, v = _split_qkv(sd[b + f"attn.qkv.{t}"], d)
            out |= {h + f"attention.self.query.{t}": q, h + f"attention.self.key.{t}": k,
                    h + f"attention.self.value.{t}": v,
                    h + f"attention.output.dense.{t}": sd[b + f"attn.proj.{t}"],
                    h + f"attention.output.LayerNorm.{t}": sd[b + f"norm1.{t}"],
                    h + f"intermediate.dense.{t}": sd[b + f"mlp.fc1.{t}"],
                    h + f"output.dense.{t}": sd[b + f"mlp.fc2.{t}"],
                    h + f"output.LayerNorm.{t}": sd[b + f"norm2.{t}"]}
    model_type = "data2vec-text" if cls == "Data2VecTextModel" else "roberta"
    hcfg = _common(cfg) | dict(model_type=model_type, vocab_size=int(cfg["vocab_size"]),
                               max_position_embeddings=npos + pad + 1, type_vocab_size=1, pad_token_id=pad,
                               position_embedding_type="absolute", hidden_dropout_prob=0.1,
                               attention_probs_dropout_prob=0.1)
    return out, hcfg, {}


def _audio(sd: dict, cfg: dict, cls: str):
    d = int(cfg["embed_dim"])
    layers = [tuple(x) for x in cfg["conv_feature_layers"]]
    out = {"feature_projection.layer_norm.weight": sd["local.norm.weight"],
           "feature_projection.layer_norm.bias": sd["local.norm.bias"],
           "feature_projection.projection.weight": sd["local.proj.weight"],
           "feature_projection.projection.bias": sd["local.proj.bias"],
           "encoder.layer_norm.weight": sd["context_norm.weight"], "encoder.layer_norm.bias": sd["context_norm.bias"],
           # the time masks' vector: only used when fine-tuning masks frames; not part of the encoder.
           # The pretrained mask_emb: fairseq's speech fine-tuning (wav2vec2_asr) loads the whole
           # pretrained model, mask_emb included, and masks with it
           "masked_spec_embed": sd["mask_emb"] if "mask_emb" in sd else torch.zeros(d)}
    for i in range(len(layers)):
        out[f"feature_extractor.conv_layers.{i}.conv.weight"] = sd[f"local.cnn.convs.{i}.weight"]
        for t in ("weight", "bias"):
            out[f"feature_extractor.conv_layers.{i}.layer_norm.{t}"] = sd[f"local.cnn.norms.{i}.{t}"]
    for j in range(int(cfg["conv_pos_depth"])):
        for t in ("weight", "bias"):
            out[f"encoder.pos_conv_embed.layers.{j}.conv.{t}"] = sd[f"positions.convs.{j}.{t}"]
    for i in range(int(cfg["depth"])):
        b, h = f"blocks.{i}.", f"encoder.layers.{i}."
        for t in ("weight", "bias"):
            q, k, v = _split_qkv(sd[b + f"attn.qkv.{t}"], d)
            out |= {h + f"attention.q_proj.{t}": q, h + f"attention.k_proj.{t}": k, h + f"attention.v_proj.{t}": v,
                    h + f"attention.out_proj.{t}": sd[b + f"attn.proj.{t}"],
                    h + f"layer_norm.{t}": sd[b + f"norm1.{t}"],
                    h + f"feed_forward.intermediate_dense.{t}": sd[b + f"mlp.fc1.{t}"],
                    h + f"feed_forward.output_dense.{t}": sd[b + f"mlp.fc2.{t}"],
                    h + f"final_layer_norm.{t}": sd[b + f"norm2.{t}"]}
    hcfg = _common(cfg) | dict(
        model_type="data2vec-audio", conv_dim=[c for c, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], num_feat_extract_layers=len(layers), conv_bias=False,
        feat_extract_activation="gelu", conv_pos_kernel_size=int(cfg["conv_pos_width"]),
        num_conv_pos_embeddings=int(cfg["conv_pos_depth"]), num_conv_pos_embedding_groups=int(cfg["conv_pos_groups"]),
        add_adapter=False,
        # the reference fine-tuning's regularizers (base_100h, as the 2.0 speech export; docs/FINETUNE.md),
        # in place of transformers' defaults (0.1 dropouts where Wav2Vec2AsrConfig has 0; no time masks
        # of length 10 at 0.65, no channel masks); they act only in training mode
        mask_time_prob=0.65, mask_time_length=10, mask_feature_prob=0.5, mask_feature_length=min(64, d // 2),
        layerdrop=0.1, activation_dropout=0.1, hidden_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, ctc_zero_infinity=True)
    sr = int(cfg.get("sample_rate", 16000))
    # training normalizes each waveform to zero mean / unit variance (data/augment.normalize_wave:
    # (x - mean) / (std + 1e-5)); the feature extractor's do_normalize uses / sqrt(var + 1e-7)
    pre = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": sr,
           "padding_value": 0.0, "padding_side": "right", "do_normalize": True, "return_attention_mask": True}
    return out, hcfg, {"preprocessor_config.json": json.dumps(pre, indent=1).encode()}


def _vision(sd: dict, cfg: dict, cls: str):
    d = int(cfg["embed_dim"])
    out = {"embeddings.cls_token": sd["extra_tokens"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.patch_embeddings.projection.weight": sd["local.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["local.proj.bias"],
           "encoder.relative_position_bias.relative_position_bias_table": sd["rel_pos_bias.table"],
           "layernorm.weight": sd["final_norm.weight"], "layernorm.bias": sd["final_norm.bias"]}
    scale = float(cfg.get("layer_scale_init", 0.0)) > 0
    for i in range(int(cfg["depth"])):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = _split_qkv(sd[b + "attn.qkv.weight"], d)
        out |= {h + "attention.attention.query.weight": q, h + "attention.attention.query.bias": sd[b + "attn.q_bias"],
                h + "attention.attention.key.weight": k,
                h + "attention.attention.value.weight": v, h + "attention.attention.value.bias": sd[b + "attn.v_bias"]}
        for t in ("weight", "bias"):
            out |= {h + f"attention.output.dense.{t}": sd[b + f"attn.proj.{t}"],
                    h + f"layernorm_before.{t}": sd[b + f"norm1.{t}"],
                    h + f"intermediate.dense.{t}": sd[b + f"mlp.fc1.{t}"],
                    h + f"output.dense.{t}": sd[b + f"mlp.fc2.{t}"],
                    h + f"layernorm_after.{t}": sd[b + f"norm2.{t}"]}
        if scale:
            out |= {h + "lambda_1": sd[b + "gamma_1"], h + "lambda_2": sd[b + "gamma_2"]}
    size = int(cfg["image_size"])
    hcfg = _common(cfg) | dict(
        model_type="data2vec-vision", image_size=size, patch_size=int(cfg["patch_size"]),
        num_channels=int(cfg.get("in_chans", 3)), use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True,
        layer_scale_init_value=float(cfg.get("layer_scale_init", 0.0)), use_mean_pooling=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1)
    # training input: the image resized to image_size, /255, ImageNet mean/std (data/augment.py)

    pre = {"image_processor_type": "BeitImageProcessor", "do_resize": True,
           "size": {"height": size, "width": size}, "resample": 2, "do_center_crop": False, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [float(x) for x in IMAGENET_MEAN],
           "image_std": [float(x) for x in IMAGENET_STD], "do_reduce_labels": False}
    return out, hcfg, {"preprocessor_config.json": json.dumps(pre, indent=1).encode()}


_CONVERT = {"RobertaModel": _text, "Data2VecTextModel": _text, "Data2VecAudioModel": _audio,
            "Data2VecVisionModel": _vision}


def to_hf(tensors: dict, cfg: dict):
    """Plain-twin tensors + export config -> (HF tensors, HF config dict, extra files {name: bytes})."""
    cls = hf_target(cfg)
    sd = {k: v for k, v in tensors.items() if not k.startswith("decoder.")}
    if cls != "Data2VecAudioModel":  # only speech's masked_spec_embed takes the training mask embedding
        sd.pop("mask_emb", None)
    out, hcfg, extra = to_remote(sd, cfg) if cls == "Data2Vec2Model" else _CONVERT[cls](sd, cfg, cls)
    hcfg["architectures"] = [cls]
    if "d2v2_export" in cfg:
        prov = dict(cfg["d2v2_export"], format_hf=cls)
        if prov.get("checkpoint"):  # a shared folder names no local path: run folder / checkpoints / step
            prov["checkpoint"] = "/".join(x for x in Path(str(prov["checkpoint"])).parts[-3:] if x != "/")
        hcfg["d2v2_export"] = prov
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}, hcfg, extra


def write_hf(out, tensors: dict, cfg: dict, force: bool = False, extra_files: dict | None = None,
             corpus: str | None = None) -> dict:
    """Write the HF folder (config.json, model.safetensors, preprocessor/tokenizer files, README.md
    model card naming `corpus`, export/hf_card.py) to `out` (temp name + rename, as every export).
    Returns the HF config written."""
    hts, hcfg, extra = to_hf(tensors, cfg)
    extra = extra | dict(extra_files or {})
    extra.setdefault("README.md", model_card(hcfg, cfg, corpus).encode())
    write_export(out, hts, hcfg, force=force, extra_files=extra, metadata={"format": "pt"})
    return hcfg


def spm_tokenizer_files(run_config: dict, mcfg: dict) -> dict[str, bytes]:
    """A text run's sentencepiece model (from its data manifest's `spm_model`, d2v2-prep text) as
    a tokenizer AutoTokenizer loads: tokenizer.model (the spm file: its ids are the model's token
    ids) + tokenizer_config.json (<s> ... </s> as the loader frames rows, right padding with the
    model's pad id, <mask> after the spm vocabulary when the model has that row).  {} when the run
    has no manifest with an spm model (the HF folder is then written without a tokenizer)."""

    man = Path(str((run_config.get("data") or {}).get("manifest") or ""))
    if mcfg["modality"] != "text" or not man.is_file():
        return {}
    m = json.loads(man.read_text())
    spm = m.get("spm_model") or {}
    if not spm:
        return {}
    try:  # the manifest may come from elsewhere: its spm path must stay inside its folder
        path = confined_path(man, spm.get("path"), "spm_model.path",
                             "copy the sentencepiece model into it and set spm_model.path to the file's name "
                             "(d2v2-prep text now copies a --spm-model there itself)")
    except DataError as e:
        raise ExportError(str(e)) from None
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if spm.get("sha256") and hashlib.sha256(data).hexdigest() != spm["sha256"]:
        raise ExportError(f"{path}: sha256 differs from {man}'s spm_model entry: not the tokenizer the run used")
    if m.get("pad_id") is not None and int(m["pad_id"]) != int(mcfg["pad_token_id"]):
        raise ExportError(f"{man}: pad_id {m['pad_id']} != the model's pad_token_id {mcfg['pad_token_id']}")
    tok = {"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": True, "padding_side": "right",
           "model_max_length": int(mcfg["max_positions"])}
    nspm = int(m.get("vocab_size") or 0)
    if nspm and int(mcfg["vocab_size"]) > nspm:  # data2vec 1.0 text: <mask> = the row after the spm ids
        tok["mask_token"] = "<mask>"
        tok["added_tokens_decoder"] = {str(nspm): {"content": "<mask>", "special": True, "lstrip": False,
                                                   "rstrip": False, "normalized": False, "single_word": False}}
    return {"tokenizer.model": data, "tokenizer_config.json": json.dumps(tok, indent=1).encode()}


def export_hf(src, out, which: str | None = None, force: bool = False, gpt2_bpe=None, warn=None) -> dict:
    """`src`: a checkpoint folder or run dir (assembled as d2v2-export does), or an existing plain
    export folder (d2v2-export / d2v2-import output: config.json with "d2v2_export") -> the HF
    folder `out`.  which: teacher | student | None (a checkpoint: the student, what the reference
    fine-tunes from, docs/FINETUNE.md "Which weights"; a plain export
    folder: what it holds, and asking for the other is refused).  A plain export's dict.txt (fairseq dictionary of imported text models) is
    copied, with a transformers tokenizer rebuilt from it and the GPT-2 BPE files (`gpt2_bpe`, a
    folder with encoder.json + vocab.bpe, or the two files stored in the export by d2v2-import
    --gpt2-bpe; export/gpt2_tokenizer.py); without them `warn(message)` is called (default: one
    line on stderr) and the tokenizer is skipped.  Refusals (HFRefused, TokenizerRefused) come
    before anything is written."""
    from safetensors.torch import load_file

    out, src = Path(out), Path(src)
    corpus = None
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    extra = {}
    if gpt2_bpe is not None and not (src / "dict.txt").is_file():
        raise ExportError(f"--gpt2-bpe is for imported fairseq text models (an export folder with dict.txt, "
                          f"d2v2-import --dict); {src} has no dict.txt")
    if (src / CONFIG).is_file() and (src / WEIGHTS).is_file():
        cfg = json.loads((src / CONFIG).read_text())
        if "d2v2_export" not in cfg:
            raise ExportError(f"{src / CONFIG} is not a d2v2 export (no d2v2_export entry)")
        if which is not None and which != cfg["d2v2_export"].get("which", which):
            raise ExportError(f"{src} holds the {cfg['d2v2_export']['which']}, not the {which}; export the "
                              f"checkpoint again with --which {which}")
        cls = hf_target(cfg)
        tensors = load_file(str(src / WEIGHTS))
        if cls == "Data2VecAudioModel" and "mask_emb" not in tensors:
            (warn or stderr_warning)(
                f"{src} is a plain export: it keeps no mask embedding, so masked_spec_embed (the fine-tuning "
                f"time masks' vector) is written as zeros; export from the checkpoint to carry the learned one")
        if (src / "dict.txt").is_file():
            extra["dict.txt"] = (src / "dict.txt").read_bytes()
            extra |= imported_tokenizer_files(src, cfg, gpt2_bpe, warn)
    else:
        folder = resolve_checkpoint(src, warn)
        info = read_marker(folder)
        cfg = dict(info["config"]["model"])
        hf_target(cfg)
        extra = spm_tokenizer_files(info["config"], cfg)
        tensors, prov = assemble(folder, info, which or FINETUNE_WEIGHTS, with_mask_emb=True)
        cfg["d2v2_export"] = prov
        corpus = corpus_name(info["config"])
    return write_hf(out, tensors, cfg, force=force, extra_files=extra, corpus=corpus)

