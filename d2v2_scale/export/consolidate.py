"""Reassemble a training checkpoint into the plain twin's state dict (twins/encoder.py).

Input: a checkpoint folder `<output_dir>/checkpoints/step_XXXXXXXX/` (see train/checkpoint.py),
or an output dir / checkpoints dir (the newest COMPLETE checkpoint is taken).

Teacher (default), from the `client_rank{r:05d}.pt` files' EMA masters (fp32):
    1. per pipeline stage p and TP rank t: under ZeRO-3 concatenate the flat shards of DP ranks
       0..dp-1 (global rank r = t + tp * (d + dp * p)), drop the padding, reshape to
       meta["shape"]; otherwise take DP rank 0's full (TP-local) tensor;
    2. merge TP shards along each parameter's partition dim (twins/mapping.py);
    3. join pipeline stages (blocks carry global names; replicated tensors must agree);
    4. rename to plain names (mapping.megatron_to_plain) and check them against PlainEncoder.
    The teacher owns only part of the encoder for audio (no CNN front end) and text (no
    embeddings): those tensors come from the student (the teacher reads the student's local
    features during training, so the composed encoder is exactly what produced the targets).
    The export's config lists them under d2v2_export.from_student.

Student (`which="student"`), from DeepSpeed's files: ZeRO-1/2/3 -> deepspeed.utils.zero_to_fp32
per model-parallel rank (its consolidation works only inside one TP rank and stage), ZeRO-0 ->
the module states (`mp_rank_{m:02d}_model_states.pt`, m = pp_rank * tp + tp_rank); then the same
TP merge, stage join and renaming.

Output folder (written under a temp name, then renamed; never over an existing export without
force=True):
    model.safetensors   plain-twin tensors, fp32 (+ decoder.* with with_decoder=True)
    config.json         the ModelConfig fields PlainEncoder reads (flat) + "d2v2_export" (provenance)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

from ..train.checkpoint import complete_checkpoints, damage, newest_intact
from ..train.safe_load import UnsafeCheckpointError, load
from ..twins import mapping
from ..twins.beit import PlainBeitEncoder
from ..twins.encoder import PlainEncoder

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "d2v2-plain-encoder"
FORMAT_VERSION = 1


STUDENT_ONLY = ("mask_emb",)  # student tensors outside encoder.* / decoder.* that the plain twin does not use
# ... and student-only parts, by name prefix: data2vec-aqc's quantizer, project_q and contr_proj
STUDENT_ONLY_PREFIXES = ("aqc.",)


class ExportError(ValueError):
    """A checkpoint the exporter does not understand, or an output it must not overwrite."""


# ---------------------------------------------------------------------------------------------
# finding and reading a checkpoint
# ---------------------------------------------------------------------------------------------


def stderr_warning(msg: str) -> None:
    """The export tools' default `warn`: one line on stderr."""
    print(f"warning: {msg}", file=sys.stderr)


def resolve_checkpoint(path: str | os.PathLike, warn=None) -> Path:
    """A checkpoint folder, or the newest intact one under an output dir / checkpoints dir.

    Under a run dir, newer checkpoints that are damaged (a file their COMPLETE marker lists is
    missing or has another size: train/checkpoint.py `damage`) are skipped, as `--resume auto`
    skips them, each through `warn(message)` (default: one line on stderr).  A checkpoint folder
    named explicitly is taken even when damaged, with that warning: the export reads only some
    of its files (the teacher: the client files), and one it cannot read is named then."""

    warn = warn or stderr_warning
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is not a folder: give a checkpoint folder (…/checkpoints/step_XXXXXXXX) "
                          f"or a training output dir")
    if _TAG.match(p.name) or any(p.glob("client_rank*.pt")):
        if not (p / MARKER).is_file():
            raise ExportError(f"checkpoint {p} has no {MARKER} marker: its save was interrupted or it is "
                              f"not a d2v2 checkpoint; export an older complete checkpoint")
        why = damage(p)
        if why is not None:
            warn(f"checkpoint {p} is damaged: {why}; exporting what it holds (or give the run dir: its newest "
                 f"intact checkpoint is taken)")
        return p
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    done = complete_checkpoints(ck)
    if not done:
        found = [c for c in ck.iterdir() if c.is_dir() and _TAG.match(c.name)]
        what = f"{len(found)} incomplete (no {MARKER} marker)" if found else "no step_XXXXXXXX folders"
        raise ExportError(f"no complete checkpoint under {ck}: {what}")
    intact = newest_intact(done, warn)
    if intact is not None:
        return intact
    raise ExportError(f"no intact checkpoint under {ck}: all {len(done)} complete ones are damaged (see the "
                      f"warnings above); export one of them by name to take what it holds")


