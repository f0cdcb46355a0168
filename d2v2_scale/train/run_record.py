"""The run record: what was trained, with which code, on which data, on which machines.

One entry per (re)start of a run, written by rank 0 when training starts (after any resume):
the resolved config and preset, the code's git commit and whether its tracked files were modified,
the versions of python / torch / deepspeed / megatron-core (and wandb when used), the world
layout (nodes, processes, GPUs, TP x PP x DP, ZeRO stage, engine, precision, global batch), and
every manifest's sha256 (the manifest holds its shards' hashes, so this pins the data) with the
mixture's shares and per-corpus sample counts (data/mixture.py).  When the run ends, the entry
gets an `end` section (step, why it stopped, samples per corpus so far).

RECORD_NAME in the run folder holds {"history": [entry, ...]}, oldest first, rewritten atomically
(temp name, then rename) so a crash never leaves half a file and the earlier entries survive.
The same entry goes to TensorBoard as text (tag run_record) and as hparams (the flattened config),
and to W&B as the run's config (trackers.py).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..data.manifest import MANIFEST_NAME, sha256_file, write_json_atomic
from ..data.mixture import mixture_description

RECORD_NAME = "run_record.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def code_version(root: Path | None = None) -> dict:
    """{"commit", "dirty"} of the git checkout the d2v2_scale package runs from, or {"git": why not}.

    `dirty`: tracked files differ from the commit (untracked files such as run folders do not
    count).  Never raises: no git, a package installed outside a checkout, or an unreadable
    repository all give a reason instead."""
    if root is None:
        root = Path(__file__).resolve().parent.parent.parent
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # `git status` must not take the index lock

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=True, env=env).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != root.resolve():  # e.g. a venv inside some other repository
            return {"git": "not a git checkout", "path": str(root)}
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "path": str(root)}
    except (OSError, subprocess.SubprocessError):
        return {"git": "not a git checkout", "path": str(root)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(with_wandb: bool = False) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": _version("deepspeed"),
           "megatron-core": _version("megatron-core"), "d2v2-scale": _version("d2v2-scale"),
           "cuda": torch.version.cuda, "platform": platform.platform()}
    if with_wandb:
        out["wandb"] = _version("wandb")
    return out


def world_layout(info, cfg, samples_per_step: int) -> dict:
    """Nodes, processes and devices, and how the model and data are split over them."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "0")) or 0)
    nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("GROUP_WORLD_SIZE") or 0) or \
        (max(info.world_size // local, 1) if local else 1)
    gpu = torch.cuda.is_available()
    return {"nodes": nodes, "processes": info.world_size, "gpus": info.world_size if gpu else 0,
            "device": torch.cuda.get_device_name(info.device) if gpu else "cpu", "launcher": info.launcher,
            "backend": info.backend, "tp": info.tp_size, "pp": info.pp_size, "dp": info.dp_size,
            "zero_stage": cfg.parallel.zero_stage, "engine": cfg.parallel.engine,
            "precision": "bf16" if cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and gpu)
            else "fp32", "global_batch": samples_per_step, "grad_accum": cfg.optim.grad_accum}


def data_record(cfg, loader=None) -> dict:
    """Every manifest with its sha256; for a mix also each corpus' share (mixture.py)."""
    paths = list(cfg.data.manifests) or ([cfg.data.manifest] if cfg.data.manifest else [])
    out = {"manifests": []}
    for p in paths:
        f = Path(p) / MANIFEST_NAME if Path(p).is_dir() else Path(p)
        try:
            m = json.loads(f.read_text())
            out["manifests"].append({"path": str(f.resolve()), "sha256": sha256_file(f),
                                     "modality": m.get("modality"), "rows": m.get("num_rows")})
        except (OSError, ValueError) as e:
            out["manifests"].append({"path": str(f), "error": f"{type(e).__name__}: {e}"})
    if loader is not None:
        mix = mixture_description(loader.shards, cfg, loader.sampler)
        if mix is not None:
            out["mixture"] = mix
    return out


def build_record(trainer, resumed_from: Path | None) -> dict:
    cfg = trainer.cfg
    rec = {"time": _now(), "event": "resume" if resumed_from else "start", "step": trainer.step,
           "resumed_from": str(resumed_from) if resumed_from else None, "preset": cfg.preset,
           "command": sys.argv, "code": code_version(), "versions": versions(cfg.logging.wandb),
           "world": world_layout(trainer.info, cfg, trainer.samples_per_step),
           "data": data_record(cfg, trainer.loader), "config": cfg.to_dict()}
    return rec


def read_history(out: Path) -> list[dict]:
    """The entries so far; a damaged file is moved aside (kept, not overwritten) and [] returned."""
    path = out / RECORD_NAME
    if not path.is_file():
        return []
    try:
        hist = json.loads(path.read_text())["history"]
        if isinstance(hist, list):
            return hist
    except (OSError, ValueError, KeyError, TypeError):
        pass
    aside = path.with_name(f"{RECORD_NAME}.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(path, aside)
    print(f"warning: {path} could not be read; kept as {aside}, a new history starts", file=sys.stderr, flush=True)
    return []


def write_history(out: Path, history: list[dict]) -> None:
    write_json_atomic(out / RECORD_NAME, {"history": history})


def append(out: Path, record: dict) -> list[dict]:
    """Add this (re)start's entry to the run folder's history; returns the history."""
    history = read_history(out) + [record]
    write_history(out, history)
    return history


def finish(out: Path, end: dict) -> None:
    """Close the newest entry with {time, step, stopped, ...}."""
    history = read_history(out)
    if history:
        history[-1]["end"] = dict(end, time=_now())
        write_history(out, history)


def flat_hparams(record: dict) -> dict:
    """TensorBoard hparams: the config as section.key -> int/float/bool/str, plus the layout and code."""
    out = {}

    def walk(prefix: str, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}{k}.", v)
            return
        key = prefix.rstrip(".")
        out[key] = x if isinstance(x, (bool, int, float, str)) else json.dumps(x)

    walk("", record["config"])
    walk("world.", record["world"])
    walk("code.", record["code"])
    return out


def to_tensorboard(writer, record: dict) -> None:
    """The entry as text (tag run_record, at the step training starts from) and as hparams."""
    from torch.utils.tensorboard.summary import hparams

    text = "    " + json.dumps(record, indent=1).replace("\n", "\n    ")  # markdown code block
    writer.add_text("run_record", text, record["step"])
    exp, ssi, sei = hparams(flat_hparams(record), {"loss/total": float("nan")})
    fw = writer._get_file_writer()
    for s in (exp, ssi, sei):
        fw.add_summary(s)
    writer.flush()


def corpus_counts(trainer) -> dict[str, int] | None:
    """A mix of corpora: samples consumed so far per corpus, summed over data-parallel ranks
    (a collective over the data-parallel group: every rank calls it); None for one corpus."""
    loader = trainer.loader
    if loader is None or getattr(loader, "corpus_samples", None) is None:
        return None
    import torch
    import torch.distributed as dist

    # a copy: on the host as_tensor would share the loader's array and the all-reduce would add into it
    t = torch.tensor(loader.corpus_samples, dtype=torch.int64, device=trainer.info.device)
    if dist.is_initialized() and trainer.info.dp_size > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(t, group=ps.get_data_parallel_group())
    counts = dict(zip(loader.shards.names, (int(x) for x in t.tolist())))
    trainer.corpus_samples = counts  # the newest totals, for the record's `end`
    return counts


def count_scalars(counts: dict[str, int] | None) -> dict[str, float]:
    """data/samples/NAME: a mix's samples drawn so far per corpus, as scalars for TensorBoard and W&B."""
    return {f"data/samples/{k}": float(v) for k, v in (counts or {}).items()}


def mix_text(counts: dict[str, int] | None) -> str:
    """" | mix NAME COUNT (PCT%) ..." for the log line; "" for one corpus."""
    if counts is None:
        return ""
    n = max(sum(counts.values()), 1)
    return " | mix" + "".join(f" {k} {v} ({100 * v / n:.1f}%)" for k, v in counts.items())
