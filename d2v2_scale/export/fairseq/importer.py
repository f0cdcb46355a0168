"""fairseq data2vec 2.0 checkpoints (Data2VecMultiModel: image, audio, text) -> the plain-twin export.
(data2vec 1.0 speech / text files, `data2vec_audio` / `data2vec_text`: importer1.py maps their
names; config validation, teacher composition, writing and `--to-run` are shared, here.)

The released files (`base_imagenet.pt`, `base_libri.pt`, `nlp_base.pt`, ...) are fairseq trainer
checkpoints (spec section 13):
    ckpt["cfg"]["model"]   Data2VecMultiConfig as a plain dict (depth, embed_dim, modalities, ...)
    ckpt["model"]          student state dict (fp16 for the v2 recipes) + "_ema": {name: fp32}
The output is what `d2v2-export` writes (consolidate.write_export): model.safetensors (fp32,
plain-twin names, model/plain.py) + config.json (every ModelConfig field + "d2v2_export"
provenance), plus the fairseq dictionary `dict.txt` for text models.

Reading is safe: `torch.load(weights_only=True)` with an explicit allow-list (the numpy scalar
types fairseq's meters and trainer state pickle); any other global is refused by name.  The
audio `feature_encoder_spec` (a Python expression in fairseq, which `eval`s it) is parsed by a
tiny evaluator of int/tuple/list literals, `+` and `*`.  Everything the twin cannot express is
refused with the config field that says so; every size comes from the file's config.

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

import ast
import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch

from ..consolidate import FORMAT, FORMAT_VERSION, ExportError, plain_keys, write_export

DICT = "dict.txt"
MODELS1 = ("data2vec_audio", "data2vec_text")  # fairseq cfg.model._name of the data2vec 1.0 models (importer1.py)
MODALITIES = ("IMAGE", "AUDIO", "TEXT")
# Decoder, target-model and other-modality tensors are pretraining-only or unused by the encoder.
_IGNORED = re.compile(r"^(shared_decoder\.|recon_proj\.|modality_encoders\.\w+\.(decoder\.|encoder_mask$|alibi_bias$))")


class ImportRefused(ExportError):
    """A fairseq checkpoint (or a config field of it) that the plain twin cannot represent."""


# ---------------------------------------------------------------------------------------------
# reading the file safely
# ---------------------------------------------------------------------------------------------


def _allowed_globals() -> list:
    """numpy scalars and dtypes: fairseq pickles meter values and trainer state as numpy scalars.
    Files written under numpy 1.x name them `numpy.core.multiarray.*` (numpy 2: `numpy._core`):
    both names are allowed, for the same two reconstruction functions."""
    import numpy as np

    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma
    allowed = [np.dtype, np.ndarray]
    for fn in (ma.scalar, ma._reconstruct):
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            allowed.append((fn, f"{mod}.{fn.__name__}"))
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    return allowed


def load_fairseq(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with the numpy allow-list; never arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch: "... Unsupported global: GLOBAL posix.getcwd was not an allowed global ..."
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = m.group(1) if m else str(e).splitlines()[0]
        raise ImportRefused(f"{path}: refusing to unpickle {what}: only tensors, plain containers and numpy "
                            f"scalars are allowed (a checkpoint that needs more is not a plain fairseq "
                            f"data2vec 2.0 file, or it is not safe to load)") from None
    except Exception as e:  # noqa: BLE001 - any other failure means a damaged or foreign file
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("cfg"), dict):
        raise ImportRefused(f"{path}: not a fairseq hydra-era checkpoint (needs dict keys 'cfg' and 'model')")
    if not isinstance(ck["cfg"].get("model"), dict):
        raise ImportRefused(f"{path}: cfg.model is missing or not a dict")
    return ck


def parse_feature_spec(spec: str, where: str = "model.modalities.audio.feature_encoder_spec") -> list[list[int]]:
    """fairseq's feature_encoder_spec (2.0) / conv_feature_layers (1.0), e.g. "[(512, 10, 5)] +
    [(512, 3, 2)] * 4", -> [[C, k, s], ...].  Only int / tuple / list literals, `+` (list
    concatenation) and `*` (list repetition).  `where`: the config field, for the error message."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add) and isinstance(a, list) and isinstance(b, list):
                return a + b
            if isinstance(node.op, ast.Mult) and isinstance(a, list) and type(b) is int and 0 <= b <= 64:
                return a * b
        raise ImportRefused(f"{where} {spec!r}: not a list of (channels, kernel, stride) literals "
                            f"(only ints, tuples, lists, + and * are read; it is never evaluated)")

    try:
        tree = ast.parse(str(spec), mode="eval")
    except SyntaxError:
        raise ImportRefused(f"{where} {spec!r}: not a Python list expression") from None
    layers = ev(tree.body)
    if not isinstance(layers, list) or not layers or not all(
            isinstance(t, list) and len(t) == 3 and all(type(v) is int and v > 0 for v in t) for t in layers):
        raise ImportRefused(f"{where} {spec!r}: expected a non-empty list of (channels, kernel, stride) triples")
    return layers


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def _need(cond: bool, field: str, value, why: str) -> None:
    if not cond:
        raise ImportRefused(f"{field}={value!r} is not supported: {why}")