def read_marker(folder: Path) -> dict:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {folder / MARKER}: {e}") from None
    need = ["step", "world_size", "zero_stage", "tp", "pp", "dp", "modality", "config"]
    missing = [k for k in need if k not in info]
    if missing:
        raise ExportError(f"{folder / MARKER} lacks {missing}: written by an older harness; cannot export it")
    if "model" not in info["config"]:
        raise ExportError(f"{folder / MARKER}: its config has no 'model' section")
    tp, dp, pp, world = (int(info[k]) for k in ("tp", "dp", "pp", "world_size"))
    if tp * dp * pp != world:
        raise ExportError(f"{folder / MARKER}: world size mismatch: world_size={world} but tp x dp x pp = "
                          f"{tp} x {dp} x {pp} = {tp * dp * pp}")
    return info


def model_namespace(info: dict) -> types.SimpleNamespace:
    return types.SimpleNamespace(**info["config"]["model"])


def plain_encoder(mcfg):
    """The plain twin of a config: PlainEncoder (twins/encoder.py), or PlainBeitEncoder
    (twins/beit.py) for data2vec 1.0 vision (model.image_block=beit).  Both files import
    only torch, so an export stays usable with torch + safetensors alone."""
    if getattr(mcfg, "image_block", "vit2") == "beit":

        return PlainBeitEncoder(mcfg)

    return PlainEncoder(mcfg)


def plain_keys(mcfg) -> dict[str, tuple]:
    """{plain name: shape} of the plain twin of mcfg, built on the meta device (no memory)."""
    with torch.device("meta"):
        enc = plain_encoder(mcfg)
    return {k: tuple(v.shape) for k, v in enc.state_dict().items()}


def _load(path: Path) -> dict:
    try:  # weights only: a run folder from elsewhere must not run code (train/safe_load.py)
        return load(path, map_location="cpu")
    except UnsafeCheckpointError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# teacher: client_rank files
# ---------------------------------------------------------------------------------------------


def client_files(folder: Path, world: int) -> list[Path]:
    files = [folder / f"client_rank{r:05d}.pt" for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"checkpoint {folder} was written by {world} processes but lacks "
                          f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}: it is damaged or copied "
                          f"incompletely")
    extra = sorted(p.name for p in folder.glob("client_rank*.pt") if p not in files)
    if extra:
        raise ExportError(f"checkpoint {folder}: world size mismatch: {MARKER} says {world} processes but "
                          f"there are also {', '.join(extra[:8])}")
    return files


