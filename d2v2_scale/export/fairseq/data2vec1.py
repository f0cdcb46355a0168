"""fairseq data2vec 1.0 checkpoints (`data2vec_audio`, `data2vec_text`) -> the plain twin's names.

The released 1.0 files (speech `audio_base_ls.pt`, text `nlp_base.pt` of data2vec 1.0, ...) are
fairseq trainer checkpoints like the 2.0 ones (docs/REFERENCE.md §1.11: "cfg", "model", ...), but of
fairseq's examples/data2vec/models/data2vec_audio.py and data2vec_text.py:

    ckpt["cfg"]["model"]    Data2VecAudioConfig (a Wav2Vec2Config: encoder_layers, encoder_embed_dim,
                            conv_feature_layers (a Python expression string), conv_pos, pos_conv_depth,
                            ...) or Data2VecTextConfig (transformer: {encoder: {embed_dim, layers, ...},
                            max_source_positions, ...}, head_layers, ...), `_name` says which
    ckpt["model"]           student state dict (fp16 when trained with fp16), with the EMA teacher's
                            fp32 parameters under "_ema" (speech, `ema_transformer_only`: the
                            TransformerEncoder's names) or "encoder._ema" (text: the sentence encoder's)

Speech (wav2vec 2.0 layout; the plain twin is the 2.0 twin with alibi off and the conv positions):
    feature_extractor.conv_layers.{i}.0.weight    -> local.cnn.convs.{i}.weight   (layer_norm mode, no bias)
    feature_extractor.conv_layers.{i}.2.1.*       -> local.cnn.norms.{i}.*
    layer_norm.*, post_extract_proj.*             -> local.norm.*, local.proj.*
    encoder.pos_conv.{j}.0.*                      -> positions.convs.{j}.*   (pos_conv_depth > 1: conv, LN, GELU)
    encoder.layer_norm.*                          -> context_norm.*
    encoder.layers.{i}.self_attn.{q,k,v}_proj.*   -> blocks.{i}.attn.qkv.*   (rows [q; k; v])
    encoder.layers.{i}.self_attn.out_proj.*       -> blocks.{i}.attn.proj.*
    encoder.layers.{i}.self_attn_layer_norm.*     -> blocks.{i}.norm1.*
    encoder.layers.{i}.fc1.*, fc2.*               -> blocks.{i}.mlp.fc1.*, mlp.fc2.*
    encoder.layers.{i}.final_layer_norm.*         -> blocks.{i}.norm2.*
    mask_emb, final_proj.*                        -> the training model's mask_emb, decoder.* (the head)
    _ema: the same names without "encoder." (the teacher has no CNN front end: it comes from the student)
Text (RoBERTa encoder, post-LN):
    encoder.sentence_encoder.embed_tokens.weight        -> local.tokens.weight
    encoder.sentence_encoder.embed_positions.weight     -> local.positions.weight = rows pad+1 ... pad+max_positions
    encoder.sentence_encoder.layernorm_embedding.*      -> local.norm.*
    encoder.sentence_encoder.layers.{i}.*               -> blocks.{i}.* as for speech
    encoder.regression_head.{0,2}.* (or .0.*)           -> the training model's decoder.{0,2}.* (decoder.*)
    encoder._ema: the sentence encoder's names (embeddings included: fairseq copies them each step)
Skipped: `version` buffers, RoBERTa `lm_head.*` and `classification_heads.*` of older files.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ...config import ModelConfig
from .common import ImportRefused, _need, parse_feature_spec, text_positions

_LAYER = {"self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
          "final_layer_norm": "norm2"}
_SKIP = re.compile(r"(^|\.)version$|^encoder\.(lm_head|emb_head|target_model)\.|^classification_heads\.")


def _targets(fcfg: dict) -> dict:
    _need(not fcfg.get("batch_norm_target_layer", False), "model.batch_norm_target_layer", True,
          "the twin has instance/layer norm targets only")
    _need(not fcfg.get("group_norm_target_layer", False), "model.group_norm_target_layer", True,
          "the twin has instance/layer norm targets only")
    ls = fcfg.get("loss_scale")
    return dict(top_k_layers=int(fcfg["average_top_k_layers"]),
                instance_norm_target_layer=bool(fcfg.get("instance_norm_target_layer", False)),
                layer_norm_target_layer=bool(fcfg.get("layer_norm_target_layer", False)),
                instance_norm_targets=bool(fcfg.get("instance_norm_targets", False)),
                layer_norm_targets=bool(fcfg.get("layer_norm_targets", False)),
                loss_beta=float(fcfg.get("loss_beta", 0.0)),
                # fairseq: None (speech) or <= 0 (text) means 1 / sqrt(D)
                loss_scale=None if ls is None or float(ls) <= 0 else float(ls))


def _mlp_ratio(ffn: int, d: int, field: str) -> float:
    r = ffn / d
    _need(int(d * r) == ffn, field, ffn, f"the twin's FFN width is int(embed_dim * mlp_ratio) (embed_dim {d})")
    return r


def model_config(fcfg: dict) -> dict:
    """cfg["model"] of a fairseq data2vec 1.0 checkpoint -> the ModelConfig fields of the plain twin."""

    name = fcfg.get("_name")
    out = dataclasses.asdict(ModelConfig())
    # the data2vec 1.0 objective (model/objectives/data2vec1.py): one copy, a regression head, no conv decoder
    out.update(variant="data2vec1", clone_batch=1, decoder_layers=0, cls_loss_weight=0.0, prenet_depth=0,
               pre_ln=False, alibi=False, target_tap="ffn", loss_scale_rule="inv_sqrt_dim", layer_norm_eps=1e-5,
               **_targets(fcfg))
    if name == "data2vec_audio":
        d = int(fcfg["encoder_embed_dim"])
        _need(not fcfg.get("layer_norm_first", False), "model.layer_norm_first", True,
              "pre-LN wav2vec 2.0 encoders are not represented by the twin (post-LN only)")
        _need(fcfg.get("extractor_mode", "default") == "layer_norm", "model.extractor_mode",
              fcfg.get("extractor_mode", "default"), "the twin's CNN has a LayerNorm after every conv "
              "(data2vec 1.0 speech uses layer_norm; 'default' is wav2vec 2.0's group norm)")
        _need(not fcfg.get("conv_bias", False), "model.conv_bias", True, "the twin's CNN convs have no bias")
        _need(fcfg.get("layer_type", "transformer") == "transformer", "model.layer_type", fcfg.get("layer_type"),
              "only transformer blocks (no conformer / adapter layers)")
        _need(fcfg.get("activation_fn", "gelu") == "gelu", "model.activation_fn", fcfg.get("activation_fn"),
              "the twin's FFN uses GELU")
        depth = int(fcfg.get("pos_conv_depth", 1))
        _need(depth > 1, "model.pos_conv_depth", depth,
              "a single weight-normed positional conv without LayerNorm (wav2vec 2.0's) has no place in the twin, "
              "whose conv positions are pos_conv_depth x [conv, LayerNorm, GELU] (data2vec 1.0 uses 5)")
        _need(not fcfg.get("conv_pos_batch_norm", False), "model.conv_pos_batch_norm", True,
              "a BatchNorm before the positional conv")
        out.update(modality="audio", depth=int(fcfg["encoder_layers"]), embed_dim=d,
                   num_heads=int(fcfg["encoder_attention_heads"]),
                   mlp_ratio=_mlp_ratio(int(fcfg["encoder_ffn_embed_dim"]), d, "model.encoder_ffn_embed_dim"),
                   dropout=float(fcfg.get("dropout", 0.1)), layerdrop=float(fcfg.get("encoder_layerdrop", 0.0)),
                   conv_feature_layers=parse_feature_spec(fcfg["conv_feature_layers"], "model.conv_feature_layers"),
                   conv_pos_width=max(3, int(fcfg["conv_pos"]) // depth),  # fairseq's per-layer kernel
                   conv_pos_groups=int(fcfg["conv_pos_groups"]), conv_pos_depth=depth, head_layers=1)
        return out
    t = fcfg.get("transformer")
    if not isinstance(t, dict) or not isinstance(t.get("encoder"), dict):
        raise ImportRefused("model.transformer.encoder is missing from the file's config")
    e = t["encoder"]
    d = int(e["embed_dim"])
    _need(not e.get("normalize_before", False), "model.transformer.encoder.normalize_before", True,
          "pre-LN text encoders are not represented by the twin (post-LN RoBERTa only)")
    _need(bool(e.get("learned_pos", True)), "model.transformer.encoder.learned_pos", e.get("learned_pos"),
          "the twin's text embedding has learned positions")
    for f, want in (("no_scale_embedding", True), ("layernorm_embedding", True),
                    ("no_token_positional_embeddings", False), ("adaptive_input", False)):
        _need(bool(t.get(f, want)) == want, f"model.transformer.{f}", t.get(f), f"the twin's text embedding needs {want}")
    _need(t.get("activation_fn", "relu") == "gelu", "model.transformer.activation_fn", t.get("activation_fn"),
          "the twin's FFN uses GELU")
    heads = int(fcfg.get("head_layers", 1))
    _need(heads in (1, 2), "model.head_layers", heads,
          "the training model's head is Linear(D, D) or Linear(D, 2D) -> GELU -> Linear(2D, D)")
    out.update(modality="text", depth=int(e["layers"]), embed_dim=d, num_heads=int(e["attention_heads"]),
               mlp_ratio=_mlp_ratio(int(e["ffn_embed_dim"]), d, "model.transformer.encoder.ffn_embed_dim"),
               dropout=float(t.get("dropout", 0.1)), layerdrop=float(e.get("layerdrop", 0.0)),
               max_positions=int(t["max_source_positions"]), head_layers=heads, pad_token_id=1)
    return out


# (modality, regex on the full fairseq name, plain name; {0}, {1} = the groups); first match wins.
# Block tensors (`layers.{i}.*`) go through _LAYER; q/k/v are concatenated after the loop.
_ENC = {"audio": r"^encoder\.", "text": r"^encoder\.sentence_encoder\."}
_RULES = [
    ("audio", r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", "local.cnn.convs.{0}.weight"),
    ("audio", r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", "local.cnn.norms.{0}.{1}"),
    ("audio", r"^layer_norm\.(weight|bias)$", "local.norm.{0}"),
    ("audio", r"^post_extract_proj\.(weight|bias)$", "local.proj.{0}"),
    ("audio", r"^encoder\.pos_conv\.(\d+)\.0\.(weight|bias)$", "positions.convs.{0}.{1}"),
    ("audio", r"^encoder\.layer_norm\.(weight|bias)$", "context_norm.{0}"),
    ("text", r"^encoder\.sentence_encoder\.embed_tokens\.weight$", "local.tokens.weight"),
    ("text", r"^encoder\.sentence_encoder\.embed_positions\.weight$", "local.positions.weight"),
    ("text", r"^encoder\.sentence_encoder\.layernorm_embedding\.(weight|bias)$", "local.norm.{0}"),
]
# the student's training-only tensors (the training model's names; `--to-run`)
_EXTRA = [
    ("audio", r"^mask_emb$", "mask_emb"),
    ("audio", r"^final_proj\.(weight|bias)$", "decoder.{0}"),
    # head_layers 1: regression_head.0 -> decoder.* (a Linear); 2: .0/.2 -> decoder.0/.2 (a Sequential)
    ("text", r"^encoder\.regression_head\.(\d+)\.(weight|bias)$", "decoder.{0}.{1}"),
]


def _rename(sd: dict, mcfg: dict, where: str, prefix: str) -> tuple[dict, dict]:
    """fairseq 1.0 names (each prefixed with `prefix`: "" for the student) -> (plain tensors fp32,
    the training-only tensors {mask_emb, decoder.*} fp32).  Unknown names are refused."""
    mod = mcfg["modality"]
    out, extra, qkv = {}, {}, {}
    for k, v in sd.items():
        if not torch.is_tensor(v) or _SKIP.search(k):
            continue
        v, full = v.float(), prefix + k
        if mt := re.match(_ENC[mod] + r"layers\.(\d+)\.(.+)\.(weight|bias)$", full):
            i, part, t = mt.groups()
            if mq := re.match(r"^self_attn\.([qkv])_proj$", part):
                qkv.setdefault((int(i), t), {})[mq.group(1)] = v
                continue
            if part in _LAYER:
                out[f"blocks.{i}.{_LAYER[part]}.{t}"] = v
                continue
        for dest, rules in ((out, _RULES), (extra, _EXTRA)):
            name = next((tmpl.format(*mt.groups()) for m, pat, tmpl in rules
                         if m == mod and (mt := re.match(pat, full))), None)
            if name is not None:
                break
        if name is None:
            raise ImportRefused(f"{where}: parameter {full!r} has no place in the plain twin of this data2vec 1.0 "
                                f"{mod} config")
        if name == "local.positions.weight":
            v = text_positions(v, mcfg, f"{where}: {full}")
        elif mod == "text" and name.startswith("decoder.") and mcfg["head_layers"] == 1:
            name = "decoder." + name.split(".", 2)[2]
        dest[name] = v
    for (i, t), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ImportRefused(f"{where}: layer {i} lacks self_attn.{{q,k,v}}_proj.{t} (has {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([parts["q"], parts["k"], parts["v"]])  # plain rows [q; k; v]
    return out, extra


def split_state(ck: dict, where: str, with_teacher: bool = True):
    """-> (ModelConfig dict, student plain tensors, EMA plain tensors or None (also when not
    with_teacher: the EMA is then not read at all), the EMA's key in ckpt["model"], the student's
    training-only tensors {mask_emb, decoder.*})."""
    mcfg = model_config(ck["cfg"]["model"])
    sd = dict(ck["model"])
    ema_key = "_ema" if mcfg["modality"] == "audio" else "encoder._ema"
    ema = sd.pop(ema_key, None)
    sd.pop("_ema", None)
    if mcfg["modality"] == "text":
        emb = sd.get("encoder.sentence_encoder.embed_tokens.weight")
        if emb is None:
            raise ImportRefused(f"{where}: no encoder.sentence_encoder.embed_tokens.weight (not a data2vec_text "
                               f"checkpoint?)")
        mcfg["vocab_size"] = int(emb.shape[0])
    student, extra = _rename(sd, mcfg, f"{where} (student)", "")
    teacher = None
    if with_teacher and isinstance(ema, dict) and ema:
        # the EMA module wraps the transformer (speech, ema_transformer_only) or the sentence
        # encoder (text); a whole-model EMA (ema_transformer_only=False) already has full names
        inner = "encoder." if mcfg["modality"] == "audio" else "encoder.sentence_encoder."
        whole = any(k.startswith(("encoder.", "feature_extractor.")) for k in ema)
        teacher, _ = _rename(ema, mcfg, f"{where} ({ema_key} teacher)", "" if whole else inner)
    return mcfg, student, teacher, ema_key, extra
