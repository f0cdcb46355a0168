"""fairseq data2vec 2.0 checkpoints (Data2VecMultiModel: image, audio, text) -> the plain-twin export.
(data2vec 1.0 speech / text files, `data2vec_audio` / `data2vec_text`: data2vec1.py maps their
names; config validation, teacher composition, writing and `--to-run` are shared, here.)

The released files (`base_imagenet.pt`, `base_libri.pt`, `nlp_base.pt`, ...) are fairseq trainer
checkpoints (docs/REFERENCE.md §1.11):
    ckpt["cfg"]["model"]   Data2VecMultiConfig as a plain dict (depth, embed_dim, modalities, ...)
    ckpt["model"]          student state dict (fp16 for the v2 recipes) + "_ema": {name: fp32}
The output is what `d2v2-export` writes (consolidate.write_export): model.safetensors (fp32,
plain-twin names, twins/encoder.py) + config.json (every ModelConfig field + "d2v2_export"
provenance), plus the fairseq dictionary `dict.txt` for text models.

Reading is safe: `torch.load(weights_only=True)` with an explicit allow-list (the numpy scalar
types fairseq's meters and trainer state pickle); any other global is refused by name.  The
audio `feature_encoder_spec` (a Python expression in fairseq, which `eval`s it) is parsed by a
tiny evaluator of int/tuple/list literals, `+` and `*`.  Everything the twin cannot express is
refused with the config field that says so; every size comes from the file's config.

The key mapping of each objective: data2vec2.py, data2vec1.py; the shared reading and
checking: common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

from ...config import ConfigError, load_preset
from ...objectives import DATA2VEC1, objective_of
from ...train.checkpoint import complete_checkpoints
from ...train.imported_run import RUN_IMPORT, RUN_META, RUN_WEIGHTS, RUN_YAML
from ...twins import mapping
from ..consolidate import FORMAT, FORMAT_VERSION, ExportError, plain_keys, write_export
from ..gpt2_tokenizer import ENCODER, MERGES, SPECIALS, fairseq_symbols, gpt2_tokenizer_files
from ..hf import export_hf
from . import data2vec1
from .common import ImportRefused, _check, load_fairseq
from .data2vec2 import _rename, model_config


DICT = "dict.txt"




# ---------------------------------------------------------------------------------------------
# reading the file safely
# ---------------------------------------------------------------------------------------------








# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------






# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------








def read_dictionary(path: str | os.PathLike) -> list[str]:
    """fairseq dict.txt: one `symbol count [#fairseq:overwrite]` per line -> the symbols after the
    4 specials, in index order (read as fairseq's Dictionary does: gpt2_tokenizer.fairseq_symbols)."""

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--dict {path} does not exist")
    return fairseq_symbols(path.read_text(encoding="utf-8"), f"--dict {path}")[len(SPECIALS):]


def import_state(ck: dict, which: str = "teacher", where: str = "checkpoint"):
    """-> (plain tensors fp32, ModelConfig dict, from_student names)."""
    if which not in ("teacher", "student"):
        raise ExportError(f"which must be 'teacher' or 'student', not {which!r}")
    fcfg = ck["cfg"]["model"]
    if fcfg.get("_name") in DATA2VEC1.fairseq_models:  # data2vec 1.0 speech / text: data2vec1.py

        mcfg, student, teacher, ema_key, _ = data2vec1.split_state(ck, where, with_teacher=which == "teacher")
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
                # a copy: `.float()` returned the file's own tensor for an fp32 student (fairseq
                # --amp / fp32 runs), so the teacher entry would share memory with the student's
                # (and with the student of another import_state call on the same file), which
                # safetensors refuses to write and an in-place EMA step would corrupt
                tensors[k] = student[k].clone()
                from_student.append(k)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ImportRefused(f"{where}: the {which} lacks {missing[:5]} (the file's config asks for them)")
    return {k: v.contiguous() for k, v in tensors.items()}, mcfg, from_student


def decoder_state(ck: dict, mcfg: dict, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The student's convolutional decoder -> the training model's names (fp32):
        M decoder.blocks.{i}.0.{weight,bias} -> decoder.convs.{i}.*   (Conv, then LN/GELU: no params)
        M decoder.proj.{weight,bias}         -> decoder.proj.*
        M decoder.proj.{0,2}.*               -> decoder.proj.{0,2}.*   (text: 2-layer head, docs/REFERENCE.md §1.10 D1)
    data2vec 1.0 files: the regression head -> decoder.* (speech final_proj: a Linear; text
    regression_head.{0,2}: decoder.{0,2}) and speech's mask_emb -> mask_emb (data2vec1.py).
    Refused: no decoder in the file (released audio files may be stripped), or a 2-layer head when
    this version's ModelConfig has no decoder_projection_layers (the training decoder then ends
    in one Linear)."""
    if objective_of(mcfg) is DATA2VEC1:
        # data2vec 1.0: the regression head (final_proj / regression_head) + speech's mask_emb

        extra = data2vec1.split_state(ck, where, with_teacher=False)[4]
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
                            f"projection, docs/REFERENCE.md §1.10 D1, is not implemented in this version)")
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



def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses shared storage;
    a mapping may return views of one file tensor under two names): the later ones copied."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.contiguous()
        key = (v.untyped_storage().data_ptr(), v.device)
        if key in seen and v.numel():
            v = v.clone()
            key = (v.untyped_storage().data_ptr(), v.device)
        seen.add(key)
        out[k] = v
    return out


def import_to_run(src: str | os.PathLike, run_dir: str | os.PathLike, preset: str, force: bool = False) -> dict:
    """Write <run_dir>/checkpoints/imported/ (student + decoder, EMA teacher, in the training model's
    full, unsharded names) and <run_dir>/import.yaml (the preset + the file's model config).
    `d2v2-train --config <run_dir>/import.yaml --output-dir <run_dir> --resume auto` then starts
    from these weights under any ZeRO/TP/PP layout, with a fresh optimizer and LR schedule."""

    import yaml
    from safetensors.torch import save_file

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
                          f"model (use a {objective_of(mcfg).preset_prefix}"
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
            "format": objective_of(mcfg).import_format,
            "fairseq_updates": int(hist[-1].get("num_updates", 0)) if isinstance(hist[-1], dict) else 0,
            "teacher_from_student": from_student}
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{RUN_IMPORT}.tmp-", dir=ckdir))
    try:
        save_file(_unshared(tensors), str(tmp / RUN_WEIGHTS))
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




def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="d2v2-import", description="Import a fairseq data2vec checkpoint "
                                "(data2vec 2.0 Data2VecMultiModel: image, audio, text; data2vec 1.0 data2vec_audio, "
                                "data2vec_text) as a plain-PyTorch export (docs/EXPORT.md). data2vec-aqc's "
                                "checkpoints (a fork of fairseq) are not read: train data2vec-aqc here (preset aqc-*) "
                                "and export it with d2v2-export")
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