def join_stages(per_stage: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """Pipeline stages -> one state dict.  Stages name blocks globally, so this is a union; a
    tensor several stages hold (replicated, e.g. the ALiBi scale) must be equal on all of them."""
    full: dict[str, torch.Tensor] = {}
    for p, sd in enumerate(per_stage):
        for k, v in sd.items():
            if k in full and not torch.equal(full[k], v):
                raise ExportError(f"{where}: {k!r} is held by several pipeline stages with different values "
                                  f"(stage {p} differs): the stages went out of step")
            full.setdefault(k, v)
    return full


def teacher_state(folder: Path, info: dict) -> dict[str, torch.Tensor]:
    """Full fp32 teacher tensors (megatron names, TP-merged, PP-joined) from the client_rank files."""
    files = client_files(folder, int(info["world_size"]))
    return join_stages([_teacher_stage(folder, info, files, p) for p in range(int(info["pp"]))],
                       f"{folder} (teacher)")


def _teacher_stage(folder: Path, info: dict, files: list[Path], p: int) -> dict[str, torch.Tensor]:
    """One pipeline stage's teacher, TP-merged.  Megatron's rank order (tp fastest, then dp, then
    pp): global rank r = t + tp * (d + dp * p)."""
    tp, dp = int(info["tp"]), int(info["dp"])
    zero3 = int(info["zero_stage"]) == 3
    per_tp = []
    for t in range(tp):
        shards: dict[str, list] = {}
        metas: dict[str, dict] = {}
        for d in range(dp if zero3 else 1):
            r = t + tp * (d + dp * p)
            c = _load(files[r])
            tch = c.get("teacher") if isinstance(c, dict) else None
            if not isinstance(tch, dict) or "master" not in tch:
                raise ExportError(f"{files[r]} has no teacher masters ('teacher'/'master'): not a d2v2 client file")
            if bool(tch.get("zero3")) != zero3:
                raise ExportError(f"{files[r]}: teacher zero3={tch.get('zero3')} but {MARKER} says "
                                  f"zero_stage={info['zero_stage']}")
            if d == 0:
                names = list(tch["master"])
            elif list(tch["master"]) != names:
                raise ExportError(f"{files[r]}: teacher parameter names differ from rank {files[r - tp * d].name}'s")
            for name, v in tch["master"].items():
                if zero3:
                    meta = tch.get("meta", {}).get(name)
                    if meta is None:
                        raise ExportError(f"{files[r]}: ZeRO-3 teacher shard {name!r} has no meta (shape/numel)")
                    if v.numel() != meta["partition_numel"]:
                        raise ExportError(f"{files[r]}: shard {name!r} has {v.numel()} elements, meta says "
                                          f"{meta['partition_numel']}")
                    metas[name] = meta
                    shards.setdefault(name, []).append(v.reshape(-1).float())
                else:
                    shards[name] = [v.float()]
            del c, tch
        full = {}
        for name, parts in shards.items():
            if zero3:
                meta = metas[name]
                flat = torch.cat(parts)
                if flat.numel() < meta["numel"]:
                    raise ExportError(f"{folder}: teacher {name!r}: {dp} shards hold {flat.numel()} elements, "
                                      f"the parameter has {meta['numel']} (dp mismatch?)")
                full[name] = flat[: meta["numel"]].reshape(meta["shape"]).clone()
            else:
                full[name] = parts[0]
        per_tp.append(full)
    for t in range(1, tp):
        if set(per_tp[t]) != set(per_tp[0]):
            raise ExportError(f"{folder}: TP rank {t}'s teacher names differ from TP rank 0's")
    return mapping.merge_tp_shards(per_tp)


# ---------------------------------------------------------------------------------------------
# student: DeepSpeed's files
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _weights_only_zero_to_fp32():
    """deepspeed.utils.zero_to_fp32 reads each file with torch.load(weights_only=False): while it
    runs, its module's `torch` is a view of torch whose `load` is the allowlisted weights-only one
    (train/safe_load.py), so a payload in a downloaded run's file is refused, naming the file."""
    from deepspeed.utils import zero_to_fp32

    class _SafeTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, weights_only=None, **kw):  # noqa: ARG004 - always weights only
            try:
                # the file itself, not the temporary link to it, in the message
                return load(Path(f).resolve() if isinstance(f, (str, os.PathLike)) else f,
                            map_location=map_location, **kw)
            except UnsafeCheckpointError as e:
                raise ExportError(str(e)) from None

    saved = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()
    try:
        yield
    finally:
        zero_to_fp32.torch = saved


