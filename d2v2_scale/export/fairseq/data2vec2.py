"""fairseq data2vec 2.0 (Data2VecMultiModel: image, audio, text) -> the plain twin's config and names.

Key mapping (M = modality_encoders.<MOD>., P = prenet depth):
    blocks.{i}.*                           -> blocks.{P+i}.*   (qkv rows [q; k; v]: plain layout)
    M context_encoder.blocks.{j}.*         -> blocks.{j}.*
    M context_encoder.norm.*               -> context_norm.*
    image  M local_encoder.proj.*          -> local.proj.*;  M extra_tokens -> extra_tokens
           M fixed_positional_encoder.positions: checked against the twin's sin-cos table
    audio  M local_encoder.conv_layers.{i}.0.weight -> local.cnn.convs.{i}.weight
           M local_encoder.conv_layers.{i}.2.1.*    -> local.cnn.norms.{i}.*
           M project_features.{1,2}.*      -> local.norm.*, local.proj.*
           M relative_positional_encoder.{j+1}.0.* -> positions.convs.{j}.*
           M alibi_scale [1,1,H|1,1,1]     -> alibi_scale [H]
    text   M local_encoder.embed_tokens.weight      -> local.tokens.weight
           M local_encoder.embed_positions.weight   -> local.positions.weight = rows pad+1 ...
           M local_encoder.layernorm_embedding.*    -> local.norm.*
The EMA teacher (`_ema`) uses the same names (image: whole encoder; audio: no CNN front end) or,
for `ema_encoder_only` models (text), the bare block list `{i}.*`; what it lacks comes from the
student, as for the project's own teacher exports (`d2v2_export.from_student`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ...config import ModelConfig
from ...twins.encoder import sincos_2d
from .common import ImportRefused, _need, parse_feature_spec, text_positions

MODALITIES = ("IMAGE", "AUDIO", "TEXT")


# Decoder, target-model and other-modality tensors are pretraining-only or unused by the encoder.
_IGNORED = re.compile(r"^(shared_decoder\.|recon_proj\.|modality_encoders\.\w+\.(decoder\.|encoder_mask$|alibi_bias$))")


def model_config(fcfg: dict) -> dict:
    """cfg["model"] of a fairseq checkpoint -> the ModelConfig fields (a dict) of the plain twin."""

    name = fcfg.get("_name")
    _need(name in (None, "data2vec_multi"), "model._name", name,
          "the importer reads data2vec 2.0 (data2vec_multi) and data2vec 1.0 (data2vec_audio, data2vec_text) "
          "checkpoints")
    mod = fcfg.get("supported_modality")
    _need(mod in MODALITIES, "model.supported_modality", mod,
          f"the plain twin knows {', '.join(MODALITIES)} (a multi-modality model has none set)")
    mods = fcfg.get("modalities") or {}
    m = mods.get(mod.lower())
    if not isinstance(m, dict):
        raise ImportRefused(f"model.modalities.{mod.lower()} is missing from the file's config")
    pre = f"model.modalities.{mod.lower()}"
    d, eps = int(fcfg["embed_dim"]), float(fcfg.get("norm_eps", 1e-6))
    _need(not fcfg.get("layer_norm_first", False), "model.layer_norm_first", True,
          "pre-LN data2vec 2.0 models are not represented by the twin's importer (post-LN only)")
    _need(fcfg.get("norm_affine", True), "model.norm_affine", False, "the twin's LayerNorms have affine parameters")
    _need(not fcfg.get("end_of_block_targets", False), "model.end_of_block_targets", True,
          "the twin's targets are FFN outputs before the residual (docs/REFERENCE.md §1.3)")
    _need(not fcfg.get("batch_norm_target_layer", False), "model.batch_norm_target_layer", True,
          "the twin has instance/layer norm targets only")
    _need(int(m.get("num_extra_tokens", 0)) == (1 if mod == "IMAGE" else 0), f"{pre}.num_extra_tokens",
          m.get("num_extra_tokens"), "the twin has one CLS token for images and none for audio/text")
    _need(not m.get("learned_alibi", False), f"{pre}.learned_alibi", True, "a learned ALiBi bias table")
    _need(not m.get("learned_alibi_scale_per_layer", False), f"{pre}.learned_alibi_scale_per_layer", True,
          "per-layer ALiBi scales; the twin shares one per-head scale across all layers")
    alibi = bool(m.get("use_alibi_encoder", False))
    _need(not alibi or mod == "AUDIO", f"{pre}.use_alibi_encoder", True, "ALiBi is audio-only in the twin")
    dec = m.get("decoder") or {}
    out = dataclasses.asdict(ModelConfig())
    out.update(
        modality=mod.lower(), depth=int(fcfg["depth"]), prenet_depth=int(m.get("prenet_depth", 0)),
        embed_dim=d, num_heads=int(fcfg["num_heads"]), mlp_ratio=float(fcfg.get("mlp_ratio", 4.0)),
        dropout=float(fcfg.get("encoder_dropout", 0.0)), layer_norm_eps=eps,
        layerdrop=float(fcfg.get("layerdrop", 0.0)), pre_ln=False, alibi=alibi,
        clone_batch=int(fcfg.get("clone_batch", 1)), top_k_layers=int(fcfg["average_top_k_layers"]),
        instance_norm_target_layer=bool(fcfg.get("instance_norm_target_layer", False)),
        layer_norm_target_layer=bool(fcfg.get("layer_norm_target_layer", False)),
        instance_norm_targets=bool(fcfg.get("instance_norm_targets", False)),
        layer_norm_targets=bool(fcfg.get("layer_norm_targets", False)),
        loss_beta=float(fcfg.get("loss_beta", 0.0)),
        loss_scale=None if fcfg.get("loss_scale") is None else float(fcfg["loss_scale"]),
        cls_loss_weight=float(fcfg.get("cls_loss", 0.0)),
    )
    if dec:
        out.update(decoder_dim=int(dec["decoder_dim"]), decoder_kernel=int(dec["decoder_kernel"]),
                   decoder_layers=int(dec["decoder_layers"]), decoder_groups=int(dec["decoder_groups"]),
                   decoder_residual=bool(dec.get("decoder_residual", True)))
    # docs/REFERENCE.md §1.10 D1-D3/D7 fields, where this version of ModelConfig has them: the file's values
    if "decoder_projection_layers" in out and dec:
        out.update(decoder_projection_layers=int(dec.get("projection_layers", 1)),
                   decoder_projection_ratio=float(dec.get("projection_ratio", 2.0)))
    if "decoder_input_dropout" in out and dec:
        out["decoder_input_dropout"] = float(dec.get("input_dropout", 0.0))
    if "encoder_input_dropout" in out:  # fairseq: the context encoder's dropout; text: the embeddings'
        out["encoder_input_dropout"] = float(m.get("dropout", 0.1) if mod == "TEXT" else m.get("prenet_dropout", 0.0))
    if mod == "IMAGE":
        ped = int(m.get("embed_dim", d))
        _need(ped == d, f"{pre}.embed_dim", ped,
              f"a patch embedding with its own width (model.embed_dim={d}) has an extra Linear the twin lacks")
        _need(m.get("fixed_positions", True), f"{pre}.fixed_positions", False, "the twin adds sin-cos positions")
        out.update(image_size=int(m["input_size"]), patch_size=int(m["patch_size"]), in_chans=int(m["in_chans"]))
    elif mod == "AUDIO":
        _need(m.get("extractor_mode", "layer_norm") == "layer_norm", f"{pre}.extractor_mode",
              m.get("extractor_mode"), "the twin's CNN has a LayerNorm after every conv")
        _need(not m.get("conv_pos_pre_ln", False), f"{pre}.conv_pos_pre_ln", True,
              "a LayerNorm before the positional convs")
        # fairseq's project_features LayerNorm has torch's default eps; the twin uses layer_norm_eps
        _need(eps == 1e-5, "model.norm_eps", eps, "audio models need 1e-5 (the feature LayerNorm's eps)")
        depth = int(m["conv_pos_depth"])
        out.update(conv_feature_layers=parse_feature_spec(m["feature_encoder_spec"]),
                   conv_pos_width=max(3, int(m["conv_pos_width"]) // depth),  # fairseq's per-layer kernel
                   conv_pos_groups=int(m["conv_pos_groups"]), conv_pos_depth=depth)
    else:
        for f, want in (("learned_pos", True), ("no_scale_embedding", True), ("layernorm_embedding", True),
                        ("no_token_positional_embeddings", False)):
            _need(bool(m.get(f, want)) == want, f"{pre}.{f}", m.get(f), f"the twin's text embedding needs {want}")
        _need(int(m.get("prenet_depth", 0)) == 0, f"{pre}.prenet_depth", m.get("prenet_depth"),
              "text prenet blocks (with their own LayerNorm) have no place in the twin")
        _need(eps == 1e-5, "model.norm_eps", eps, "text models need 1e-5 (the embedding LayerNorm's eps)")
        out.update(max_positions=int(m["max_source_positions"]))
    return out


def _rename(sd: dict, mod: str, mcfg: dict, where: str, bare_blocks: bool = False) -> dict[str, torch.Tensor]:
    """fairseq names -> plain names (fp32).  Unknown names are refused; pretraining-only ones skipped."""

    P, M = mcfg["prenet_depth"], f"modality_encoders.{mod}."
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not torch.is_tensor(v) or _IGNORED.match(k):
            continue
        v = v.float()
        if bare_blocks and re.match(r"^\d+\.", k):
            i, rest = k.split(".", 1)
            out[f"blocks.{P + int(i)}.{rest}"] = v
            continue
        if k.startswith("modality_encoders.") and not k.startswith(M):
            continue  # another modality's encoder (multi-modality builds)
        if mt := re.match(r"^blocks\.(\d+)\.(.+)$", k):
            out[f"blocks.{P + int(mt.group(1))}.{mt.group(2)}"] = v
            continue
        if not k.startswith(M):
            raise ImportRefused(f"{where}: unknown parameter {k!r}: not a data2vec 2.0 {mod.lower()} encoder tensor")
        r = k[len(M):]
        if mt := re.match(r"^context_encoder\.blocks\.(\d+)\.(.+)$", r):
            out[f"blocks.{int(mt.group(1))}.{mt.group(2)}"] = v
        elif mt := re.match(r"^context_encoder\.norm\.(weight|bias)$", r):
            out[f"context_norm.{mt.group(1)}"] = v
        else:
            for pattern, place in _FRONT_END[mod]:
                if mt := re.match(pattern, r):
                    out.update(place(mt, v, mcfg, f"{where}: {k}"))
                    break
            else:
                raise ImportRefused(f"{where}: parameter {k!r} has no place in the plain twin of this config")
    return out


def _image_positions(mt, v, mcfg: dict, where: str) -> dict:
    """The fixed 2-D sin-cos table: checked, not imported (the twin recomputes it)."""
    g = mcfg["image_size"] // mcfg["patch_size"]
    want = sincos_2d(mcfg["embed_dim"], g)[None]
    if tuple(v.shape) != tuple(want.shape) or not torch.allclose(v, want, atol=2e-3):
        raise ImportRefused(f"{where} is not the 2-D sin-cos table of embed_dim {mcfg['embed_dim']} on a {g}^2 "
                            f"grid (the twin recomputes it; learned or other positions are not supported)")
    return {}


def _alibi_scale(mt, v, mcfg: dict, where: str) -> dict:
    h = mcfg["num_heads"]
    flat = v.reshape(-1)
    if flat.numel() not in (1, h):
        raise ImportRefused(f"{where} has shape {tuple(v.shape)}: per-layer ALiBi scales "
                            f"(learned_alibi_scale_per_layer) are not supported")
    return {"alibi_scale": flat.expand(h).clone()}


# fairseq modality -> [(name under modality_encoders.<MOD>. (regex), (match, tensor, model config,
# where) -> {twin name: tensor})]: each modality's front end, extra tokens and positions
_FRONT_END = {
    "IMAGE": [
        (r"^local_encoder\.proj\.(weight|bias)$", lambda mt, v, c, w: {f"local.proj.{mt.group(1)}": v}),
        (r"^extra_tokens$", lambda mt, v, c, w: {"extra_tokens": v}),
        (r"^(fixed_positional_encoder\.positions|positional_encoder\.pos_embed)$", _image_positions),
    ],
    "AUDIO": [
        (r"^local_encoder\.conv_layers\.(\d+)\.0\.weight$",
         lambda mt, v, c, w: {f"local.cnn.convs.{mt.group(1)}.weight": v}),
        (r"^local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$",
         lambda mt, v, c, w: {f"local.cnn.norms.{mt.group(1)}.{mt.group(2)}": v}),
        (r"^project_features\.([12])\.(weight|bias)$",
         lambda mt, v, c, w: {f"local.{'norm' if mt.group(1) == '1' else 'proj'}.{mt.group(2)}": v}),
        (r"^relative_positional_encoder\.(\d+)\.0\.(weight|bias)$",
         lambda mt, v, c, w: {f"positions.convs.{int(mt.group(1)) - 1}.{mt.group(2)}": v}),
        (r"^alibi_scale$", _alibi_scale),
    ],
    "TEXT": [
        (r"^local_encoder\.embed_tokens\.weight$", lambda mt, v, c, w: {"local.tokens.weight": v}),
        (r"^local_encoder\.embed_positions\.weight$",
         lambda mt, v, c, w: {"local.positions.weight": text_positions(v, c, w)}),
        (r"^local_encoder\.layernorm_embedding\.(weight|bias)$", lambda mt, v, c, w: {f"local.norm.{mt.group(1)}": v}),
    ],
}