def model_config(fcfg: dict) -> dict:
    """cfg["model"] of a fairseq checkpoint -> the ModelConfig fields (a dict) of the plain twin."""
    from ...config import ModelConfig

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
          "the twin's targets are FFN outputs before the residual (spec section 3)")
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
    # spec 12 D1-D3/D7 fields, where this version of ModelConfig has them: the file's values
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


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def _rename(sd: dict, mod: str, mcfg: dict, where: str, bare_blocks: bool = False) -> dict[str, torch.Tensor]:
    """fairseq names -> plain names (fp32).  Unknown names are refused; pretraining-only ones skipped."""
    from ...twins.encoder import sincos_2d

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
        elif mod == "IMAGE" and (mt := re.match(r"^local_encoder\.proj\.(weight|bias)$", r)):
            out[f"local.proj.{mt.group(1)}"] = v
        elif mod == "IMAGE" and r == "extra_tokens":
            out["extra_tokens"] = v
        elif mod == "IMAGE" and r in ("fixed_positional_encoder.positions", "positional_encoder.pos_embed"):
            want = sincos_2d(mcfg["embed_dim"], mcfg["image_size"] // mcfg["patch_size"])[None]
            if tuple(v.shape) != tuple(want.shape) or not torch.allclose(v, want, atol=2e-3):
                raise ImportRefused(f"{where}: {k} is not the 2-D sin-cos table of embed_dim "
                                    f"{mcfg['embed_dim']} on a {mcfg['image_size'] // mcfg['patch_size']}^2 grid "
                                    f"(the twin recomputes it; learned or other positions are not supported)")
        elif mod == "AUDIO" and (mt := re.match(r"^local_encoder\.conv_layers\.(\d+)\.0\.weight$", r)):
            out[f"local.cnn.convs.{mt.group(1)}.weight"] = v
        elif mod == "AUDIO" and (mt := re.match(r"^local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r)):
            out[f"local.cnn.norms.{mt.group(1)}.{mt.group(2)}"] = v
        elif mod == "AUDIO" and (mt := re.match(r"^project_features\.([12])\.(weight|bias)$", r)):
            out[f"local.{'norm' if mt.group(1) == '1' else 'proj'}.{mt.group(2)}"] = v
        elif mod == "AUDIO" and (mt := re.match(r"^relative_positional_encoder\.(\d+)\.0\.(weight|bias)$", r)):
            out[f"positions.convs.{int(mt.group(1)) - 1}.{mt.group(2)}"] = v
        elif mod == "AUDIO" and r == "alibi_scale":
            h = mcfg["num_heads"]
            flat = v.reshape(-1)
            if flat.numel() not in (1, h):
                raise ImportRefused(f"{where}: {k} has shape {tuple(v.shape)}: per-layer ALiBi scales "
                                    f"(learned_alibi_scale_per_layer) are not supported")
            out["alibi_scale"] = flat.expand(h).clone()
        elif mod == "TEXT" and r == "local_encoder.embed_tokens.weight":
            out["local.tokens.weight"] = v
        elif mod == "TEXT" and r == "local_encoder.embed_positions.weight":
            out["local.positions.weight"] = text_positions(v, mcfg, f"{where}: {k}")
        elif mod == "TEXT" and (mt := re.match(r"^local_encoder\.layernorm_embedding\.(weight|bias)$", r)):
            out[f"local.norm.{mt.group(1)}"] = v
        else:
            raise ImportRefused(f"{where}: parameter {k!r} has no place in the plain twin of this config")
    return out


def text_positions(v: torch.Tensor, mcfg: dict, where: str) -> torch.Tensor:
    """fairseq's learned position table [pad + 1 + max_positions, D] -> the twin's [max_positions, D]:
    fairseq numbers real tokens from row pad + 1 (rows 0..pad unused), the twin from row 0."""
    first, n = mcfg["pad_token_id"] + 1, mcfg["max_positions"]
    if v.shape[0] < first + n:
        raise ImportRefused(f"{where} has {v.shape[0]} rows, fewer than pad+1+max_source_positions = {first + n}")
    return v[first:first + n].clone()


def _check(tensors: dict, expected: dict, where: str) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ImportRefused(f"{where}: {unknown[:5]} do not exist in the plain twin of the file's config "
                            f"(depth/prenet_depth in cfg.model disagree with the tensors?)")
    bad = [(k, tuple(v.shape), expected[k]) for k, v in tensors.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise ImportRefused(f"{where}: shape mismatch {bad[:3]} (name, file, twin of the file's config)")


def read_dictionary(path: str | os.PathLike) -> list[str]:
    """fairseq dict.txt: one `symbol count [#fairseq:overwrite]` per line -> the symbols after the
    4 specials, in index order (read as fairseq's Dictionary does: gpt2_tokenizer.fairseq_symbols)."""
    from ..gpt2_tokenizer import SPECIALS, fairseq_symbols

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--dict {path} does not exist")
    return fairseq_symbols(path.read_text(encoding="utf-8"), f"--dict {path}")[len(SPECIALS):]


def import_state(ck: dict, which: str = "teacher", where: str = "checkpoint"):
    """-> (plain tensors fp32, ModelConfig dict, from_student names)."""
    if which not in ("teacher", "student"):
        raise ExportError(f"which must be 'teacher' or 'student', not {which!r}")
    fcfg = ck["cfg"]["model"]
    if fcfg.get("_name") in MODELS1:  # data2vec 1.0 speech / text: importer1.py
        from .data2vec1 import split_state1

        mcfg, student, teacher, ema_key, _ = split_state1(ck, where, with_teacher=which == "teacher")
    else:
        mcfg = model_config(fcfg)
        mod = mcfg["modality"].upper()
        sd = dict(ck["model"])
        ema, ema_key = sd.pop("_ema", None), "_ema"
        if mod == "TEXT":
            emb = sd.get(f"modality_encoders.{mod}.local_encoder.embed_tokens.weight")
            if emb is None:
                raise ImportRefused(f"{where}: no modality_encoders.TEXT.local_encoder.embed_tokens.weight")
            mcfg["vocab_size"] = int(emb.shape[0])
            mcfg["pad_token_id"] = 1  # fairseq Dictionary: <s>=0 <pad>=1 </s>=2 <unk>=3
        student = _rename(sd, mod, mcfg, f"{where} (student)")
        teacher = None
        if which == "teacher" and isinstance(ema, dict) and ema:
            teacher = _rename(ema, mod, mcfg, f"{where} (_ema teacher)", bare_blocks=True)
    expected = plain_keys(_ns(mcfg))
    _check(student, expected, f"{where} (student)")
    from_student: list[str] = []
    if which == "student":
        tensors = student
    else:
        if not teacher:
            raise ImportRefused(f"{where}: the file has no EMA teacher (model[{ema_key!r}] is missing or empty; "
                                f"released audio files and files saved after fairseq's remove_pretraining_modules "
                                f"have none): import the student with --which student")
        tensors = teacher
        _check(tensors, expected, f"{where} ({ema_key} teacher)")
        for k in sorted(set(expected) - set(tensors)):
            if k in student:
                tensors[k] = student[k]
                from_student.append(k)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ImportRefused(f"{where}: the {which} lacks {missing[:5]} (the file's config asks for them)")
    return {k: v.contiguous() for k, v in tensors.items()}, mcfg, from_student


def decoder_state(ck: dict, mcfg: dict, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The student's convolutional decoder -> the training model's names (fp32):
        M decoder.blocks.{i}.0.{weight,bias} -> decoder.convs.{i}.*   (Conv, then LN/GELU: no params)
        M decoder.proj.{weight,bias}         -> decoder.proj.*
        M decoder.proj.{0,2}.*               -> decoder.proj.{0,2}.*   (text: 2-layer head, spec D1)
    data2vec 1.0 files: the regression head -> decoder.* (speech final_proj: a Linear; text
    regression_head.{0,2}: decoder.{0,2}) and speech's mask_emb -> mask_emb (importer1.py).
    Refused: no decoder in the file (released audio files may be stripped), or a 2-layer head when
    this version's ModelConfig has no decoder_projection_layers (the training decoder then ends
    in one Linear)."""
    if mcfg.get("variant") == "data2vec1":
        # data2vec 1.0: the regression head (final_proj / regression_head) + speech's mask_emb
        from .data2vec1 import split_state1

        extra = split_state1(ck, where, with_teacher=False)[4]
        if not any(k.startswith("decoder.") for k in extra):
            raise ImportRefused(f"{where}: the file has no regression head (final_proj / encoder.regression_head: "
                                f"removed by fairseq's remove_pretraining_modules?): nothing to continue "
                                f"pretraining from")
        return extra
    mod = mcfg["modality"].upper()
    M = f"modality_encoders.{mod}.decoder."
    dec = (ck["cfg"]["model"]["modalities"][mcfg["modality"]] or {}).get("decoder") or {}
    n_proj = int(dec.get("projection_layers", 1))
    if n_proj > 1 and "decoder_projection_layers" not in mcfg:
        raise ImportRefused(f"model.modalities.{mcfg['modality']}.decoder.projection_layers={n_proj} is not "
                            f"supported: the training decoder ends in one Linear (the text recipe's 2-layer "
                            f"projection, spec D1, is not implemented in this version)")
    for f in ("add_positions_masked", "add_positions_all"):
        if dec.get(f):
            raise ImportRefused(f"model.modalities.{mcfg['modality']}.decoder.{f}=True is not supported: the "
                                f"decoder adds no positions")
    out = {}
    for k, v in ck["model"].items():
        if not k.startswith(M):
            continue
        r = k[len(M):]
        if mt := re.match(r"^blocks\.(\d+)\.0\.(weight|bias)$", r):
            out[f"decoder.convs.{mt.group(1)}.{mt.group(2)}"] = v.float()
        elif mt := re.match(r"^proj\.((?:\d+\.)?(?:weight|bias))$", r):  # proj.* or the D1 head's proj.{0,2}.*
            out[f"decoder.proj.{mt.group(1)}"] = v.float()
        else:
            raise ImportRefused(f"{where}: decoder parameter {k!r} has no place in the training decoder")
    if not out:
        raise ImportRefused(f"{where}: the file has no decoder ({M}*): nothing to continue pretraining from")
    return out


def _ns(mcfg: dict):
    import types

    return types.SimpleNamespace(**mcfg)


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, which: str = "teacher",
                      dict_path: str | os.PathLike | None = None, force: bool = False, gpt2_bpe=None) -> dict:
    """fairseq checkpoint `src` -> export folder `out` (as d2v2-export writes).  Returns config.json.
    `gpt2_bpe`: a folder with the GPT-2 BPE encoder.json + vocab.bpe the dictionary's ids come from;
    stored next to dict.txt (checked first: export/gpt2_tokenizer.py) so `--format hf` writes a tokenizer."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    ck = load_fairseq(src)
    tensors, mcfg, from_student = import_state(ck, which, str(src))
    extra = {}
    if mcfg["modality"] == "text":
        if dict_path is None:
            raise ExportError(f"{src} is a text model: pass its fairseq dictionary with --dict dict.txt "
                              f"(token ids mean nothing without it)")
        syms = read_dictionary(dict_path)
        # ids: 4 specials (<s> <pad> </s> <unk>), the dictionary, then <mask> (and padding to a multiple)
        if not 4 + len(syms) <= mcfg["vocab_size"] <= 4 + len(syms) + 8:
            raise ExportError(f"--dict {dict_path}: {len(syms)} symbols + 4 specials do not fit the model's "
                              f"{mcfg['vocab_size']} token embeddings: not this model's dictionary")
        extra[DICT] = Path(dict_path).read_bytes()
        if gpt2_bpe is not None:
            from ..gpt2_tokenizer import ENCODER, MERGES, gpt2_tokenizer_files

            # refusals (not GPT-2 ids, tokens no exact tokenizer maps) before anything is written
            gpt2_tokenizer_files(extra[DICT].decode("utf-8"), gpt2_bpe, mcfg["vocab_size"], mcfg["max_positions"],
                                 where=f"--dict {dict_path}")
            extra |= {f: (Path(gpt2_bpe) / f).read_bytes() for f in (ENCODER, MERGES)}
    elif gpt2_bpe is not None:
        raise ExportError(f"--gpt2-bpe is for text models; {src} is a {mcfg['modality']} model")
    hist = ck.get("optimizer_history") or [{}]
    step = hist[-1].get("num_updates", 0) if isinstance(hist[-1], dict) else 0
    mcfg["d2v2_export"] = {
        "format": FORMAT, "version": FORMAT_VERSION, "which": which, "checkpoint": str(Path(src).resolve()),
        "step": int(step), "seed": None, "preset": None, "modality": mcfg["modality"], "source": "fairseq",
        "from_student": from_student, "with_decoder": False,
        "dictionary": DICT if extra else None,
        "fp16_student": any(torch.is_tensor(v) and v.dtype == torch.float16 for v in ck["model"].values()),
    }
    write_export(out, tensors, mcfg, force=force, extra_files=extra)
    return mcfg


# ---------------------------------------------------------------------------------------------
# --to-run: continued pretraining from a fairseq checkpoint
# ---------------------------------------------------------------------------------------------

RUN_IMPORT = "imported"  # <run>/checkpoints/imported/: what `d2v2-train --resume auto` starts from
RUN_WEIGHTS = "weights.safetensors"
RUN_META = "import.json"
RUN_YAML = "import.yaml"
# the ModelConfig fields that decide parameter names and shapes: the run must use the file's
STRUCTURE = ("modality", "depth", "prenet_depth", "embed_dim", "num_heads", "mlp_ratio", "pre_ln", "alibi",
             "image_size", "patch_size", "in_chans", "conv_feature_layers", "conv_pos_width", "conv_pos_groups",
             "conv_pos_depth", "vocab_size", "max_positions", "decoder_dim", "decoder_kernel", "decoder_layers",
             "decoder_groups", "decoder_residual", "variant", "head_layers")


def import_to_run(src: str | os.PathLike, run_dir: str | os.PathLike, preset: str, force: bool = False) -> dict:
    """Write <run_dir>/checkpoints/imported/ (student + decoder, EMA teacher, in the training model's
    full, unsharded names) and <run_dir>/import.yaml (the preset + the file's model config).
    `d2v2-train --config <run_dir>/import.yaml --output-dir <run_dir> --resume auto` then starts
    from these weights under any ZeRO/TP/PP layout, with a fresh optimizer and LR schedule."""
    import json
    import shutil
    import tempfile

    import yaml
    from safetensors.torch import save_file

    from ...config import ConfigError, load_preset
    from ...twins import mapping
    from ...train.checkpoint import complete_checkpoints

    run = Path(run_dir)
    ckdir = run / "checkpoints"
    if ckdir.is_dir() and complete_checkpoints(ckdir):
        raise ExportError(f"{run} already has training checkpoints ({complete_checkpoints(ckdir)[-1].name}): "
                          f"--resume auto would continue from those; give a new run dir")
    dest = ckdir / RUN_IMPORT
    if dest.exists() and not force:
        raise ExportError(f"{dest} already exists; pass --force to replace it")
    ck = load_fairseq(src)
    student, mcfg, _ = import_state(ck, "student", str(src))
    teacher, _, from_student = import_state(ck, "teacher", str(src))
    model = {k: v for k, v in mcfg.items()}
    try:
        cfg = load_preset(preset)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if cfg.model.modality != mcfg["modality"]:
        raise ExportError(f"--preset {preset} is a {cfg.model.modality} preset; the file holds a "
                          f"{mcfg['modality']} model")
    if cfg.model.variant != mcfg["variant"]:  # the masks, EMA schedule and optimizer belong to the objective
        raise ExportError(f"--preset {preset} is a {cfg.model.variant} preset; the file holds a {mcfg['variant']} "
                          f"model (use a {'d2v1-' if mcfg['variant'] == 'data2vec1' else ''}"
                          f"{mcfg['modality']}-* preset)")
    for k, v in model.items():
        setattr(cfg.model, k, v)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ExportError(f"the file's model config does not validate with --preset {preset}: {e}") from None
    heads = mcfg["num_heads"]
    tensors = {f"student.{k}": v for k, v in mapping.plain_to_megatron(student, heads).items()}
    tensors.update({f"student.{k}": v for k, v in decoder_state(ck, mcfg, str(src)).items()})
    tensors.update({f"teacher.{k}": v for k, v in mapping.plain_to_megatron(teacher, heads).items()})
    hist = ck.get("optimizer_history") or [{}]
    meta = {"source": str(Path(src).resolve()), "model": model,
            "format": "fairseq-data2vec1" if mcfg["variant"] == "data2vec1" else "fairseq-data2vec2",
            "fairseq_updates": int(hist[-1].get("num_updates", 0)) if isinstance(hist[-1], dict) else 0,
            "teacher_from_student": from_student}
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{RUN_IMPORT}.tmp-", dir=ckdir))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / RUN_WEIGHTS))
        (tmp / RUN_META).write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    y = run / RUN_YAML
    y.write_text(yaml.safe_dump({"preset": preset, "model": model}, sort_keys=False))
    return meta


def load_run_import(ckpt_dir: Path, cfg, student, teacher) -> dict[str, torch.Tensor] | None:
    """Trainer side, before ZeRO/PP touch the modules: load <ckpt_dir>/imported/ into the freshly
    built (TP-sharded, whole) student and teacher.  -> the teacher's fp32 weights as this TP rank
    holds them (the EMA masters, see EmaTeacher.set_masters), or None when there is no import."""
    import json

    from safetensors.torch import load_file

    from ...twins import mapping

    folder = Path(ckpt_dir) / RUN_IMPORT
    if not (folder / RUN_META).is_file():
        return None
    meta = json.loads((folder / RUN_META).read_text())
    for k in STRUCTURE + ("decoder_projection_layers",):
        if not hasattr(cfg.model, k):
            continue
        want, have = meta["model"].get(k), getattr(cfg.model, k)
        if (list(map(list, want)) if k == "conv_feature_layers" else want) != \
                (list(map(list, have)) if k == "conv_feature_layers" else have):
            raise ValueError(f"{folder} holds a model with model.{k}={want!r} but this run has {have!r}: "
                             f"start it with --config {folder.parent.parent / RUN_YAML}")
    sd = load_file(str(folder / RUN_WEIGHTS))
    mapping.load_full_state_dict(student, {k[8:]: v for k, v in sd.items() if k.startswith("student.")})
    own = set(mapping.clean_state_dict(teacher.state_dict()))
    mapping.load_full_state_dict(teacher, {k[8:]: v for k, v in sd.items()
                                           if k.startswith("teacher.") and k[8:] in own})
    return {n: p.detach().float().clone() for n, p in teacher.named_parameters()}


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="d2v2-import", description="Import a fairseq data2vec checkpoint "
                                "(2.0 Data2VecMultiModel: image, audio, text; 1.0 data2vec_audio, data2vec_text) "
                                "as a plain-PyTorch export (docs/EXPORT.md)")
    p.add_argument("checkpoint", help="fairseq checkpoint .pt (e.g. base_imagenet.pt, base_libri.pt, nlp_base.pt, "
                                      "or a data2vec 1.0 speech / text file)")
    p.add_argument("--out", help="output folder (model.safetensors + config.json [+ dict.txt])")
    p.add_argument("--to-run", help="instead: a new training output dir that `d2v2-train --resume auto` continues "
                                    "from (student, EMA teacher, decoder or 1.0 head; fresh optimizer and LR "
                                    "schedule)")
    p.add_argument("--preset", help="with --to-run: the training preset (data, optimizer, parallelism) to use")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="the EMA teacher (default: model['_ema'], 1.0 text model['encoder._ema']) or the "
                        "student (what fairseq fine-tunes)")
    p.add_argument("--dict", dest="dict_path", help="text models: the fairseq dict.txt (stored in the export)")
    p.add_argument("--gpt2-bpe", metavar="DIR", default=None,
                   help="text models: a folder with fairseq's GPT-2 BPE encoder.json and vocab.bpe (the BPE the "
                        "dictionary's ids come from), stored with dict.txt; --format hf then writes a tokenizer")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--format", choices=["plain", "hf"], default="plain",
                   help="with --out: plain (default) or hf, a Hugging Face transformers folder for the models a "
                        "transformers class computes exactly (2.0 text -> RobertaModel, 1.0 speech -> "
                        "Data2VecAudioModel, 1.0 text -> Data2VecTextModel; docs/EXPORT.md)")
    a = p.parse_args(argv)
    if bool(a.out) == bool(a.to_run):
        p.error("give exactly one of --out DIR and --to-run RUN_DIR")
    if a.to_run:
        if a.gpt2_bpe:
            p.error("--gpt2-bpe goes with --out (it is stored with dict.txt for the tokenizer of --format hf)")
        if not a.preset:
            p.error("--to-run needs --preset (e.g. image-base)")
        try:
            meta = import_to_run(a.checkpoint, a.to_run, a.preset, force=a.force)
        except ExportError as e:
            print(f"d2v2-import: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {Path(a.to_run) / 'checkpoints' / RUN_IMPORT} (student, EMA teacher, "
              f"{'regression head' if meta['format'] == 'fairseq-data2vec1' else 'decoder'} of "
              f"{a.checkpoint}, fairseq update {meta['fairseq_updates']}); continue pretraining with:\n"
              f"  d2v2-train --config {Path(a.to_run) / RUN_YAML} --output-dir {a.to_run} --resume auto "
              f"--data.manifest YOUR/manifest.json")
        return 0
    try:
        if a.format == "hf":
            return _import_hf(a)
        cfg = import_checkpoint(a.checkpoint, a.out, which=a.which, dict_path=a.dict_path, force=a.force,
                                gpt2_bpe=a.gpt2_bpe)
    except ExportError as e:
        print(f"d2v2-import: error: {e}", file=sys.stderr)
        return 2
    prov = cfg["d2v2_export"]
    extra = f"; from the student: {len(prov['from_student'])} tensors" if prov["from_student"] else ""
    print(f"imported the {a.which} of {a.checkpoint} ({cfg['modality']}, depth {cfg['depth']} + prenet "
          f"{cfg['prenet_depth']}, D {cfg['embed_dim']}, update {prov['step']}"
          f"{', fp16 student cast to fp32' if prov['fp16_student'] else ''}) to {a.out}{extra}")
    return 0


def _import_hf(a) -> int:
    """d2v2-import --format hf: the plain import into a temporary folder, then export/hf.py on it."""
    import sys
    import tempfile

    from ..hf import export_hf

    if Path(a.out).exists() and not a.force:
        raise ExportError(f"{a.out} already exists; pass --force to replace it")
    Path(a.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    # refusals (HFRefused) come from export_hf, before anything is written to a.out
    with tempfile.TemporaryDirectory(prefix=".d2v2-import-", dir=Path(a.out).resolve().parent) as tmp:
        import_checkpoint(a.checkpoint, Path(tmp) / "plain", which=a.which, dict_path=a.dict_path,
                          gpt2_bpe=a.gpt2_bpe)
        hcfg = export_hf(Path(tmp) / "plain", a.out, which=a.which, force=a.force,
                         warn=lambda m: print(f"d2v2-import: warning: {m}", file=sys.stderr))
    print(f"imported the {a.which} of {a.checkpoint} as {hcfg['architectures'][0]} to {a.out} "
          f"(AutoModel.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