def _zero_to_fp32_tp_rank(folder: Path, t: int) -> dict:
    """deepspeed.utils.zero_to_fp32 over the files of one model-parallel rank t = pp_rank * tp +
    tp_rank (it cannot merge TP shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mine = sorted(folder.glob(f"*mp_rank_{t:02d}_*_states.pt"))
    if not any(p.name.endswith("_optim_states.pt") for p in mine):
        raise ExportError(f"{folder}: no DeepSpeed optimizer files for TP rank {t} "
                          f"(*mp_rank_{t:02d}_optim_states.pt): the student cannot be reassembled")
    with tempfile.TemporaryDirectory(prefix="d2v2-export-") as tmp:
        tag = Path(tmp) / "tp"
        tag.mkdir()
        for p in mine:
            (tag / p.name).symlink_to(p.resolve())
        # its log lines (stdout) and tqdm bars (stderr) are nothing a user can act on; errors raise
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                _weights_only_zero_to_fp32():
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tp")
            except ExportError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"{folder}: DeepSpeed's zero_to_fp32 failed on TP rank {t}: "
                                  f"{type(e).__name__}: {e}") from None
    return {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}


def student_state(folder: Path, info: dict) -> dict[str, torch.Tensor]:
    """Full fp32 student tensors (megatron names, TP-merged, PP-joined, encoder + decoder).
    DeepSpeed names its files by model-parallel rank: pp_rank * tp + tp_rank."""
    tp = int(info["tp"])
    return join_stages([_student_stage(folder, info, p * tp) for p in range(int(info["pp"]))],
                       f"{folder} (student)")


def _student_stage(folder: Path, info: dict, first_mp: int) -> dict[str, torch.Tensor]:
    tp, stage = int(info["tp"]), int(info["zero_stage"])
    per_tp = []
    for t in range(first_mp, first_mp + tp):
        if stage == 0:
            f = folder / f"mp_rank_{t:02d}_model_states.pt"
            if not f.is_file():
                raise ExportError(f"checkpoint {folder} lacks DeepSpeed's {f.name} (model-parallel rank {t})")
            mod = _load(f).get("module") or {}
            sd = {k: v.float() for k, v in mod.items() if torch.is_tensor(v)}
        else:
            sd = _zero_to_fp32_tp_rank(folder, t)
        per_tp.append(mapping.clean_state_dict(sd))
    return mapping.merge_tp_shards(per_tp)


# ---------------------------------------------------------------------------------------------
# assembling the plain state dict
# ---------------------------------------------------------------------------------------------


def to_plain(full: dict, mcfg, expected: dict[str, tuple], where: str) -> dict[str, torch.Tensor]:
    enc = {k: v for k, v in full.items() if k.startswith("encoder.")}
    # mask_emb: data2vec 1.0 speech's training-only mask embedding (not part of the encoder)
    others = sorted(k for k in full if not k.startswith(("encoder.", "decoder.") + STUDENT_ONLY_PREFIXES)
                    and k not in STUDENT_ONLY)
    if others:
        raise ExportError(f"{where}: unknown parameter names {others[:5]} (neither encoder.* nor decoder.*)")
    plain = mapping.megatron_to_plain(enc, mcfg.num_heads)
    unknown = sorted(k for k in plain if k not in expected)
    if unknown:
        raise ExportError(f"{where}: unknown parameter names {unknown[:5]}: they have no place in the plain "
                          f"twin of this config (twins/encoder.py); the checkpoint and the exporter disagree")
    bad = [(k, tuple(v.shape), expected[k]) for k, v in plain.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise ExportError(f"{where}: shape mismatch for {bad[:3]} (name, checkpoint shape, plain-twin shape)")
    return plain


def assemble(folder: Path, info: dict, which: str = "teacher", with_decoder: bool = False,
             with_mask_emb: bool = False):
    """-> (tensors {plain name | decoder.* | mask_emb: fp32}, provenance dict).  with_mask_emb: add
    the student's learned mask embedding `mask_emb` [D] where the objective has one (data2vec 1.0
    speech, data2vec-aqc; the teacher never masks, so it always comes from the student): the
    reference fine-tunes with it (wav2vec 2.0 fine-tuning masks time spans with the pretrained
    mask_emb), so the HF export writes it as `masked_spec_embed`."""
    if which not in ("teacher", "student"):
        raise ExportError(f"which must be 'teacher' or 'student', not {which!r}")
    mcfg = model_namespace(info)
    expected = plain_keys(mcfg)
    from_student: list[str] = []
    student = None
    if which == "teacher":
        tensors = to_plain(teacher_state(folder, info), mcfg, expected, f"{folder} (teacher)")
        need = sorted(set(expected) - set(tensors))
        if need or with_decoder or with_mask_emb:
            student = student_state(folder, info)
            splain = to_plain(student, mcfg, expected, f"{folder} (student)")
            for k in need:
                if k in splain:
                    tensors[k] = splain[k]
                    from_student.append(k)
    else:
        student = student_state(folder, info)
        tensors = to_plain(student, mcfg, expected, f"{folder} (student)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ExportError(f"{folder}: the {which} lacks plain-twin tensors {missing[:5]}")
    if with_decoder:
        dec = {k: v for k, v in student.items() if k.startswith("decoder.")}
        if not dec:
            raise ExportError(f"{folder}: --with-decoder but the student has no decoder.* tensors")
        tensors.update(dec)
    if with_mask_emb and "mask_emb" in student:
        tensors["mask_emb"] = student["mask_emb"]
        if which == "teacher":
            from_student.append("mask_emb")
    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    prov = {"format": FORMAT, "version": FORMAT_VERSION, "which": which, "checkpoint": str(folder.resolve()),
            "step": int(info["step"]), "seed": info["config"].get("seed"), "preset": info.get("preset"), "modality": info["modality"],
            "zero_stage": int(info["zero_stage"]), "tp": int(info["tp"]), "dp": int(info["dp"]),
            "pp": int(info["pp"]), "from_student": from_student, "with_decoder": bool(with_decoder)}
    return tensors, prov


# ---------------------------------------------------------------------------------------------
# writing and loading an export
# ---------------------------------------------------------------------------------------------


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, which: str = "teacher",
                      with_decoder: bool = False, force: bool = False, warn=None) -> dict:
    """Export `src` (checkpoint folder or output dir) to the folder `out`.  Returns the config
    written (model fields + d2v2_export).  `warn(message)`: damaged checkpoints skipped or taken
    (resolve_checkpoint)."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    folder = resolve_checkpoint(src, warn)
    info = read_marker(folder)
    tensors, prov = assemble(folder, info, which, with_decoder)
    config = dict(info["config"]["model"])
    config["d2v2_export"] = prov
    write_export(out, tensors, config, force=force)
    return config


def write_export(out: str | os.PathLike, tensors: dict, config: dict, force: bool = False,
                 extra_files: dict[str, bytes] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write model.safetensors + config.json (+ extra_files {name: bytes}) to the folder `out`,
    under a temp name then renamed; an existing `out` only with force=True.  `metadata`: the
    safetensors header metadata (default: this project's format tag)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    prov = config["d2v2_export"]
    files = [WEIGHTS, CONFIG] + sorted(extra_files or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata or {"format": FORMAT, "which": prov["which"],
                                                                      "step": str(prov["step"])})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an export is an ordinary folder
        for f in files:
            os.chmod(tmp / f, 0o666 & ~umask)
        if out.exists():  # force: move the old one aside first, delete it once the new one is in place
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_export(path: str | os.PathLike, strict: bool = True):
    """-> (plain twin (PlainEncoder | PlainBeitEncoder) in eval mode, config dict, decoder tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    sd = load_file(str(path / WEIGHTS))
    dec = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    enc = plain_encoder(types.SimpleNamespace(**config))
    enc.load_state_dict({k: v for k, v in sd.items() if k not in dec}, strict=strict)
    return enc.eval(), config, dec
